"""The pack inside a real ComfyUI server: node list, templates, the no-diffusion example run through /prompt.

Needs a ComfyUI checkout in $COMFYUI_DIR (tested with 0.3.64) and a Python that can run it: $COMFYUI_PYTHON,
else this interpreter.  ComfyUI itself is not modified: the server runs with --base-directory in a temp
folder whose custom_nodes/ links to this repository, and the tiny models come in through an
extra_model_paths.yaml `ict:` entry.  Loopback only; --cpu.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
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

# A random-weight SD1.5 checkpoint for the generation test (../shared/hosts/make_sd15_comfy.py makes one)
SD15_CKPT = os.environ.get("COMFYUI_SD15_CKPT") or os.environ.get("COMFYUI_CHECKPOINT") or (
    str(Path(COMFYUI_DIR) / "models" / "checkpoints" / "sd15_random.safetensors") if COMFYUI_DIR else None)
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

    def post_prompt(self, prompt: dict, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        if extra_data is not None:  # the ComfyUI page sends {"extra_pnginfo": {"workflow": ...}}
            body["extra_data"] = extra_data
        data = json.dumps(body).encode()
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

    def free_until(self, text: str, count: int) -> int:
        """/free, and once more if `text` has not reached `count` log lines within 15 s. ComfyUI 0.3.64's
        queue worker reads the /free flags once after a run, collects garbage, then waits on its queue without
        reading them again: a /free posted in that moment (as here, right after the run) waits for the next
        wake-up (a run, another /free, or 1000 s), for ComfyUI's own models as for ours. Returns the calls."""
        for calls in (1, 2):
            self.free()
            try:
                self.wait_log(text, count, timeout=15)
                return calls
            except AssertionError:
                if calls == 2:
                    raise
        return calls

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


@contextlib.contextmanager
def _running_server(tmp: Path, tiny_models, yaml_extra: str = "", args: tuple[str, ...] = ()):
    """A ComfyUI server (--cpu, plus `args`) on a free loopback port, its own base directory, the pack linked in."""
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
    yaml.write_text(f"ict_reward_test:\n    base_path: {tmp}\n    ict: ict_models\n{yaml_extra}")
    images = _write_images(base / "input")
    with serve(base, yaml, tmp / "comfyui.log", *args) as srv:
        srv.images, srv.models = images, models
        yield srv


@contextlib.contextmanager
def serve(base: Path, yaml: Path, log: Path, *args: str, env: dict | None = None):
    """ComfyUI's main.py (--cpu) on a free loopback port with this base directory and model paths;
    yields a Server once /system_stats answers, and stops the process afterwards."""
    port = _free_port()
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--extra-model-paths-config", str(yaml), "--disable-auto-launch", *args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=f, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, base)
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


