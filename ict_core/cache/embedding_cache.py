"""EmbeddingCache: prompt features and image galleries per model, and gallery search.

Why: a forward costs seconds on a CPU; a prompt or image seen before should not. An accelerator, never a
point of failure: nothing here raises into the scorer. Needs no torch; faiss comes with the first search.
"""
from __future__ import annotations

import atexit
import functools
import importlib
import logging
import os
import threading
import time
import weakref
from collections import namedtuple

import numpy as np

from . import gallery_search as gs
from .keys import resolve_cache_dir, safe_name
from .store import Busy, Store  # noqa: F401  (Busy: raised by clear)

log = logging.getLogger("ict_core.cache")

#: Set to 1 to search without faiss (numpy scans: same results, slower).
NO_FAISS_ENV = "ICT_CACHE_NO_FAISS"
BY = ("ict", "hp", "ict*hp")
KINDS = {"p": "prompts", "i": "images"}
SearchHit = namedtuple("SearchHit", "label hash ict hp_raw value")  # value: what was ranked by (see search)
_live: weakref.WeakSet[EmbeddingCache] = weakref.WeakSet()


@functools.cache
def _faiss():
    """faiss, imported lazily (`import ict_core` stays light), or None with one warning when it is missing."""
    try:
        return importlib.import_module("faiss")
    except Exception as exc:
        log.warning("faiss is not importable (%s); gallery search uses numpy (same ranking, slower)", exc)


@atexit.register
def _flush_at_exit():
    for cache in list(_live):
        cache.flush(force=True)  # guarded: never fails


