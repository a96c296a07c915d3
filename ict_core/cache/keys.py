"""Names in the cache: its folder, the keys of prompt tables and galleries (of images: ImageRef.digest()).

Why here: the scorer, the CLI and the hosts must compute the same keys, or a lookup misses.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_DIR_ENV = "ICT_CACHE_DIR"


def resolve_cache_dir(explicit=None) -> Path:
    """Cache folder: explicit, else ict_core.paths.default_cache_dir ($ICT_CACHE_DIR, the XDG or
    Windows default). Nothing is created here: the folder is made on the first save."""
    if explicit in (None, ""):
        from ..paths import default_cache_dir
        explicit = default_cache_dir()
    return Path(os.path.expanduser(os.fspath(explicit)))


def _precision_tag(dtype: str) -> str:
    """Half-precision features differ from fp32 ones, so they are kept apart ("" for fp32)."""
    dtype = str(dtype).removeprefix("torch.")
    return "" if dtype in ("float32", "fp32") else f"@{dtype}"


def prompt_key(ict_fp: str, dtype: str = "float32") -> str:
    """Key of the prompt table of one ICT weight file at one precision."""
    return ict_fp + _precision_tag(dtype)


def gallery_key(ict_fp: str, hp_fp: str | None, dtype: str = "float32") -> str:
    """Key of the image gallery of one (ICT, HP) weight pair at one precision; HP may be absent."""
    return f"{ict_fp}+{hp_fp or 'none'}{_precision_tag(dtype)}"


def prompt_key_of(gallery: str) -> str:
    """The prompt table of a gallery's ICT model at the gallery's precision: the texts it is searched for."""
    ict_fp, _, rest = gallery.partition("+")
    return ict_fp + rest[rest.index("@"):] if "@" in rest else ict_fp


def safe_name(key: str) -> str:
    """A file name for a key: its readable part and a hash of the whole key."""
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "+-_") else "_" for c in key)[:40]
    return f"{stem}-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
