"""The Settings action "Download the official weights" (Settings → ICT reward) and its API route.

The download itself is :func:`ict_core.official.ensure` (the same as `ict fetch` and the ComfyUI loader's
"8y/ICT (download)" choice: resumable, checked against the hub's checksum, converted once). This module only
translates it into the webui's terms: the progress goes to ``shared.state`` (job, textinfo, job_no/job_count,
sampling_step/sampling_steps, which ``/sdapi/v1/progress`` and the UI read) and to an optional callback (the
button's Gradio progress), the webui's Interrupt (``shared.state.interrupted``) stops it, the run holds the webui's
queue lock (so it never shares ``shared.state`` with a generation), and every outcome is one line for the user.
Nothing here imports ``modules.*``: the webui script passes its ``shared.state`` and lock in.
"""
from __future__ import annotations

import html
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hints

log = logging.getLogger(__name__)

ACTION = "Download the official weights"        # the button, and what the messages tell the user to press
STOP = "Stop the download"
WHERE = f"Settings > ICT reward > {ACTION}"     # ASCII: it is printed on consoles too
ROUTE = "/ict-reward/v1/download"
OPTION_KEY = "ict_reward_download"             # the Settings entry (not saved: do_not_save)
JOB = "ict_reward_download"                     # shared.state.job while it runs
KINDS = ("ict", "hp")
HTTP_STATUS = {"done": 200, "interrupted": 409, "failed": 502}

_CONVERT_CMD = re.compile(r"`ict (convert [^`]+)`")


class Interrupted(Exception):
    """Raised by the cancel check when the webui's Interrupt was pressed; ensure lets it through."""


@dataclass
class Outcome:
    status: str                                 # "done" (downloaded, or there already), "interrupted", "failed"
    message: str                                # one line for the user
    folder: str = ""
    files: dict[str, str] = field(default_factory=dict)       # kind -> path of the converted file
    downloaded: list[str] = field(default_factory=list)       # the kinds fetched by this run

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.status]

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "folder": self.folder, "files": self.files,
                "downloaded": self.downloaded}

    def as_html(self) -> str:
        return status_html(self.message)


def runnable_offline(msg: str) -> str:
    """The engine's message with its `ict convert ...` command written as it runs in this webui (the webui's
    Python, from the extension's folder). Its `ict fetch ...` is left as it is: it names a command for another
    machine, one with network, where the path of this extension means nothing."""
    return hints.runnable(msg, _CONVERT_CMD)


def _size(n: int, total: int) -> str:
    return f"{n / 1e9:.2f} GB" if total >= 1e9 else f"{n / 1e6:.1f} MB"


def _installed(kind: str, dirs: list[Path]) -> Path | None:
    from ict_core import official

    return official.installed(kind, dirs)


def describe(folder: str | os.PathLike, dirs: Iterable[str | os.PathLike] | None = None) -> str:
    """What the action would do now: which files are there, which would be downloaded, and where to."""
    from ict_core import official

    folder = Path(folder)
    dirs = [Path(d) for d in (dirs or [folder])]
    have = {k: _installed(k, dirs) for k in KINDS}
    missing = [official.RELEASES[k].repo for k in KINDS if have[k] is None]
    if not missing:
        return (f"The official weights are installed: {have['ict']} and {have['hp']}. Nothing to download.")
    return (f"Downloads {' and '.join(missing)} from Hugging Face (8y/ICT 2 GB, 8y/HP up to 4 GB) into {folder} "
            f"and converts them once. {STOP} stops it; pressing {ACTION} again resumes it.")


def status_html(text: str) -> str:
    """The status line under the button."""
    return f"<p>{html.escape(text)}</p>"


