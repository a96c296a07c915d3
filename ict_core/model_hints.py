"""The command that the engine suggests for a PyTorch pickle given as a model file, written to run as printed.

A pickle with a pickle's name converts beside itself; one under another name (``ict.safetensors``) is first
renamed to ``.bin``, since the converter reads a pickle by that name, then converted back to its own name, where
the hosts look for it. Paths are absolute and quoted, so the command works from any folder. Adapters that run
the CLI another way (the webui: its own Python, ``-m ict_core``) pass their own ``command``.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path


def quote(arg: str | os.PathLike) -> str:
    """One argument quoted for this platform's shell."""
    return subprocess.list2cmdline([str(arg)]) if os.name == "nt" else shlex.quote(str(arg))


def ict_command(*args: str | os.PathLike) -> str:
    """``ict ARGS``, as a user with the ``ict`` command on the PATH runs it."""
    return " ".join(["ict", *(quote(a) for a in args)])


def free_name(path: Path) -> Path:
    """``path``, or ``stem-2.suffix``, ``stem-3.suffix`` ...: the first name not taken."""
    out, n = path, 2
    while out.exists():
        out = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return out


def convert_command(pickle: str | os.PathLike, command: Callable[..., str] = ict_command) -> str:
    """The shell command that converts the ICT pickle ``pickle`` into a safetensors file that is found where the
    pickle was: beside it for a pickle's name, under its own name otherwise."""
    from .weights import PICKLE_SUFFIXES

    pickle = Path(pickle).resolve()
    if pickle.suffix.lower() in PICKLE_SUFFIXES:
        return command("convert", pickle, "--out", free_name(pickle.with_suffix(".safetensors")))
    kept = free_name(pickle.with_suffix(".bin"))
    move = "move /y" if os.name == "nt" else "mv"
    return f"{move} {quote(pickle)} {quote(kept)} && {command('convert', kept, '--out', pickle)}"
