"""One file of a Hugging Face repository into a local folder, resumable across processes, with a host's progress
bar and cancel check; and the hub's errors sorted into what a user can act on (ict_core.official uses it)."""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .files import open_regular

log = logging.getLogger(__name__)

RESUMES = 3                     # tries of one file's transfer, each continuing where the last one broke off
MAX_SMALL_BYTES = 1 << 20       # a config.json


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None  # read per call: huggingface_hub reads it once at import


def reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def unreachable(e: BaseException) -> bool:
    """A refused or dropped connection, a timeout, DNS, or the hub's offline mode: no HTTP answer at all."""
    if status(e) is not None:
        return False
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                         "Timeout", "TimeoutException", "TimeoutError", "NetworkError", "TransportError",
                         "ProtocolError", "RemoteProtocolError"})


def dropped(e: BaseException) -> bool:
    """A transfer that broke off (or never started) for a network reason, worth resuming."""
    names = {c.__name__ for c in type(e).__mro__}
    return unreachable(e) or bool(names & {"ChunkedEncodingError", "IncompleteRead", "ReadError"})


def status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    with open_regular(path) as f:
        data = f.read(MAX_SMALL_BYTES + 1)
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def progress_class(report: Callable[[int], None], check_cancel: Callable[[], None] | None):
    """A tqdm of huggingface_hub's that reports each chunk and lets the host cancel between chunks."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class _Bar(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # the host draws the bar; no second one on the console
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self._at = int(kwargs.get("initial") or 0)
            report(self._at)

        def update(self, n=1):
            if check_cancel is not None:
                check_cancel()   # the host's own exception (ComfyUI: InterruptProcessingException) ends the transfer
            self._at += int(n or 0)
            report(self._at)
            return super().update(n)

    return _Bar


def fetch_file(url: str, dest: Path, size: int, bar) -> None:
    """One file into `dest` through `dest`.part, continued from where a stopped run left it (a Range request).

    huggingface_hub's http_get does the transfer (headers, proxies, retries, the size check); hf_hub_download is not
    used because since huggingface_hub 1.x each process downloads into a fresh temporary file, so a killed run
    starts over."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    params = inspect.signature(http_get).parameters
    for attempt in range(1, RESUMES + 1):
        have = part.stat().st_size if part.is_file() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            break
        extra = ({"tqdm_class": bar} if "tqdm_class" in params
                 else {"_tqdm_bar": bar(total=size, initial=have)} if "_tqdm_bar" in params else {})
        try:
            with open(part, "ab") as f:
                http_get(url, f, resume_size=have, headers=build_hf_headers(), expected_size=size, **extra)
            break
        except Exception as e:
            # a transfer that broke off resumes here too: huggingface_hub < 1.0 gives up on a dropped connection
            if attempt == RESUMES or getattr(e, "_ict_cancel", False) or not dropped(e):
                raise
            log.warning("the download of %s broke off (%s); resuming it (%d/%d)", dest.name, reason(e), attempt,
                        RESUMES - 1)
    os.replace(part, dest)