@contextmanager
def torch_load_for_weights_only(original: Callable[..., Any] | None):
    """While the download converts: ``torch.load(..., weights_only=True)`` is torch's own ``original`` load.

    Automatic1111 replaces ``torch.load`` with its ``modules.safe.load``, which first checks a pickle with its own
    restricted unpickler and a list of the names a zip checkpoint may hold; that list predates the
    ``.format_version`` entry that recent torch writes, so it refuses such a file (printing a traceback) and returns
    None. The converter's only load passes ``weights_only=True``: torch's own restricted unpickler, which builds
    tensors and plain containers and nothing else, so that call goes to ``original`` (the webui's
    ``modules.safe.unsafe_torch_load``); every other call, from any thread, still goes through the webui's check.
    Nothing changes where torch.load is not replaced (Forge) or ``original`` is unknown."""
    import torch

    patched = torch.load
    if original is None or patched is original:
        yield
        return

    def load(f, *args, **kwargs):
        if kwargs.get("weights_only") is True:
            return original(f, *args, **kwargs)
        return patched(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        if torch.load is load:
            torch.load = patched


class Downloader:
    """Runs :func:`ict_core.official.ensure` for the releases, on the webui's ``shared.state``.

    ``state`` is the webui's ``shared.state`` (or a stand-in with ``begin(job)``, ``end()``, ``interrupted``,
    ``job_no``, ``job_count``, ``sampling_step``, ``sampling_steps``, ``textinfo``); ``lock`` the webui's
    ``call_queue.queue_lock`` (a generation and a download then take turns)."""

    def __init__(self, state: Callable[[], Any], lock: Any = None,
                 torch_load: Callable[[], Callable[..., Any] | None] | None = None):
        self._state = state
        self._lock = lock
        self._torch_load = torch_load   # -> torch's own load where the webui replaced it (A1111's modules.safe)
        self._mine = threading.Lock()   # in this process, one run at a time even without the webui's lock
        self.running = False

    def stop(self) -> bool:
        """The Stop button: interrupt the download, never someone's generation. True when one was running."""
        st = self._state()
        if self.running and getattr(st, "job", None) == JOB:
            st.interrupt() if hasattr(st, "interrupt") else setattr(st, "interrupted", True)
            return True
        return False

    def run(self, folder: str | os.PathLike, kinds: Iterable[str] = KINDS,
            dirs: Iterable[str | os.PathLike] | None = None,
            report: Callable[[float, str], None] | None = None) -> Outcome:
        """Make the converted files of ``kinds`` ready in ``folder`` (those already in one of ``dirs``, the folders
        the extension searches, are left as they are). Never raises for an engine error: it is the outcome's
        one-line message."""
        from ict_core import official
        from ict_core.errors import ICTError

        folder = Path(folder)
        kinds = [k for k in kinds if k in official.RELEASES]
        dirs = [Path(d) for d in (dirs or [folder])]
        files: dict[str, str] = {}
        with self._mine, (self._lock if self._lock is not None else nullcontext()):
            todo = []
            for kind in kinds:
                there = _installed(kind, dirs)
                if there is None:
                    todo.append(kind)
                else:
                    files[kind] = str(there)
            if not todo:
                names = " and ".join(files.values())
                return Outcome("done", f"ICT reward: the official weights are already installed ({names}); nothing "
                                       f"was downloaded.", str(folder), files)
            st = self._state()
            st.begin(job=JOB)
            self.running = True
            st.job_count = len(todo)
            done: list[str] = []
            original = self._torch_load() if self._torch_load is not None else None
            try:
                with torch_load_for_weights_only(original):
                    self._each(st, todo, folder, files, done, report)
            except Interrupted:
                msg = (f"ICT reward: the download was stopped; press {ACTION} again to resume it "
                       f"(what is downloaded stays in {folder / '.download'}).")
                log.info(msg)
                return Outcome("interrupted", msg, str(folder), files, done)
            except ICTError as e:
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                msg = f"ICT reward: {runnable_offline(text)}"
                log.error(msg)
                return Outcome("failed", msg, str(folder), files, done)
            except Exception as e:  # noqa: BLE001 - an unexpected error is still one line for the user
                log.exception("ICT reward: the download failed")
                msg = (f"ICT reward: the download failed ({type(e).__name__}: {str(e).strip()[:200]}); the console "
                       f"has the details. Press {ACTION} again to resume it.")
                return Outcome("failed", " ".join(msg.split()), str(folder), files, done)
            finally:
                self.running = False
                st.textinfo = None
                st.end()
        names = " and ".join(official.RELEASES[k].repo for k in done)
        msg = (f"ICT reward: {names} downloaded and converted into {folder} "
               f"({', '.join(Path(files[k]).name for k in done)}); generations with ICT reward enabled use them.")
        log.info(msg)
        return Outcome("done", msg, str(folder), files, done)

    def _each(self, st: Any, todo: list[str], folder: Path, files: dict[str, str], done: list[str],
              report: Callable[[float, str], None] | None) -> None:
        from ict_core import official

        for i, kind in enumerate(todo):
            rel = official.RELEASES[kind]
            st.sampling_step, st.sampling_steps = 0, 0     # first: a reader never sees the next job full
            st.job_no = i
            st.textinfo = f"ICT reward: downloading {rel.repo}"
            log.info("ICT reward: downloading %s into %s", rel.repo, folder)
            out = official.ensure(kind, folder, progress=self._progress(st, rel.repo, i, len(todo), report),
                                  check_cancel=lambda: self._check(st))
            files[kind] = str(out)
            done.append(kind)

    @staticmethod
    def _check(st: Any) -> None:
        if getattr(st, "interrupted", False) or getattr(st, "stopping_generation", False):
            raise Interrupted

    @staticmethod
    def _progress(st: Any, repo: str, index: int, count: int, report: Callable[[float, str], None] | None):
        most = [0]

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "download":
                most[0] = max(most[0], int(done))   # a bar that never goes back (between a release's files the
                done = most[0]                      # engine may report a file's start again)
                st.sampling_step, st.sampling_steps = done, int(total)
                text = f"ICT reward: downloading {repo} ({_size(done, total)} of {_size(total, total)})"
                part = done / total if total else 0.0
            else:
                st.sampling_step = st.sampling_steps = max(int(st.sampling_steps or 0), 1)
                text = f"ICT reward: converting {repo}" if done < total else f"ICT reward: {repo} converted"
                part = 1.0
            st.textinfo = text
            if report is not None:
                try:
                    report(min(1.0, (index + part) / count), text)
                except Exception as e:  # noqa: BLE001 - the UI's bar must not stop the download
                    log.debug("ICT reward: progress report failed (%s)", e)
        return progress
