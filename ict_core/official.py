"""The official weights (8y/ICT, 8y/HP on the Hugging Face hub), made ready in a models folder on first use.

`ensure` is what the CLI (`ict fetch`), the ComfyUI loader's "8y/ICT (download)" choice and the webui's download
action call. It downloads the released files with huggingface_hub into a staging folder inside the models folder
(an interrupted download resumes there), checks each file against the checksum the hub publishes for it, converts
them once with the converter (pickles read with ``weights_only=True`` only), and removes the pickles. A converted
file already in the folder is used as it is: a second run never touches the network. Progress goes to a callback
and a host's cancel check runs between chunks, so a host shows its own bar and its Cancel stops the transfer.
"""
from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import hub_transfer
from .errors import ModelFileError
from .files import regular_file_problem, sha256_file
from .paths import HP_FILE, ICT_FILE

log = logging.getLogger(__name__)

#: progress(stage, done, total): stage is "download" (bytes of all files of the release) or "convert" (0 or 1 of 1)
Progress = Callable[[str, int, int], None]

KNOWN_ICT_SHA256 = "d5b86b0d5da463288650ed86d0409a28196f7514efa44cf63641297fb0e9832f"  # FACTS.md, via a mirror
MAX_FILE_BYTES = 8 << 30        # the largest released file accepted (8y/ICT's pickle is 1.97 GB)
_LOCK_POLL_S = 0.5


@dataclass(frozen=True)
class Release:
    """One released model: its hub repository, the files the converter reads, and the file it becomes."""
    kind: str
    repo: str
    files: tuple[str, ...]
    optional: tuple[str, ...]
    out_name: str

    @property
    def choice(self) -> str:
        """How the hosts list it before (and after) it is on disk."""
        return f"{self.repo} (download)"


RELEASES = {
    # a config.json beside 8y/ICT's pickle is read when a repository has one (the released one has none: the
    # converter then uses the published ViT-H-14 architecture)
    "ict": Release("ict", "8y/ICT", ("pytorch_model.bin",), ("config.json",), ICT_FILE),
    "hp": Release("hp", "8y/HP", ("hp_backbone/config.json", "hp_backbone/pytorch_model.bin",
                                  "hp_scorer/mlp_pytorch_model.bin"), (), HP_FILE),
}
CHOICES = {r.choice: r for r in RELEASES.values()}


def release_for(name: str | None) -> Release | None:
    """The release a host's choice names ("8y/ICT (download)"), or None for a file name."""
    return CHOICES.get(name or "")


def installed(kind: str, folders: list[Path]) -> Path | None:
    """The converted file of a release in the first of `folders` that has it (no network, no read)."""
    for folder in folders:
        p = Path(folder) / RELEASES[kind].out_name
        if p.is_file():
            return p
    return None


def offline_hint(kind: str, folder: Path) -> str:
    """The two commands that make the file without this machine reaching the hub."""
    from .model_hints import ict_command

    rel, out = RELEASES[kind], Path(folder) / RELEASES[kind].out_name
    fetch = ict_command("fetch", *(["--hp"] if kind == "hp" else []), "--dest", "MODELS")
    return (f"on a machine with network run `{fetch}` and copy MODELS/{rel.out_name} to {out}, or with a copy of "
            f"the {rel.repo} folder run `{ict_command('convert', 'FOLDER', '--out', out)}`")


# ---------------------------------------------------------------------------------------------------- the hub
def _expected(rel: Release, name: str, hub) -> tuple[str | None, int | None, str] | None:
    """(checksum the hub publishes, size, where to download it) of one file, or None when an optional file is not
    in the repository."""
    url = hub.hf_hub_url(rel.repo, name, endpoint=hub_transfer.endpoint())
    try:
        meta = hub.get_hf_file_metadata(url)
    except Exception as e:
        if name in rel.optional and hub_transfer.status(e) == 404:
            return None
        raise
    return (meta.etag or "").strip('"').lower() or None, meta.size, meta.location or url


