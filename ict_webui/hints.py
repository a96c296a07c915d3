"""The commands the extension's messages suggest, written so that they run as printed in this webui.

The webui does not put the ``ict`` command on the PATH (only the extension's requirements are installed), so
a command is ``cd "<extension folder>" && "<the webui's Python>" -m ict_core ...`` with absolute paths: it runs
from any folder, in the webui's own environment. The engine's messages name commands as the ``ict`` CLI
(`` `ict fetch ...` ``); :func:`runnable` rewrites them into that form.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from ict_core.model_hints import convert_command
from ict_core.model_hints import quote as _quote

EXTENSION_DIR = Path(__file__).resolve().parents[1]     # holds ict_core/: `python -m ict_core` works from here
_CLI = re.compile(r"`ict ([\w-]+ [^`]+)`")           # a command with arguments (a bare `ict convert` names the tool)
_CONVERT = re.compile(r"`[^`]*\bict convert [^`]+`")  # the engine's convert command (after a rename, maybe)


def command(*args: str | os.PathLike) -> str:
    """``ict ARGS`` as this webui runs it (``cd`` into the extension folder, the webui's Python, ``-m ict_core``)."""
    cd = "cd /d" if os.name == "nt" else "cd"
    return " ".join([cd, _quote(str(EXTENSION_DIR)), "&&", _quote(sys.executable), "-m", "ict_core",
                     *(_quote(str(a)) for a in args)])


def runnable(msg: str, pattern: re.Pattern = _CLI) -> str:
    """``msg`` with each `` `ict ARGS` `` that ``pattern`` matches (group 1: ARGS) rewritten by :func:`command`
    (arguments as a POSIX shell splits them)."""
    def one(m: re.Match) -> str:
        try:
            args = shlex.split(m.group(1))
        except ValueError:          # unbalanced quotes: not a command we wrote
            return m.group(0)
        return f"`{command(*args)}`"
    return pattern.sub(one, msg)


def fetch_hint(dest: str | os.PathLike) -> str:
    """The command that downloads and converts both models into ``dest``."""
    return f"`{command('fetch', '--hp', '--dest', Path(dest).resolve())}`"


def convert_hint(pickle: Path) -> str:
    """The engine's command that converts the ICT pickle ``pickle`` (:func:`ict_core.model_hints.convert_command`),
    as this webui runs it."""
    return f"`{convert_command(pickle, command)}`"


def is_pickle(path: Path) -> bool:
    """Whether the engine takes ``path`` for a PyTorch pickle (its own test, on the file's first bytes)."""
    from ict_core.weights import looks_like_pickle

    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return head[8:9] != b"{" and looks_like_pickle(Path(path), head)


def for_refused(path: Path, problem: str) -> str:
    """The engine's message about a model file it refused, with a command that works here: for a pickle, its
    ``ict convert`` suggestion replaced by :func:`convert_hint`; for any other file (truncated, not converted), the
    download into its folder (which replaces it) added."""
    if is_pickle(path):
        fix = convert_hint(path)
        return runnable(_CONVERT.sub(lambda _: fix, problem) if _CONVERT.search(problem) else f"{problem}; {fix}")
    return runnable(f"{problem}; to download the weights again: {fetch_hint(Path(path).parent)}")
