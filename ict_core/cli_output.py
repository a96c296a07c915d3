"""What the CLI writes: one line per row (control characters escaped), JSON without bare NaN, file names
that are not UTF-8, and copies that never overwrite anything."""
from __future__ import annotations

import codecs
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import open_regular

log = logging.getLogger("ict_core")
_NAMES = "ict.names"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: object) -> str:
    """`text` with its control characters (newlines, escapes, C1, line separators) written as Python
    escapes (\\n, \\x1b): a file name can then neither break "one line per image" nor drive the terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def _names_errors(exc: UnicodeError):
    """Encoding error handler for stdout: a file name that is not valid UTF-8 (decoded by Python with
    surrogate escapes) is written as its own bytes, as `ls` does; anything else a stream cannot encode
    is backslash-escaped. Never an exception in the middle of a report."""
    if isinstance(exc, UnicodeEncodeError) and codecs.lookup(exc.encoding).name == "utf-8":
        try:
            return codecs.lookup_error("surrogateescape")(exc)
        except UnicodeError:
            pass
    return codecs.backslashreplace_errors(exc)


def tolerant_stdout() -> None:
    """Make sys.stdout write any file name (even under PYTHONIOENCODING=utf-8:strict)."""
    try:
        codecs.lookup_error(_NAMES)
    except LookupError:
        codecs.register_error(_NAMES, _names_errors)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors=_NAMES)
        except (ValueError, OSError):  # pragma: no cover - a stream that cannot be reconfigured
            pass


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no NaN, and a bare `NaN` breaks strict parsers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def check_copy_to(dest: Path, inputs: Sequence[str]) -> None:
    """Refuse, before anything is scored, a --copy-to that cannot be a folder or is an input folder."""
    if dest.exists() and not dest.is_dir():
        raise InputError(f"--copy-to {dest} is a file, not a folder; give a folder (it is made if missing)")
    for parent in dest.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--copy-to {dest}: {parent} is a file, so the folder cannot be made")
            break
    if dest.is_dir():
        for item in inputs:
            if Path(item).is_dir() and os.path.samefile(item, dest):
                raise InputError(f"--copy-to {dest} is the input folder {item}; give another folder (the copies "
                                 f"would be mixed with the images they rank)")


def copy_new(src: Path, dest: Path, name: str) -> Path:
    """Copy src into dest under `name`, or `name` with _1, _2 ... added when taken: never overwrites.
    The name is claimed with O_EXCL, so a file made meanwhile by another process is not overwritten either."""
    dest.mkdir(parents=True, exist_ok=True)
    stem, suffix = os.path.splitext(name)
    n = 0
    while True:
        target = dest / (name if n == 0 else f"{stem}_{n}{suffix}")
        try:
            out = open(target, "xb")
        except FileExistsError:
            n += 1
            continue
        break
    try:
        with out, open_regular(src) as f:
            shutil.copyfileobj(f, out)
        shutil.copystat(src, target)
    except OSError as e:
        target.unlink(missing_ok=True)
        raise InputError(f"could not copy {src} to {target}: {e.strerror or e}") from None
    if n:
        log.warning("%s already exists; copied %s as %s", dest / name, src, target.name)
    return target