def _need_comfyui() -> None:
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON)
    if not (Path(COMFYUI_DIR) / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    _need_comfyui()
    ckpts = Path(SD15_CKPT).parent if SD15_CKPT else None
    extra = f"    checkpoints: {ckpts}\n" if ckpts and ckpts.is_dir() else ""
    with _running_server(tmp_path_factory.mktemp("comfyui"), tiny_models, extra, keep_cache_args()) as srv:
        yield srv


def keep_cache_args() -> tuple[str, ...]:
    """ComfyUI 0.33+ drops cached node outputs (a loaded model among them) while less than max(2 GB, 10% of the
    RAM) is available, its default RAM-pressure cache; on a busy test machine that makes "loaded once" checks
    depend on other processes. A small headroom keeps the cache as a quieter machine would."""
    args = Path(COMFYUI_DIR, "comfy", "cli_args.py")
    return ("--cache-ram", "0.25") if args.is_file() and "--cache-ram" in args.read_text() else ()


def rerank_api(prompt: str = PROMPT, score_by: str = "ict", hp: str = "none",
               ict: str = "8y/ICT (download)") -> dict:
    """API format of example_workflows/ict_rerank_images.json (same node ids and links)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "image_1.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "image_2.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "image_3.png"}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "5": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["3", 0]}},
        "6": {"class_type": "ICTModelLoader", "inputs": {"ict_model": ict, "hp_model": hp,
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
    loader = next(n for n in ui["nodes"] if n["type"] == "ICTModelLoader")
    assert loader["widgets_values"][:2] == [api["6"]["inputs"]["ict_model"], api["6"]["inputs"]["hp_model"]]


def combo_options(spec) -> list:
    """A combo input's choices in /object_info: ["COMBO", {"options": [...]}] (V3) or [[...], {...}] (classic)."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_nodes_models_and_templates_are_listed(server):
    info = server.get("/object_info")
    for node in ("ICTModelLoader", "ICTScore", "ICTSelectBest", "ICTRerank"):
        assert node in info, f"{node} not registered; log:\n{server.log.read_text()[-3000:]}"
    ld = info["ICTModelLoader"]["input"]["required"]
    # the official releases first, then the files of models/ict via extra_model_paths.yaml (.txt skipped)
    assert combo_options(ld["ict_model"]) == ["8y/ICT (download)", "hp.safetensors", "ict.safetensors"]
    assert combo_options(ld["hp_model"]) == ["none", "8y/HP (download)", "hp.safetensors", "ict.safetensors"]
    assert info["ICTScore"]["output_node"] is True and info["ICTSelectBest"]["output_node"] is True
    assert info["ICTSelectBest"]["output_name"] == ["images", "latent", "mask", "indices", "scores", "report"]
    # the V1 view a saved workflow is matched against: input names and order as the classic nodes had them
    assert info["ICTSelectBest"]["input_order"] == {
        "required": ["model", "images", "prompt", "k", "score_by", "min_score"], "optional": ["latent", "mask"],
        "hidden": ["extra_pnginfo", "prompt", "unique_id"]}
    sb = info["ICTSelectBest"]["input"]["required"]
    assert sb["min_score"][1]["default"] == -1.0 and sb["prompt"][1]["tooltip"]
    assert "Traceback" not in server.log.read_text() and "Cannot import" not in server.log.read_text()
    templates = server.get("/workflow_templates")
    assert {"ict_best_of_4_second_pass", "ict_rerank_images"} <= set(templates[PACK])
    thumb = server.get(f"/api/workflow_templates/{PACK}/ict_rerank_images.jpg")  # where the template browser looks
    assert thumb[:3] == b"\xff\xd8\xff"
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
    server.free_until("ICT model released", 1)
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


def test_a_wrong_file_pick_keeps_the_loaded_model(server):
    """Picking an HP file as ict_model is refused when queued (validate_inputs), before ComfyUI drops the
    loader's cached output: the next good run uses the model loaded before, without loading it again."""
    api = rerank_api(prompt="a wrong pick in between")
    assert server.wait(server.post_prompt(api))["status"]["status_str"] == "success"
    loads = server.log.read_text().count("ICT model loaded")
    with pytest.raises(AssertionError, match="swap the two files"):
        server.post_prompt({**api, "6": {"class_type": "ICTModelLoader", "inputs": {
            "ict_model": "hp.safetensors", "hp_model": "none", "precision": "auto", "device": "auto"}}})
    again = rerank_api(prompt="after the wrong pick")
    assert server.wait(server.post_prompt(again))["status"]["status_str"] == "success"
    assert server.log.read_text().count("ICT model loaded") == loads, "the loaded model was dropped"


def test_save_image_after_a_cached_ict_node_writes_each_images_own_scores(server):
    """ComfyUI takes ICT Rerank from its cache when only a Save Image downstream changes: the images it saves
    still carry their own ict_reward records (the /prompt hook adds the records the node wrote before), also
    for an API client that sends no extra_data."""
    from ict_core import metadata

    def saved(h, node):
        return [server.base / "output" / i["subfolder"] / i["filename"] for i in h["outputs"][node]["images"]]

    api = rerank_api(prompt="saved after a cached rerank")
    api["10"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "first"}}
    first = server.wait(server.post_prompt(api, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}}))
    assert first["status"]["status_str"] == "success", first["status"]
    rows = first["outputs"]["7"]["ict_table"][0]["rows"]
    for extra in ({"extra_pnginfo": {"workflow": {"nodes": []}}}, None):   # the page; an API client
        api["10"]["inputs"]["filename_prefix"] = f"cached_{extra is None}"
        h = server.wait(server.post_prompt(api, extra_data=extra))
        assert h["status"]["status_str"] == "success", h["status"]
        cached = [m for m in h["status"]["messages"] if m[0] == "execution_cached"][0][1]["nodes"]
        assert "7" in cached, cached                                         # ICT Rerank did not run
        files = saved(h, "10")
        assert len(files) == len(rows) == 3
        for pos, f in enumerate(files):
            own = metadata.own_scores(f)
            assert own is not None, f"{f.name} has no record of its own"
            assert own["rank"] == pos + 1 and own["index"] == rows[pos]["index"]
            assert own["ict"] == pytest.approx(rows[pos]["ict"], abs=1e-6)


