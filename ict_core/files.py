"""Files that a user names: only regular files are read (never blocking on a FIFO or a device), and
an output never replaces an input, is written atomically, and gets the usual permissions."""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The largest image file read (1 GiB): above Pillow's own bound on what it decodes (2 x 89 M pixels of 4 bytes),
#: so no image that can be scored is refused, and no multi-GB file is read into memory in vain.
MAX_IMAGE_BYTES = 1 << 30


def folder_images(folder: Path) -> list[Path]:
    """The image files inside a folder (by suffix), recursively, sorted."""
    return [f for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]


def image_files(items: Sequence[str]) -> list[str]:
    """Files as given; folders expand to the images inside them (recursively, sorted)."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        out.extend(map(str, folder_images(p)) if p.is_dir() else [item])
    if not out:
        raise InputError("no images given (folders were empty); pass image files or folders holding images")
    return out


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


def _size_problem(size: int, limit: int, what: str) -> str | None:
    if size <= limit:
        return None
    return f"{size / 2 ** 20:,.0f} MiB, more than the {limit / 2 ** 20:,.0f} MiB {what} may have"


def read_regular(path: str | Path, limit: int = MAX_IMAGE_BYTES, what: str = "an image file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes, read once; InputError (one line naming the
    path) for anything else. The size is checked before the read, and the read stops past the limit (a
    file that grows meanwhile)."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise InputError(f"{path}: file not found" if problem == "not found" else f"{path}: {problem}")
    try:
        with open_regular(path) as f:
            problem = _size_problem(os.fstat(f.fileno()).st_size, limit, what)
            data = b"" if problem else f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    problem = problem or _size_problem(len(data), limit, what)
    if problem:
        raise InputError(f"{path}: {problem}")
    return data


def sha256_file(path: str | Path, limit: int | None = None, what: str = "this file") -> str:
    """Hex sha256 of a regular file's bytes, read 1 MiB at a time (never whole in memory). OSError when it
    cannot be read; InputError when it is larger than `limit` (checked before the read)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        problem = None if limit is None else _size_problem(os.fstat(f.fileno()).st_size, limit, what)
        if problem:
            raise InputError(f"{path}: {problem}")
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_new_file(out: Path, inputs: Sequence[Path], option: str) -> None:
    """Refuse an output path that cannot or must not be written, before anything is read or written."""
    problem = regular_file_problem(out)
    if problem not in (None, "not found"):
        raise InputError(f"{option} {out} is {problem}; give the path of a new file")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {out}: {parent} is a file, so no folder can hold the output; "
                                 f"give another path")
            break
    if problem is None:
        for src in inputs:
            if src.exists() and os.path.samefile(src, out):
                raise InputError(f"{option} {out} is the input {src}; give a new file name (the input is kept)")


def _new_file_mode(out: Path) -> int:
    """A replaced file keeps its mode; a new one gets the usual 0666 less the umask (0644 under 022)."""
    try:
        return out.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(out: Path, write: Callable[[str], None]) -> None:
    """write(temporary path) beside `out`, fsync, then rename over it: readers see the old or the new file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(out)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
