"""Returning freed memory to the OS after a model is dropped (both hosts' adapters call it).

glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the process's heaps, so the many
5-30 MB tensors of a freed model would stay in a long-running server's RSS; ``malloc_trim(0)`` returns them.
"""
from __future__ import annotations

import ctypes
import sys


def trim_heap() -> bool:
    """``malloc_trim(0)``: True when trimmed (Linux with glibc); elsewhere (musl, macOS, Windows) the
    allocator is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to trim
        return False
    return True
