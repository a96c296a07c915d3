"""Where models and caches live by default; each can be overridden by an environment variable."""
from __future__ import annotations

import os
import sys
from pathlib import Path

MODELS_ENV = "ICT_MODELS_DIR"
CACHE_ENV = "ICT_CACHE_DIR"
ICT_FILE = "ict.safetensors"
HP_FILE = "hp.safetensors"


def _windows() -> bool:
    return sys.platform == "win32"


def _home() -> Path:
    """The user's home folder. An empty or relative $HOME (HOME="") would put models and caches under
    the current folder: the account's home from the password database is used instead, else an error."""
    home = os.environ.get("HOME")
    if home is None or os.path.isabs(home):
        return Path.home()
    try:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        home = ""
    if not os.path.isabs(home):
        from .errors import InputError

        raise InputError(f"HOME is {os.environ.get('HOME')!r} and no home folder is known; set HOME, or "
                         f"{MODELS_ENV} and {CACHE_ENV}")
    return Path(home)


def _base(xdg_var: str, fallback: str, windows_sub: str) -> Path:
    """$XDG_* when set to an absolute path (the XDG spec ignores relative ones); else
    %LOCALAPPDATA%\\ict-reward\\<windows_sub> on Windows (where per-user data and caches belong there),
    else ~/<fallback>/ict-reward."""
    base = os.environ.get(xdg_var)
    if base and os.path.isabs(base):
        return Path(base) / "ict-reward"
    if _windows() and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "ict-reward" / windows_sub
    return _home() / fallback / "ict-reward"


def default_models_dir() -> Path:
    """$ICT_MODELS_DIR, else $XDG_DATA_HOME/ict-reward/models (~/.local/share/ict-reward/models;
    %LOCALAPPDATA%\\ict-reward\\models on Windows)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else _base("XDG_DATA_HOME", ".local/share", "") / "models"


def default_cache_dir() -> Path:
    """$ICT_CACHE_DIR, else $XDG_CACHE_HOME/ict-reward (~/.cache/ict-reward; %LOCALAPPDATA%\\ict-reward\\cache
    on Windows)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else _base("XDG_CACHE_HOME", ".cache", "cache")


def default_model(kind: str) -> Path:
    """The file `ict fetch` writes for a kind ("ict" or "hp") in the default models folder."""
    return default_models_dir() / (ICT_FILE if kind == "ict" else HP_FILE)
