"""`ict show IMAGE...`: the scores stored in images, as text or JSON; nothing is computed or loaded.

Per image: the pack's `ict_reward` records (metadata: the file's own one, matched by its pixels, and all
records written with it), the webui infotext fields `ICT score` / `HP score` (PNG `parameters` or JPEG/WebP
EXIF), and the flat PNG keys `ict_score` / `hp_score`. Exit 0 when at least one image holds scores, else 1.
"""
from __future__ import annotations

import json
import sys

from . import metadata
from .cli_output import json_safe, one_line
from .errors import InputError
from .prompt_source import infotext_fields

INFOTEXT_KEYS = ("ICT score", "HP score")
_SHOWN = ("ict", "hp", "score", "by", "value", "rank", "prompt", "model", "hp_model", "precision", "error")


def stored(path: str) -> dict:
    """What one image holds; `error` when the file cannot be opened."""
    row = {"image": path, "own": None, "records": [], "infotext": {}, "png_keys": {}, "error": None}
    try:
        texts = metadata.read_texts(path)
        row["own"] = metadata.own_scores(path)
    except OSError as e:
        row["error"] = f"{path}: cannot read ({e.strerror or e})"
        return row
    row["records"] = metadata.loads(texts.get(metadata.KEY))
    fields = infotext_fields(texts.get("parameters", ""))
    row["infotext"] = {k: fields[k] for k in INFOTEXT_KEYS if k in fields}
    row["png_keys"] = {k: texts[k][:40] for k in (metadata.ICT_TEXT_KEY, metadata.HP_TEXT_KEY) if k in texts}
    return row


def _has_scores(row: dict) -> bool:
    return bool(row["records"] or row["infotext"] or row["png_keys"])


def _record_line(rec: dict) -> str:
    parts = []
    for k in _SHOWN:
        v = rec.get(k)
        if v is not None:
            parts.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={json.dumps(v, ensure_ascii=False)}")
    return one_line(" ".join(parts))


def _text(row: dict) -> list[str]:
    if row["error"]:
        return [f"{one_line(row['image'])}\terror: {one_line(row['error'])}"]
    if not _has_scores(row):
        return [f"{one_line(row['image'])}\tno stored scores"]
    lines = [one_line(row["image"])]
    if row["own"] is not None:
        lines.append(f"  ict_reward: {_record_line(row['own'])}")
    elif row["records"]:
        lines.append(f"  ict_reward: {len(row['records'])} record(s) of the batch it was saved with, none for these "
                     f"exact pixels (changed after scoring?)")
    if row["infotext"]:
        lines.append("  webui infotext: " + one_line(", ".join(f"{k}: {v}" for k, v in row["infotext"].items())))
    if row["png_keys"]:
        lines.append("  png keys: " + one_line(", ".join(f"{k}={v}" for k, v in row["png_keys"].items())))
    return lines


def show(images: list[str], as_json: bool) -> int:
    rows = [stored(p) for p in images]
    if as_json:
        print(json.dumps(json_safe({"images": rows}), indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(*_text(row), sep="\n")
    for row in rows:
        if row["error"]:
            print(f"ict: cannot show: {one_line(row['error'])}", file=sys.stderr)
    if not any(_has_scores(r) for r in rows):
        raise InputError("none of the images holds stored scores (an ict_reward record or webui score fields)")
    return 0
