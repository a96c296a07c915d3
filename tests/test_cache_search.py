"""Top-k gallery search through faiss 8-bit codes (ict_core.cache_search): exact, or it steps aside.

Every test compares with the plain fp32 scan (ICT_CACHE_NO_FAISS=1), which is the definition of
the right answer: same rows in the same order, same values.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from ict_core import cache as cache_mod  # noqa: E402
from ict_core import cache_search, cache_store  # noqa: E402
from ict_core.cache import EmbeddingCache, gallery_key  # noqa: E402

FP = "0123456789abcdef01234567"
GAL = gallery_key(FP, "abcdef0123456789abcdef01")


def unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def small_min_rows(monkeypatch):
    """The code scan is used from 200 rows on and from the first search, so the tests stay small."""
    monkeypatch.setattr(cache_store, "CODES_MIN_ROWS", 200)
    monkeypatch.setattr(cache_store, "CODES_AFTER_SEARCHES", 1)


@pytest.fixture
def code_calls(monkeypatch):
    """Records what each CodeIndex.top_k call returned: certified (True) or stepped aside (False)."""
    calls = []
    real = cache_search.CodeIndex.top_k

    def spy(self, q, k, exact):
        out = real(self, q, k, exact)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cache_search.CodeIndex, "top_k", spy)
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
def test_code_scan_gives_the_fp32_answer(tmp_path, small_min_rows, code_calls, monkeypatch, top_k):
    rng = np.random.default_rng(1)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 3000, 64))
    for q in unit(rng, 5, 64):
        same(c.search(GAL, q, top_k=top_k), plain(c, q, top_k, monkeypatch))
    assert code_calls and all(code_calls)  # random galleries are certified: the codes did the work


def test_clustered_gallery_still_exact(tmp_path, small_min_rows, code_calls, monkeypatch):
    """Near-duplicates (a real gallery: many takes of one prompt) sit closer than the code error."""
    rng = np.random.default_rng(2)
    base = unit(rng, 20, 64)
    vecs = base[rng.integers(0, 20, 4000)] + rng.normal(0, 1e-3, (4000, 64)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    c = EmbeddingCache(tmp_path)
    fill(c, vecs)
    for q in list(unit(rng, 3, 64)) + [base[0]]:
        same(c.search(GAL, q, top_k=10), plain(c, q, 10, monkeypatch))
    assert code_calls  # whether certified or not, the answer above was the fp32 one


def test_exact_ties_step_aside_and_break_by_insertion(tmp_path, small_min_rows, code_calls, monkeypatch):
    """1,000 copies of the best vector: the k-th value ties rows the codes cannot tell apart, so
    the search must fall back to the fp32 scan and keep the earliest stored first."""
    rng = np.random.default_rng(3)
    vecs = unit(rng, 3000, 64)
    q = unit(rng, 1, 64)[0]
    vecs[rng.choice(3000, 1000, replace=False)] = q
    c = EmbeddingCache(tmp_path)
    fill(c, vecs)
    got = c.search(GAL, q, top_k=5)
    same(got, plain(c, q, 5, monkeypatch))
    assert code_calls == [False]
    first = sorted(i for i in range(3000) if np.array_equal(vecs[i], q))[:5]
    assert [h.hash for h in got] == [f"h{i:06d}" for i in first]


def test_bound_holds_for_every_row():
    """|code score - fp32 inner product| <= eps for all rows and queries, and eps is useful."""
    rng = np.random.default_rng(4)
    x = unit(rng, 2000, 128)
    x[:10] *= 3.0  # rows of other norms and an outlier component
    x[10, 0] = 5.0
    idx = cache_search.CodeIndex(faiss, 128, threads=3)
    idx.add(1500, lambda a, b: x[a:b])
    idx.add(500, lambda a, b: x[a:b])  # an append: its own shard
    assert idx.rows == 2000 and idx.shard_count == 4
    for q in list(unit(rng, 5, 128)) + [np.full(128, 0.5, np.float32)]:
        rows, approx = idx.scan(q, 2000)
        assert sorted(rows.tolist()) == list(range(2000))
        exact = x[rows].astype(np.float64) @ q.astype(np.float64)
        gap = np.abs(approx - exact).max()
        eps = idx.eps(q)
        assert gap <= eps
        assert eps < 0.2 * np.linalg.norm(q) * 5  # bounded by the code error, not the scores


def test_appends_and_changes_keep_the_index_right(tmp_path, small_min_rows, code_calls, monkeypatch):
    rng = np.random.default_rng(5)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 2000, 32))
    q = unit(rng, 1, 32)[0]
    c.search(GAL, q, top_k=3)
    table = c._table("images", GAL)
    shards = table._codes["ict"].shard_count
    c.put_images(GAL, {"best": (q, 0.0, "best.png")})  # appended after the index was built
    got = c.search(GAL, q, top_k=3)
    assert got[0].hash == "best" and table._codes["ict"].shard_count == shards + 1
    same(got, plain(c, q, 3, monkeypatch))
    c.put_images(GAL, {"h000000": (q, 0.0, "moved.png")})  # an existing row changes: rebuilt
    assert table._codes == {}
    got = c.search(GAL, q, top_k=3)
    assert {h.hash for h in got[:2]} == {"best", "h000000"}
    same(got, plain(c, q, 3, monkeypatch))


def test_full_rankings_use_one_fp32_scan(tmp_path, small_min_rows, code_calls, monkeypatch):
    """Ranking everything needs every fp32 score anyway: one matrix-vector product, no codes."""
    rng = np.random.default_rng(6)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 1000, 32), rng.normal(0, 2, 1000).astype(np.float32))
    q = unit(rng, 1, 32)[0]
    same(c.search(GAL, q), plain(c, q, None, monkeypatch))
    same(c.search(GAL, q, by="ict*hp"), plain(c, q, None, monkeypatch, by="ict*hp"))
    assert code_calls == []


@pytest.mark.parametrize("top_k", [1, 10, 50])
def test_top_k_by_ict_times_hp_through_scaled_codes(tmp_path, small_min_rows, code_calls, monkeypatch, top_k):
    """ict*hp = <q, sigmoid(hp) x>: codes of the scaled rows give the same certified search. Rows
    without hp (NaN) rank last either way."""
    rng = np.random.default_rng(9)
    hp = rng.normal(0, 2, 3000).astype(np.float32)
    hp[rng.choice(3000, 300, replace=False)] = np.nan
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 3000, 64), hp)
    for q in unit(rng, 5, 64):
        same(c.search(GAL, q, top_k=top_k, by="ict*hp"), plain(c, q, top_k, monkeypatch, by="ict*hp"))
    assert code_calls and all(code_calls)
    assert set(c._table("images", GAL)._codes) == {"ict*hp"}


def test_top_k_by_ict_times_hp_without_enough_hp(tmp_path, small_min_rows, code_calls, monkeypatch):
    """Fewer rows with hp than k: NaN rows fill the tail, which only the fp32 scan orders."""
    rng = np.random.default_rng(10)
    hp = np.full(1200, np.nan, np.float32)
    hp[:3] = 1.0
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 1200, 32), hp)
    q = unit(rng, 1, 32)[0]
    got = c.search(GAL, q, top_k=5, by="ict*hp")
    same(got, plain(c, q, 5, monkeypatch, by="ict*hp"))
    assert code_calls == [False] and {h.hash for h in got[:3]} == {"h000000", "h000001", "h000002"}


def test_one_off_query_scans_without_coding(tmp_path, monkeypatch, code_calls):
    """A fresh `ict search` asks once: coding the table would cost more than it saves."""
    monkeypatch.setattr(cache_store, "CODES_MIN_ROWS", 200)
    rng = np.random.default_rng(11)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 3000, 32))
    q1, q2 = unit(rng, 2, 32)
    first = c.search(GAL, q1, top_k=5)
    assert code_calls == [] and c._table("images", GAL)._codes == {}
    second = c.search(GAL, q2, top_k=5)
    assert code_calls == [True]
    same(first, plain(c, q1, 5, monkeypatch))
    same(second, plain(c, q2, 5, monkeypatch))


def test_non_finite_query_uses_the_plain_scan(tmp_path, small_min_rows, code_calls, monkeypatch):
    rng = np.random.default_rng(7)
    c = EmbeddingCache(tmp_path)
    fill(c, unit(rng, 1000, 32))
    q = unit(rng, 1, 32)[0]
    q[3] = np.nan
    got = c.search(GAL, q, top_k=4)
    assert len(got) == 4 and code_calls == []


def test_rows_the_codes_cannot_tell_apart(tmp_path, small_min_rows, code_calls, monkeypatch):
    """2,000 rows within 1e-5 of one vector share their codes, so the code scan returns an
    arbitrary 300 of them; only the bound stops it from passing those off as the top 5."""
    rng = np.random.default_rng(8)
    v = unit(rng, 1, 64)[0]
    near = v + rng.normal(0, 1e-5, (2000, 64)).astype(np.float32)
    vecs = np.concatenate([unit(rng, 1000, 64), near])
    c = EmbeddingCache(tmp_path)
    fill(c, vecs)
    queries = [v + rng.normal(0, 0.05, 64).astype(np.float32) for _ in range(8)]
    for q in queries:
        same(c.search(GAL, q, top_k=5), plain(c, q, 5, monkeypatch))
    assert code_calls == [False] * len(queries)


@pytest.mark.parametrize("m", [1, 5, 257, 266, 1001])
def test_a_rows_score_does_not_depend_on_its_batch(m):
    """BLAS sgemv gives the last n % 4 rows another kernel; exact_scores must not, or a rescored
    subset and a full ranking would disagree in the last bit (and order near-ties differently)."""
    rng = np.random.default_rng(12)
    x = unit(rng, 40_000, 1024)  # above the threading threshold too
    q = unit(rng, 1, 1024)[0]
    full = cache_search.exact_scores(x, q)
    rows = rng.choice(len(x), m, replace=False)
    assert np.array_equal(cache_search.exact_scores(x[rows], q), full[rows])
    assert np.allclose(full, x.astype(np.float64) @ q.astype(np.float64), atol=1e-6)


def test_near_tie_at_the_end_orders_like_the_full_ranking(tmp_path, small_min_rows, code_calls, monkeypatch):
    """The best row stored last, a copy of it 1 ulp away stored earlier: a top-k search and the full
    ranking must agree on which is first."""
    rng = np.random.default_rng(13)
    vecs = unit(rng, 3001, 64)
    q = unit(rng, 1, 64)[0]
    vecs[-1] = q
    vecs[100] = np.nextafter(q, np.float32(2))
    c = EmbeddingCache(tmp_path)
    fill(c, vecs)
    full = plain(c, q, None, monkeypatch)
    for k in (1, 2, 5):
        got = c.search(GAL, q, top_k=k)
        same(got, full[:k])
        same(got, plain(c, q, k, monkeypatch))


def test_vanishing_vectors_are_not_certified_wrongly(tmp_path, small_min_rows, code_calls, monkeypatch):
    """Components around 1e-24: their squares underflow float32. The bound must allow for that (and
    then certify nothing) instead of collapsing to zero."""
    rng = np.random.default_rng(14)
    vecs = unit(rng, 3000, 64)
    q = unit(rng, 1, 64)[0]
    vecs[2000] = q  # the best row
    c = EmbeddingCache(tmp_path)
    fill(c, vecs * np.float32(1e-24))
    for qq in (q, unit(rng, 1, 64)[0]):
        got = c.search(GAL, qq, top_k=10)
        same(got, plain(c, qq, 10, monkeypatch))
    assert got is not None and not any(code_calls)


def test_gpu_candidates_are_certified_too(tmp_path, small_min_rows, monkeypatch):
    """A GPU flat index sums in another order, maybe on TF32 units: its top k is only a candidate
    set. Simulated with a CPU flat index whose scores carry TF32-sized noise."""
    rng = np.random.default_rng(15)
    vecs = unit(rng, 4000, 64)
    base = unit(rng, 1, 64)[0]
    vecs[:500] = base + rng.normal(0, 1e-5, (500, 64)).astype(np.float32)  # near-duplicates: not certifiable

    class NoisyFlat:
        def __init__(self, x):
            self.inner = faiss.IndexFlatIP(x.shape[1])
            self.inner.add(x)
            self.rng = np.random.default_rng(0)

        def search(self, q, k):
            d, i = self.inner.search(q, k)
            return d + self.rng.uniform(-1, 1, d.shape).astype(np.float32) * 2.0 ** -11, i

    calls = []

    def fake_gpu_flat(faiss_mod, x):
        flat = cache_search.GpuFlat(NoisyFlat(np.ascontiguousarray(x)), x.shape[1], len(x),
                                    float(np.linalg.norm(x, axis=1).max()) * 1.001)
        real = flat.top_k

        def spy(q, k, exact):
            out = real(q, k, exact)
            calls.append(out is not None)
            return out
        flat.top_k = spy
        return flat

    monkeypatch.setattr(cache_store, "gpu_flat", fake_gpu_flat)
    c = EmbeddingCache(tmp_path)
    fill(c, vecs)
    for q in list(unit(rng, 4, 64)) + [base, base]:
        same(c.search(GAL, q, top_k=5), plain(c, q, 5, monkeypatch))
    assert calls[:4] == [True] * 4 and calls[4:] == [False, False]


def test_sigmoid_is_accurate_for_very_negative_hp():
    import math

    x = np.array([-800.0, -60.0, -30.0, -1.0, 0.0, 1.0, 30.0, 800.0])
    want = [math.exp(v) / (1 + math.exp(v)) if v < 0 else 1 / (1 + math.exp(-v)) for v in x]
    assert np.allclose(cache_store.sigmoid(x), want, rtol=1e-14, atol=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_threaded_scores_work_in_a_forked_child():
    """A child forked after the thread pool was made must not wait forever on the parent's threads."""
    rng = np.random.default_rng(16)
    x = unit(rng, 40_000, 64)
    q = unit(rng, 1, 64)[0]
    want = cache_search.exact_scores(x, q)  # makes the pool in this process
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the scores come back equal
        try:
            os._exit(0 if np.array_equal(cache_search.exact_scores(x, q), want) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("exact_scores hung in a forked child")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


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
