"""The official weights on first use (ict_core.official): downloaded from a local server that answers as the hub
does (tests/fake_hub.py, via HF_ENDPOINT), checked, converted once, resumed after a kill; never the internet."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_hp_layout, save_ict_layout, save_wide_ict_layout, tiny_clip
from fake_hub import FakeHub
from ict_core import official
from ict_core.errors import ModelFileError
from ict_core.weights import read_info

ROOT = Path(__file__).resolve().parents[1]
ICT_BIN = "8y/ICT/pytorch_model.bin"


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_models):
    """The two layouts as the hub holds them; 8y/ICT with the tiny architecture's config.json beside the pickle
    (the real repository has none and gets the published ViT-H-14), and a copy with a larger text embedding
    (12.6 MB of bf16) whose transfer outlasts huggingface_hub's 10 MiB chunk, for the kill-and-resume test."""
    root = tmp_path_factory.mktemp("released")
    ict = save_ict_layout(tiny_models.ict_clip, root / "ICT")
    (ict / "config.json").write_text(tiny_models.config.read_text())
    big_dir = save_wide_ict_layout(root / "ICT-big")
    hp = save_hp_layout(tiny_clip(2), tiny_models.hp_mlp, root / "HP")
    return {"8y/ICT": ict, "8y/HP": hp, "big": big_dir}


