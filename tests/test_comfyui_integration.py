"""The pack inside a real ComfyUI server: node list, templates, the no-diffusion example run through /prompt.

Needs a ComfyUI checkout in $COMFYUI_DIR (tested with 0.3.64) and a Python that can run it: $COMFYUI_PYTHON,
else this interpreter.  ComfyUI itself is not modified: the server runs with --base-directory in a temp
folder whose custom_nodes/ links to this repository, and the tiny models come in through an
extra_model_paths.yaml `ict:` entry.  Loopback only; --cpu.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
PACK = "ict-reward"
PROMPT = "a red cube on a wooden table"

SKIP_REASON = ("COMFYUI_DIR is not set: point it at a ComfyUI checkout (0.3.64 tested), and COMFYUI_PYTHON at a "
               "Python with its requirements, to run the ComfyUI integration test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, base: Path):
        self.url, self.proc, self.log, self.base = url, proc, log, base

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post_prompt(self, prompt: dict) -> str:
        data = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt refused the workflow: {e.read().decode()[:2000]}") from None

    def free(self) -> None:
        """What "Unload models" + "Free model and node cache" post; ComfyUI acts on it when its worker is idle."""
        req = urllib.request.Request(self.url + "/free", data=json.dumps({"unload_models": True, "free_memory": True})
                                     .encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()

    def wait_log(self, text: str, count: int, timeout: float = 60) -> None:
        end = time.time() + timeout
        while self.log.read_text().count(text) < count:
            assert time.time() < end, f"'{text}' did not appear {count}x in the log:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("status_str") in ("success", "error"):
                    return h[prompt_id]
            assert self.proc.poll() is None, f"ComfyUI exited:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no result for {prompt_id} in {timeout}s:\n{self.log.read_text()[-3000:]}")


def _write_images(folder: Path) -> list[Path]:
    """Three distinct 64x64 PNGs (same size, so ImageBatch does not resize them)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for i in range(3):
        y, x = np.mgrid[0:64, 0:64]
        base = np.stack([np.sin(x / (3 + 2 * i + c) + y / (5 + i)) for c in range(3)], -1)
        arr = np.clip((base * 0.4 + 0.5 + rng.normal(0, 0.1, base.shape)) * 255, 0, 255).astype(np.uint8)
        p = folder / f"image_{i + 1}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON)
    comfy = Path(COMFYUI_DIR)
    if not (comfy / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={comfy} has no main.py")
    tmp = tmp_path_factory.mktemp("comfyui")
    base = tmp / "base"
    for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    models = tmp / "ict_models"
    models.mkdir()
    shutil.copy(tiny_models.ict, models / "ict.safetensors")
    shutil.copy(tiny_models.hp, models / "hp.safetensors")
    (models / "readme.txt").write_text("not a model: must not be listed")
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(f"ict_reward_test:\n    base_path: {tmp}\n    ict: ict_models\n")
    images = _write_images(base / "input")
    port = _free_port()
    log = tmp / "comfyui.log"
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--extra-model-paths-config", str(yaml), "--disable-auto-launch"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=f, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, base)
    srv.images, srv.models = images, models
    try:
        end = time.time() + 240
        while True:
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > end:
                    pytest.fail(f"ComfyUI did not start:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rerank_api(prompt: str = PROMPT, score_by: str = "ict", hp: str = "none") -> dict:
    """API format of example_workflows/ict_rerank_images.json (same node ids and links)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "image_1.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "image_2.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "image_3.png"}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "5": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["3", 0]}},
        "6": {"class_type": "ICTModelLoader", "inputs": {"ict_model": "ict.safetensors", "hp_model": hp,
                                                         "precision": "auto", "device": "auto"}},
        "7": {"class_type": "ICTRerank", "inputs": {"model": ["6", 0], "images": ["5", 0], "prompt": prompt,
                                                    "score_by": score_by}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["7", 5]}},
    }


def test_api_workflow_matches_the_ui_example():
    ui = json.loads((ROOT / "example_workflows" / "ict_rerank_images.json").read_text())
    api = rerank_api()
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    links = {(str(a), ao, str(b)) for _, a, ao, b, _, _ in ui["links"]}
    api_links = {(v[0], v[1], k) for k, n in api.items() for v in n["inputs"].values() if isinstance(v, list)}
    assert links == api_links


def test_nodes_models_and_templates_are_listed(server):
    info = server.get("/object_info")
    for node in ("ICTModelLoader", "ICTScore", "ICTSelectBest", "ICTRerank"):
        assert node in info, f"{node} not registered; log:\n{server.log.read_text()[-3000:]}"
    ld = info["ICTModelLoader"]["input"]["required"]
    assert ld["ict_model"][0] == ["hp.safetensors", "ict.safetensors"]  # via extra_model_paths.yaml, .txt skipped
    assert ld["hp_model"][0] == ["none", "hp.safetensors", "ict.safetensors"]
    assert info["ICTScore"]["output_node"] is True and info["ICTSelectBest"]["output_node"] is True
    assert info["ICTSelectBest"]["output_name"] == ["images", "latent", "mask", "indices", "scores", "report"]
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK]) == ["ict_best_of_4_second_pass", "ict_rerank_images"]
    wf = server.get(f"/api/workflow_templates/{PACK}/ict_rerank_images.json")
    assert (wf if isinstance(wf, dict) else json.loads(wf))["nodes"]
    js = server.get("/extensions")
    assert any(p.endswith("/ict_scores.js") and PACK in p for p in js)


def test_rerank_example_runs_and_reuses_the_model(server, tiny_models):
    from PIL import Image

    from ict_core import Scorer, rank

    scorer = Scorer.load(tiny_models.ict, device="cpu")
    candidates = [PROMPT, "a blue ball in the grass", "three green leaves", "an old brass key"]
    prompt, expected = next(((p, o) for p in candidates
                             if (o := rank(scorer.score(server.images, p), "ict")) != [0, 1, 2]),
                            (PROMPT, [0, 1, 2]))  # prefer a prompt that really reorders the batch
    h = server.wait(server.post_prompt(rerank_api(prompt=prompt)))
    assert h["status"]["status_str"] == "success", h["status"]
    out = h["outputs"]
    table = out["7"]["ict_table"][0]
    order = [row["index"] for row in table["rows"]]
    assert order == expected
    assert [r["value"] for r in table["rows"]] == sorted((r["value"] for r in table["rows"]), reverse=True)
    report = out["9"]["text"][0]
    assert report == out["7"]["text"][0] and "rank" in report
    previews = out["8"]["images"]
    assert len(previews) == 3
    for item, i in zip(previews, order):
        q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item["subfolder"], "type": item["type"]})
        got = np.asarray(Image.open(__import__("io").BytesIO(server.get(f"/view?{q}"))).convert("RGB"))
        assert np.array_equal(got, np.asarray(Image.open(server.images[i]).convert("RGB"))), "previews out of order"

    # a second run with another prompt: the loader's output is cached, the model is not loaded again
    h2 = server.wait(server.post_prompt(rerank_api(prompt="a yellow cube")))
    assert h2["status"]["status_str"] == "success"
    log = server.log.read_text()
    assert log.count("ICT model loaded") == 1, log[-3000:]
    assert log.count("Requested to load RewardModules") == 1  # load_models_gpu: loaded once, then kept

    # "Unload models" + "Free memory" (what the UI buttons post): ComfyUI drops its caches and unloads the
    # model, which frees it (the pack keeps no copy); the next run loads it again
    server.free()
    server.wait_log("ICT model released", 1)
    h3 = server.wait(server.post_prompt(rerank_api(prompt=prompt)))
    assert h3["status"]["status_str"] == "success"
    assert [r["index"] for r in h3["outputs"]["7"]["ict_table"][0]["rows"]] == expected
    log = server.log.read_text()
    assert log.count("ICT model loaded") == 2, log[-3000:]
    assert log.count("Requested to load RewardModules") == 2


def test_bad_input_shows_one_clear_message(server):
    h = server.wait(server.post_prompt(rerank_api(prompt="   ")))
    assert h["status"]["status_str"] == "error"
    err = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"][0]
    assert err["node_type"] == "ICTRerank" and "prompt is empty" in err["exception_message"]
    assert "Traceback" not in err["exception_message"]
    h = server.wait(server.post_prompt(rerank_api(score_by="ict*hp")))
    err = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"][0]
    assert "needs an HP model" in err["exception_message"]
    # a wrong file is refused when queued (VALIDATE_INPUTS), so the cached model of the last run stays
    with pytest.raises(AssertionError, match="swap the two files"):
        server.post_prompt({**rerank_api(), "6": {"class_type": "ICTModelLoader", "inputs": {
            "ict_model": "hp.safetensors", "hp_model": "none", "precision": "auto", "device": "auto"}}})


def test_empty_prompt_ranks_by_hp_alone(server, tiny_models):
    """HP needs no prompt: the rerank example with an empty prompt and score_by hp runs, in HP order."""
    from ict_core import Scorer, rank

    expected = rank(Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu").score(server.images, None), "hp")
    h = server.wait(server.post_prompt(rerank_api(prompt="", score_by="hp", hp="hp.safetensors")))
    assert h["status"]["status_str"] == "success", h["status"]
    rows = h["outputs"]["7"]["ict_table"][0]["rows"]
    assert [r["index"] for r in rows] == expected and all(r["ict"] is None for r in rows)
