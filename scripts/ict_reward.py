"""ICT reward for the Automatic1111 / Forge webui: an always-visible "ICT reward" accordion.

Only the webui loads this file (its `scripts/` folder). It is kept thin: everything that can be tested without the
webui lives in the `ict_webui` package at the root of this repository. Hooks used, as in A1111 1.8-1.10 and Forge
(classic and Neo) `modules/scripts.py`: `process`, `postprocess_batch_list(p, pp, *args, **kwargs)` (before
saving), `postprocess_image` / `postprocess_image_after_composite` and `postprocess`; callbacks `on_ui_settings`,
`on_before_image_saved` and `on_app_started` (the route POST /ict-reward/v1/download). The Settings section also
holds the action "Download the official weights" (ict_webui/download.py: ict_core.official.ensure on the webui's
shared.state and queue lock). No model is loaded at import: the first enabled generation loads it, and where it
waits between scorings follows the host (ict_webui/placement.py: Forge's memory manager, or A1111's device).
"""
import logging
import os
import sys

import gradio as gr
from modules import paths, script_callbacks, scripts, shared

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:       # ict_core and ict_webui live beside scripts/; appended so nothing is shadowed
    sys.path.append(_ROOT)

from ict_webui import BY_CHOICES, MODE_CHOICES, OPTIONS, RunArgs, ScorerHolder, Settings, WebuiReward  # noqa: E402
from ict_webui import download as download  # noqa: E402, I001
from ict_webui.holder import search_dirs  # noqa: E402
from ict_webui.options import MODE_ANNOTATE, SECTION  # noqa: E402
from ict_webui.placement import host_placement  # noqa: E402
from ict_webui.reward import keep_warnings_visible  # noqa: E402

log = logging.getLogger("ict_reward")


def _ui_warning(msg: str) -> None:
    warn = getattr(gr, "Warning", None)          # gradio >= 3.40; shown as a toast where a request is active
    if warn is not None:
        warn(msg)


def _webui_device():
    """A1111's device for this task: the GPU, or the CPU under --use-cpu all / ict_reward."""
    from modules import devices
    return devices.get_device_for("ict_reward")


keep_warnings_visible()
REWARD = WebuiReward(ScorerHolder(placement=host_placement(_webui_device)), ui_notify=_ui_warning)


def _queue_lock():
    """The webui's lock that generations hold (modules.call_queue): a download and a generation take turns, as
    both report on shared.state."""
    try:
        from modules import call_queue
        return call_queue.queue_lock
    except Exception:      # pragma: no cover - a webui without it
        return None


def _torch_own_load():
    """torch's load where the webui replaced it (A1111: modules.safe), else None."""
    return getattr(sys.modules.get("modules.safe"), "unsafe_torch_load", None)


DOWNLOADER = download.Downloader(lambda: shared.state, _queue_lock(), torch_load=_torch_own_load)


def _settings() -> Settings:
    return Settings.from_opts(lambda key, default: getattr(shared.opts, key, default),
                              getattr(paths, "models_path", None))


def _should_stop() -> bool:
    st = shared.state
    return bool(getattr(st, "interrupted", False) or getattr(st, "stopping_generation", False))


class ICTRewardScript(scripts.Script):
    sorting_priority = 50

    def title(self):
        return "ICT reward"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion("ICT reward", open=False, elem_id=f"ict_reward_{tab}"):
            enabled = gr.Checkbox(label="Enable", value=False, elem_id=f"ict_reward_{tab}_enabled")
            with gr.Row():
                mode = gr.Radio(label="Mode", choices=list(MODE_CHOICES), value=MODE_ANNOTATE,
                                elem_id=f"ict_reward_{tab}_mode")
                by = gr.Radio(label="Score by", choices=list(BY_CHOICES), value="ict*hp",
                              elem_id=f"ict_reward_{tab}_by")
            with gr.Row():
                k = gr.Slider(label="K (keep best K per batch)", minimum=1, maximum=16, step=1, value=1,
                              elem_id=f"ict_reward_{tab}_k")
                min_score = gr.Slider(label="Min score", minimum=0.0, maximum=1.0, step=0.01, value=0.3,
                                      elem_id=f"ict_reward_{tab}_min_score")
                use_hp = gr.Checkbox(label="Use HP", value=True, elem_id=f"ict_reward_{tab}_use_hp")
        return [enabled, mode, k, min_score, by, use_hp]

    def process(self, p, *args):
        REWARD.process(p, RunArgs.from_values(*args), _settings())

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        if not RunArgs.from_values(*args).enabled:
            return
        old = getattr(shared.state, "textinfo", None)
        shared.state.textinfo = "ICT reward: scoring"
        try:
            REWARD.postprocess_batch_list(p, pp, int(kwargs.get("batch_number", 0) or 0), should_stop=_should_stop)
        finally:
            shared.state.textinfo = old

    def postprocess_image(self, p, pp, *args):
        REWARD.postprocess_image(p, pp.image)

    def postprocess_image_after_composite(self, p, pp, *args):
        REWARD.postprocess_image(p, pp.image)

    def postprocess(self, p, processed, *args):
        REWARD.postprocess(p, processed)


def _option_info(default, label, component=None, component_args=None):
    try:
        return shared.OptionInfo(default, label, component, component_args, section=SECTION,
                                 category_id="postprocessing")
    except TypeError:          # webui < 1.7: no categories
        return shared.OptionInfo(default, label, component, component_args, section=SECTION)


