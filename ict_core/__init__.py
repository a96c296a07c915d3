"""ict_core: host-independent ICT / HP reward scoring (no ComfyUI or webui imports).

Names are imported lazily, so `import ict_core.cache` (or `ict cache stats`) does not pull in torch."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ICTError": "errors", "InputError": "errors", "ModelFileError": "errors",
    "BY": "ranking", "Selection": "ranking", "rank": "ranking", "report": "ranking", "select": "ranking",
    "values": "ranking",
    "ImageFeatures": "scorer", "Scorer": "scorer", "ScoreResult": "scorer",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ict_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
