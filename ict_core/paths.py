"""Where models and caches live by default; each can be overridden by an environment variable."""
from __future__ import annotations

import os
from pathlib import Path

MODELS_ENV = "ICT_MODELS_DIR"
CACHE_ENV = "ICT_CACHE_DIR"
ICT_FILE = "ict.safetensors"
HP_FILE = "hp.safetensors"


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    return Path(base) if base else Path.home() / fallback


def default_models_dir() -> Path:
    """$ICT_MODELS_DIR, else $XDG_DATA_HOME/ict-reward/models (~/.local/share/ict-reward/models)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else _xdg("XDG_DATA_HOME", ".local/share") / "ict-reward" / "models"


def default_cache_dir() -> Path:
    """$ICT_CACHE_DIR, else $XDG_CACHE_HOME/ict-reward (~/.cache/ict-reward)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else _xdg("XDG_CACHE_HOME", ".cache") / "ict-reward"


def default_model(kind: str) -> Path:
    """The file `ict fetch` writes for a kind ("ict" or "hp") in the default models folder."""
    return default_models_dir() / (ICT_FILE if kind == "ict" else HP_FILE)