def _check(rel: Release, name: str, path: Path, checksum: str) -> None:
    """The downloaded bytes against the hub's checksum (sha256 of an LFS file, git's blob sha1 of a small one)."""
    got = sha256_file(path) if len(checksum) == 64 else hub_transfer.git_blob_sha1(path)
    if got != checksum:
        path.unlink(missing_ok=True)
        raise ModelFileError(f"{rel.repo}/{name} downloaded with checksum {got[:16]}… but the hub publishes "
                             f"{checksum[:16]}…; the copy was deleted: run again to download it again (a proxy or "
                             f"mirror may have altered it)")
    if rel.kind == "ict" and name == "pytorch_model.bin" and got != KNOWN_ICT_SHA256:
        log.warning("%s/%s has sha256 %s, not the published %s; the repository may have changed: check the source",
                    rel.repo, name, got, KNOWN_ICT_SHA256)


# --------------------------------------------------------------------------------------------------- ensuring
@contextmanager
def _folder_lock(path: Path, what: str, check_cancel: Callable[[], None] | None):
    """One download of a release per models folder, across processes; waiting for another run can be cancelled."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    told = False
    while True:
        try:
            lock.acquire(timeout=_LOCK_POLL_S)
            break
        except Timeout:
            if not told:
                log.info("waiting for another download of %s (lock %s)", what, path)
                told = True
            if check_cancel is not None:
                check_cancel()
    try:
        yield
    finally:
        lock.release()


def _marked(check_cancel: Callable[[], None] | None) -> Callable[[], None] | None:
    """The host's check, its exception marked so that it passes through the error messages untouched."""
    if check_cancel is None:
        return None

    def check() -> None:
        try:
            check_cancel()
        except BaseException as e:
            e._ict_cancel = True  # type: ignore[attr-defined]
            raise
    return check


def _space_problem(folder: Path, need: int) -> str | None:
    free = shutil.disk_usage(folder).free
    if free >= need:
        return None
    return f"{folder} has {free / 1e9:.1f} GB free and the download and conversion need {need / 1e9:.1f} GB"


