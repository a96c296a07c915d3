"""Where the scores appear: the infotext ("parameters" text), the API's info, and the PNG text chunks of each image.

Infotext keys (the webui's "Key: value" style): ``ICT score`` and ``HP score``.
PNG keys (the names of :mod:`ict_core.metadata`, shared with the ComfyUI nodes): ``ict_reward`` (one JSON record,
the image's own) and the flat ``ict_score`` / ``hp_score``; the flat keys are derived from the infotext that the
webui is about to write, so every saved copy of an image (before/after face restoration, mask, ...) carries the
score of the image it was computed for.

The webui builds the infotext of image ``i`` of batch ``n`` by calling ``create_infotext(p, p.prompts, p.seeds,
p.subseeds, index=i, ...)`` right after ``postprocess_batch_list``; a callable value in
``p.extra_generation_params`` is called there as ``value(**locals())`` (A1111 >= 1.8, all Forge versions).
:class:`ScoreField` is such a callable. Everything in ``extra_generation_params`` is also serialised by
``Processed.js()`` (the API's ``info``); Forge Classic calls ``json.dumps`` there without a fallback, so the field
is a ``str`` (JSON-safe as it is). Once the generation is over it is replaced by an :class:`ApiList` of the scores,
one per image returned after the grid: JSON writes it as an array, while ``create_infotext`` (a grid's infotext,
made later by X/Y/Z plot) gets None from it, so no grid carries a single image's score.

The extension's messages reach API users the same way: ``Processed.js()`` has no ``comments`` in A1111 1.10 nor in
Forge, so they are listed under :data:`MESSAGES_KEY` in ``extra_generation_params`` (the API's
``info.extra_generation_params``), besides ``p.comment`` (under the images in the UI).
"""
from __future__ import annotations

import re
from typing import Any

from ict_core.metadata import HP_TEXT_KEY as HP_PNG_KEY
from ict_core.metadata import ICT_TEXT_KEY as ICT_PNG_KEY
from ict_core.metadata import KEY as RECORD_PNG_KEY  # noqa: F401  (re-exported: the PNG key of the record)

ICT_INFOTEXT_KEY = "ICT score"
HP_INFOTEXT_KEY = "HP score"
MESSAGES_KEY = "ICT reward messages"
STATE_ATTR = "_ict_reward_state"

_FIELDS = {ICT_INFOTEXT_KEY: ICT_PNG_KEY, HP_INFOTEXT_KEY: HP_PNG_KEY}


def fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


class ScoreField(str):
    """Value of ``p.extra_generation_params["ICT score"]`` (or "HP score"): one score per image.

    A ``str`` (empty) so that any JSON encoder takes it as it is; callable so that ``create_infotext`` asks it for
    the score of image ``index``. During the batch loop, ``index`` is the position in the current batch (after
    selection). The grid's infotext (``use_main_prompt=True``) and calls made before the batch was scored get
    ``None`` (left out)."""

    def __new__(cls, which: str) -> ScoreField:
        obj = super().__new__(cls, "")
        obj.which = which          # "ict" or "hp"
        return obj

    def __call__(self, p: Any = None, index: Any = None, use_main_prompt: bool = False, **_: Any) -> str | None:
        state = getattr(p, STATE_ATTR, None)
        if state is None or use_main_prompt or not isinstance(index, int) or index < 0:
            return None
        return state.score_text(self.which, index, getattr(p, "iteration", None))

    def __repr__(self) -> str:      # shows in debug dumps of extra_generation_params
        return f"ScoreField({self.which!r})"

    def __reduce__(self):           # copy / deepcopy / pickle (e.g. another extension copying p)
        return (ScoreField, (self.which,))


class ApiList(tuple):
    """A value of ``p.extra_generation_params`` for the API's ``info`` alone: JSON writes it as an array (``json``
    encodes a tuple subclass by its items), ``create_infotext`` calls it and gets None, so it is never written
    into an infotext."""

    def __call__(self, *_: Any, **__: Any) -> None:
        return None

    def __reduce__(self):           # copy / deepcopy / pickle keep the type
        return (ApiList, (tuple(self),))


def with_message(previous: Any, msg: str) -> ApiList:
    """The messages so far (an :class:`ApiList` left by this run or an earlier cell of the same plot) plus ``msg``."""
    old = tuple(previous) if isinstance(previous, ApiList) else ()
    return ApiList(old if msg in old else old + (msg,))


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