def test_empty_prompt_ranks_by_hp_alone(server, tiny_models):
    """HP needs no prompt: the rerank example with an empty prompt and score_by hp runs, in HP order."""
    from ict_core import Scorer, rank

    expected = rank(Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu").score(server.images, None), "hp")
    h = server.wait(server.post_prompt(rerank_api(prompt="", score_by="hp", hp="hp.safetensors")))
    assert h["status"]["status_str"] == "success", h["status"]
    rows = h["outputs"]["7"]["ict_table"][0]["rows"]
    assert [r["index"] for r in rows] == expected and all(r["ict"] is None for r in rows)


# ------------------------------------------------------------------------------ generation, memory, metadata
def generation_api(ckpt: str, seed: int, prompt: str = PROMPT) -> dict:
    """Random SD1.5, 64x64, best-of-4 by ict*hp; the picked latent goes through a second pass with a short
    noise mask (3 masks for 4 samples, repeated to [0, 1, 1, 0]: 0 keeps the latent, 1 resamples it; a
    mask passed through unchanged would give every pick the first one, 0). Both results are saved."""
    sampler = {"steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, **sampler, "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "ICTModelLoader", "inputs": {"ict_model": "ict.safetensors", "hp_model": "hp.safetensors",
                                                         "precision": "auto", "device": "auto"}},
        "20": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "21": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFF0000}},
        "22": {"class_type": "ImageBatch", "inputs": {"image1": ["20", 0], "image2": ["21", 0]}},
        "25": {"class_type": "ImageBatch", "inputs": {"image1": ["22", 0], "image2": ["21", 0]}},
        "23": {"class_type": "ImageToMask", "inputs": {"image": ["25", 0], "channel": "red"}},
        "24": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["23", 0]}},
        "8": {"class_type": "ICTSelectBest", "inputs": {"model": ["7", 0], "images": ["6", 0], "prompt": prompt, "k": 1,
                                                        "score_by": "ict*hp", "min_score": -1.0, "latent": ["24", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ICT_best"}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed + 1, **sampler,
                                                    "positive": ["2", 0],
                                                    "negative": ["3", 0], "latent_image": ["8", 1], "denoise": 0.5}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "ICT_second"}},
        "13": {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}},
    }


def test_best_of_4_second_pass_mask_follows_the_pick_and_pngs_carry_their_scores(server):
    from PIL import Image

    from ict_core import metadata

    if not SD15_CKPT or not Path(SD15_CKPT).is_file():
        pytest.skip("no random SD1.5 checkpoint: set COMFYUI_SD15_CKPT (../shared/hosts/make_sd15_comfy.py makes one)")
    h = server.wait(server.post_prompt(generation_api(Path(SD15_CKPT).name, seed=3),
                                       extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}}), timeout=900)
    assert h["status"]["status_str"] == "success", h["status"]
    out = h["outputs"]
    picked = [r for r in out["8"]["ict_table"][0]["rows"] if r["picked"]]
    assert len(picked) == 1
    idx = picked[0]["index"]
    latent_text = out["13"]["text"][0]
    # 3 masks for 4 samples are repeated to the batch (LatentFromBatch's rule): sample idx has mask idx % 3
    mask_value = int(re.search(r"'noise_mask': tensor\(\[\[\[\[(\d)", latent_text).group(1))
    print(f"best of 4: picked sample {idx}, its noise mask {mask_value}")
    assert mask_value == [0, 1, 1][idx % 3], (idx, latent_text[:400])
    assert re.search(r"'batch_index': \[(\d+)\]", latent_text).group(1) == str(idx)

    def saved(node):
        (item,) = out[node]["images"]
        return server.base / "output" / item["subfolder"] / item["filename"]

    best, second = saved("9"), saved("12")
    own = metadata.own_scores(best)
    assert own is not None and own["index"] == idx and own["rank"] == 1 and own["by"] == "ict*hp"
    assert own["ict"] == pytest.approx(picked[0]["ict"], abs=1e-6)
    assert own["hp"] == pytest.approx(picked[0]["hp"], abs=1e-6)
    assert own["model"] == "ict.safetensors" and own["hp_model"] == "hp.safetensors"
    assert metadata.read_scores(second) and metadata.own_scores(second) is None  # not the pixels that were scored
    a = np.asarray(Image.open(best), dtype=np.int16)
    b = np.asarray(Image.open(second), dtype=np.int16)
    if mask_value == 0:  # mask 0 keeps the picked latent: the second pass decodes to the same picture
        assert np.abs(a - b).max() <= 1
    else:
        assert np.abs(a - b).max() > 1


