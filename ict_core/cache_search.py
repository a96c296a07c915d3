"""Exact top-k gallery search that reads a quarter of the bytes: faiss 8-bit codes, then fp32.

Why: one query against a big gallery is a memory-bound scan. A flat fp32 scan of 100,000 x 1024
reads 400 MB; faiss's 8-bit scalar-quantiser codes are 100 MB, and split into shards searched in
parallel threads they are scanned in about half the time of the fp32 scan on two cores.

The result stays exact. Every code's reconstruction error e_i = ||decode(code_i) - x_i|| is
measured when the code is made, so a code's score is within
    eps = ||q|| * (max e + 4 d u (max ||x|| + max e))      (u = 2^-24, d = width)
of the row's fp32 inner product (Cauchy-Schwarz for the codes; the worst-case float summation
bound for both sums, with room for the two roundings of a row scaled by sigmoid(hp) before it
is coded). The best candidates of the code scan are rescored in fp32; the answer is returned
only when the lowest code score of the candidates plus eps is below the k-th rescored value,
i.e. no row left out could reach or tie it. Otherwise the caller scans everything in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

log = logging.getLogger(__name__)

#: Below this many rows an fp32 scan is cheap enough (a few ms) that codes do not pay.
CODES_MIN_ROWS = 16_384
#: A table is coded at its second top-k search: coding costs about 30 fp32 scans, which a single
#: query (a fresh `ict search`) would never win back.
CODES_AFTER_SEARCHES = 2
#: Rows decoded at a time when measuring reconstruction errors (bounds the temporary memory).
_DECODE_CHUNK = 8192
#: float32 unit roundoff.
_U = 2.0 ** -24
#: Below this many rows a GPU copy of the vectors costs more than it saves.
GPU_MIN_ROWS = 50_000
#: faiss GPU k-selection handles at most this many results per query.
GPU_MAX_K = 2048
_gpu_resources = None


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
        self._emax = 0.0  # largest reconstruction error of any code
        self._xmax = 0.0  # largest fp32 row norm

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
        for s in range(0, len(x), _DECODE_CHUNK):
            chunk = x[s: s + _DECODE_CHUNK]
            diff = part.sa_decode(codes[s: s + _DECODE_CHUNK])
            diff -= chunk
            # float32 sums of d squares: relative error <= d u, so the margin keeps both maxima
            # upper bounds. A NaN (never stored, but a file could carry one) makes eps NaN, and
            # then nothing is certified.
            margin = 1 + 2 * self.dim * _U
            err = float(np.sqrt(np.einsum("ij,ij->i", diff, diff).max())) * margin
            norm = float(np.sqrt(np.einsum("ij,ij->i", chunk, chunk).max())) * margin
            self._emax = float(np.maximum(self._emax, err))
            self._xmax = float(np.maximum(self._xmax, norm))
        self._parts.append(part)
        self._shards = None

    @property
    def shard_count(self) -> int:
        return len(self._parts)

    def eps(self, q: np.ndarray) -> float:
        """Largest possible |code score - fp32 inner product| of any row for query q."""
        qn = float(np.linalg.norm(q.astype(np.float64)))
        return qn * (self._emax + 4 * self.dim * _U * (self._xmax + self._emax)) * (1 + 1e-6) + 1e-30

    def scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, code scores) of the k best code scores, best first."""
        if self._shards is None:
            shards = self._faiss.IndexShards(self.dim, True, True)  # threaded, successive ids
            for part in self._parts:
                shards.add_shard(part)
            self._shards = shards
        with _one_omp_thread(self._faiss):  # the shards are the parallelism; idle OpenMP teams spin
            scores, ids = self._shards.search(q.reshape(1, -1), int(k))
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def top_k(self, q: np.ndarray, k: int, exact) -> np.ndarray | None:
        """Candidate rows that hold the exact top k by exact(rows) (the coded vectors' fp32 inner
        products; NaN = ranks last), or None when the bound cannot certify them (the caller then
        scans in fp32)."""
        n = self.rows
        want = min(n, max(4 * k, k + 256))
        if want * 4 > n:
            return None  # nearly everything would be rescored: the fp32 scan is as cheap
        rows, approx = self.scan(q, want)
        if len(rows) < want:
            return None
        score = exact(rows)
        score = score[np.isfinite(score)]
        if len(score) < k:
            return None
        kth = float(np.partition(score, len(score) - k)[len(score) - k])
        bound = float(approx.min()) + self.eps(q)
        if not bound < kth:  # a row left out could reach the k-th value (or NaN: cannot tell)
            log.debug("code scan could not certify the top %d (k-th %.6g, bound %.6g); fp32 scan", k, kth, bound)
            return None
        return rows


@contextlib.contextmanager
def _one_omp_thread(faiss):
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def gpu_flat(faiss, vectors: np.ndarray):
    """An exact flat inner-product index on GPU 0 over `vectors` (ids = rows) when faiss was built
    with GPU support and a GPU is present and the table is big enough to gain; else None."""
    global _gpu_resources
    if len(vectors) < GPU_MIN_ROWS or os.environ.get("ICT_CACHE_GPU", "1") == "0":
        return None
    try:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= 0:
            return None
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        cpu = faiss.IndexFlatIP(int(vectors.shape[1]))
        cpu.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return faiss.index_cpu_to_gpu(_gpu_resources, 0, cpu)
    except Exception as exc:  # an optional speed-up: any failure means CPU search
        log.debug("faiss GPU search unavailable (%s); using CPU", exc)
        return None
