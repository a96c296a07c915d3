"""ICT reward for the Automatic1111 / Forge webui: an always-visible "ICT reward" accordion.

Only the webui loads this file (its `scripts/` folder). It is kept thin: everything that can be tested without the
webui lives in the `ict_webui` package at the root of this repository. Hooks used, as in A1111 1.8-1.10 and Forge
(classic and Neo) `modules/scripts.py`: `process`, `postprocess_batch_list(p, pp, *args, **kwargs)` (before
saving), `postprocess_image` / `postprocess_image_after_composite` and `postprocess`; callbacks `on_ui_settings` and
`on_before_image_saved`. No model is loaded at import: the first enabled generation loads it, and where it
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


def _on_ui_settings():
    for o in OPTIONS:
        component, component_args = (gr.Radio, {"choices": list(o.choices)}) if o.choices else (None, None)
        try:
            info = shared.OptionInfo(o.default, o.label, component, component_args, section=SECTION,
                                     category_id="postprocessing")
        except TypeError:          # webui < 1.7: no categories
            info = shared.OptionInfo(o.default, o.label, component, component_args, section=SECTION)
        if o.info and hasattr(info, "info"):
            info = info.info(o.info)
        shared.opts.add_option(o.key, info)


def _on_before_image_saved(params):
    REWARD.add_png_info(getattr(params, "p", None), getattr(params, "pnginfo", None))


script_callbacks.on_ui_settings(_on_ui_settings)
script_callbacks.on_before_image_saved(_on_before_image_saved)
