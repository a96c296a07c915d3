"""A new user's first run in a real ComfyUI: the rerank template, as shipped, from a models folder with no ICT file.

The loader's "8y/ICT (download)" choice fetches the released layout from a local server that answers as the hub
does (tests/fake_hub.py, HF_ENDPOINT), converts it into ComfyUI's models/ict, and the template runs; the second run
makes no request. Needs what tests/test_comfyui_integration.py needs ($COMFYUI_DIR, $COMFYUI_PYTHON).
"""
from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from fake_hub import FakeHub
from ict_core.weights import read_info
from test_comfyui_integration import (
    PACK,
    ROOT,
    _need_comfyui,
    _write_images,
    keep_cache_args,
    rerank_api,
    serve,
    ws_runs,
)


def _base(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    _write_images(base / "input")
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text("none: {}\n")
    return base, yaml


def _env(hub: FakeHub, tmp_path: Path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
            "ICT_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_models):
    """The 8y/ICT layout (one pickle) at the tiny size, whose architecture comes in the repository's config.json."""
    from conftest import save_ict_layout

    root = save_ict_layout(tiny_models.ict_clip, tmp_path_factory.mktemp("released") / "ICT")
    (root / "config.json").write_text(tiny_models.config.read_text())
    return root


def test_the_template_runs_from_a_fresh_models_folder(tmp_path, released):
    _need_comfyui()
    base, yaml = _base(tmp_path)
    models = base / "models" / "ict"
    with FakeHub({"8y/ICT": released}) as hub:
        with serve(base, yaml, tmp_path / "comfyui.log", *keep_cache_args(), env=_env(hub, tmp_path)) as srv:
            assert not (models / "ict.safetensors").exists()
            run = ws_runs(srv, rerank_api(prompt="a first run"), 1)[0]
            assert run["end"] == "execution_success", run
            mib = (released / "pytorch_model.bin").stat().st_size >> 20
            assert ["6", mib, mib] in run.get("progress", []), run.get("progress")  # the loader's bar, in MiB
            assert read_info(models / "ict.safetensors").kind == "ict"
            assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["ict.safetensors"]
            assert [r for m, k, r in hub.requests if m == "GET"] == [None, None]  # the pickle and config.json
            log = srv.log.read_text()
            assert "downloading 8y/ICT" in log
            assert run["history"]["9"], run["history"]  # the report
            asked = len(hub.requests)
            h2 = srv.wait(srv.post_prompt(rerank_api(prompt="a second run")), timeout=600)
            assert h2["status"]["status_str"] == "success", h2["status"]
            assert len(hub.requests) == asked  # the second run downloads nothing


@pytest.fixture(scope="module")
def released_big(tmp_path_factory):
    from conftest import save_wide_ict_layout

    return save_wide_ict_layout(tmp_path_factory.mktemp("released_big") / "ICT")


def test_cancel_stops_the_download_and_the_next_run_resumes_it(tmp_path, released_big):
    """Cancel (/interrupt) while the pickle is half downloaded ends the run as interrupted, with nothing converted;
    the next run asks the hub only for the rest, converts, and the template runs."""
    _need_comfyui()
    base, yaml = _base(tmp_path)
    models = base / "models" / "ict"
    key = "8y/ICT/pytorch_model.bin"
    with FakeHub({"8y/ICT": released_big}) as hub:
        hub.stall_after[key] = 11 << 20
        with serve(base, yaml, tmp_path / "comfyui.log", *keep_cache_args(), env=_env(hub, tmp_path)) as srv:
            pid = srv.post_prompt(rerank_api(prompt="a cancelled first run"))
            end = time.time() + 300
            while not any(p.stat().st_size >= 10 << 20 for p in models.rglob("*.part")):
                assert time.time() < end, srv.log.read_text()[-3000:]
                time.sleep(0.2)
            urllib.request.urlopen(urllib.request.Request(srv.url + "/interrupt", data=b"", method="POST"),
                                   timeout=30).close()
            hub.release.set()  # the stalled transfer breaks off; huggingface_hub resumes it and meets the Cancel
            h = srv.wait(pid, timeout=300)
            assert h["status"]["status_str"] == "error", h["status"]
            assert any(m[0] == "execution_interrupted" for m in h["status"]["messages"]), h["status"]
            assert not (models / "ict.safetensors").exists()
            have = max(p.stat().st_size for p in models.rglob("*.part"))
            h2 = srv.wait(srv.post_prompt(rerank_api(prompt="the run after the cancel")), timeout=600)
            assert h2["status"]["status_str"] == "success", h2["status"]
            assert hub.gets(key)[-1] == f"bytes={have}-"
            assert read_info(models / "ict.safetensors").kind == "ict"


def test_without_network_the_run_stops_with_one_line_naming_the_offline_commands(tmp_path):
    _need_comfyui()
    import socket

    base, yaml = _base(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the block ends
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    with serve(base, yaml, tmp_path / "comfyui.log", env=env) as srv:
        h = srv.wait(srv.post_prompt(rerank_api(prompt="an offline first run")), timeout=300)
    assert h["status"]["status_str"] == "error"
    err = next(m[1] for m in h["status"]["messages"] if m[0] == "execution_error")
    assert err["node_type"] == "ICTModelLoader"
    msg = err["exception_message"].strip()
    assert msg.startswith(f"cannot reach http://127.0.0.1:{port} to download 8y/ICT") and "\n" not in msg
    assert "`ict fetch --dest MODELS`" in msg and "`ict convert FOLDER --out " in msg
    assert not list((base / "models" / "ict").glob("*.safetensors"))
