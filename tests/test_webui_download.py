"""Settings > ICT reward > Download the official weights, and POST /ict-reward/v1/download (issue 24, webui): the
stand-in webui of test_webui.py with the hub answered by tests/fake_hub.py (HF_ENDPOINT); never the internet.

The action is pressed as the Settings page presses it: the Settings entry's component factory builds the buttons
and the click handler registered on the Download button is called (with a gradio progress tracker)."""
# ruff: noqa: F811  (the fixtures `host`, `hub`, `released` are imported from test_webui.py / test_official.py)
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from html import escape
from pathlib import Path

import pytest

from fake_hub import FakeHub
from ict_core.weights import read_info
from test_official import ICT_BIN, hub, released  # noqa: F401
from test_webui import host, run  # noqa: F401

ACTION = "Download the official weights"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fastapi_standin(monkeypatch):
    """What the script's on_app_started takes from fastapi (not installed in the test environments)."""
    fastapi = types.ModuleType("fastapi")
    fastapi.Body = lambda default=None, **kw: default
    responses = types.ModuleType("fastapi.responses")

    class JSONResponse:
        def __init__(self, status_code=200, content=None):
            self.status_code, self.content = status_code, content

    responses.JSONResponse = JSONResponse
    fastapi.responses = responses
    monkeypatch.setitem(sys.modules, "fastapi", fastapi)
    monkeypatch.setitem(sys.modules, "fastapi.responses", responses)


class App:
    """FastAPI's add_api_route, remembered."""

    def __init__(self):
        self.routes = {}

    def add_api_route(self, path, endpoint, methods=(), **kw):
        for m in methods:
            self.routes[(m, path)] = (endpoint, kw)


def settings_entry(host):
    """Build the Settings entry as create_setting_component does: component(label=, value=, elem_id=)."""
    info = host.opts.added["ict_reward_download"]
    buttons = []
    real_button = host.gr.Button

    class Button(real_button):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            buttons.append(self)

    host.gr.Button = Button
    try:
        status = info.component(label=info.label, value=info.default, elem_id="setting_ict_reward_download")
    finally:
        host.gr.Button = real_button
    by_label = {b.kwargs["value"]: b for b in buttons}
    return status, by_label


def press(host, *, on_progress=None):
    """Click the Download button: its handler, with a gradio progress tracker (that may act on each report)."""
    status, buttons = settings_entry(host)
    (fn, inputs, outputs), = buttons[ACTION].handlers
    assert outputs == [status] and inputs == []
    tracker = host.gr.Progress()
    if on_progress is not None:
        inner = tracker.__call__

        class Tracker(type(tracker)):
            def __call__(self, progress=None, desc=None, **kw):
                inner(progress, desc)
                on_progress(progress, desc)
        tracker = Tracker()
        tracker.calls = []
    return fn(progress=tracker), tracker, status


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_the_settings_entry_says_what_it_will_do(host):
    status, buttons = settings_entry(host)
    assert set(buttons) == {ACTION, "Stop the download"}
    assert buttons[ACTION].kwargs["variant"] == "primary"
    assert "8y/ICT and 8y/HP" in status.value and str(host.models) in status.value
    assert host.module.DOWNLOADER.stop() is False              # nothing running: no one's generation is stopped
    assert host.state.interrupted is False


def test_the_action_downloads_and_converts_then_does_nothing(host, hub):
    html, tracker, _ = press(host)
    assert visible(host.models) == ["hp.safetensors", "ict.safetensors"]     # the pickles are gone
    assert read_info(host.models / "ict.safetensors").kind == "ict"
    assert read_info(host.models / "hp.safetensors").kind == "hp"
    assert "8y/ICT and 8y/HP downloaded and converted into" in html and str(host.models) in html
    assert host.gr.warnings == []
    asked = len(hub.requests)
    html, _, _ = press(host)
    assert "already installed" in html and "nothing was downloaded" in html
    assert len(hub.requests) == asked                                        # no network the second time
    assert host.state.jobs == ["ict_reward_download"]                        # and no job on shared.state
    p, res = run(host, mode="annotate")                                      # the next generation is scored
    assert "ICT score" in res.infotexts[1] and "HP score" in res.infotexts[1]


