"""Gallery search: one canonical fp32 score per row, and exact top-k that reads a quarter of the bytes.

Scores. A row's score is its fp32 inner product with the query as `exact_scores` computes it: a
per-row kernel (numpy einsum) whose result does not depend on which other rows are in the batch.
(BLAS sgemv does depend on it: OpenBLAS uses another kernel for the last n % 4 rows, so a row's
last bit would change between a full ranking and a rescored subset.) Every path returns these
values, so a top-k search and a full ranking agree bit for bit, ties included.

Top-k. One query against a big gallery is a memory-bound scan: 100,000 x 1024 fp32 is 400 MB.
faiss's 8-bit scalar-quantiser codes are 100 MB; split into shards searched in parallel threads
they are scanned in a third of the time of the fp32 scan on two cores. The best candidates are
rescored with `exact_scores`. The answer stays exact: every code's reconstruction error
e_i = ||decode(code_i) - x_i|| is measured when the code is made, so a code's score is within

    eps = ||q|| * (max e + 4 d u (max ||x|| + max e)) + 1e-30      (u = 2^-24, d = width)

of the row's score (Cauchy-Schwarz for the codes; the worst-case float summation bound for both
sums, with room for faiss's own decoding and for the two roundings of a row scaled by sigmoid(hp)
before it is coded; the last term for products that underflow). The candidates are accepted only
when their lowest code score plus eps is below the k-th rescored value, i.e. no row left out could
reach or tie it; otherwise the caller scores every row. A flat GPU index (faiss-gpu) is used the
same way, with a bound that also covers TF32 matrix units.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

#: Below this many rows scoring every row is cheap enough (a few ms) that codes do not pay.
CODES_MIN_ROWS = 16_384
#: A table is coded at its second top-k search: coding costs about 30 full scans, which a single
#: query (a fresh `ict search`) would never win back.
CODES_AFTER_SEARCHES = 2
#: Rows decoded at a time when measuring reconstruction errors (bounds the temporary memory).
_CHUNK = 8192
#: float32 unit roundoff, and the smallest normal float32 (squares below it may be flushed to 0).
_U = 2.0 ** -24
_TINY = float(np.finfo(np.float32).tiny)
#: Below this many rows a GPU copy of the vectors costs more than it saves.
GPU_MIN_ROWS = 50_000
#: faiss GPU k-selection handles at most this many results per query.
GPU_MAX_K = 2048
#: Relative error of one product on TF32 matrix units (10-bit mantissas), which a GPU may use.
_TF32 = 2.0 ** -10
_gpu_resources = None
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)
#: Rows per thread below which exact_scores stays on one thread.
_THREAD_ROWS = 16_384


def search_threads() -> int:
    """Threads (= shards) for one query: $ICT_CACHE_FAISS_THREADS, else the CPU count up to 8."""
    want = os.environ.get("ICT_CACHE_FAISS_THREADS", "")
    try:
        threads = int(want) if want else 0
    except ValueError:
        threads = 0
    if threads <= 0:
        threads = min(os.cpu_count() or 1, 8)
    return threads


def exact_scores(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float32 inner products of each row with q, bit-identical whatever rows come with it; big
    inputs are split over threads (einsum releases the GIL; the split does not change a bit)."""
    global _pool
    n = len(vectors)
    out = np.empty(n, np.float32)
    threads = min(search_threads(), n // _THREAD_ROWS)
    if threads <= 1:
        return np.einsum("ij,j->i", vectors, q, out=out)
    if _pool is None or _pool[0] != os.getpid():  # a forked child inherits the pool but not its threads
        _pool = (os.getpid(), ThreadPoolExecutor(search_threads(), thread_name_prefix="ict-search"))
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def part(i: int) -> None:
        np.einsum("ij,j->i", vectors[bounds[i]: bounds[i + 1]], q, out=out[bounds[i]: bounds[i + 1]])

    list(_pool[1].map(part, range(threads)))
    return out


def candidate_count(n: int, k: int) -> int | None:
    """Candidates rescored for a top-k of n rows, or None when nearly everything would be."""
    want = min(n, max(4 * k, k + 256))
    return None if want * 4 > n else want


def _certified(rows, approx, exact, k: int, eps: float):
    """rows if no row outside them can reach the k-th exact(rows) value (see the module docstring)."""
    score = exact(rows)
    score = score[np.isfinite(score)]  # NaN values (no hp) rank last anyway
    if len(score) < k:
        return None
    kth = float(np.partition(score, len(score) - k)[len(score) - k])
    bound = float(approx.min()) + eps
    if not bound < kth:  # a row left out could reach the k-th value (or NaN: cannot tell)
        log.debug("candidates not certified for the top %d (k-th %.6g, bound %.6g); scoring all", k, kth, bound)
        return None
    return rows


def _max_norm(x: np.ndarray) -> float:
    """Upper bound of the largest row norm of float32 rows, computed in float32: the sum of d
    squares is within d u of the truth, and squares flushed to zero add at most d * tiny."""
    d = x.shape[1]
    sq = float(np.einsum("ij,ij->i", x, x).max())
    return float(np.sqrt(sq * (1 + 2 * d * _U) + d * _TINY))


def _eps(q: np.ndarray, dim: int, emax: float, xmax: float, rel: float = 0.0) -> float:
    qn = float(np.linalg.norm(q.astype(np.float64)))
    return qn * (emax + (rel + 4 * dim * _U) * (xmax + emax)) * (1 + 1e-6) + 1e-30


class CodeIndex:
    """8-bit codes of rows [0, rows) in shards, each with the bound of its reconstruction error.

    Shards are independent faiss IndexScalarQuantizer(QT_8bit) indexes over consecutive rows,
    searched together by a threaded IndexShards whose result ids are row numbers. Rows appended
    later get a shard of their own; a change to an existing row means a new CodeIndex.
    """

    def __init__(self, faiss, dim: int, threads: int):
        self._faiss = faiss
        self.dim = int(dim)
        self.threads = max(1, int(threads))
        self.rows = 0
        self._parts: list = []  # keep the shards alive: IndexShards does not own them
        self._shards = None
        self._emax = 0.0  # upper bound of the largest reconstruction error of any code
        self._xmax = 0.0  # upper bound of the largest row norm

    def add(self, count: int, rows_of) -> None:
        """Code rows [rows, rows + count), split into up to `threads` shards; rows_of(start, stop)
        returns those rows as float32 (asked one shard at a time: no copy of the whole table)."""
        if count <= 0:
            return
        per = -(-count // self.threads)
        if self._parts and count <= self.rows // self.threads:
            per = count  # an append no bigger than a shard: one shard
        for start in range(self.rows, self.rows + count, per):
            stop = min(start + per, self.rows + count)
            self._add_shard(np.ascontiguousarray(rows_of(start, stop), dtype=np.float32))
        self.rows += count

    def _add_shard(self, x: np.ndarray) -> None:
        faiss = self._faiss
        part = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        part.train(x)
        part.add(x)
        codes = faiss.vector_to_array(part.codes).reshape(len(x), -1)
        for s in range(0, len(x), _CHUNK):
            chunk = x[s: s + _CHUNK]
            diff = part.sa_decode(codes[s: s + _CHUNK])
            diff -= chunk
            # A NaN (never stored, but a file could carry one) makes eps NaN: nothing is certified.
            self._emax = float(np.maximum(self._emax, _max_norm(diff)))
            self._xmax = float(np.maximum(self._xmax, _max_norm(chunk)))
        self._parts.append(part)
        self._shards = None

    @property
    def shard_count(self) -> int:
        return len(self._parts)

    def eps(self, q: np.ndarray) -> float:
        """Largest possible |code score - exact score| of any row for query q."""
        return _eps(q, self.dim, self._emax, self._xmax)

    def scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, code scores) of the k best code scores, best first."""
        if self._shards is None:
            shards = self._faiss.IndexShards(self.dim, True, True)  # threaded, successive ids
            for part in self._parts:
                shards.add_shard(part)
            self._shards = shards
        scores, ids = self._shards.search(q.reshape(1, -1), int(k))
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def top_k(self, q: np.ndarray, k: int, exact) -> np.ndarray | None:
        """Candidate rows that hold the exact top k by exact(rows) (the coded rows' scores; NaN =
        ranks last), or None when the bound cannot certify them (the caller scores every row)."""
        want = candidate_count(self.rows, k)
        if want is None:
            return None
        rows, approx = self.scan(q, want)
        if len(rows) < want:
            return None
        return _certified(rows, approx, exact, k, self.eps(q))


class GpuFlat:
    """An exact flat inner-product index of rows on GPU 0 (ids = rows), certified like the codes:
    its sums run in another order and possibly on TF32 units, so its top k is only a candidate set."""

    def __init__(self, index, dim: int, rows: int, xmax: float):
        self.index, self.dim, self.rows, self._xmax = index, dim, rows, xmax

    def top_k(self, q: np.ndarray, k: int, exact) -> np.ndarray | None:
        want = candidate_count(self.rows, k)
        if want is None or want > GPU_MAX_K:
            return None
        approx, ids = self.index.search(q.reshape(1, -1), want)
        keep = ids[0] >= 0
        if keep.sum() < want:
            return None
        return _certified(ids[0][keep], approx[0][keep], exact, k, _eps(q, self.dim, 0.0, self._xmax, _TF32))


def gpu_flat(faiss, vectors: np.ndarray) -> GpuFlat | None:
    """A GpuFlat of `vectors` when faiss was built with GPU support, a GPU is present and the table
    is big enough to gain; else None."""
    global _gpu_resources
    if len(vectors) < GPU_MIN_ROWS or os.environ.get("ICT_CACHE_GPU", "1") == "0":
        return None
    try:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= 0:
            return None
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        dim = int(vectors.shape[1])
        xmax = float(np.max([_max_norm(vectors[s: s + _CHUNK]) for s in range(0, len(vectors), _CHUNK)]))  # NaN stays
        cpu = faiss.IndexFlatIP(dim)
        cpu.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return GpuFlat(faiss.index_cpu_to_gpu(_gpu_resources, 0, cpu), dim, len(vectors), xmax)
    except Exception as exc:  # an optional speed-up: any failure means CPU search
        log.debug("faiss GPU search unavailable (%s); using CPU", exc)
        return None
