"""Gallery search through faiss: exact while the gallery is small (or when asked), IVF past IVF_MIN rows.

Scores: a row's ict is its fp32 inner product with the query as exact_scores computes it (numpy einsum,
one row at a time: unlike BLAS sgemv, a row's last bit does not depend on the rows it comes with).
faiss only proposes candidates; every value returned is exact_scores', so all paths agree bit for bit.

Exact: the rows are read in chunks (memory: one chunk; galleries under IVF_MIN rows are held). By ict,
a faiss IndexFlatIP gives each chunk's best candidates; they stand only if no row left out could reach
the k-th exact value (faiss's and numpy's sums differ by at most 2 d u |q| |x|, u = 2^-24), else the
chunk is scored row by row. Full rankings and rankings by ict*hp score every row.

Fast (top k by ict over IVF_MIN rows or more): an IndexIVFScalarQuantizer (8-bit codes, a quarter of
the fp32 bytes) saved as faiss/<gallery>.faiss beside the database. Rows added since it was built are
appended at the next search (saved again once they are APPEND_SAVE of it); it is rebuilt when in-place
changes and evictions reach STALE of its rows, or the gallery doubled since it was trained. NPROBE_SHARE
of the lists are scanned and the best candidates(k) rows are read from SQLite in fp32 and rescored.
With faiss-gpu and a GPU, the index is searched on GPU 0.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np

log = logging.getLogger("ict_core.cache")

#: Gallery size from which a top-k search by ict uses the IVF index (docs/BENCHMARKS.md: exact search
#: of this many rows takes about as long as a fresh process loading the IVF index).
IVF_MIN = 20_000
STALE, APPEND_SAVE = 0.05, 0.01
#: IVF lists per sqrt(rows), training rows per list, share of the lists scanned per query.
LISTS_PER_SQRT, TRAIN_PER_LIST, NPROBE_SHARE = 1.0, 40, 1 / 16
_gpu = {}


def exact_scores(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.einsum("ij,j->i", vectors, q)


def sigmoid(x) -> np.ndarray:
    """Logistic function in float64, accurate for large |x| of either sign."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def candidates(k: int) -> int:
    return max(10 * k, 100)


def _sort_key(value: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(value), np.inf, -value)  # best first, NaN last


def ranked(ids, ict, value, k):
    """Best first, ties by id (insertion order), NaN last; the first k (all for None)."""
    order = np.lexsort((ids, _sort_key(value)))[:k]
    return ids[order], ict[order], value[order]


def _top(value, k):
    """Rows that can be in the top k: every tie of the k-th value is kept."""
    if k is None or len(value) <= k:
        return np.ones(len(value), bool)
    key = _sort_key(value)
    return key <= np.partition(key, k - 1)[k - 1]


def values(ict, hp, by: str) -> np.ndarray:
    return ict.astype(np.float64) * (sigmoid(hp) if by == "ict*hp" else 1.0)


def _chunk_best(faiss, ids, vecs, hp, q, k, by, eps):
    rows = None
    if by == "ict" and k is not None and faiss is not None and len(ids) > candidates(k):
        flat = faiss.IndexFlatIP(vecs.shape[1])
        flat.add(vecs)
        approx, cand = flat.search(q[None], candidates(k))
        ict = exact_scores(vecs[cand[0]], q)
        if approx[0, -1] + eps < np.sort(ict)[-k]:  # no row left out reaches the k-th exact value
            rows = cand[0]
    rows = np.arange(len(ids)) if rows is None else rows
    ict = exact_scores(vecs[rows], q)
    value = values(ict, hp[rows], by)
    keep = _top(value, k)
    return ids[rows][keep], ict[keep], value[keep]