def test_the_progress_reaches_shared_state_and_the_button(host, hub):
    html, tracker, _ = press(host)
    # the job is over: the webui's progress reads idle, the queue is free
    assert host.state.job == "" and host.state.job_count == 0 and host.state.textinfo is None
    assert host.queue_lock.acquire(blocking=False)
    host.queue_lock.release()
    seen = host.state.seen
    texts = [s["textinfo"] for s in seen if s["textinfo"]]
    assert any(t.startswith("ICT reward: downloading 8y/ICT (") for t in texts)
    assert any(t.startswith("ICT reward: downloading 8y/HP (") for t in texts)
    assert "ICT reward: converting 8y/ICT" in texts and "ICT reward: converting 8y/HP" in texts
    assert all(s["job_count"] == 2 for s in seen if s["textinfo"])
    # what /sdapi/v1/progress computes at each new text (the last thing an update sets): from 0.01 up to 1, never
    # backwards
    state = host.state
    values = []
    for s in seen:
        if s["changed"] == "textinfo" and s["textinfo"]:
            for k in state.WATCHED:
                object.__setattr__(state, k, s[k])
            values.append(state.progress())
    assert values[0] < 0.1 and values[-1] == pytest.approx(1.0, abs=0.02)
    assert values == sorted(values)
    assert any(0.2 < v < 0.8 for v in values)
    # the button's gradio bar: fractions 0..1 with the same words
    fractions = [f for f, _ in tracker.calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {d for _, d in tracker.calls} >= {"ICT reward: converting 8y/ICT", "ICT reward: 8y/HP converted"}


def test_stop_interrupts_the_download_and_a_second_press_resumes_it(host, released, monkeypatch, tmp_path):
    """The release here (12.6 MB) outlasts huggingface_hub's 10 MiB chunk: Stop is pressed when the first chunk has
    arrived, the transfer stops at the next one, and the second press asks only for the rest (a Range request)."""
    with FakeHub({"8y/ICT": released["big"], "8y/HP": released["8y/HP"]}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

        def stop_after_a_chunk(fraction, desc):
            if desc.startswith("ICT reward: downloading 8y/ICT") and fraction > 0.2:
                assert host.module.DOWNLOADER.stop() is True      # the Stop button (shared.state.interrupt())

        html, _, _ = press(host, on_progress=stop_after_a_chunk)
        assert "the download was stopped" in html and f"press {ACTION} again to resume" in html
        assert host.gr.warnings and "stopped" in host.gr.warnings[-1]
        assert not (host.models / "ict.safetensors").exists() and not (host.models / "hp.safetensors").exists()
        part = next((host.models / ".download").rglob("pytorch_model.bin.part"))
        have = part.stat().st_size
        assert have >= 10 << 20
        assert host.state.job == "" and host.state.job_count == 0             # the job ended
        html, _, _ = press(host)
        assert "downloaded and converted" in html
        assert hub.gets(ICT_BIN)[-1] == f"bytes={have}-"
        assert visible(host.models) == ["hp.safetensors", "ict.safetensors"]


def test_the_webuis_interrupt_stops_it_too(host, hub):
    """/sdapi/v1/interrupt and the Interrupt button call shared.state.interrupt()."""
    def interrupt(fraction, desc):
        if desc.startswith("ICT reward: downloading"):
            host.state.interrupt()

    html, _, _ = press(host, on_progress=interrupt)
    assert "the download was stopped" in html and not (host.models / "ict.safetensors").exists()


def test_a_refused_connection_gives_one_line(host, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # closed when the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    html, _, _ = press(host)
    msg = host.gr.warnings[-1]
    assert msg.startswith(f"ICT reward: cannot reach http://127.0.0.1:{port} to download 8y/ICT") and "\n" not in msg
    assert "Traceback" not in msg and html == f"<p>{escape(msg)}</p>"         # the status line says the same
    assert "`ict fetch --dest MODELS`" in msg                      # for a machine with network, as the CLI
    assert "-m ict_core convert FOLDER --out" in msg                # here: the webui's Python, as it runs
    assert host.state.job == "" and host.state.job_count == 0


def test_a_checksum_mismatch_gets_its_line_and_the_next_press_downloads_again(host, hub):
    hub.corrupt.add(ICT_BIN)
    html, _, _ = press(host)
    msg = host.gr.warnings[-1]
    assert "checksum" in msg and "8y/ICT/pytorch_model.bin" in msg and "\n" not in msg
    hub.corrupt.clear()
    html, _, _ = press(host)
    assert "downloaded and converted" in html


def test_the_api_route_downloads_and_answers_json(host, hub, fastapi_standin):
    app = App()
    for cb in host.callbacks.app_started:
        cb(None, app)
    post, _ = app.routes[("POST", "/ict-reward/v1/download")]
    get, _ = app.routes[("GET", "/ict-reward/v1/download")]
    before = get()
    assert before.status_code == 200 and before.content["files"] == {"ict": None, "hp": None}
    res = post({"models": ["hp"]})
    assert res.status_code == 200 and res.content["status"] == "done" and res.content["downloaded"] == ["hp"]
    assert visible(host.models) == ["hp.safetensors"]
    res = post(None)
    assert res.status_code == 200 and res.content["downloaded"] == ["ict"]
    assert set(res.content["files"]) == {"ict", "hp"} and res.content["folder"] == str(host.models)
    res = post({"models": ["sdxl"]})
    assert res.status_code == 422 and "unknown model 'sdxl'" in res.content["message"]
    assert get().content["files"]["ict"] == str(host.models / "ict.safetensors")


def test_the_api_route_reports_a_refused_connection_and_an_interrupt(host, monkeypatch, released, fastapi_standin):
    app = App()
    for cb in host.callbacks.app_started:
        cb(None, app)
    post, _ = app.routes[("POST", "/ict-reward/v1/download")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    res = post(None)
    assert res.status_code == 502 and res.content["status"] == "failed"
    assert res.content["message"].startswith("ICT reward: cannot reach") and "\n" not in res.content["message"]
    with FakeHub({"8y/ICT": released["8y/ICT"], "8y/HP": released["8y/HP"]}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        host.state.begin = (lambda begin: lambda job="": (begin(job), host.state.interrupt()))(host.state.begin)
        res = post(None)         # an Interrupt right after the job began (as /sdapi/v1/interrupt would)
        assert res.status_code == 409 and res.content["status"] == "interrupted"


def test_no_route_without_the_api(host, fastapi_standin):
    import modules.shared as shared

    shared.cmd_opts.api = False
    app = App()
    for cb in host.callbacks.app_started:
        cb(None, app)
    assert app.routes == {}


def test_a_download_waits_for_a_running_generation(host, hub):
    """The action takes the webui's queue lock, as a generation does: shared.state is never shared."""
    host.queue_lock.acquire()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("html", press(host)[0]))
    t.start()
    t.join(1.0)
    assert t.is_alive() and host.state.jobs == []
    host.queue_lock.release()
    t.join(120)
    assert "downloaded and converted" in result["html"]


# =============================================================================================== a real webui
WEBUI_DIR = os.environ.get("WEBUI_DIR")          # an Automatic1111 1.10 or Forge Classic checkout
WEBUI_PYTHON = os.environ.get("WEBUI_PYTHON")    # a Python with its requirements (its venv)


def _slow(hub: FakeHub, seconds_per_mib: float):
    """Have the hub send large bodies 1 MiB at a time, `seconds_per_mib` apart (a slow network: the download is
    under way long enough to be watched and interrupted). Returns the undo."""
    plain = hub.server.RequestHandlerClass

    class Slow(plain):
        def setup(self):
            super().setup()
            raw = self.wfile

            class Writer:
                def write(self, data):
                    step = 1 << 20
                    for i in range(0, len(data), step):
                        raw.write(data[i:i + step])
                        raw.flush()
                        if len(data) > step:
                            time.sleep(seconds_per_mib)
                    return len(data)

                def __getattr__(self, name):
                    return getattr(raw, name)

            self.wfile = Writer()

    hub.server.RequestHandlerClass = Slow
    return lambda: setattr(hub.server, "RequestHandlerClass", plain)


AUTH = {"Authorization": "Basic " + base64.b64encode(b"ict:s3cret").decode()}     # --api-auth ict:s3cret


def _http(url: str, method: str = "GET", body: dict | None = None, timeout: float = 600,
          headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body or {}).encode() if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **AUTH, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def real_webui(tmp_path):
    """The webui as a user starts it for the API (CPU, --nowebui), with this repository as its only extension, in a
    fresh data folder (--data-dir: extensions/, models/, config.json), and the hub answered by the fixture's
    FakeHub through HF_ENDPOINT. Yields a function that starts it once the hub is known."""
    if not WEBUI_DIR:
        pytest.skip("WEBUI_DIR is not set: point it at an Automatic1111 1.10 or Forge Classic checkout, and "
                    "WEBUI_PYTHON at a Python with its requirements, to run the real-webui download test")
    procs = []

    def start(hub_url: str, ui: bool = False, *more: str) -> str:
        data = tmp_path / "data"
        (data / "extensions").mkdir(parents=True)
        (data / "extensions" / "ict-reward").symlink_to(ROOT, target_is_directory=True)
        (data / "models" / "Stable-diffusion").mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        flags = "".join(f.read_text() for f in (Path(WEBUI_DIR) / n for n in (
            "modules/cmd_args.py", "ldm_patched/modules/args_parser.py", "backend/args.py")) if f.is_file())
        cpu = ["--always-cpu"] if "--always-cpu" in flags else ["--use-cpu", "all", "--no-half", "--precision", "full"]
        extra = ["--skip-load-model-at-start"] if "--skip-load-model-at-start" in flags else []
        cmd = [WEBUI_PYTHON or sys.executable, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
               "--skip-python-version-check", "--skip-version-check", *cpu, "--api", *([] if ui else ["--nowebui"]),
               "--port", str(port), "--server-name", "127.0.0.1", "--data-dir", str(data), "--no-download-sd-model",
               *extra, *more]
        env = dict(os.environ, HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
                   HF_HOME=str(tmp_path / "hf-home"), ICT_CACHE_DIR=str(tmp_path / "cache"),
                   ICT_MODELS_DIR=str(tmp_path / "no-default-models"))
        env.pop("PYTHONPATH", None)
        log = open(tmp_path / "webui.log", "wb")
        proc = subprocess.Popen(cmd, cwd=WEBUI_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 400
        while True:
            assert proc.poll() is None, (tmp_path / "webui.log").read_text()[-4000:]
            try:
                if _http(url + "/ict-reward/v1/download", timeout=5)[0] in (200, 401):
                    return url
            except OSError:
                pass
            assert time.monotonic() < end, (tmp_path / "webui.log").read_text()[-4000:]
            time.sleep(2)

    yield start
    for proc, log in procs:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_a_real_webui_downloads_through_the_api_from_a_fresh_models_folder(real_webui, released, tmp_path):
    """POST /ict-reward/v1/download in a real webui: /sdapi/v1/progress shows it, /sdapi/v1/interrupt stops it
    (409), the next POST resumes it (a Range request) and converts both models into the webui's models/ict, and the
    one after that makes no request."""
    models = tmp_path / "data" / "models" / "ict"
    with FakeHub({"8y/ICT": released["big"], "8y/HP": released["8y/HP"]}) as hub:
        fast = _slow(hub, 0.5)
        url = real_webui(hub.url, False, "--api-auth", "ict:s3cret")
        assert _http(url + "/ict-reward/v1/download", "POST", headers={"Authorization": "Basic eDp5"})[0] == 401
        code, body = _http(url + "/ict-reward/v1/download")
        assert code == 200 and body["folder"] == str(models) and body["files"] == {"ict": None, "hp": None}
        result = {}
        t = threading.Thread(target=lambda: result.update(zip(("code", "body"),
                                                              _http(url + "/ict-reward/v1/download", "POST"))))
        t.start()
        seen, end = [], time.monotonic() + 300
        while t.is_alive() and time.monotonic() < end:
            _, p = _http(url + "/sdapi/v1/progress?skip_current_image=true", timeout=30)
            seen.append(p)
            if p["state"]["job"] == "ict_reward_download" and p["state"]["sampling_step"] >= 10 << 20:
                assert _http(url + "/sdapi/v1/interrupt", "POST")[0] == 200
                break
            time.sleep(0.1)
        t.join(300)
        assert result.get("code") == 409, (result, seen[-3:])
        assert result["body"]["status"] == "interrupted" and "press Download the official weights again" in \
            result["body"]["message"]
        during = seen[-1]
        assert during["textinfo"].startswith("ICT reward: downloading 8y/ICT (") and 0.01 < during["progress"] < 1
        assert not (models / "ict.safetensors").exists()
        have = next((models / ".download").rglob("pytorch_model.bin.part")).stat().st_size
        assert have >= 10 << 20
        fast()
        code, body = _http(url + "/ict-reward/v1/download", "POST")
        assert code == 200 and body["status"] == "done" and body["downloaded"] == ["ict", "hp"], body
        assert hub.gets(ICT_BIN)[-1] == f"bytes={have}-"
        assert read_info(models / "ict.safetensors").kind == "ict" and read_info(models / "hp.safetensors").kind == "hp"
        assert visible(models) == ["hp.safetensors", "ict.safetensors"]
        asked = len(hub.requests)
        code, body = _http(url + "/ict-reward/v1/download", "POST")
        assert code == 200 and body["downloaded"] == [] and "already installed" in body["message"]
        assert len(hub.requests) == asked
        _, idle = _http(url + "/sdapi/v1/progress?skip_current_image=true")
        assert idle["state"]["job"] == "" and idle["progress"] == 0


def test_the_conversion_gets_past_a1111s_torch_load(host, hub, monkeypatch):
    """A1111 replaces torch.load with modules.safe.load, whose checker refuses the zip layout recent torch writes
    (returning None after a traceback). The converter's weights_only=True load goes to torch's own; every other
    load still meets the webui's check, and torch.load is the webui's again afterwards."""
    import torch

    real, refused = torch.load, []

    def webui_load(f, *args, **kwargs):      # modules/safe.py load(): "bad file inside ...: .format_version"
        refused.append(kwargs.get("weights_only"))
        return None

    safe = types.ModuleType("modules.safe")
    safe.unsafe_torch_load, safe.load = real, webui_load
    monkeypatch.setitem(sys.modules, "modules.safe", safe)
    monkeypatch.setattr(torch, "load", webui_load)
    html, _, _ = press(host)
    assert "downloaded and converted" in html and refused == []
    assert torch.load is webui_load
    torch.load("x.pt")
    assert refused == [None]


CLICK = """
import json, sys
from gradio_client import Client
client = Client(sys.argv[1], verbose=False)
print(json.dumps(client.predict(fn_index=int(sys.argv[2]))))
"""


def test_a_real_webui_settings_page_has_the_button_and_pressing_it_downloads(real_webui, released, tmp_path):
    """With the page (no --nowebui): the Settings section holds the button, the Stop button and the status line, and
    pressing the button (its click event called through gradio's queue by gradio_client, as the page does) downloads
    and converts into the webui's models/ict."""
    models = tmp_path / "data" / "models" / "ict"
    with FakeHub({"8y/ICT": released["8y/ICT"], "8y/HP": released["8y/HP"]}) as hub:
        url = real_webui(hub.url, ui=True)
        config = json.loads(urllib.request.urlopen(url + "/config", timeout=60).read())
        ids = {c["props"].get("elem_id"): c for c in config["components"] if "props" in c}
        start, stop = ids["ict_reward_download_start"], ids["ict_reward_download_stop"]
        status = ids["setting_ict_reward_download"]
        assert start["props"]["value"] == ACTION and stop["props"]["value"] == "Stop the download"
        assert "8y/ICT and 8y/HP" in status["props"]["value"] and str(models) in status["props"]["value"]
        (fn_index,) = [i for i, d in enumerate(config["dependencies"])
                       if start["id"] in [t[0] if isinstance(t, list) else t for t in d["targets"]]]
        done = subprocess.run([WEBUI_PYTHON or sys.executable, "-c", CLICK, url, str(fn_index)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        html = json.loads(done.stdout.strip().splitlines()[-1])
        assert "8y/ICT and 8y/HP downloaded and converted into" in html, html
        assert visible(models) == ["hp.safetensors", "ict.safetensors"]
        _, body = _http(url + "/sdapi/v1/options")
        assert "ict_reward_download" not in body or body["ict_reward_download"] == ""     # not a saved setting
