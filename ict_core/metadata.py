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
from collections.abc import Iterable
from typing import Any

from .files import open_regular

KEY = "ict_reward"
VERSION = 1
ICT_TEXT_KEY = "ict_score"      # flat per-image keys (webuis): the same values, 4 decimals
HP_TEXT_KEY = "hp_score"
RECORD_FIELDS = ("ict", "hp", "score", "by", "value", "rank", "index", "prompt", "model", "hp_model", "precision",
                 "pixels")


#: Characters of one metadata text that are read at most (a record list, a webui infotext, a ComfyUI graph);
#: a longer value is garbage to these readers, as are deep or mistyped JSON and unreadable chunks.
MAX_TEXT = 1 << 20
_NUMBERS = ("ict", "hp", "score", "value")
_TEXTS = ("by", "prompt", "model", "hp_model", "precision", "pixels", "error")


def _num(v) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _sane(rec: dict) -> dict:
    """A record read from a file with every known field of its documented type (else null); other keys kept
    only when they are plain JSON scalars."""
    out = {k: v for k, v in rec.items() if isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
           and k not in _NUMBERS + _TEXTS + ("rank", "index")}
    out.update({k: _num(rec.get(k)) for k in _NUMBERS if k in rec})
    out.update({k: rec[k] if isinstance(rec.get(k), str) else None for k in _TEXTS if k in rec})
    out.update({k: _int(rec.get(k)) for k in ("rank", "index") if k in rec})
    return out


def _records(obj) -> list[dict]:
    """The records of a parsed `ict_reward` value (a dict as built here), sanitised; [] for anything else."""
    images = obj.get("images") if isinstance(obj, dict) else None
    return [_sane(r) for r in images if isinstance(r, dict)] if isinstance(images, list) else []


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
    h = hashlib.sha256("{}x{}x{}:".format(*shape).encode())
    h.update(pixels.tobytes())
    return "sha256:" + h.hexdigest()[:32]


def dumps(records: Iterable[dict]) -> str:
    """The text of the `ict_reward` key."""
    return json.dumps({"v": VERSION, "images": list(records)}, allow_nan=False)


def merge(existing: Any, records: Iterable[dict]) -> dict[str, Any]:
    """`existing` value of the key (a dict as built by this module, its JSON text, None, or anything
    another node left there: ignored) plus `records`; a record with the same pixels digest replaces the
    earlier one (the later node wins)."""
    old = loads(existing) if isinstance(existing, str) else _records(existing)
    new = list(records)
    seen = {r.get("pixels") for r in new if isinstance(r.get("pixels"), str)}
    kept = [r for r in old if r.get("pixels") not in seen]
    return {"v": VERSION, "images": kept + new}


def loads(text: Any) -> list[dict]:
    """The records of an `ict_reward` value, each field of its documented type; [] for a missing,
    unreadable, oversized (MAX_TEXT), too deeply nested or mistyped value."""
    if not isinstance(text, str) or not text or len(text) > MAX_TEXT:
        return []
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return []
    return _records(obj)


def _user_comment(raw: Any) -> str | None:
    """The text of an EXIF UserComment (the webuis write the infotext there in JPEG and WebP files, with
    piexif's UNICODE prefix: UTF-16 big-endian)."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = body.decode("utf-16", "replace")
        else:
            be, le = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
            text = be if sum(c.isascii() for c in be) >= sum(c.isascii() for c in le) else le
    elif prefix == b"ASCII\0\0\0":
        text = body.decode("latin-1")
    elif prefix == b"\0" * 8:
        text = body.decode("utf-8", "replace")
    else:
        text = raw.decode("utf-8", "replace")
    return text.rstrip("\0")


def _texts(img) -> dict[str, str]:
    texts = {k: v for k, v in (img.info or {}).items() if isinstance(k, str) and isinstance(v, str)}
    if "parameters" not in texts:
        try:
            comment = _user_comment(img.getexif().get_ifd(0x8769).get(0x9286))  # Exif IFD, UserComment
        except Exception:  # any EXIF garbage
            comment = None
        if comment:
            texts["parameters"] = comment
    return {k: v for k, v in texts.items() if len(v) <= MAX_TEXT}


def read_texts(image) -> dict[str, str]:
    """The text metadata of an image (a path or a PIL image): its PNG text chunks, and the webui infotext of a
    JPEG or WebP (EXIF UserComment) as "parameters". Values longer than MAX_TEXT, and chunks or EXIF that
    cannot be read, are left out. OSError only when a path cannot be opened (not found, not a regular file)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return _texts(image)
    with open_regular(image) as f:
        try:
            with Image.open(f) as img:
                return _texts(img)
        except Exception:  # not an image, or a text chunk Pillow refuses (too large when decompressed)
            return {}


def read_scores(image) -> list[dict]:
    """Every record in a saved image's `ict_reward` key (`image`: a path or a PIL image); [] when there is
    none or it is garbage. OSError only when a path cannot be opened."""
    return loads(read_texts(image).get(KEY))


def _digest_of(img) -> str | None:
    """pixel_digest of an 8-bit image as Pillow reads it; None for other modes (16-bit, 1-bit, float: a
    host's Save Image writes 8 bits, so no record is theirs) or pixels that cannot be read."""
    import numpy as np

    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "RGBX", "LAB", "HSV"):
        return None
    try:
        arr = np.asarray(img)
    except Exception:  # truncated or undecodable pixels
        return None
    return pixel_digest(arr) if arr.dtype == np.uint8 else None


def own_scores(image) -> dict | None:
    """The record of this very image: the one whose pixels digest matches the file's pixels, or the only
    record when it carries no digest (one file, one record, as the webuis write); None if none is its own.
    Garbage in the file gives None; OSError only when a path cannot be opened."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        with open_regular(image) as f:
            try:
                with Image.open(f) as img:
                    return own_scores(img)
            except Exception:
                return None
    records = read_scores(image)
    if len(records) == 1 and not records[0].get("pixels"):
        return records[0]
    with_pixels = [r for r in records if r.get("pixels")]
    if not with_pixels:
        return None
    digest = _digest_of(image)
    mine = [r for r in with_pixels if r["pixels"] == digest]
    return mine[-1] if mine else None
