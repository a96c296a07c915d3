"""Persistent embedding cache: prompt text features and an image gallery, kept per model.

Why: the ViT-H text tower costs ~2.8 s per prompt on a 2-core CPU and the image tower far more;
a workflow that re-scores with the same prompt, or a gallery searched by many prompts, should
pay that once. The cache is an accelerator, never a point of failure: every fault (garbled
file, read-only or full disk, lock trouble) becomes one logging warning and a cache that keeps
working (from memory if it must); nothing here raises into the scorer.

Layout under the cache folder (see resolve_cache_dir)::

    prompts/<model fingerprint>.ictc        text features of one ICT weight file
    images/<ict fp>+<hp fp|none>.ictc       image gallery of one (ICT, HP) pair
    *.ictc.lock                             cross-process lock of each table

Files are written atomically with a checksum (ict_core.cache_file). Several processes may share
a folder: a save takes the table's lock, re-reads the disk copy, merges its own new entries and
LRU times in, and writes the result back, so concurrent writers lose nothing.

This module must stay importable without torch (and imports faiss lazily).
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections import namedtuple
from pathlib import Path

import numpy as np

from . import cache_file as cf
from .cache_store import Table

log = logging.getLogger(__name__)

__all__ = [
    "EmbeddingCache", "SearchHit", "resolve_cache_dir", "gallery_key", "prompt_key", "hash_file",
    "hash_pixels", "CACHE_DIR_ENV",
]

CACHE_DIR_ENV = "ICT_CACHE_DIR"
#: Set to 1 to search with numpy even when faiss is installed.
NO_FAISS_ENV = "ICT_CACHE_NO_FAISS"
KINDS = ("prompts", "images")
BY = ("ict", "hp", "ict*hp")

SearchHit = namedtuple("SearchHit", "label hash ict hp_raw value")
SearchHit.__doc__ = """One ranked gallery image: value is ict, sigmoid(hp_raw) for by='hp', or
ict*sigmoid(hp_raw) for by='ict*hp'; ict is NaN when by='hp' was asked without a query."""


def resolve_cache_dir(explicit=None) -> Path:
    """Cache folder: explicit, else ict_core.paths.default_cache_dir ($ICT_CACHE_DIR, the XDG or
    Windows default; one source of truth for the CLI's help text and the nodes). Nothing is
    created here: folders are made on the first save.
    """
    if explicit not in (None, ""):
        return Path(os.path.expanduser(os.fspath(explicit)))
    from .paths import default_cache_dir

    return Path(os.path.expanduser(str(default_cache_dir())))


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


def hash_file(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes: the gallery key of an image read from disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_pixels(pixels) -> str:
    """sha256 of in-memory uint8 pixels and their shape (so a reshaped buffer differs).

    Same digest as the engine's for a uint8 CHW tensor (ict_core.preprocess), so a host that hashes
    images itself finds what the scorer stored."""
    arr = np.ascontiguousarray(np.asarray(pixels))
    digest = hashlib.sha256(str(tuple(int(x) for x in arr.shape)).encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


def _safe_name(key: str) -> str:
    """A file name for a key; keys that are not plain lower-case tokens get a hash suffix."""
    if re.fullmatch(r"[a-z0-9_+-][a-z0-9._+-]{0,99}", key):
        return key
    stem = re.sub(r"[^a-z0-9._+-]", "_", key.lower())[:40].lstrip(".")
    return f"{stem}-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


_faiss_state = {"tried": False, "mod": None}


def _faiss():
    """faiss, or None (then numpy searches; one warning when it is missing)."""
    if os.environ.get(NO_FAISS_ENV, "") not in ("", "0"):
        return None
    if not _faiss_state["tried"]:
        _faiss_state["tried"] = True
        try:
            import faiss  # noqa: PLC0415  (lazy: `import ict_core` must stay light)

            _faiss_state["mod"] = faiss
        except Exception as exc:
            log.warning("faiss is not importable (%s); gallery search uses numpy (same ranking, slower)", exc)
    return _faiss_state["mod"]


def _bulk_hits(rows, count: int) -> list:
    """SearchHits built in C (tuple.__new__), with the cyclic GC paused for big lists: its passes
    over a large heap otherwise double the cost of 100,000 results (the tuples hold no cycles)."""
    paused = count > 10_000 and gc.isenabled()
    if paused:
        gc.disable()
    try:
        return list(map(tuple.__new__, itertools.repeat(SearchHit), rows))
    finally:
        if paused:
            gc.enable()


_live_caches: "weakref.WeakSet[EmbeddingCache]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit():
    for cache in list(_live_caches):
        try:
            cache.flush(force=True)
        except Exception:  # never fail interpreter shutdown
            pass


def _guard(default):
    """Hot-path methods never raise: an unexpected error is logged once and yields `default`."""

    def wrap(fn):
        def inner(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                if fn.__name__ not in self._warned_errors:
                    self._warned_errors.add(fn.__name__)
                    log.warning("ict-reward cache: %s failed (%s: %s); carrying on without the cache",
                                fn.__name__, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                return default() if callable(default) else default

        inner.__name__, inner.__doc__, inner.__wrapped__ = fn.__name__, fn.__doc__, fn
        return inner

    return wrap


class EmbeddingCache:
    """Prompt-feature cache and image gallery on disk; see the module docstring.

    max_prompts / max_images cap each table (one model's prompts, one gallery); past the cap the
    least recently used entries are evicted. memory_only=True never touches the disk.
    Thread-safe within a process, merge-safe across processes.
    """

    #: Seconds between looks at the disk for other processes' saves (a stat per table).
    refresh_interval = 0.5
    #: A save that only carries new LRU times waits this long (flush(force=True) does not).
    lru_flush_interval = 60.0
    #: Use times alone are saved only for tables at least this full (fraction of the cap).
    LRU_PERSIST_FILL = 0.8
    #: Seconds to wait for another process's lock before deferring a save to the next flush.
    lock_timeout = 30.0

    def __init__(self, cache_dir=None, max_prompts: int = 100_000, max_images: int = 1_000_000,
                 *, memory_only: bool = False):
        self.path = resolve_cache_dir(cache_dir)
        self.max_prompts = int(max_prompts)
        self.max_images = int(max_images)
        self._memory_only = bool(memory_only)
        self._memory_reason = "requested" if memory_only else None
        self._tables: dict = {}
        self._lock = threading.RLock()
        self._warned_errors: set = set()
        self._warned_lock = False
        self.reset_counters()
        _live_caches.add(self)

    def __repr__(self):
        return f"EmbeddingCache({str(self.path)!r}{', memory-only' if self._memory_only else ''})"

    # ---- counters ------------------------------------------------------------------------
    @property
    def counters(self) -> dict:
        return dict(self._counters)

    def reset_counters(self) -> None:
        self._counters = dict(prompt_hits=0, prompt_misses=0, image_hits=0, image_misses=0)

    @property
    def memory_only(self) -> bool:
        return self._memory_only

    # ---- prompts -------------------------------------------------------------------------
    @_guard(dict)
    def get_prompts(self, fingerprint: str, prompts) -> dict:
        """Cached L2-normalised text features of the given prompts (hits only), bit-identical to
        what was put. Each distinct prompt counts as one hit or one miss."""
        with self._lock:
            return self._lookup(self._table("prompts", fingerprint), prompts, "prompt", Table.vector)

    @_guard(None)
    def put_prompts(self, fingerprint: str, features: dict) -> None:
        """Store {prompt: float32 vector}. Persisted lazily: call flush() (also done at exit)."""
        with self._lock:
            table = self._table("prompts", fingerprint)
            items = []
            for prompt, vec in features.items():
                vec = self._vector(table, vec)
                if vec is not None and isinstance(prompt, str):
                    items.append((prompt, vec, np.nan, ""))
            table.put(items, time.time(), self.max_prompts)

    # ---- images --------------------------------------------------------------------------
    @_guard(dict)
    def get_images(self, gallery: str, hashes) -> dict:
        """{hash: (float32 vector, hp_raw or NaN)} for the stored hashes among `hashes`."""
        with self._lock:
            return self._lookup(self._table("images", gallery), hashes, "image",
                                lambda table, row: (table.vector(row), table.hp_raw(row)))

    def _lookup(self, table, keys, counter: str, value) -> dict:
        """{key: value(table, row)} for the stored keys among `keys` (each distinct key one hit or
        miss in the `counter` counters); hits are marked used now."""
        out, now = {}, time.time()
        for key in dict.fromkeys(keys):
            row = table.row(key)
            if row is None:
                self._counters[f"{counter}_misses"] += 1
            else:
                out[key] = value(table, row)
                table.touch(row, now)
                self._counters[f"{counter}_hits"] += 1
        return out

    @_guard(None)
    def put_images(self, gallery: str, entries: dict) -> None:
        """Store {hash: (vector, hp_raw or None/NaN, label)}; failed (non-finite) vectors are skipped."""
        with self._lock:
            table = self._table("images", gallery)
            items = []
            for digest, (vec, hp_raw, label) in entries.items():
                vec = self._vector(table, vec)
                if vec is None or not isinstance(digest, str):
                    continue
                hp = np.float32(np.nan if hp_raw is None else hp_raw)
                items.append((digest, vec, hp, "" if label is None else str(label)))
            table.put(items, time.time(), self.max_images)

    def image_count(self, gallery: str) -> int:
        with self._lock:
            return len(self._table("images", gallery))

    def search(self, gallery: str, query_vec, top_k=None, by: str = "ict") -> list:
        """Rank every stored image of a gallery for one text feature, best first.

        ict is the fp32 inner product (== ICT cosine of normalised features), see cache_store;
        by='ict*hp' multiplies by sigmoid(hp_raw), the order the engine's ranking uses; by='hp'
        ranks by sigmoid(hp_raw) alone and needs no query (query_vec None: ict is NaN); ties go
        to the image stored first; images without hp_raw rank last under 'hp' and 'ict*hp'.
        Returns [SearchHit(label, hash, ict, hp_raw, value)]. Raises ValueError on bad arguments.
        """
        if by not in BY:
            raise ValueError(f"by must be one of {BY}, not {by!r}")
        with self._lock:
            table = self._table("images", gallery)
            query = None if query_vec is None else np.asarray(query_vec, dtype=np.float32)
            if query is None and by != "hp":
                raise ValueError(f"by={by!r} needs a query vector; only by='hp' ranks without one")
            rows, ict, value = table.search(query, top_k, by, _faiss())
            labels, keys, hp_raw = table.columns(rows)
            return _bulk_hits(zip(labels, keys, ict.tolist(), hp_raw, value.tolist()), len(labels))

    # ---- housekeeping --------------------------------------------------------------------
    @_guard(None)
    def flush(self, force: bool = False) -> None:
        """Persist new entries now (merging with other processes). Cheap when nothing changed;
        changes of use times alone wait lru_flush_interval unless force, and are kept only for
        tables near their cap (see _lru_matters)."""
        with self._lock:
            if self._memory_only:
                return
            now = time.monotonic()
            for table in list(self._tables.values()):
                if table.pending or (table.touched and self._lru_matters(table)
                                     and (force or now - table.saved >= self.lru_flush_interval)):
                    self._save(table)
                    if self._memory_only:
                        return

    def close(self) -> None:
        """Flush everything, LRU times included."""
        self.flush(force=True)

    def stats(self) -> dict:
        """What is on disk (after a flush), plus this process's counters."""
        with self._lock:
            self.flush(force=True)
            tables, size = [], 0
            for kind in KINDS:
                folder = self.path / kind
                try:
                    names = sorted(os.listdir(folder))
                except OSError:
                    continue
                for name in names:
                    try:
                        nbytes = os.stat(folder / name).st_size
                    except OSError:
                        continue
                    size += nbytes
                    if not name.endswith(cf.SUFFIX):
                        continue
                    header = cf.read_header(folder / name)
                    if header is None or header.get("kind") != kind:
                        continue
                    tables.append({"kind": kind, "key": header.get("key"), "count": int(header.get("count", 0)),
                                   "dim": int(header.get("dim", 0)), "bytes": nbytes, "file": str(folder / name)})
            if self._memory_only:  # nothing reaches the disk: report what memory holds
                on_disk = {(t["kind"], t["key"]) for t in tables}
                for (kind, key), table in self._tables.items():
                    if (kind, key) in on_disk:
                        next(t for t in tables if (t["kind"], t["key"]) == (kind, key))["count"] = len(table)
                    elif len(table):
                        tables.append({"kind": kind, "key": key, "count": len(table), "dim": table.dim or 0,
                                       "bytes": 0, "file": None})
            fingerprints = set()
            for t in tables:
                if t["kind"] == "prompts":
                    fingerprints.add(t["key"])
                else:
                    fingerprints.update(p for p in str(t["key"]).split("+") if p != "none")
            return {
                "path": str(self.path),
                "prompts": sum(t["count"] for t in tables if t["kind"] == "prompts"),
                "images": sum(t["count"] for t in tables if t["kind"] == "images"),
                "bytes": size,
                "fingerprints": sorted(fingerprints),
                "galleries": sorted(t["key"] for t in tables if t["kind"] == "images"),
                "tables": tables,
                "max_prompts": self.max_prompts,
                "max_images": self.max_images,
                "memory_only": self._memory_only,
                "counters": self.counters,
            }

    def clear(self, prompts: bool = True, images: bool = True) -> None:
        """Forget every table of the chosen kinds, on disk (all models) and in memory."""
        kinds = [k for k, on in (("prompts", prompts), ("images", images)) if on]
        with self._lock:
            for key in [k for k in self._tables if k[0] in kinds]:
                del self._tables[key]
            if self._memory_only:
                return
            for kind in kinds:
                folder = self.path / kind
                try:
                    names = os.listdir(folder)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._go_memory_only(exc)
                    return
                for name in sorted(names):
                    if not name.endswith(cf.SUFFIX):
                        continue
                    try:
                        with cf.FileLock(folder / (name + ".lock"), self.lock_timeout):
                            for other in os.listdir(folder):  # the table, its temps, its corrupt copies
                                if other == name or (other.startswith(name + ".") and not other.endswith(".lock")):
                                    os.unlink(folder / other)
                    except cf.LockTimeout:
                        log.warning("ict-reward cache: %s is locked by another process; not cleared", folder / name)
                    except OSError as exc:
                        self._go_memory_only(exc)
                        return
                for name in os.listdir(folder):  # corrupt copies of tables that are gone
                    if ".corrupt-" in name:
                        try:
                            os.unlink(folder / name)
                        except OSError:
                            pass

    # ---- internals -----------------------------------------------------------------------
    def _vector(self, table: Table, vec):
        arr = np.asarray(vec)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        arr = arr.reshape(-1)
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            return None
        if table.dim is not None and arr.shape[0] != table.dim:
            log.warning("ict-reward cache: vector width %d does not match %d of %s %s; not stored",
                        arr.shape[0], table.dim, table.kind, table.key)
            return None
        return arr

    def _file(self, kind: str, key: str) -> Path:
        return self.path / kind / (_safe_name(key) + cf.SUFFIX)

    def _table(self, kind: str, key: str) -> Table:
        if not isinstance(key, str) or not key:
            raise ValueError("cache key (fingerprint) must be a non-empty string")
        table = self._tables.get((kind, key))
        if table is None:
            table = self._tables[(kind, key)] = Table(kind, key)
        self._refresh(table)
        return table

    def _lru_matters(self, table: Table) -> bool:
        """Use times can only change what is evicted once a table nears its cap; below that, a run
        that only reads (a search, a re-score) never rewrites a possibly large file."""
        return len(table) >= self.LRU_PERSIST_FILL * self._cap(table)

    def _cap(self, table: Table) -> int:
        return self.max_prompts if table.kind == "prompts" else self.max_images

    def _refresh(self, table: Table) -> None:
        """Pick up another process's save (at most every refresh_interval seconds)."""
        now = time.monotonic()
        if now - table.checked < self.refresh_interval:
            return
        table.checked = now
        path = self._file(table.kind, table.key)
        try:
            sig = cf.signature(path)
        except OSError:
            return
        if sig == table.sig:
            return
        data, sig = self._read(table, path, locked=False)
        table.merge(data, self._cap(table))
        table.sig = sig
        table.saved = now

    def _read(self, table: Table, path: Path, locked: bool):
        """(TableData or None, signature of what was read). Corrupt files are moved aside."""
        try:
            got = cf.read_bytes(path)
        except OSError as exc:
            if not isinstance(exc, (NotADirectoryError, IsADirectoryError)):
                self._go_memory_only(exc)
            return None, None
        if got is None:
            return None, None
        blob, sig = got
        try:
            return cf.decode(blob, table.kind, table.key), sig
        except cf.CorruptFile as exc:
            return self._quarantine(table, path, exc, sig, locked)

    def _quarantine(self, table: Table, path: Path, exc, sig, locked: bool):
        """Move a bad file aside (under the lock, after re-checking it) and start empty."""
        busy = False
        if not locked and not self._memory_only:
            try:
                with cf.FileLock(self._lock_path(path), self.lock_timeout):
                    return self._read(table, path, locked=True)
            except cf.LockTimeout:
                busy = True  # never move a file aside without the lock: a writer may be replacing it
            except OSError as err:
                self._go_memory_only(err)
        aside = None
        if not self._memory_only and not busy:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            try:
                os.replace(path, aside)
                sig = None
            except OSError:
                aside = None
        log.warning("ict-reward cache: %s is unusable (%s); %s, starting this table empty", path, exc,
                    f"moved it to {aside.name}" if aside else "ignoring it")
        return None, sig

    @staticmethod
    def _lock_path(path: Path) -> Path:
        return path.with_name(path.name + ".lock")

    def _save(self, table: Table) -> None:
        path = self._file(table.kind, table.key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with cf.FileLock(self._lock_path(path), self.lock_timeout):
                cf.remove_stale_temps(path)
                if cf.signature(path) != table.sig:  # someone else saved: merge their state in
                    data, _ = self._read(table, path, locked=True)
                    if self._memory_only:  # the disk copy could not be read: never overwrite it blind
                        return
                    table.merge(data, self._cap(table))
                cf.atomic_write(path, cf.encode(table.to_data()))
                table.sig = cf.signature(path)
        except cf.LockTimeout:
            if not self._warned_lock:
                self._warned_lock = True
                log.warning("ict-reward cache: %s stayed locked for %.0f s; saving later", path, self.lock_timeout)
            return
        except OSError as exc:
            self._go_memory_only(exc)
            return
        table.pending.clear()
        table.touched = False
        table.saved = table.checked = time.monotonic()

    def _go_memory_only(self, exc: OSError) -> None:
        if self._memory_only:
            return
        self._memory_only = True
        self._memory_reason = str(exc)
        log.warning("ict-reward cache: cannot write to %s (%s); keeping the cache in memory only",
                    self.path, exc)
