"""Opening files that a user names: only regular files, never blocking on a FIFO or a device."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


def regular_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a regular file ("not found", "a folder", "a FIFO" ...), or None.

    Only stats the path (follows symlinks); never opens it, so a FIFO or a device cannot block."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    return None if stat.S_ISREG(mode) else _kind(mode)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    return "not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading; OSError with a plain reason for anything else.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer); the check is
    made on the opened descriptor, so a path swapped after a stat cannot slip through."""
    f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0)))
    try:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is {_kind(mode)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(f.fileno(), True)
        return f
    except BaseException:
        f.close()
        raise
