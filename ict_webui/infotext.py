"""Where the scores appear: the infotext ("parameters" text) and the PNG text chunks of each saved image.

Infotext keys (the webui's "Key: value" style): ``ICT score`` and ``HP score``.
PNG info keys (documented in docs/webui.md): ``ict_score`` and ``hp_score``; they are derived from the infotext
that the webui is about to write, so every saved copy of an image (before/after face restoration, mask, ...)
carries the score of the image it was computed for.

The webui builds the infotext of image ``i`` of batch ``n`` by calling ``create_infotext(p, p.prompts, p.seeds,
p.subseeds, index=i, ...)`` right after ``postprocess_batch_list``; a callable value in
``p.extra_generation_params`` is called there as ``value(**locals())`` (A1111 >= 1.8, all Forge versions).
:class:`ScoreField` is such a callable: it reads the scores of the current batch from the run state on ``p``.
"""
from __future__ import annotations

import re
from typing import Any

ICT_INFOTEXT_KEY = "ICT score"
HP_INFOTEXT_KEY = "HP score"
ICT_PNG_KEY = "ict_score"
HP_PNG_KEY = "hp_score"
STATE_ATTR = "_ict_reward_state"

_FIELDS = {ICT_INFOTEXT_KEY: ICT_PNG_KEY, HP_INFOTEXT_KEY: HP_PNG_KEY}


def fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


class ScoreField:
    """Value of ``p.extra_generation_params["ICT score"]`` (or "HP score"): one score per image.

    During the batch loop, ``index`` is the position in the current batch (after selection); once the
    generation is finished (``postprocess``), ``index`` is the position among all images kept. The grid's
    infotext (``use_main_prompt=True``) and calls made before the batch was scored get ``None`` (left out)."""

    def __init__(self, which: str):
        self.which = which          # "ict" or "hp"

    def __call__(self, p: Any = None, index: Any = None, use_main_prompt: bool = False, **_: Any) -> str | None:
        state = getattr(p, STATE_ATTR, None)
        if state is None or use_main_prompt or not isinstance(index, int) or index < 0:
            return None
        return state.score_text(self.which, index, getattr(p, "iteration", None))

    def __repr__(self) -> str:      # shows in debug dumps of extra_generation_params
        return f"ScoreField({self.which!r})"


_NUM = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"


def scores_from_infotext(text: str | None) -> dict[str, float]:
    """``{"ict_score": 0.31, "hp_score": 0.72}`` from an infotext's last line (the parameters line)."""
    if not text:
        return {}
    last = str(text).strip().splitlines()[-1] if str(text).strip() else ""
    out: dict[str, float] = {}
    for key, png in _FIELDS.items():
        m = re.search(r"(?:^|,\s*)" + re.escape(key) + r":\s*" + _NUM + r"\s*(?:,|$)", last)
        if m:
            out[png] = float(m.group(1))
    return out


def png_keys_from_infotext(text: str | None) -> dict[str, str]:
    """The PNG text chunks to add next to "parameters" (values as written in the infotext)."""
    return {k: fmt(v) for k, v in scores_from_infotext(text).items()}


def add_png_keys(pnginfo: dict, section: str = "parameters") -> dict:
    """In-place: add ``ict_score`` / ``hp_score`` to a webui pnginfo dict (``ImageSaveParams.pnginfo``)."""
    if isinstance(pnginfo, dict):
        pnginfo.update(png_keys_from_infotext(pnginfo.get(section)))
    return pnginfo