def _guard(default):
    """Hot-path methods never raise: an unexpected error is logged once and yields default()."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                if fn.__name__ not in self._warned:
                    self._warned.add(fn.__name__)
                    log.warning("ict-reward cache: %s failed (%s: %s); carrying on without the cache",
                                fn.__name__, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                return default()
        return inner
    return wrap


class EmbeddingCache:
    """Prompt features and image galleries on disk. max_prompts / max_images cap each table (one model's
    prompts, one gallery): past them the least recently used go. memory_only=True never touches the disk.
    Thread-safe; any number of processes may share a folder."""

    #: Use times of hits are written at most this often (flush(force=True) does not wait) and only
    #: for tables at least LRU_PERSIST_FILL full (below that they evict nothing).
    lru_flush_interval, LRU_PERSIST_FILL = 60.0, 0.8

    def __init__(self, cache_dir=None, max_prompts: int = 100_000, max_images: int = 1_000_000,
                 *, memory_only: bool = False, lock_timeout: float = 30.0):
        self.path = resolve_cache_dir(cache_dir)
        self.max_prompts, self.max_images = int(max_prompts), int(max_images)
        self._store = Store(self.path, lock_timeout, memory_only)
        self._lock = threading.RLock()
        self._pending: dict = {}  # (kind, key) -> {name: item} not written yet (the database was locked)
        self._labels: dict = {}  # gallery -> {hash: label} not written yet
        self._used: dict = {}  # (kind, key) -> {id: time} of hits not written yet
        self._ivf: dict = {}  # gallery -> gallery_search.Ivf
        self._used_saved, self._warned = time.monotonic(), set()
        self.reset_counters()
        _live.add(self)

    counters = property(lambda self: dict(self._counters))
    memory_only = property(lambda self: self._store.memory_only)
    problem = property(lambda self: self._store.problem, doc="why the folder is not used (None when it is)")

    def reset_counters(self) -> None:
        self._counters = dict(prompt_hits=0, prompt_misses=0, image_hits=0, image_misses=0)

    @_guard(dict)
    def get_prompts(self, fingerprint: str, prompts) -> dict:
        """Cached text features of the given prompts (hits only), bit-identical to what was put.
        Each distinct prompt counts as one hit or one miss."""
        return {k: v[0] for k, v in self._get("p", fingerprint, prompts).items()}

    @_guard(dict)
    def get_images(self, gallery: str, hashes) -> dict:
        """{hash: (float32 vector, hp_raw or NaN)} for the stored hashes among `hashes`."""
        return self._get("i", gallery, hashes)

    @_guard(lambda: None)
    def put_prompts(self, fingerprint: str, features: dict) -> None:
        """Store {prompt: float32 vector}; non-finite vectors are skipped."""
        self._put("p", fingerprint, [(p, v, None, None) for p, v in features.items()])

    @_guard(lambda: None)
    def put_images(self, gallery: str, entries: dict) -> None:
        """Store {hash: (vector, hp_raw or None/NaN, label)}; non-finite vectors are skipped."""
        self._put("i", gallery, [(d, v, hp, "" if label is None else str(label))
                                 for d, (v, hp, label) in entries.items()])

    def unsaved(self) -> int:
        """Entries put but not written yet (another process held the write lock past the timeout)."""
        with self._lock:
            return sum(len(p) for p in self._pending.values()) + sum(len(m) for m in self._labels.values())

    def save(self, wait: float = 0.0) -> int:
        """Write what is pending, trying again while another process holds the write lock, for at most
        `wait` seconds (a line on the log every 10 s of it). Returns unsaved() (0: all written).
        Why: a command that reports work as stored must know whether it is."""
        pause = self._pauses(wait)
        with self._lock:
            while True:
                for kind, key in list(self._pending):
                    self._write(kind, key)
                self._write_labels()
                left = self.unsaved()
                if not left or not pause():
                    return left

    def _pauses(self, wait: float):
        """pause() -> False once `wait` seconds have passed, else sleeps a little and says so every 10 s."""
        deadline, said = time.monotonic() + max(0.0, wait), []

        def pause() -> bool:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not said or said[-1] - left >= 10:
                said.append(left)
                log.warning("ict-reward cache: %s is being written by another process; waiting for it (%.0f s "
                            "left)", self._store.file, left)
            time.sleep(min(0.5, left))
            return True
        return pause

    def labels(self, gallery: str, hashes) -> dict:
        """{hash: label} of the stored images among `hashes` (the path each content was last indexed from)."""
        with self._lock:
            names = [h for h in dict.fromkeys(hashes) if isinstance(h, str)]
            found = self._store.labels(gallery, names)
            found.update({h: lab for h, lab in self._labels.get(gallery, {}).items() if h in found})
            return found

    def relabel(self, gallery: str, labels: dict) -> None:
        """Set the label (path) of stored images {hash: label}: the paths of a content follow its files.
        A label is not part of a vector, so the gallery's IVF index stays valid."""
        with self._lock:
            self._labels.setdefault(gallery, {}).update({h: str(lab) for h, lab in labels.items()})
            self._write_labels()

    def _write_labels(self) -> None:
        for gallery, labels in list(self._labels.items()):
            try:
                self._store.relabel(gallery, labels)
            except Busy:
                continue
            del self._labels[gallery]

    def image_count(self, gallery: str) -> int:
        with self._lock:
            return self._store.meta("i", gallery)["n"]

    def _get(self, kind: str, key: str, names) -> dict:
        with self._lock:
            names = list(dict.fromkeys(n for n in names if isinstance(n, str)))
            pending = self._pending.get((kind, key), {})
            found = self._store.get(kind, key, [n for n in names if n not in pending])
            used, now, out = self._used.setdefault((kind, key), {}), time.time(), {}
            for name in names:
                if name in pending:
                    out[name] = (pending[name][1].copy(), pending[name][2])
                elif name in found:
                    id_, vec, hp = found[name]
                    out[name], used[id_] = (vec, hp), now
            self._counters[f"{KINDS[kind][:-1]}_hits"] += len(out)
            self._counters[f"{KINDS[kind][:-1]}_misses"] += len(names) - len(out)
            return out

    def _put(self, kind: str, key: str, items: list) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("cache key (fingerprint) must be a non-empty string")
        with self._lock:
            pending = self._pending.setdefault((kind, key), {})
            dim = self._store.meta(kind, key)["dim"] or next((len(p[1]) for p in pending.values()), None)
            for name, vec, hp, label in items:
                vec = np.asarray(vec, dtype=np.float32).reshape(-1)
                if not isinstance(name, str) or vec.size == 0 or not np.isfinite(vec).all():
                    continue
                if dim is not None and vec.shape[0] != dim:
                    log.warning("ict-reward cache: vector width %d does not match %d of %s %s; not stored",
                                vec.shape[0], dim, KINDS[kind], key)
                    continue
                dim = vec.shape[0]
                pending[name] = (name, vec.copy(), np.nan if hp is None else float(hp), label)
            self._write(kind, key)

    def _write(self, kind: str, key: str) -> None:
        """Write a table's pending entries and use times (these first: they decide what is evicted)."""
        pending = self._pending.get((kind, key))
        if not pending:
            return
        cap = self.max_prompts if kind == "p" else self.max_images
        try:
            self._store.put(kind, key, list(pending.values()), time.time(), cap, self._used.get((kind, key), {}))
        except Busy as exc:
            if "busy" not in self._warned:
                self._warned.add("busy")
                log.warning("ict-reward cache: %s stayed locked by another process for %.0f s (%s); kept in "
                            "memory until a later save", self._store.file, self._store.timeout, exc)
            return
        del self._pending[(kind, key)]
        self._used.pop((kind, key), None)

    def search(self, gallery: str, query_vec, top_k=None, by: str = "ict", *, exact: bool = False) -> list:
        """[SearchHit], best first: ict is the fp32 inner product (the ICT cosine); value is ict, or
        ict * sigmoid(hp_raw) for by='ict*hp' (the engine's ranking), or sigmoid(hp_raw) for by='hp' (no
        query needed; ict NaN without one). Ties: stored first first; NaN last. A top k by ict of a big
        gallery comes from its IVF index unless exact (gallery_search). ValueError on bad arguments."""
        if by not in BY:
            raise ValueError(f"by must be one of {BY}, not {by!r}")
        if query_vec is None and by != "hp":
            raise ValueError(f"by={by!r} needs a query vector; only by='hp' ranks without one")
        q = None if query_vec is None else np.ascontiguousarray(query_vec, dtype=np.float32).reshape(-1)
        with self._lock:
            self._write("i", gallery)
            meta = self._store.meta("i", gallery)
            faiss = None if os.environ.get(NO_FAISS_ENV, "") not in ("", "0") else _faiss()  # numpy if None
            if meta["n"] == 0 or (top_k is not None and top_k <= 0):
                return []
            if q is not None and q.shape[0] != meta["dim"]:
                raise ValueError(f"query width {q.shape[0]} does not match stored width {meta['dim']}")
            if by == "hp":  # the stored hp alone ranks; ict of the rows returned when there is a query
                ids, hp = self._store.hp_column(gallery)
                ids, ict, value = gs.ranked(ids, np.full(len(ids), np.nan, np.float32), gs.sigmoid(hp), top_k)
                if q is not None:
                    got, vecs, _ = self._store.fetch(gallery, ids)
                    ict = gs.exact_scores(vecs, q)[np.searchsorted(got, ids)]
            else:  # the candidates of the IVF index, else every row
                rows = self._store.chunks(gallery)
                if not exact and by == "ict" and top_k is not None and faiss is not None and meta["n"] >= gs.IVF_MIN \
                        and gs.candidates(top_k, meta["n"]) < meta["n"] and np.isfinite(q).all():
                    held, path = self._ivf.get(gallery), self.path / "faiss" / (safe_name(gallery) + ".faiss")
                    ix = self._ivf[gallery] = gs.ivf_index(faiss, self._store, gallery, meta, path, held, q)
                    found = ix.search(faiss, q, gs.candidates(top_k, meta["n"]))
                    rows = rows if found is None else [self._store.fetch(gallery, found)]
                ids, ict, value = gs.exact_search(faiss, rows, q, top_k, by, meta["xmax"])
            info = self._store.describe(ids)
            return [SearchHit(info[i][1], info[i][0], c, info[i][2], v)
                    for i, c, v in zip(ids.tolist(), ict.tolist(), value.tolist()) if i in info]

    @_guard(lambda: None)
    def flush(self, force: bool = False) -> None:
        """Write what is pending. Use times of hits wait lru_flush_interval unless force, and are kept
        only for tables near their cap."""
        with self._lock:
            for kind, key in list(self._pending):
                self._write(kind, key)
            self._write_labels()
            if not force and time.monotonic() - self._used_saved < self.lru_flush_interval:
                return
            for (kind, key), used in list(self._used.items()):
                cap = self.max_prompts if kind == "p" else self.max_images
                if used and self._store.meta(kind, key)["n"] >= self.LRU_PERSIST_FILL * cap:
                    try:
                        self._store.touch(used)
                    except Busy:
                        continue
                del self._used[(kind, key)]
            self._used_saved = time.monotonic()

    def close(self) -> None:
        """Flush everything, use times included, and close the database."""
        with self._lock:
            self.flush(force=True)
            self._store.close()

    def stats(self) -> dict:
        """What the cache holds (after a flush), plus this process's counters."""
        with self._lock:
            self.flush(force=True)
            tables = [{"kind": KINDS[kind], "key": key, "count": n, "dim": dim or 0, "bytes": n * (dim or 0) * 4,
                       "file": None if self.memory_only else str(self._store.file)}
                      for kind, key, n, dim in self._store.select("SELECT kind, key, n, dim FROM meta WHERE n > 0 "
                                                                  "ORDER BY kind, key")]
            size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.path.is_dir() else 0
            fingerprints = {p for t in tables for p in ([t["key"]] if t["kind"] == "prompts" else t["key"].split("+"))}
            return {"path": str(self.path), "prompts": sum(t["count"] for t in tables if t["kind"] == "prompts"),
                    "images": sum(t["count"] for t in tables if t["kind"] == "images"), "bytes": size,
                    "fingerprints": sorted(fingerprints - {"none"}),
                    "galleries": sorted(t["key"] for t in tables if t["kind"] == "images"), "tables": tables,
                    "max_prompts": self.max_prompts, "max_images": self.max_images,
                    "memory_only": self.memory_only, "counters": self.counters}

    def clear(self, prompts: bool = True, images: bool = True, wait: float = 0.0) -> None:
        """Forget every table of the chosen kinds (all models), for every process sharing the folder.
        Busy, with nothing cleared, when another process holds the write lock `wait` seconds past the timeout."""
        kinds = [k for k, on in (("p", prompts), ("i", images)) if on]
        pause = self._pauses(wait)
        with self._lock:
            while True:
                try:
                    self._store.clear(kinds)
                    break
                except Busy:
                    if not pause():
                        raise
            self._pending = {k: v for k, v in self._pending.items() if k[0] not in kinds}
            self._used = {k: v for k, v in self._used.items() if k[0] not in kinds}
            self._labels = {} if images else self._labels
            self._ivf = {} if images else self._ivf
            for f in (self.path / "faiss").glob("*") if images and not self.memory_only else ():
                f.unlink()