MEDIUM = {"projection_dim": 512,
          "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                          "num_hidden_layers": 12, "vocab_size": 49408, "max_position_embeddings": 77,
                          "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
                          "pad_token_id": 1},
          "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                            "num_hidden_layers": 12, "patch_size": 32, "image_size": 224, "num_channels": 3,
                            "hidden_act": "gelu", "layer_norm_eps": 1e-5}}


def _medium_ict(folder: Path) -> Path:
    """A random ICT file of ViT-B size (~300 MB), big enough for its memory to show in the server's RSS."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from conftest import save_ict_layout
    from ict_core.weights import convert

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=MEDIUM["text_config"], vision_config=MEDIUM["vision_config"],
                                 projection_dim=MEDIUM["projection_dim"])).eval()
    cfg = folder / "medium.json"
    cfg.write_text(json.dumps(MEDIUM))
    src = save_ict_layout(model, folder / "ICT")
    del model
    out = convert(src, folder / "medium.safetensors", cfg).path
    shutil.rmtree(src)
    return out


def test_free_gives_the_models_memory_back(tmp_path, tiny_models):
    """After /free (Unload models + Free model and node cache) the server's RSS is back within 10% of what it
    was before the first ICT load. What a first load adds for good is the code it imports: transformers' CLIP
    model module and open_clip's tokenizer file (not the open_clip package: ict_core.text)."""
    _need_comfyui()
    medium = _medium_ict(tmp_path)
    with _running_server(tmp_path / "srv", tiny_models) as srv:
        shutil.move(str(medium), srv.models / "medium.safetensors")
        api = rerank_api()
        api["6"]["inputs"]["ict_model"] = "medium.safetensors"
        before = srv.rss_mb()
        assert srv.wait(srv.post_prompt(api))["status"]["status_str"] == "success"
        loaded = srv.rss_mb()
        frees = srv.free_until("ICT model released", 1)
        after, end = srv.rss_mb(), time.time() + 30   # ComfyUI acts on /free when its worker is next idle
        while after > 1.02 * before and time.time() < end:
            time.sleep(1)
            after = min(after, srv.rss_mb())
        figures = (f"RSS MB: before the first ICT load {before:.0f}, medium model loaded {loaded:.0f}, "
                   f"after /free {after:.0f} (/free calls needed: {frees})")
        print(figures)
        assert loaded - before > 200, figures          # the model's memory shows: the check below can fail
        assert after <= 1.1 * before, figures
        assert srv.wait(srv.post_prompt(api))["status"]["status_str"] == "success"  # and it loads again
        assert srv.log.read_text().count("ICT model loaded: ICT medium") == 2


PARTIAL_LOAD = r"""
import json, sys
comfy_dir, pack, ict, hp = sys.argv[1:5]
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [pack, comfy_dir]                  # the pack's nodes package, not ComfyUI's nodes.py
import comfy.options
comfy.options.enable_args_parsing()                # as main.py does: comfy.* read --cpu on import
import torch
from ict_core import Scorer
from nodes import comfy_host
cpu = torch.device("cpu")
scorer, patcher = comfy_host.load_scorer(ict, hp, "auto", (cpu, cpu))
patcher.load(cpu, lowvram_model_memory=1)          # what ComfyUI does on a GPU too small for the model
lowvram = sum(1 for m in scorer.modules.modules() if hasattr(m, "prev_comfy_cast_weights"))
imgs = [torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(i)) for i in range(3)]
got = [(r.ict, r.hp) for r in scorer.score(imgs, "a red cube")]
ref = [(r.ict, r.hp) for r in Scorer.load(ict, hp, device="cpu").score(imgs, "a red cube")]
print(json.dumps({"lowvram_layers": lowvram, "model_lowvram": scorer.modules.model_lowvram, "got": got, "ref": ref}))
"""