def _on_ui_settings():
    for o in OPTIONS:
        component, component_args = (gr.Radio, {"choices": list(o.choices)}) if o.choices else (None, None)
        info = _option_info(o.default, o.label, component, component_args)
        if o.info and hasattr(info, "info"):
            info = info.info(o.info)
        shared.opts.add_option(o.key, info)
        if o.key == "ict_reward_models_dir":        # the action sits under the folder it downloads into
            action = _option_info("", download.ACTION, _download_component)
            action.do_not_save = True               # a button and its status, not a setting (as OptionHTML)
            shared.opts.add_option(download.OPTION_KEY, action)


# ------------------------------------------------------------------------------ Download the official weights
def _download_folder():
    settings = _settings()
    return settings.models_dir, search_dirs(settings.models_dir)


def _download_component(label="", value="", elem_id=None, **kwargs):
    """The Settings entry: the action's button, a Stop button and a status line (the component the Settings page
    keeps; not saved). Built where the webui builds the section's components."""
    with gr.Row():
        start = gr.Button(value=download.ACTION, variant="primary", elem_id="ict_reward_download_start")
        stop = gr.Button(value=download.STOP, elem_id="ict_reward_download_stop")
    folder, dirs = _download_folder()
    status = gr.HTML(value=download.status_html(download.describe(folder, dirs)),
                     elem_id=elem_id or "ict_reward_download_status")
    start.click(fn=_download_from_ui, inputs=[], outputs=[status])
    stop.click(fn=_stop_from_ui, inputs=[], outputs=[])
    return status


def _run_download(report=None):
    folder, dirs = _download_folder()
    return DOWNLOADER.run(folder, dirs=dirs, report=report)


_PROGRESS = gr.Progress() if getattr(gr, "Progress", None) is not None else None


def _download_from_ui(progress=_PROGRESS):
    """The button: the download with gradio's bar over the status line (gradio gives a function whose argument
    defaults to a gr.Progress its tracker; the webuis enable the queue it needs) and the webui's progress."""
    report = None if progress is None else (lambda fraction, text: progress(fraction, desc=text))
    outcome = _run_download(report)
    if outcome.status != "done":
        _ui_warning(outcome.message)
    return outcome.as_html()


def _stop_from_ui():
    DOWNLOADER.stop()


def _api_allowed():
    """Whether the webui serves its API (--api, or --nowebui): the route is an API's, registered only then."""
    opts = getattr(shared, "cmd_opts", None)
    return opts is None or bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


def _api_auth_dependencies():
    """--api-auth user:password[,...]: the route asks for the same HTTP Basic credentials as /sdapi/v1/*."""
    raw = getattr(getattr(shared, "cmd_opts", None), "api_auth", None)
    if not raw:
        return []
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    credentials = dict(pair.split(":", 1) for pair in raw.split(",") if ":" in pair)    # as modules/api/api.py
    basic = Depends(HTTPBasic())

    def auth(given: HTTPBasicCredentials = basic):
        if given.username in credentials and compare_digest(given.password, credentials[given.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def download_route(payload=None):
    """POST /ict-reward/v1/download [{"models": ["ict", "hp"]}]: runs the Settings action; /sdapi/v1/progress shows
    its progress and /sdapi/v1/interrupt stops it. 200 done, 409 interrupted, 502 failed; always the one-line
    message. GET: what is installed, nothing downloaded."""
    kinds = download.KINDS
    if isinstance(payload, dict) and payload.get("models"):
        kinds = tuple(str(k).lower() for k in payload["models"])
        unknown = [k for k in kinds if k not in download.KINDS]
        if unknown:
            return 422, {"status": "failed", "message": f"ICT reward: unknown model {unknown[0]!r}; models are "
                                                        f"{', '.join(download.KINDS)}"}
    folder, dirs = _download_folder()
    outcome = DOWNLOADER.run(folder, kinds, dirs=dirs)
    return outcome.http_status, outcome.as_json()


def installed_route():
    folder, dirs = _download_folder()
    from ict_core import official

    files = {k: (str(p) if (p := official.installed(k, dirs)) else None) for k in download.KINDS}
    return 200, {"folder": str(folder), "files": files, "message": download.describe(folder, dirs)}


def _on_app_started(demo, app):
    if not _api_allowed():
        return
    from typing import Optional

    from fastapi import Body
    from fastapi.responses import JSONResponse

    body = Body(None)

    def post(payload: Optional[dict] = body):  # noqa: UP045 - FastAPI reads the annotation at run time
        code, content = download_route(payload)
        return JSONResponse(status_code=code, content=content)

    def get():
        code, content = installed_route()
        return JSONResponse(status_code=code, content=content)

    deps = _api_auth_dependencies()
    app.add_api_route(download.ROUTE, post, methods=["POST"], dependencies=deps)
    app.add_api_route(download.ROUTE, get, methods=["GET"], dependencies=deps)


def _on_before_image_saved(params):
    REWARD.add_png_info(getattr(params, "p", None), getattr(params, "pnginfo", None))


script_callbacks.on_ui_settings(_on_ui_settings)
script_callbacks.on_before_image_saved(_on_before_image_saved)
script_callbacks.on_app_started(_on_app_started)
