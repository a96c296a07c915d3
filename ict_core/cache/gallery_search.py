"""Gallery search through faiss: exact for small galleries (or when asked), IVF from IVF_MIN rows.

faiss proposes candidates; values are exact_scores' (einsum row by row: unlike BLAS sgemv, a row's last
bit does not depend on its batch), bit for bit alike on all paths. Exact: per chunk, an IndexFlatIP's
candidates stand if no row left out can reach the k-th value (the sums differ by at most 2 d u |q| |x|),
else the chunk is scored whole. Fast: an IndexIVFScalarQuantizer (8-bit codes) in faiss/<gallery>.faiss,
memory-mapped, appended to, rebuilt when STALE of it changed or the gallery doubled; GPU 0 with faiss-gpu.
At each build nprobe doubles from NPROBE_MIN until sample queries find RECALL of their exact top 10 among the
candidates (rescoring then ranks them right), else 0: exact search. The samples are what is searched for: 16
gallery rows (a gallery without structure needs every list for them) and, held to RECALL on their own, the
query at hand and up to 16 recent prompts of the model's prompt table (the user's queries). Random directions,
which nobody searches with, would make a clustered gallery scan ~40 % of its lists (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from ..ranking import sort_key
from .keys import prompt_key_of

log = logging.getLogger("ict_core.cache")

#: Rows from which a top k by ict uses the IVF index: an exact search reads every row from SQLite, about
#: 22 us each here, so 5,000 rows take ~0.1 s (docs/BENCHMARKS.md).
IVF_MIN = 5_000
STALE, APPEND_SAVE = 0.05, 0.01
#: IVF lists per sqrt(rows), training rows per list, first nprobe tried, recall@10 required.
LISTS_PER_SQRT, TRAIN_PER_LIST, NPROBE_MIN, RECALL = 1.0, 40, 48, 0.99
#: Gallery rows among the sample queries of the nprobe tuning.
ROWS = 16
_gpu = {}


def exact_scores(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.einsum("ij,j->i", vectors, q)


def candidates(k: int, rows: int | None = None) -> int:
    """How many rows an index proposes for a top k: never more than the `rows` it holds."""
    return max(10 * k, 100) if rows is None else min(max(10 * k, 100), rows)


def sigmoid(x) -> np.ndarray:
    """Logistic function in float64, accurate for large |x| of either sign."""
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(-np.abs(x))  # at most 1: nothing overflows
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def ranked(ids, ict, value, k):
    """Best first, ties by id (insertion order), NaN last; the first k (all for None)."""
    order = np.lexsort((ids, sort_key(value)))[:k]
    return ids[order], ict[order], value[order]


def _chunk_best(faiss, ids, vecs, hp, q, k, by, eps):
    """(ids, ict, value) of the rows of one chunk that can be in the top k, every tie of the k-th kept."""
    rows = slice(None)  # every row, unless the flat index narrows them down
    if by == "ict" and k is not None and faiss is not None and len(ids) > candidates(k, len(ids)):
        flat = faiss.IndexFlatIP(vecs.shape[1])
        flat.add(vecs)
        approx, cand = flat.search(q[None], candidates(k, len(ids)))
        if approx[0, -1] + eps < np.sort(exact_scores(vecs[cand[0]], q))[-k]:
            rows = cand[0]
    ict = exact_scores(vecs[rows], q)
    value = ict.astype(np.float64) * (sigmoid(hp[rows]) if by == "ict*hp" else 1.0)
    keys = sort_key(value)
    keep = slice(None) if k is None or len(value) <= k else keys <= np.partition(keys, k - 1)[k - 1]
    return ids[rows][keep], ict[keep], value[keep]


def exact_search(faiss, chunks, q, k, by, xmax):
    """Exact ranking of the rows in `chunks` ((ids, vectors, hp_raw) each); see the module docstring."""
    eps = float(np.linalg.norm(q.astype(np.float64))) * xmax * 2 * len(q) * 2.0 ** -24 * 1.01 + 1e-30
    use = faiss if np.isfinite(q).all() and np.isfinite(eps) else None
    parts = [(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0))]  # so that no rows gives empty arrays
    parts += [_chunk_best(use, *chunk, q, k, by, eps) for chunk in chunks if len(chunk[0])]
    return ranked(*(np.concatenate(p) for p in zip(*parts)), k)


class Ivf:
    """An IVF index; state: upto (last id in it), edits (the gallery's at its build), ntotal, trained
    (rows at its training), saved (ntotal when saved)."""

    def __init__(self, index, state: dict, mapped=False):
        self.index, self.state, self.gpu, self.mapped = index, state, None, mapped

    def search(self, faiss, q: np.ndarray, k: int) -> np.ndarray | None:
        """Candidate ids, or None when this index cannot reach RECALL (exact search then)."""
        if not self.state["nprobe"]:
            return None
        self.index.nprobe = self.state["nprobe"]
        if self.gpu is None:
            self.gpu = False
            try:
                if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                    if "res" not in _gpu:  # one per process: it holds GPU scratch memory
                        _gpu["res"] = faiss.StandardGpuResources()
                    self.gpu = faiss.index_cpu_to_gpu(_gpu["res"], 0, self.index)
            except Exception as exc:  # an optional speed-up
                log.debug("faiss GPU search unavailable (%s)", exc)
        _, found = (self.gpu or self.index).search(q[None], k)
        return found[0][found[0] >= 0]


def ivf_index(faiss, store, gallery: str, meta: dict, path, held: Ivf | None, q: np.ndarray) -> Ivf:
    """The gallery's IVF index, up to date: this process's copy, else the saved one, else a new one (tuned
    with the query q among its samples)."""
    ix, queries = held or _load(faiss, meta, path), None
    if ix is None or meta["edits"] - ix.state["edits"] > STALE * ix.state["ntotal"] \
            or meta["n"] > 2 * ix.state["trained"] or "nprobe" not in ix.state:
        ix, queries = _build(faiss, store, gallery, meta, q)
        best = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    for ids, vecs, _ in store.chunks(gallery, ix.state["upto"]):  # rows added since: appended
        if ix.mapped:  # a mapped file cannot grow: read it into memory
            ix = Ivf(faiss.read_index(str(path)), ix.state)
        ix.index.add_with_ids(vecs, ids)
        ix.state.update(upto=int(ids[-1]), ntotal=int(ix.index.ntotal))
        ix.gpu = None
        if queries is not None:  # the exact top 10 of each sample query, so far
            s, i = np.hstack([best[0], queries @ vecs.T]), np.hstack([best[1], np.tile(ids, (len(queries), 1))])
            top = np.argsort(-s, axis=1, kind="stable")[:, :10]
            best = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    if queries is not None:
        ix.state["nprobe"] = _tune(ix.index, queries, best[1], gallery)
    if not store.memory_only and ix.state["ntotal"] - ix.state["saved"] > APPEND_SAVE * ix.state["ntotal"]:
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            faiss.write_index(ix.index, tmp)
            os.replace(tmp, path)
            store.set_ix(gallery, {**ix.state, "saved": ix.state["ntotal"]})
            ix.state["saved"] = ix.state["ntotal"]
        except Exception as exc:  # the index is an accelerator: kept in memory only
            log.debug("faiss index not saved to %s (%s)", path, exc)
            Path(tmp).unlink(missing_ok=True)
    return ix


def _load(faiss, meta, path):
    if not meta["ix"] or not os.path.exists(path):
        return None
    try:  # memory-mapped: a search reads only the lists it probes
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    except RuntimeError as exc:
        log.debug("faiss index %s unreadable (%s); rebuilding it", path, exc)
        return None
    same = (index.ntotal, index.d) == (meta["ix"]["ntotal"], meta["dim"])
    return Ivf(index, meta["ix"], mapped=True) if same else None


def _build(faiss, store, gallery, meta, q):
    dim, n = meta["dim"], meta["n"]
    nlist = max(1, int(LISTS_PER_SQRT * math.sqrt(n)))
    ids = store.hp_column(gallery)[0]
    _, train, _ = store.fetch(gallery, np.random.default_rng(0).choice(ids, min(len(ids), TRAIN_PER_LIST * nlist), 0))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    log.info("built a faiss IVF index of %d lists for gallery %s", nlist, gallery)
    asked = store.recent("p", prompt_key_of(gallery), 16)
    queries = np.vstack([train[:ROWS], q[None], *(a[None] for a in asked if a.shape == q.shape)])
    return Ivf(index, dict(upto=-1, edits=meta["edits"], ntotal=0, trained=n, saved=0)), queries


def _tune(index, queries, truth, gallery) -> int:
    """The nprobe reaching RECALL on the sample gallery rows and, apart, on the queries searched for (the
    rows alone would outweigh them); 0 if scanning every list does not."""
    nprobe = min(NPROBE_MIN, index.nlist)
    while True:
        index.nprobe = nprobe
        found = index.search(queries, candidates(10))[1]
        hits = [len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]
        recall = min(np.mean(hits[:ROWS]), np.mean(hits[ROWS:]))
        log.debug("IVF recall@10 of gallery %s with nprobe %d of %d lists: %.3f", gallery, nprobe, index.nlist, recall)
        if recall >= RECALL or nprobe == index.nlist:
            return nprobe if recall >= RECALL else 0
        nprobe = min(2 * nprobe, index.nlist)