def test_comfyuis_partial_load_scores_like_the_full_model(tiny_models, tmp_path):
    """ComfyUI's ModelPatcher loading the layers in part (its --lowvram path) keeps the official scores:
    run with ComfyUI's own comfy.ops and model_patcher, in its Python (on the CPU: no device moves)."""
    _need_comfyui()
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, ICT_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([py, "-c", PARTIAL_LOAD, str(COMFYUI_DIR), str(ROOT), str(tiny_models.ict),
                          str(tiny_models.hp)], cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["model_lowvram"] and out["lowvram_layers"] > 10
    assert np.allclose(out["got"], out["ref"], atol=1e-6)


# ------------------------------------------------------------------------------ what the page is sent
WS_RUNS = r"""
import asyncio, json, sys, uuid
import aiohttp                                       # ComfyUI's own server library: always in its Python
url, runs = sys.argv[1], int(sys.argv[2])
prompt = json.loads(sys.stdin.read())

async def main():
    cid = uuid.uuid4().hex
    out = []
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{url}/ws?clientId={cid}") as ws:
        for _ in range(runs):
            async with s.post(f"{url}/prompt", json={"prompt": prompt, "client_id": cid}) as r:
                body = await r.json()
                assert r.status == 200, body
            pid, run = body["prompt_id"], {"executed": {}, "cached": None, "end": None}
            while True:                              # until the worker's closing "executing node None"
                msg = await ws.receive(timeout=300)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise SystemExit(f"websocket closed: {msg}")
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue                         # binary previews
                m = json.loads(msg.data)
                t, d = m["type"], m.get("data") or {}
                if d.get("prompt_id") != pid:
                    continue
                if t == "executed":
                    run["executed"][d["node"]] = d["output"]
                elif t == "execution_cached":
                    run["cached"] = d["nodes"]
                elif t == "progress":
                    run.setdefault("progress", []).append([d.get("node"), d["value"], d["max"]])
                elif t in ("execution_success", "execution_error", "execution_interrupted"):
                    run["end"] = t
                    if t == "execution_error":
                        run["error"] = d.get("exception_message")
                elif t == "executing" and d.get("node") is None:
                    break
            async with s.get(f"{url}/history/{pid}") as r:    # what the queue panel loads back
                run["history"] = (await r.json())[pid]["outputs"]
            out.append(run)
    print(json.dumps(out))

asyncio.run(main())
"""


def ws_runs(srv: Server, prompt: dict, runs: int) -> list[dict]:
    """Queue `prompt` `runs` times in a row from one websocket client, as the ComfyUI page does, and return per
    run what that client was sent: {"executed": {node: its `output` (the node's ui dict, which the page shows)},
    "cached": the execution_cached node list, "end": execution_success/_error, "progress": [node, value, max] of
    each progress message, "history": the run's outputs in /history (what the queue panel shows again)}. The
    client runs in ComfyUI's Python with its aiohttp, so the tests need no websocket package of their own."""
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    res = subprocess.run([py, "-c", WS_RUNS, srv.url, str(runs)], input=json.dumps(prompt), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, f"{res.stderr[-3000:]}\nserver log:\n{srv.log.read_text()[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def _table_comes_back(srv: Server, cache_none: bool) -> None:
    api = rerank_api(prompt="a table that stays on the node")   # no earlier test ran this prompt
    first, again = ws_runs(srv, api, 2)
    assert first["end"] == again["end"] == "execution_success", (first, again)
    assert "7" not in first["cached"]
    shown = first["executed"].get("7")
    assert shown and shown["ict_table"][0]["rows"] and "rank" in shown["text"][0], first["executed"]
    if cache_none:    # --cache-none: nothing is kept, ICT Rerank runs again
        assert again["cached"] == [], again["cached"]
    else:             # the very same workflow: ICT Rerank is not run again, its outputs come from the cache
        assert "7" in again["cached"], again["cached"]
    assert again["executed"].get("7") == shown, f"ICT Rerank's table was not sent on the re-run: {again}"
    if not cache_none:  # (--cache-none: ComfyUI 0.3.64 drops a node's ui from the run's /history once all the
        # nodes it feeds have stored theirs, output node or not; the page still gets the table through `executed`)
        assert first["history"].get("7") == again["history"].get("7") == shown, "ICT Rerank's table not in /history"


def test_rerank_table_is_sent_again_on_a_cached_rerun(server):
    """The page shows a node's table from the `executed` message sent to the client that queued the run;
    queued again unchanged, ICT Rerank comes from ComfyUI's cache and its table must be sent again."""
    _table_comes_back(server, cache_none=False)


def test_rerank_table_is_sent_with_cache_none(tmp_path, tiny_models):
    """The same on a server started with --cache-none (every node runs each time, nothing kept)."""
    _need_comfyui()
    with _running_server(tmp_path, tiny_models, args=("--cache-none",)) as srv:
        _table_comes_back(srv, cache_none=True)
