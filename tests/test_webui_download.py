"""Settings > ICT reward > Download the official weights, and POST /ict-reward/v1/download (issue 24, webui): the
stand-in webui of test_webui.py with the hub answered by tests/fake_hub.py (HF_ENDPOINT); never the internet.

The action is pressed as the Settings page presses it: the Settings entry's component factory builds the buttons
and the click handler registered on the Download button is called (with a gradio progress tracker)."""
# ruff: noqa: F811  (the fixtures `host`, `released` are imported from test_webui.py / test_official.py)
from __future__ import annotations

import socket
import sys
import threading
import types
from html import escape
from pathlib import Path

import pytest

from fake_hub import FakeHub
from ict_core.weights import read_info
from test_official import ICT_BIN, released  # noqa: F401
from test_webui import host, run  # noqa: F401

ACTION = "Download the official weights"


@pytest.fixture
def hub(released, monkeypatch, tmp_path):
    with FakeHub({"8y/ICT": released["8y/ICT"], "8y/HP": released["8y/HP"]}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield h


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