def ensure(kind: str, folder: str | Path, progress: Progress | None = None,
           check_cancel: Callable[[], None] | None = None) -> Path:
    """The converted file of release `kind` in `folder`: there already, or downloaded, checked and converted now.

    Errors are one-line ModelFileErrors; `check_cancel`'s own exception (a host's Cancel) passes through and
    leaves the partial download to resume on the next call."""
    rel = RELEASES[kind]
    folder = Path(folder)
    out = folder / rel.out_name
    check_cancel = _marked(check_cancel)
    if out.is_file():
        return out
    problem = regular_file_problem(out)
    if problem != "not found":
        raise ModelFileError(f"{out} is {problem}, where the converted {rel.repo} goes; move it away and run again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / ".download" / rel.repo.replace("/", "--")
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFileError(f"cannot write to the models folder {folder} ({e.strerror or type(e).__name__}); "
                             f"check its permissions or choose another folder") from None
    # beside the staging folder's parent, so that .download goes once it is empty (the lock file stays: deleting
    # a lock file lets a waiting process and a new one both hold "the" lock)
    with _folder_lock(folder / f".{staging.name}.download.lock", rel.repo, check_cancel):
        if out.is_file():  # another run made it while this one waited
            return out
        checked = _download(rel, staging, folder, progress, check_cancel)
        if check_cancel is not None:
            check_cancel()
        _convert(rel, staging, out, progress, checked)
    return out


def _download(rel: Release, staging: Path, folder: Path, progress: Progress | None,
              check_cancel: Callable[[], None] | None) -> dict[Path, str]:
    """Every file of the release into `staging`, each checked; the hub's errors become one line. Returns the
    sha256 of each file checked by one (the converter records them without reading the files again)."""
    try:
        import huggingface_hub as hub
    except ImportError:  # pragma: no cover - a dependency
        raise ModelFileError("huggingface_hub is not installed; pip install huggingface_hub") from None
    name = ""
    try:
        files = {}
        for name in (*rel.files, *rel.optional):
            got = _expected(rel, name, hub)
            if got is not None:
                files[name] = _bounded(rel, name, *got)
        total = sum(size for _, size, _ in files.values())
        problem = _space_problem(folder, 2 * total - sum(_partial_size(staging, n) for n in files))
        if problem:
            raise ModelFileError(f"{problem}; free some space and run again")
        done = 0
        for name, (checksum, size, url) in files.items():
            def report(at: int, base=done, size=size, name=name) -> None:
                if at > size:  # a server sending more than it announced: stopped before it fills the disk
                    raise ModelFileError(f"{rel.repo}/{name}: the server sent more than the {size} bytes it "
                                         f"announced; check HF_ENDPOINT")
                if progress is not None:
                    progress("download", base + at, total)

            dest = staging / name
            if not (dest.is_file() and dest.stat().st_size == size):
                bar = hub_transfer.progress_class(report, check_cancel)
                hub_transfer.fetch_file(url, dest, size, bar)
            _check(rel, name, dest, checksum)
            done += size
            if progress is not None:
                progress("download", done, total)
        return {staging / n: c for n, (c, _, _) in files.items() if len(c) == 64}
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub's and the HTTP library's errors, named in one line
        if getattr(e, "_ict_cancel", False):
            raise
        raise _user_error(e, rel, name, staging, folder) from None


def _bounded(rel: Release, name: str, checksum: str | None, size: int | None, url: str) -> tuple[str, int, str]:
    """A file's metadata, refused before any transfer when it has no size or checksum or is larger than a release."""
    where = hub_transfer.endpoint() or "huggingface.co"
    bound = hub_transfer.MAX_SMALL_BYTES if name.endswith(".json") else MAX_FILE_BYTES
    if size is None or size > bound:
        got = "has no size" if size is None else f"is {size / 1e9:.2f} GB"
        raise ModelFileError(f"{rel.repo}/{name} {got} on {where}, where a released file has at most "
                             f"{bound / 1e9:.2f} GB; check HF_ENDPOINT")
    if checksum is None or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", checksum):
        raise ModelFileError(f"{rel.repo}/{name}: {where} publishes no checksum to check a download against; "
                             f"check HF_ENDPOINT")
    return checksum, size, url


def _user_error(e: Exception, rel: Release, name: str, staging: Path, folder: Path) -> ModelFileError:
    hint = offline_hint(rel.kind, folder)
    where = hub_transfer.endpoint() or "huggingface.co"
    why = hub_transfer.reason(e)
    if hub_transfer.unreachable(e):
        return ModelFileError(f"cannot reach {where} to download {rel.repo} ({why}); {hint}")
    status = hub_transfer.status(e)
    if status is not None:
        return ModelFileError(f"{where} answered HTTP {status} for {rel.repo}/{name}; check the name, your "
                              f"network's proxy or HF_TOKEN, or {hint}")
    return ModelFileError(f"downloading {rel.repo}/{name} into {staging} failed ({why}); run again to resume it, "
                          f"or {hint}")


def _partial_size(staging: Path, name: str) -> int:
    """Bytes of `name` already in the staging folder (done, or the .part of a stopped run)."""
    for p in (staging / name, staging / (name + ".part")):
        if p.is_file():
            return p.stat().st_size
    return 0


def _convert(rel: Release, staging: Path, out: Path, progress: Progress | None, checked: dict[Path, str]) -> None:
    """The converter on the checked download, then the pickles go (a failed conversion keeps them)."""
    from .weights import convert

    if progress is not None:
        progress("convert", 0, 1)
    config = staging / "config.json" if rel.kind == "ict" and (staging / "config.json").is_file() else None
    log.info("converting %s into %s", rel.repo, out)
    convert(staging, out, config, known_sha256=checked)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.parent.rmdir()  # .download, when nothing else is staged
    except OSError:
        pass
    if progress is not None:
        progress("convert", 1, 1)
