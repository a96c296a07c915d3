"""Gallery search (ict_core.cache.gallery_search): exact through faiss flat indexes, fast through IVF.

The exact answer is defined by the plain fp32 scan without faiss (ICT_CACHE_NO_FAISS=1): same rows in
the same order, same values, bit for bit. The fast (IVF) mode returns exact values on its rows; its
recall is measured in bench/bench_cache.py and checked here on a clustered gallery.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from ict_core.cache import EmbeddingCache, gallery_key  # noqa: E402
from ict_core.cache import embedding_cache as cache_mod  # noqa: E402
from ict_core.cache import gallery_search as gs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP = "0123456789abcdef01234567"
GAL = gallery_key(FP, "abcdef0123456789abcdef01")


def unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(rng, n, d, centers=50, spread=0.5):
    base = unit(rng, centers, d)
    v = base[rng.integers(0, centers, n)] + spread * unit(rng, n, d)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def ivf_from(monkeypatch):
    """The IVF index is used from this many rows (small galleries keep the tests fast)."""
    return lambda rows: monkeypatch.setattr(gs, "IVF_MIN", rows)


@pytest.fixture
def flat_calls(monkeypatch):
    calls = []
    real = faiss.IndexFlatIP.search

    def spy(self, *a, **k):
        calls.append(self.ntotal)
        return real(self, *a, **k)

    monkeypatch.setattr(faiss.IndexFlatIP, "search", spy)
    return calls


def fill(cache, vecs, hp=None):
    hp = np.zeros(len(vecs), np.float32) if hp is None else hp
    cache.put_images(GAL, {f"h{i:06d}": (v, float(h), f"img{i}.png") for i, (v, h) in enumerate(zip(vecs, hp))})


def plain(cache, q, top_k, monkeypatch, by="ict"):
    with monkeypatch.context() as m:
        m.setenv(cache_mod.NO_FAISS_ENV, "1")
        return cache.search(GAL, q, top_k=top_k, by=by)


def same(a, b):
    assert [h.hash for h in a] == [h.hash for h in b]
    for field in ("ict", "value"):  # fp32 rescoring: bit-identical values (NaN = no hp)
        assert np.array_equal([getattr(h, field) for h in a], [getattr(h, field) for h in b], equal_nan=True)


@pytest.mark.parametrize("top_k", [1, 10, 50])
def test_exact_search_through_faiss_gives_the_fp32_answer(tmp_path, flat_calls, monkeypatch, ivf_from, top_k):
    rng = np.random.default_rng(1)
    ivf_from(10 ** 6)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 18_000, 64))
    for q in unit(rng, 2, 64):
        same(c.search(GAL, q, top_k=top_k), plain(c, q, top_k, monkeypatch))
    assert flat_calls == [8192, 8192, 1616] * 2  # read in chunks, a flat index each
    ivf_from(1000)
    for q in unit(rng, 2, 64):  # a big gallery, exact: the same
        same(c.search(GAL, q, top_k=top_k, exact=True), plain(c, q, top_k, monkeypatch))
    assert flat_calls[6:] == [8192, 8192, 1616] * 2


def test_exact_ties_break_by_insertion(tmp_path, flat_calls, monkeypatch):
    """1,000 copies of the best vector: faiss cannot tell them apart, so those chunks are scored
    row by row and the earliest stored come first."""
    rng = np.random.default_rng(3)
    vecs = unit(rng, 3000, 64)
    q = unit(rng, 1, 64)[0]
    vecs[rng.choice(3000, 1000, replace=False)] = q
    c = EmbeddingCache(tmp_path)
    fill(c, vecs)
    got = c.search(GAL, q, top_k=5)
    same(got, plain(c, q, 5, monkeypatch))
    first = sorted(i for i in range(3000) if np.array_equal(vecs[i], q))[:5]
    assert [h.hash for h in got] == [f"h{i:06d}" for i in first] and flat_calls


def test_near_tie_at_the_end_orders_like_the_full_ranking(tmp_path, monkeypatch):
    rng = np.random.default_rng(13)
    vecs = unit(rng, 3001, 64)
    q = unit(rng, 1, 64)[0]
    vecs[-1] = q
    vecs[100] = np.nextafter(q, np.float32(2))
    c = EmbeddingCache(tmp_path)
    fill(c, vecs)
    full = plain(c, q, None, monkeypatch)
    for k in (1, 2, 5):
        same(c.search(GAL, q, top_k=k), full[:k])


@pytest.mark.parametrize("top_k", [None, 1, 10])
def test_by_ict_times_hp_with_missing_hp(tmp_path, monkeypatch, top_k):
    rng = np.random.default_rng(9)
    hp = rng.normal(0, 2, 3000).astype(np.float32)
    hp[rng.choice(3000, 300, replace=False)] = np.nan
    hp[:2990] = np.where(np.arange(2990) % 2, hp[:2990], np.nan)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 3000, 32), hp)
    q = unit(rng, 1, 32)[0]
    got = c.search(GAL, q, top_k=top_k, by="ict*hp")
    same(got, plain(c, q, top_k, monkeypatch, by="ict*hp"))
    value = np.array([h.value for h in c.search(GAL, q, by="ict*hp")])
    assert np.isnan(value[-1]) and not np.isnan(value[: int(np.isfinite(value).sum())]).any()  # NaN last


def test_non_finite_query_ranks_by_insertion(tmp_path):
    rng = np.random.default_rng(7)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 1000, 32))
    q = unit(rng, 1, 32)[0]
    q[3] = np.nan
    assert [h.hash for h in c.search(GAL, q, top_k=4)] == [f"h{i:06d}" for i in range(4)]


@pytest.mark.parametrize("m", [1, 5, 257, 266, 1001])
def test_a_rows_score_does_not_depend_on_its_batch(m):
    """BLAS sgemv gives the last n % 4 rows another kernel; exact_scores must not, or a rescored
    subset and a full ranking would disagree in the last bit (and order near-ties differently)."""
    rng = np.random.default_rng(12)
    x = unit(rng, 40_000, 1024)
    q = unit(rng, 1, 1024)[0]
    full = gs.exact_scores(x, q)
    rows = rng.choice(len(x), m, replace=False)
    assert np.array_equal(gs.exact_scores(x[rows], q), full[rows])
    assert np.allclose(full, x.astype(np.float64) @ q.astype(np.float64), atol=1e-6)


def test_ivf_finds_the_neighbours_with_exact_scores(tmp_path, ivf_from, monkeypatch):
    """Clustered vectors (as real galleries are): the IVF top 10 is the exact one nearly always,
    and every value it returns is the exact fp32 value of that row."""
    ivf_from(2000)
    rng = np.random.default_rng(5)
    c = EmbeddingCache(tmp_path)
    fill(c, clustered(rng, 8000, 64))
    hits = 0
    for q in clustered(rng, 20, 64):
        fast, exact = c.search(GAL, q, top_k=10), c.search(GAL, q, top_k=10, exact=True)
        same(exact, plain(c, q, 10, monkeypatch))
        assert [h.value for h in fast] == sorted((h.value for h in fast), reverse=True)
        truth = {h.hash: h for h in plain(c, q, None, monkeypatch)}
        assert all(truth[h.hash].ict == h.ict for h in fast)
        hits += len({h.hash for h in fast} & {h.hash for h in exact})
    assert hits >= 0.8 * 200  # recall at 1M rows: bench/bench_cache.py
    assert (tmp_path / "faiss").is_dir() and c._store.meta("i", GAL)["ix"]["ntotal"] == 8000


def test_ivf_takes_appends_and_rebuilds_when_stale(tmp_path, ivf_from, monkeypatch):
    ivf_from(1000)
    rng = np.random.default_rng(6)
    c = EmbeddingCache(tmp_path)
    vecs = clustered(rng, 3000, 32)
    fill(c, vecs)
    c.search(GAL, vecs[0], top_k=3)
    ix = c._ivf[GAL]
    c.put_images(GAL, {"best": (-vecs[0], 0.0, "best.png")})  # appended to the same index
    assert c.search(GAL, -vecs[0], top_k=1)[0].hash == "best" and c._ivf[GAL] is ix
    assert ix.state["ntotal"] == 3001
    c.put_images(GAL, {f"h{i:06d}": (-vecs[i], 0.0, "moved") for i in range(200)})  # 200 changed in place
    assert c.search(GAL, -vecs[5], top_k=1)[0].hash == "h000005" and c._ivf[GAL] is not ix


def test_ivf_tunes_nprobe_to_the_exact_top_10_on_uniform_vectors(tmp_path, ivf_from, monkeypatch, caplog):
    """Uniform vectors have no clusters: the first nprobe finds ~0.9 of the top 10 at 6,000 x 64 (~0.26 at
    100k x 1024). The build raises nprobe until its sample queries reach recall@10 0.99, saves it with the
    index, and falls back to exact search when even every list does not reach it."""
    ivf_from(5000)
    rng = np.random.default_rng(9)
    vecs = unit(rng, 6000, 64)
    c = EmbeddingCache(tmp_path / "a")
    fill(c, vecs)
    with caplog.at_level("DEBUG", logger="ict_core.cache"):
        for q in unit(rng, 20, 64):
            assert [h.hash for h in c.search(GAL, q, top_k=10)] == [h.hash for h in c.search(GAL, q, top_k=10,
                                                                                           exact=True)]
    nprobe = c._ivf[GAL].state["nprobe"]
    assert gs.NPROBE_MIN < nprobe <= c._ivf[GAL].index.nlist and c._store.meta("i", GAL)["ix"]["nprobe"] == nprobe
    assert any("recall@10" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(gs, "RECALL", 1.01)  # unreachable: exact search, through the flat path
    c = EmbeddingCache(tmp_path / "b")
    fill(c, vecs)
    q = unit(rng, 1, 64)[0]
    assert c.search(GAL, q, top_k=10) == c.search(GAL, q, top_k=10, exact=True) and c._ivf[GAL].state["nprobe"] == 0


def test_ivf_tuning_samples_the_models_own_prompts(tmp_path, ivf_from):
    """Queries unlike every gallery row (here random directions) need more probes than gallery rows do. The
    build samples the prompts stored for the gallery's model (the user's queries), so it raises nprobe for
    them, and they are found as by the exact search."""
    from ict_core.cache import prompt_key

    ivf_from(5000)
    rng = np.random.default_rng(10)
    vecs, asked = clustered(rng, 6000, 64, centers=300), unit(rng, 16, 64)
    plain, tuned = EmbeddingCache(tmp_path / "a"), EmbeddingCache(tmp_path / "b")
    fill(plain, vecs)
    fill(tuned, vecs)
    tuned.put_prompts(prompt_key(FP), {f"prompt {i}": v for i, v in enumerate(asked)})
    plain.search(GAL, vecs[0], top_k=10)
    tuned.search(GAL, vecs[0], top_k=10)
    assert tuned._ivf[GAL].state["nprobe"] > plain._ivf[GAL].state["nprobe"] == gs.NPROBE_MIN
    found = [[h.hash for h in c.search(GAL, q, top_k=10)] for c in (plain, tuned) for q in asked]
    exact = [[h.hash for h in tuned.search(GAL, q, top_k=10, exact=True)] for q in asked]
    assert found[16:] == exact and found[:16] != exact


def _fresh_process(folder, code):
    prelude = textwrap.dedent(f"""
        import sys, types
        pkg = types.ModuleType("ict_core"); pkg.__path__ = [{str(ROOT / 'ict_core')!r}]
        sys.modules["ict_core"] = pkg
        import faiss, numpy as np
        from ict_core.cache import EmbeddingCache, gallery_search as gs
        calls = []
        for cls in (faiss.IndexFlatIP, faiss.IndexIVFScalarQuantizer):
            real = cls.search
            cls.search = lambda self, *a, real=real, name=cls.__name__: calls.append(name) or real(self, *a)
        c = EmbeddingCache({str(folder)!r})
    """)
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_fresh_process_searches_through_faiss(tmp_path, ivf_from):
    """A lone search (a fresh `ict search`) goes through faiss: a flat index while small, the saved
    IVF index past IVF_MIN (loaded, not rebuilt)."""
    rng = np.random.default_rng(8)
    c = EmbeddingCache(tmp_path)
    fill(c, clustered(rng, 3000, 32))
    c.close()
    q = ", ".join(map(str, clustered(rng, 1, 32)[0].tolist()))
    search = f"hits = c.search({GAL!r}, np.array([{q}], np.float32), top_k=5)\nprint(len(hits), *calls)"
    assert _fresh_process(tmp_path, search) == ["5", "IndexFlatIP"]
    ivf = f"gs.IVF_MIN = 1000\n{search}"
    built = _fresh_process(tmp_path, ivf)  # the build searches its sample queries too (nprobe tuning)
    assert built[0] == "5" and set(built[1:]) == {"IndexIVFScalarQuantizer"}
    mtime = (tmp_path / "faiss").stat().st_mtime_ns, [p.stat().st_mtime_ns for p in (tmp_path / "faiss").iterdir()]
    assert _fresh_process(tmp_path, ivf) == ["5", "IndexIVFScalarQuantizer"]  # the saved index, as it was
    faiss_dir = tmp_path / "faiss"
    assert (faiss_dir.stat().st_mtime_ns, [p.stat().st_mtime_ns for p in faiss_dir.iterdir()]) == mtime


def test_sigmoid_is_accurate_for_very_negative_hp():
    import math

    x = np.array([-800.0, -60.0, -30.0, -1.0, 0.0, 1.0, 30.0, 800.0])
    want = [math.exp(v) / (1 + math.exp(v)) if v < 0 else 1 / (1 + math.exp(-v)) for v in x]
    assert np.allclose(gs.sigmoid(x), want, rtol=1e-14, atol=0)


def test_by_hp_needs_no_query(tmp_path):
    """by='hp' ranks the stored preference: no query, NaN hp last, ties by insertion; other rules need one."""
    rng = np.random.default_rng(17)
    hp = np.array([0.5, np.nan, 2.0, 0.5, -1.0], np.float32)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 5, 16), hp)
    got = c.search(GAL, None, by="hp")
    assert [h.hash for h in got] == ["h000002", "h000000", "h000003", "h000004", "h000001"]
    assert all(np.isnan(h.ict) for h in got) and got[0].value == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert [h.hash for h in c.search(GAL, None, top_k=2, by="hp")] == ["h000002", "h000000"]
    q = unit(rng, 1, 16)[0]
    with_q = c.search(GAL, q, by="hp")
    assert [h.hash for h in with_q] == [h.hash for h in got] and not np.isnan(with_q[0].ict)
    with pytest.raises(ValueError, match="needs a query"):
        c.search(GAL, None, by="ict")


def test_a_gallery_cleared_by_another_process_is_not_searched_through_the_old_index(tmp_path, ivf_from,
                                                                                   monkeypatch):
    """Another process clears the images and indexes others: this process's IVF index still holds the old
    rows (their ids are gone). The clear counts as edits, so the index is rebuilt, not searched."""
    ivf_from(1000)
    rng = np.random.default_rng(8)
    mine, other = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)
    near = clustered(rng, 3000, 32, centers=5, spread=0.2)
    fill(mine, near)
    q = near[0]
    assert mine.search(GAL, q, top_k=10)[0].hash == "h000000"
    other.clear(prompts=False)
    far = unit(rng, 1500, 32)
    far -= 2 * np.outer(far @ q, q)  # mirrored away from the query: every new row is far from it
    other.put_images(GAL, {f"n{i:06d}": (v, 0.0, "new.png") for i, v in enumerate(far)})
    other.flush()
    got = mine.search(GAL, q, top_k=10)
    same(got, plain(mine, q, 10, monkeypatch))
    assert len(got) == 10 and all(h.hash.startswith("n") for h in got)


def test_one_gpu_resources_object_per_process(monkeypatch):
    """faiss-gpu's StandardGpuResources holds GPU scratch memory: made once, not at every index copy."""
    made = []

    class FakeGpuFaiss:  # the CPU faiss, seen as faiss-gpu with one GPU
        def __getattr__(self, name):
            return getattr(faiss, name)

        def StandardGpuResources(self):
            made.append(1)
            return object()

        get_num_gpus = staticmethod(lambda: 1)
        index_cpu_to_gpu = staticmethod(lambda res, device, index: index)

    monkeypatch.setattr(gs, "_gpu", {})
    rng = np.random.default_rng(9)
    vecs = unit(rng, 400, 16)
    for _ in range(3):
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(16), 16, 4, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.train(vecs)
        index.add_with_ids(vecs, np.arange(400))
        found = gs.Ivf(index, {"nprobe": 4}).search(FakeGpuFaiss(), vecs[3], 5)
        assert found[0] == 3
    assert len(made) == 1


def test_candidates_that_are_all_gone_give_no_rows_not_an_error():
    """An IVF index may propose only rows evicted meanwhile; the store then returns an empty chunk."""
    empty = (np.empty(0, np.int64), np.empty((0, 0), np.float32), np.empty(0, np.float32))
    ids, ict, value = gs.exact_search(faiss, [empty], unit(np.random.default_rng(1), 1, 8)[0], 10, "ict", 1.0)
    assert len(ids) == len(ict) == len(value) == 0