def exact_search(faiss, chunks, q, k, by, xmax):
    """Exact ranking of the rows of `chunks` ((ids, vectors, hp_raw) each); see the module docstring."""
    dim = len(q)
    eps = float(np.linalg.norm(q.astype(np.float64))) * xmax * 2 * dim * 2.0 ** -24 * 1.01 + 1e-30
    use = faiss if np.isfinite(q).all() and np.isfinite(eps) else None
    parts = [_chunk_best(use, *chunk, q, k, by, eps) for chunk in chunks if len(chunk[0])]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0)
    return ranked(*(np.concatenate(p) for p in zip(*parts)), k)


class Ivf:
    """A gallery's IVF index and what it holds: upto (last id added), edits (of the gallery when it
    was built), ntotal, trained (rows when it was trained), saved (ntotal when last saved)."""

    def __init__(self, index, state: dict, keep=None):
        self.index, self.state, self._keep, self.gpu = index, state, keep, None

    def search(self, faiss, q: np.ndarray, k: int) -> np.ndarray:
        self.index.nprobe = max(1, math.ceil(self.index.nlist * NPROBE_SHARE))
        index = self._gpu(faiss) or self.index
        _, found = index.search(q[None], k)
        return found[0][found[0] >= 0]

    def _gpu(self, faiss):
        if self.gpu is None:
            self.gpu = False
            try:  # faiss-gpu: untested here (no GPU on the machines this was written on)
                if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                    res = _gpu.setdefault("res", faiss.StandardGpuResources())
                    self.gpu = faiss.index_cpu_to_gpu(res, 0, self.index)
            except Exception as exc:  # an optional speed-up
                log.debug("faiss GPU search unavailable (%s)", exc)
        return self.gpu


def ivf_index(faiss, store, gallery: str, meta: dict, path, held: Ivf | None) -> Ivf:
    """The gallery's IVF index, up to date: this process's copy, else the saved one, else a new one."""
    ix = held or _load(faiss, meta, path)
    if ix is None or meta["edits"] - ix.state["edits"] > STALE * max(ix.state["ntotal"], 1) \
            or meta["n"] > 2 * ix.state["trained"]:
        ix = _build(faiss, store, gallery, meta)
    while True:  # rows added since: appended
        ids, vecs, _ = store.scan(gallery, ix.state["upto"])
        if not len(ids):
            break
        ix.index.add_with_ids(vecs, ids)
        ix.state.update(upto=int(ids[-1]), ntotal=int(ix.index.ntotal))
        ix.gpu = None
    if not store.memory_only and ix.state["ntotal"] - ix.state["saved"] > APPEND_SAVE * ix.state["ntotal"]:
        _save(faiss, store, gallery, ix, path)
    return ix


def _load(faiss, meta, path):
    state = meta["ix"]
    if not state or not os.path.exists(path):
        return None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        log.debug("faiss index %s unreadable (%s); rebuilding it", path, exc)
        return None
    return Ivf(index, state) if index.ntotal == state["ntotal"] and index.d == meta["dim"] else None


def _build(faiss, store, gallery, meta):
    dim, n = meta["dim"], meta["n"]
    nlist = max(1, int(LISTS_PER_SQRT * math.sqrt(n)))
    ids, _ = store.hp_column(gallery)
    sample = np.random.default_rng(0).choice(ids, min(len(ids), TRAIN_PER_LIST * nlist), replace=False)
    _, train, _ = store.fetch(gallery, sample)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    log.info("built a faiss IVF index of %d lists for gallery %s", nlist, gallery)
    return Ivf(index, dict(upto=-1, edits=meta["edits"], ntotal=0, trained=n, saved=0), quantizer)


def _save(faiss, store, gallery, ix, path) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        faiss.write_index(ix.index, tmp)
        os.replace(tmp, path)
        ix.state["saved"] = ix.state["ntotal"]
        store.set_ix(gallery, ix.state)
    except Exception as exc:  # the index is an accelerator: kept in memory only
        log.debug("faiss index not saved to %s (%s)", path, exc)
        try:
            os.unlink(tmp)
        except OSError:
            pass
