"""Unit tests run the pack's V3 nodes without ComfyUI: `install()` puts tests/comfy_api_standin on sys.path
when no real `comfy_api` is importable; `run()` calls a node as ComfyUI does (a class copy with hidden values)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "comfy_api_standin"


def install() -> None:
    """Make `import comfy_api.latest` work: the real one where ComfyUI is importable, else the stand-in."""
    if importlib.util.find_spec("comfy_api") is None and str(STANDIN) not in sys.path:
        sys.path.insert(0, str(STANDIN))


def run(node, hidden: dict | None = None, **inputs):
    """`node.execute(**inputs)` on a copy of the class carrying `hidden` ({"extra_pnginfo": ..., "prompt": ...,
    "unique_id": ...}), as ComfyUI's executor does."""
    from comfy_api.latest import io

    return node.PREPARE_CLASS_CLONE({io.Hidden[k]: v for k, v in (hidden or {}).items()}).execute(**inputs)
