"""In-memory table of the embedding cache: vectors with stable ids, LRU times, merge and search.

A Table holds one file's worth of entries (all prompts of one model, or all images of one
gallery). Rows are slots: an evicted entry's slot is reused by the next new entry, so a put on
a full table costs O(d), not a copy of the whole table. Ids grow monotonically, so sorting by id
is insertion order, which breaks score ties the same way the engine's ranking breaks them.

Search scores rows by their fp32 inner product (== ICT cosine for L2-normalised vectors), always
computed by cache_search.exact_scores. A top-k search over a big table finds its candidates
through faiss (8-bit codes or a flat GPU index, certified by an error bound, see cache_search) and
scores only them; full rankings, uncertified searches and every search without faiss score every
row. All give the same rows and values, bit for bit.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .cache_file import TableData
from .cache_search import (CODES_AFTER_SEARCHES, CODES_MIN_ROWS, CodeIndex, candidate_count, exact_scores, gpu_flat,
                           search_threads)

log = logging.getLogger(__name__)



def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float64, accurate for large |x| of either sign (no 1 - p cancellation)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


class Table:
    """Entries of one table; see the module docstring. Not thread-safe (the cache locks)."""

    def __init__(self, kind: str, key: str):
        self.kind = kind
        self.key = key
        self.dim: int | None = None
        self.n = 0
        self.next_id = 0
        self._keys: list = []
        self._rows: dict = {}
        self._ids = np.empty(0, np.int64)
        self._vec = np.empty((0, 0), np.float32)
        self._used = np.empty(0, np.float64)
        self._hp = np.empty(0, np.float32)
        self._labels: list = []
        self.pending: set = set()  # keys put since the last successful save
        self.touched = False  # LRU times changed since the last save
        self.sig = None  # signature of the disk file this state was last synced with
        self.checked = float("-inf")  # monotonic time of the last look at the disk
        self.saved = time.monotonic()  # monotonic time of the last save or load
        self._codes: dict = {}  # CodeIndex per ranking ("ict", "ict*hp"), built lazily for search
        self._searches: dict = {}  # top-k searches per ranking, to build codes only when they pay
        self._gpu = None  # flat GPU index for search: None = not tried, False = none

    # ---- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def row(self, key: str):
        return self._rows.get(key)

    def vector(self, row: int) -> np.ndarray:
        return self._vec[row].copy()

    def hp_raw(self, row: int) -> float:
        return float(self._hp[row])

    def touch(self, row: int, now: float) -> None:
        self._used[row] = now
        self.touched = True

    # ---- storage -------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = len(self._ids)
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 64)
        for name, shape, dtype in (
            ("_ids", (new_cap,), np.int64),
            ("_vec", (new_cap, self.dim), np.float32),
            ("_used", (new_cap,), np.float64),
            ("_hp", (new_cap,), np.float32),
        ):
            old = getattr(self, name)
            arr = np.empty(shape, dtype)
            arr[: self.n] = old[: self.n]
            setattr(self, name, arr)

    def _set(self, row, key, vec, hp, label, now, new_id) -> None:
        self._vec[row] = vec
        self._used[row] = now
        self._hp[row] = hp
        if new_id is not None:
            self._ids[row] = new_id
        if row == len(self._keys):
            self._keys.append(key)
            self._labels.append(label)
        else:
            self._keys[row] = key
            self._labels[row] = label
        self._rows[key] = row

    def put(self, items: list, now: float, cap: int) -> int:
        """Insert or replace (key, vec, hp_raw, label) items; evict least recently used past cap."""
        if not items or cap <= 0:
            return 0
        if self.dim is None:
            self.dim = int(items[0][1].shape[0])
            self._vec = np.empty((0, self.dim), np.float32)
        fresh = []
        for item in items:
            row = self._rows.get(item[0])
            if row is None:
                fresh.append(item)
            else:
                self._set(row, *item, now, None)
                self._changed()
                self.pending.add(item[0])
        dropped = max(0, len(fresh) - cap)  # a batch larger than the cap keeps its tail
        fresh = fresh[dropped:]
        victims = self._lru_rows(self.n + len(fresh) - cap)
        for row in victims:
            old = self._keys[row]
            del self._rows[old]
            self.pending.discard(old)
        if victims:
            self._changed()
        self._grow(self.n + len(fresh) - len(victims))
        for i, item in enumerate(fresh):
            if i < len(victims):
                row = victims[i]
            else:
                row, self.n = self.n, self.n + 1
            self._set(row, *item, now, self.next_id)
            self.pending.add(item[0])
            self.next_id += 1
        if len(victims) > len(fresh):  # the table was over the cap (a smaller cap than before)
            self._remove_rows(victims[len(fresh):])
        self._gpu = None  # a GPU copy is rebuilt; the code index takes appends as a new shard
        self.touched = True
        return len(items) - dropped

    def _lru_rows(self, count: int) -> list:
        """Rows of the `count` least recently used entries (oldest first, ties by id)."""
        if count <= 0:
            return []
        order = np.lexsort((self._ids[: self.n], self._used[: self.n]))
        return [int(r) for r in order[:count]]

    def enforce_cap(self, cap: int) -> None:
        """Evict least recently used entries until at most `cap` remain."""
        rows = self._lru_rows(self.n - max(cap, 0))
        for row in rows:
            self.pending.discard(self._keys[row])
        if rows:
            self._remove_rows(rows)

    def _remove_rows(self, rows) -> None:
        """Drop rows and compact (O(n*d): only when the cap shrinks, not on the hot path)."""
        keep = np.ones(self.n, bool)
        keep[list(rows)] = False
        for name in ("_ids", "_vec", "_used", "_hp"):
            setattr(self, name, getattr(self, name)[: self.n][keep].copy())
        self._keys = [k for k, on in zip(self._keys, keep) if on]
        self._labels = [x for x, on in zip(self._labels, keep) if on]
        self._rows = {k: i for i, k in enumerate(self._keys)}
        self.n = len(self._keys)
        self._changed()

    def _changed(self) -> None:
        """A row changed in place: the search indexes must be rebuilt."""
        self._codes = {}
        self._gpu = None

    # ---- disk exchange -------------------------------------------------------------------
    def to_data(self) -> TableData:
        order = np.argsort(self._ids[: self.n], kind="stable")
        keys = [self._keys[i] for i in order]
        images = self.kind == "images"
        return TableData(
            self.kind, self.key, int(self.dim or 0), self.next_id, keys,
            self._ids[order], self._vec[order], self._used[order],
            self._hp[order] if images else None,
            [self._labels[i] for i in order] if images else None,
        )

    def load(self, data: TableData | None) -> None:
        """Replace the whole state by `data` (rows kept in its id order)."""
        self._changed()
        self.pending = set()
        self.touched = False
        if data is None or data.count == 0:
            self.n, self._keys, self._labels, self._rows = 0, [], [], {}
            self.next_id = data.next_id if data is not None else 0
            if data is not None and data.dim:
                self.dim = data.dim
            if self.dim is not None:
                self._vec = np.empty((0, self.dim), np.float32)
            return
        self.dim = data.dim
        self.n = data.count
        self.next_id = data.next_id
        self._keys = list(data.keys)
        self._rows = {k: i for i, k in enumerate(self._keys)}
        # no copy when the arrays are already writable (views into the buffer the file was read into)
        self._ids = np.require(data.ids, np.int64, ["C", "W"])
        self._vec = np.require(data.vectors, np.float32, ["C", "W"])
        self._used = np.require(data.used, np.float64, ["C", "W"])
        if data.hp_raw is not None:
            self._hp = np.require(data.hp_raw, np.float32, ["C", "W"])
            self._labels = list(data.labels)
        else:
            self._hp = np.full(self.n, np.nan, np.float32)
            self._labels = [""] * self.n

    def merge(self, disk: TableData | None, cap: int) -> None:
        """Adopt what is on disk plus this process's pending entries and newer LRU times.

        Entries that this process loaded earlier but that are gone from disk stay gone: another
        process evicted or cleared them. Pending entries survive (they are kept for the save).
        """
        if not self.pending and not self.n and not self.touched:  # nothing of ours: adopt the disk copy
            self.load(disk)
            self.enforce_cap(cap)
            return
        pending = self.pending
        if disk is not None and self.dim is not None and disk.count and disk.dim != self.dim:
            log.warning("ict-reward cache: %s %s changed width on disk; keeping the disk copy",
                        self.kind, self.key)
            pending = set()
        mine_pending = sorted((self._rows[k] for k in pending), key=lambda r: self._ids[r])
        base = disk if disk is not None else TableData(
            self.kind, self.key, int(self.dim or 0), 0, [], np.empty(0, np.int64),
            np.empty((0, int(self.dim or 0)), np.float32), np.empty(0, np.float64),
            np.empty(0, np.float32) if self.kind == "images" else None,
            [] if self.kind == "images" else None,
        )
        dim = base.dim if base.count else int(self.dim or base.dim)
        index = {k: i for i, k in enumerate(base.keys)}
        vectors = np.array(base.vectors, np.float32).reshape(base.count, dim)
        used = np.array(base.used, np.float64)
        hp = np.array(base.hp_raw, np.float32) if base.hp_raw is not None else np.full(base.count, np.nan, np.float32)
        labels = list(base.labels) if base.labels is not None else [""] * base.count
        keys, ids = list(base.keys), list(base.ids.tolist())
        for key, row in self._rows.items():  # newer LRU times of shared entries
            i = index.get(key)
            if i is not None and self._used[row] > used[i]:
                used[i] = self._used[row]
        extra_vec, extra_used, extra_hp = [], [], []
        next_id = base.next_id
        for row in mine_pending:
            key = self._keys[row]
            i = index.get(key)
            if i is not None:
                vectors[i] = self._vec[row]
                hp[i] = self._hp[row]
                labels[i] = self._labels[row]
            else:
                keys.append(key)
                ids.append(next_id)
                next_id += 1
                labels.append(self._labels[row])
                extra_vec.append(self._vec[row])
                extra_used.append(self._used[row])
                extra_hp.append(self._hp[row])
        if extra_vec:
            vectors = np.concatenate([vectors, np.stack(extra_vec)])
            used = np.concatenate([used, np.array(extra_used, np.float64)])
            hp = np.concatenate([hp, np.array(extra_hp, np.float32)])
        ids = np.array(ids, np.int64)
        if len(keys) > cap:  # least recently used go, ties by id
            keep = np.sort(np.lexsort((ids, used))[len(keys) - cap:])
            keys = [keys[i] for i in keep]
            labels = [labels[i] for i in keep]
            ids, vectors, used, hp = ids[keep], vectors[keep], used[keep], hp[keep]
        images = self.kind == "images"
        merged = TableData(self.kind, self.key, dim, next_id, keys, ids, vectors, used,
                           hp if images else None, labels if images else None)
        kept = set(keys)
        kept_pending = {k for k in pending if k in kept}
        touched = self.touched
        self.load(merged)
        self.pending = kept_pending
        self.touched = touched

    # ---- search --------------------------------------------------------------------------
    def search(self, query: np.ndarray, top_k, by: str, faiss_mod) -> list:
        """Rank rows for a query vector (None for by='hp'): arrays (rows, ict, value), best first,
        ties by id, NaN last."""
        n = self.n
        if n == 0 or (top_k is not None and top_k <= 0):
            return np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float64)
        q = None
        if query is not None:
            q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
            if q.shape[0] != self.dim:
                raise ValueError(f"query width {q.shape[0]} does not match stored width {self.dim}")
        rows = None
        if by != "hp" and faiss_mod is not None and top_k is not None and np.isfinite(q).all():
            rows = self._faiss_top(faiss_mod, q, int(top_k), by)
        if by == "hp":  # the stored preference: no query needed (ict shown when one is given)
            rows = np.arange(n)
            ict = exact_scores(self._vec[:n], q) if q is not None else np.full(n, np.nan, np.float32)
            value = sigmoid(self._hp[:n])
        elif rows is None:  # score every row
            rows = np.arange(n)
            ict, value = self._values(slice(0, n), q, by)
        else:
            ict, value = self._values(rows, q, by)
        key = np.where(np.isfinite(value), -value, np.inf)
        cand = np.arange(len(rows))
        if top_k is not None and top_k < len(rows):  # keep every tie of the k-th value
            kth = np.partition(key, int(top_k) - 1)[int(top_k) - 1]
            cand = np.flatnonzero(key <= kth)
        order = cand[np.lexsort((self._ids[rows[cand]], key[cand]))]
        if top_k is not None:
            order = order[: int(top_k)]
        return rows[order], ict[order], value[order]

    def columns(self, rows: np.ndarray) -> tuple[list, list, list]:
        """labels, keys and hp_raw (Python floats) of rows, for building results in bulk."""
        order = rows.tolist()
        return (list(map(self._labels.__getitem__, order)), list(map(self._keys.__getitem__, order)),
                self._hp[rows].tolist())

    def _faiss_top(self, faiss, q: np.ndarray, top_k: int, by: str):
        """Candidate rows holding the exact top k, through faiss: a flat GPU index (by ict) when
        there is one, else the 8-bit code scan, both certified (cache_search); None means score
        every row.

        By ict*hp the codes are of sigmoid(hp_raw) * vector (zeros without hp_raw), whose inner
        product is the ict*hp value: the same certified search."""
        n = self.n
        if n < CODES_MIN_ROWS or candidate_count(n, top_k) is None:
            return None
        self._searches[by] = self._searches.get(by, 0) + 1
        if by not in self._codes and self._searches[by] < CODES_AFTER_SEARCHES:
            return None  # coding costs ~30 full scans: a one-off query (`ict search`) just scans
        exact = lambda rows: self._values(rows, q, by)[1]  # noqa: E731
        if by == "ict":
            gpu = self._gpu_index(faiss)
            if gpu is not None:
                found = gpu.top_k(q, top_k, exact)
                if found is not None:
                    return found
        return self._code_index(faiss, by).top_k(q, top_k, exact)

    def _values(self, rows, q: np.ndarray, by: str) -> tuple[np.ndarray, np.ndarray]:
        """(ict, value) of rows: the canonical fp32 scores, and the ranking value in float64."""
        ict = exact_scores(self._vec[rows], q)
        value = ict.astype(np.float64)
        if by == "ict*hp":
            value = value * sigmoid(self._hp[rows])
        return ict, value

    def _coded_rows(self, start: int, stop: int, by: str) -> np.ndarray:
        if by == "ict":
            return self._vec[start:stop]
        scale = np.nan_to_num(sigmoid(self._hp[start:stop]), nan=0.0).astype(np.float32)
        return self._vec[start:stop] * scale[:, None]  # two roundings: within CodeIndex.eps

    def _code_index(self, faiss, by: str) -> CodeIndex:
        """The 8-bit code index of all rows for `by`; appends since the last build get a shard of
        their own, any other change rebuilds it (see _changed)."""
        codes = self._codes.get(by)
        if codes is None or codes.rows > self.n or codes.shard_count > 2 * codes.threads:
            codes = CodeIndex(faiss, int(self.dim), search_threads())
        if codes.rows < self.n:
            codes.add(self.n - codes.rows, lambda start, stop: self._coded_rows(start, stop, by))
        self._codes[by] = codes
        return codes

    def _gpu_index(self, faiss):
        if self._gpu is None:
            self._gpu = gpu_flat(faiss, self._vec[: self.n]) or False
        return self._gpu or None