@pytest.fixture
def hub(released, monkeypatch, tmp_path):
    with FakeHub({"8y/ICT": released["8y/ICT"], "8y/HP": released["8y/HP"]}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield h


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_first_run_downloads_and_converts_and_the_second_run_does_neither(hub, tmp_path):
    models, seen = tmp_path / "models", []
    out = official.ensure("ict", models, progress=lambda *a: seen.append(a))
    hp = official.ensure("hp", models)
    assert out == models / "ict.safetensors" and read_info(out).kind == "ict"
    assert read_info(hp).kind == "hp"
    assert _visible(models) == ["hp.safetensors", "ict.safetensors"]  # the pickles are gone
    assert not (models / ".download").exists()
    size = sum((hub.repos["8y/ICT"] / f).stat().st_size for f in ("pytorch_model.bin", "config.json"))
    assert ("download", size, size) in seen and seen[-1] == ("convert", 1, 1)
    done = [d for s, d, t in seen if s == "download"]
    assert done == sorted(done) and all(d <= t for s, d, t in seen if s == "download")  # never goes back
    asked = len(hub.requests)
    assert official.ensure("ict", models) == out and official.ensure("hp", models) == hp
    assert len(hub.requests) == asked  # no network the second time
    assert not (tmp_path / "hf-home").exists()  # nothing written outside the models folder


def test_the_released_layout_without_a_config_converts_with_the_published_architecture(hub, tmp_path, monkeypatch):
    """The real 8y/ICT has no config.json: its absence (a 404) is fine, and the architecture is the published one."""
    import ict_core.config as arch_config

    (hub.repos["8y/ICT"] / "config.json").rename(tmp_path / "config.json")
    try:
        monkeypatch.setattr(arch_config, "VIT_H_14", json.loads((tmp_path / "config.json").read_text()))
        out = official.ensure("ict", tmp_path / "models")
    finally:
        (tmp_path / "config.json").rename(hub.repos["8y/ICT"] / "config.json")
    assert read_info(out).kind == "ict"
    assert ("HEAD", "8y/ICT/config.json", None) in hub.requests


def test_a_checksum_mismatch_gets_one_line_and_the_next_run_downloads_again(hub, tmp_path):
    hub.corrupt.add(ICT_BIN)
    with pytest.raises(ModelFileError) as e:
        official.ensure("ict", tmp_path)
    msg = str(e.value)
    assert "checksum" in msg and "8y/ICT/pytorch_model.bin" in msg and "\n" not in msg
    assert not (tmp_path / "ict.safetensors").exists()
    assert not (tmp_path / ".download" / "8y--ICT" / "pytorch_model.bin").exists()  # the bad copy is deleted
    hub.corrupt.clear()
    assert read_info(official.ensure("ict", tmp_path)).kind == "ict"


def test_a_refused_connection_gives_one_line_naming_the_offline_commands(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ModelFileError) as e:
        official.ensure("hp", tmp_path / "models")
    msg = str(e.value)
    assert msg.startswith(f"cannot reach http://127.0.0.1:{port} to download 8y/HP") and "\n" not in msg
    assert "`ict fetch --hp --dest MODELS`" in msg and "`ict convert FOLDER --out" in msg
    assert time.monotonic() - t0 < 60


def test_cancel_stops_the_transfer_and_the_next_run_resumes(hub, tmp_path):
    """The host's cancel check raises its own exception, which passes through; nothing converted is left."""
    class Interrupted(Exception):
        pass

    def cancel():
        raise Interrupted

    with pytest.raises(Interrupted):
        official.ensure("ict", tmp_path, check_cancel=cancel)
    assert not (tmp_path / "ict.safetensors").exists()
    assert read_info(official.ensure("ict", tmp_path)).kind == "ict"


def test_a_download_killed_halfway_resumes(released, tmp_path, monkeypatch):
    """`ict fetch` in another process is killed (SIGKILL) after the first 10 MiB chunk is on disk; the next run asks
    the hub only for the rest (a Range request) and converts the whole."""
    models = tmp_path / "models"
    with FakeHub({"8y/ICT": released["big"]}) as hub:
        size = (released["big"] / "pytorch_model.bin").stat().st_size
        assert size > 11 << 20
        hub.stall_after[ICT_BIN] = 11 << 20
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
               "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "ict_core", "fetch", "--dest", str(models)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                parts = list((models / ".download").rglob("*.part"))
                if parts and parts[0].stat().st_size >= 10 << 20:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, "the fetch ended before it was killed"
            have = parts[0].stat().st_size
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        out = official.ensure("ict", models)
        assert hub.gets(ICT_BIN)[-1] == f"bytes={have}-"
        assert read_info(out).kind == "ict" and _visible(models) == ["ict.safetensors"]


def test_a_file_larger_than_any_release_is_refused_before_the_download(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(official, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ModelFileError, match="where a released file has at most"):
        official.ensure("ict", tmp_path)
    assert hub.gets(ICT_BIN) == []


def test_the_choices_name_the_releases():
    assert official.release_for("8y/ICT (download)").kind == "ict"
    assert official.release_for("8y/HP (download)").kind == "hp"
    assert official.release_for("ict.safetensors") is None and official.release_for(None) is None


def test_a_second_run_waits_for_the_first_ones_download(released, tmp_path, monkeypatch, caplog):
    """Two hosts on one models folder: the second waits on the first one's lock and then uses its file."""
    import threading

    models = tmp_path / "models"
    with FakeHub({"8y/ICT": released["big"]}) as hub:
        hub.stall_after[ICT_BIN] = 11 << 20
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "ict_core", "fetch", "--dest", str(models)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while not list((models / ".download").rglob("*.part")) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.1)
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            threading.Timer(2.0, hub.release.set).start()  # the stalled transfer breaks off; the first run resumes
            with caplog.at_level("INFO", logger="ict_core.official"):
                out = official.ensure("ict", models)
            assert proc.wait(120) == 0, proc.stderr.read().decode()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert any("waiting for another download of 8y/ICT" in r.getMessage() for r in caplog.records)
    assert read_info(out).kind == "ict"
    assert sorted(k for m, k, _ in hub.requests if m == "HEAD") == ["8y/ICT/config.json", ICT_BIN]  # the first run's


def test_a_folder_where_the_file_goes_is_refused_before_any_request(hub, tmp_path):
    (tmp_path / "ict.safetensors").mkdir()
    with pytest.raises(ModelFileError, match="is a folder, not a file, where the converted 8y/ICT goes"):
        official.ensure("ict", tmp_path)
    assert hub.requests == []
