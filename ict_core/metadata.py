"""The scores that travel with a saved image: one documented PNG text key, the same in every host.

Key ``ict_reward`` (a PNG tEXt chunk; image browsers list it next to ``parameters``/``prompt``) holds
JSON::

    {"v": 1, "images": [{"ict": 0.3121, "hp": 0.734, "score": 0.2291, "by": "ict*hp", "value": 0.2291,
                         "rank": 1, "index": 3, "prompt": "...", "model": "ict.safetensors",
                         "hp_model": "hp.safetensors", "precision": "auto", "pixels": "sha256:..."}]}

Per image record (RECORD_FIELDS): ``ict`` (cosine, null without a prompt), ``hp`` (sigmoid of the HP
head, null without an HP model), ``score`` (ict*hp with HP, else ict; hp alone without a prompt),
``by`` (the rule it was ranked by) and ``value`` (its value under that rule), ``rank`` (1 = best, null
when not ranked), ``index`` (position in the scored batch), ``prompt``, ``model``/``hp_model`` (file
names), ``precision``.

Why a list: a host that writes one file per image with its own metadata (the webuis) writes a list of
one record.  ComfyUI's Save Image writes the same workflow-wide metadata (``extra_pnginfo``) into every
file of a run, so there each record also carries ``pixels``, a digest of the 8-bit pixels the image is
saved with, and a file's own record is the one whose digest matches its pixels (:func:`own_scores`).
A record matches only the exact pixels that were scored: an image changed after scoring (upscaled,
resampled) has no record of its own.

The webuis also write the flat keys ``ict_score`` / ``hp_score`` (4 decimals) for tools that read
single values.  Nothing here imports a host or torch.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable

KEY = "ict_reward"
VERSION = 1
ICT_TEXT_KEY = "ict_score"      # flat per-image keys (webuis): the same values, 4 decimals
HP_TEXT_KEY = "hp_score"
RECORD_FIELDS = ("ict", "hp", "score", "by", "value", "rank", "index", "prompt", "model", "hp_model", "precision",
                 "pixels")


def _num(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def record(result, *, by: str, value=None, rank: int | None = None, model: str | None = None,
           hp_model: str | None = None, precision: str | None = None, pixels: str | None = None) -> dict[str, Any]:
    """The record of one scored image (`result`: an ict_core ScoreResult)."""
    rec = {"ict": _num(result.ict), "hp": _num(result.hp), "score": _num(result.score), "by": by,
           "value": _num(value), "rank": rank, "index": result.index, "prompt": result.prompt,
           "model": model, "hp_model": hp_model, "precision": precision}
    if result.error is not None:
        rec["error"] = result.error
    if pixels is not None:
        rec["pixels"] = pixels
    return rec


def pixel_digest(pixels) -> str:
    """Digest of an image's 8-bit pixels, [H, W] or [H, W, C] (any array with .shape and .tobytes()).

    ComfyUI's Save Image writes ``clip(255 * image, 0, 255).astype(uint8)``; reading the PNG back with
    Pillow gives the same array, so the digest identifies the file's pixels."""
    shape = tuple(int(s) for s in pixels.shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or str(getattr(pixels, "dtype", "uint8")) != "uint8":
        raise ValueError(f"pixel_digest needs an 8-bit [H, W, C] array, got {shape} {getattr(pixels, 'dtype', '')}")
    h = hashlib.sha256(("%dx%dx%d:" % shape).encode())
    h.update(pixels.tobytes())
    return "sha256:" + h.hexdigest()[:32]


def dumps(records: Iterable[dict]) -> str:
    """The text of the `ict_reward` key."""
    return json.dumps({"v": VERSION, "images": list(records)}, allow_nan=False)


def merge(existing: Any, records: Iterable[dict]) -> dict[str, Any]:
    """`existing` value of the key (a dict as built by this module, its JSON text, or None) plus
    `records`; a record with the same pixels digest replaces the earlier one (the later node wins)."""
    if isinstance(existing, str):
        try:
            existing = json.loads(existing)
        except ValueError:
            existing = None
    old = list(existing.get("images", [])) if isinstance(existing, dict) else []
    new = list(records)
    seen = {r.get("pixels") for r in new if r.get("pixels")}
    kept = [r for r in old if not (isinstance(r, dict) and r.get("pixels") in seen)]
    return {"v": VERSION, "images": kept + new}


def loads(text: str | None) -> list[dict]:
    """The records of an `ict_reward` value; [] for a missing or unreadable value."""
    if not text:
        return []
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    images = obj.get("images") if isinstance(obj, dict) else None
    return [r for r in images if isinstance(r, dict)] if isinstance(images, list) else []


def read_scores(image) -> list[dict]:
    """Every record in a saved image's `ict_reward` key (`image`: a path or a PIL image)."""
    from PIL import Image

    img = Image.open(image) if not isinstance(image, Image.Image) else image
    info = dict(getattr(img, "text", None) or {}) or dict(img.info)
    return loads(info.get(KEY))


def own_scores(image) -> dict | None:
    """The record of this very image: the one whose pixels digest matches the file's pixels, or the only
    record when it carries no digest (one file, one record, as the webuis write); None if none is its own."""
    import numpy as np
    from PIL import Image

    img = Image.open(image) if not isinstance(image, Image.Image) else image
    records = read_scores(img)
    if len(records) == 1 and not records[0].get("pixels"):
        return records[0]
    with_pixels = [r for r in records if r.get("pixels")]
    if not with_pixels:
        return None
    digest = pixel_digest(np.asarray(img))
    mine = [r for r in with_pixels if r["pixels"] == digest]
    return mine[-1] if mine else None
