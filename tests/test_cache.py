"""Embedding cache (ict_core.cache): persistence, eviction, separation, faults, processes, search.

Most tests need only numpy (+ faiss); the last ones use the engine with the tiny models.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ict_core.cache import EmbeddingCache, gallery_key, resolve_cache_dir
from ict_core.cache import embedding_cache as cache_mod
from ict_core.cache import store as cache_store

ROOT = Path(__file__).resolve().parents[1]
FP = "0123456789abcdef01234567"
FP2 = "fedcba9876543210fedcba98"


def unit(rng, n, d=16):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def prompts_of(n, tag="p", d=16, seed=0):
    vecs = unit(np.random.default_rng(seed), n, d)
    return {f"{tag}{i}": vecs[i] for i in range(n)}


def db_file(root: Path) -> Path:
    return root / cache_store.DB_NAME


def cache_warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("ict_core.cache")]


# Subprocesses load ict_core.cache without ict_core/__init__ (no torch import): fast to start.
PRELUDE = textwrap.dedent(f"""
    import sys, types
    pkg = types.ModuleType("ict_core"); pkg.__path__ = [{str(ROOT / 'ict_core')!r}]
    sys.modules["ict_core"] = pkg
    import numpy as np
    from ict_core.cache import EmbeddingCache
""")


def run_py(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], **kw)


# ------------------------------------------------------------------------------------------ basic behaviour
def test_hits_survive_restart_bit_identical(tmp_path):
    odd = {"": None, "naïve café ☕ 🎨": None, "line\nbreak\ttab": None, "x" * 5000: None, "\udcff lone": None}
    feats = prompts_of(20)
    for i, k in enumerate(odd):
        feats[k] = unit(np.random.default_rng(100 + i), 1)[0]
    c = EmbeddingCache(tmp_path)
    assert c.get_prompts(FP, list(feats)) == {}
    c.put_prompts(FP, feats)
    c.flush()
    c2 = EmbeddingCache(tmp_path)
    got = c2.get_prompts(FP, list(feats) + ["never stored"])
    assert set(got) == set(feats)
    for k, v in feats.items():
        assert got[k].dtype == np.float32 and got[k].tobytes() == v.tobytes()
    assert c2.counters == dict(prompt_hits=len(feats), prompt_misses=1, image_hits=0, image_misses=0)
    c2.reset_counters()
    assert c2.counters["prompt_hits"] == 0


def test_returned_vectors_are_copies_and_inputs_converted(tmp_path):
    c = EmbeddingCache(tmp_path)
    v = np.arange(16, dtype=np.float64) / 10
    c.put_prompts(FP, {"a": v, "bad": np.full(16, np.nan)})
    got = c.get_prompts(FP, ["a", "bad"])
    assert list(got) == ["a"] and np.array_equal(got["a"], v.astype(np.float32))
    got["a"][:] = 7
    assert c.get_prompts(FP, ["a"])["a"][0] == 0


def test_duplicates_count_once(tmp_path):
    c = EmbeddingCache(tmp_path)
    c.put_prompts(FP, prompts_of(1))
    c.get_prompts(FP, ["p0", "p0", "zz", "zz"])
    assert c.counters["prompt_hits"] == 1 and c.counters["prompt_misses"] == 1


def test_lru_eviction_in_memory_and_on_disk(tmp_path):
    c = EmbeddingCache(tmp_path, max_prompts=5)
    feats = prompts_of(8)
    c.put_prompts(FP, {k: feats[k] for k in ["p0", "p1", "p2", "p3", "p4"]})
    time.sleep(0.01)
    c.get_prompts(FP, ["p0"])  # p0 is now the most recently used
    time.sleep(0.01)
    c.put_prompts(FP, {"p5": feats["p5"], "p6": feats["p6"]})
    assert set(c.get_prompts(FP, list(feats))) == {"p0", "p3", "p4", "p5", "p6"}
    c.flush()
    c2 = EmbeddingCache(tmp_path, max_prompts=3)
    time.sleep(0.01)
    c2.put_prompts(FP, {"p7": feats["p7"]})
    c2.flush()  # the merge with disk applies the (smaller) cap too
    c3 = EmbeddingCache(tmp_path)
    kept = c3.get_prompts(FP, list(feats))
    assert len(kept) == 3 and "p7" in kept


def test_batch_larger_than_cap_keeps_its_tail(tmp_path):
    c = EmbeddingCache(tmp_path, max_prompts=4)
    c.put_prompts(FP, prompts_of(10))
    assert set(c.get_prompts(FP, list(prompts_of(10)))) == {"p6", "p7", "p8", "p9"}


def test_fingerprints_are_separate(tmp_path):
    c = EmbeddingCache(tmp_path)
    a, b = prompts_of(3, seed=1), prompts_of(3, seed=2)
    c.put_prompts(FP, a)
    c.put_prompts(FP2, b)
    c.put_prompts("Weird/FP:..", a)
    c.flush()
    c2 = EmbeddingCache(tmp_path)
    assert all(np.array_equal(v, a[k]) for k, v in c2.get_prompts(FP, list(a)).items())
    assert all(np.array_equal(v, b[k]) for k, v in c2.get_prompts(FP2, list(b)).items())
    assert c2.get_prompts("another", list(a)) == {}
    assert sorted(t["key"] for t in c2.stats()["tables"]) == sorted([FP, FP2, "Weird/FP:.."])


# ------------------------------------------------------------------------------------------ damaged files
def _damage(path: Path, how: str, vec: np.ndarray):
    blob = bytearray(path.read_bytes())
    if how == "flip":  # inside a stored vector: SQLite cannot see it, the row checksum does
        raw = vec.tobytes()  # a 4 KB vector spans pages: find a piece of it
        blob[next(blob.find(raw[i:i + 64]) for i in range(0, 4096, 64) if blob.find(raw[i:i + 64]) > 0) + 9] ^= 0x40
    elif how == "truncate":
        blob = blob[: len(blob) // 2]
    elif how == "garbage":
        blob = os.urandom(len(blob))
    elif how == "header":
        blob[8] = 99  # the "SQLite format 3" magic
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how", ["flip", "truncate", "garbage", "header"])
def test_damaged_file_is_moved_aside_once_and_cache_restarts(tmp_path, caplog, how):
    c = EmbeddingCache(tmp_path)
    feats = prompts_of(30, d=1024)
    c.put_prompts(FP, feats)
    c.close()  # all of it in the database file (no write-ahead log left)
    path = db_file(tmp_path)
    _damage(path, how, feats["p7"])
    caplog.clear()
    c2 = EmbeddingCache(tmp_path)
    for _ in range(3):
        assert c2.get_prompts(FP, list(feats)) == {}
    warns = cache_warnings(caplog)
    assert len(warns) == 1 and "unusable" in warns[0].getMessage()
    assert len([p for p in tmp_path.glob("*.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]) == 1
    c2.put_prompts(FP, {"new": feats["p0"]})  # and it keeps working
    c2.flush()
    assert set(EmbeddingCache(tmp_path).get_prompts(FP, ["new", "p1"])) == {"new"}
    assert len(cache_warnings(caplog)) == 1


def test_damage_found_at_save_time_is_handled(tmp_path, caplog):
    c = EmbeddingCache(tmp_path)
    c.put_prompts(FP, prompts_of(5))
    c.close()
    _damage(db_file(tmp_path), "garbage", None)  # another writer's torn file appears behind our back
    c.put_prompts(FP, {"late": prompts_of(1)["p0"]})
    c.flush()
    assert len(cache_warnings(caplog)) == 1
    assert set(EmbeddingCache(tmp_path).get_prompts(FP, ["late", "p1"])) == {"late"}


def test_database_holds_plain_vectors(tmp_path):
    """No pickle anywhere: each vector is its float32 bytes."""
    import sqlite3

    c = EmbeddingCache(tmp_path)
    feats = prompts_of(3)
    c.put_prompts(FP, feats)
    c.put_images(gallery_key(FP, None), {"h": (feats["p0"], None, "a.png")})
    c.close()
    rows = sqlite3.connect(db_file(tmp_path)).execute("SELECT kind, name, vec FROM entries ORDER BY id").fetchall()
    assert [(k, n) for k, n, _ in rows] == [("p", b"p0"), ("p", b"p1"), ("p", b"p2"), ("i", b"h")]
    assert all(v == feats[f"p{i % 3}"].tobytes() for i, (_, _, v) in enumerate(rows))


def test_old_format_folder_is_set_aside_once(tmp_path, caplog):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / f"{FP}.ictc").write_bytes(b"ICTC old table")
    c = EmbeddingCache(tmp_path)
    c.put_prompts(FP, prompts_of(2))
    c.close()
    assert (tmp_path / "old-format" / "prompts" / f"{FP}.ictc").exists() and not (tmp_path / "prompts").exists()
    assert len(cache_warnings(caplog)) == 1 and "older format" in caplog.text
    assert len(EmbeddingCache(tmp_path).get_prompts(FP, ["p0", "p1"])) == 2
    assert len(cache_warnings(caplog)) == 1


# ------------------------------------------------------------------------------------------ processes
def test_sigkill_during_save_loses_nothing_committed(tmp_path):
    """A writer killed at a random point of its endless saves: every batch it committed is there,
    bit-identical, the one it was writing is wholly absent, and the database is sound."""
    import sqlite3

    c = EmbeddingCache(tmp_path)
    old = prompts_of(10, d=1024)
    c.put_prompts(FP, old)
    c.close()
    proc = run_py(f"""
        c = EmbeddingCache({str(tmp_path)!r})
        for b in range(10_000):
            rng = np.random.default_rng(b)
            c.put_prompts({FP!r}, {{f"b{{b}}-{{i}}": rng.standard_normal(1024).astype("float32") for i in range(500)}})
    """)
    reader = sqlite3.connect(db_file(tmp_path), timeout=30)
    count = lambda: reader.execute("SELECT count(*) FROM entries").fetchone()[0]  # noqa: E731
    deadline = time.time() + 60
    while count() < 10 + 1000:  # two batches committed
        assert proc.poll() is None and time.time() < deadline, "the writer never saved"
        time.sleep(0.02)
    time.sleep(np.random.default_rng().uniform(0, 0.3))
    seen = count()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    c2 = EmbeddingCache(tmp_path)
    got = c2.get_prompts(FP, list(old))
    assert all(got[k].tobytes() == v.tobytes() for k, v in old.items()) and len(got) == 10
    batches = (count() - 10) // 500
    assert count() == 10 + 500 * batches and count() >= seen
    for b in (0, batches - 1):
        want = np.random.default_rng(b).standard_normal((500, 1024)).astype("float32")
        got = c2.get_prompts(FP, [f"b{b}-{i}" for i in range(500)])
        assert all(got[f"b{b}-{i}"].tobytes() == want[i].tobytes() for i in range(500))
    assert c2.get_prompts(FP, [f"b{batches}-0"]) == {}


def test_four_processes_adding_at_once_lose_nothing(tmp_path):
    go = tmp_path / "go"
    folder = tmp_path / "cache"
    procs = [run_py(f"""
        import os, time
        c = EmbeddingCache({str(folder)!r})
        rng = np.random.default_rng({w})
        vecs = rng.standard_normal((250, 64)).astype("float32")
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        for i in range(250):
            c.put_prompts("shared", {{f"w{w}-{{i}}": vecs[i]}})
            if i % 50 == 49:
                c.flush()
        c.flush()
    """) for w in range(4)]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        assert p.wait(60) == 0
    got = EmbeddingCache(folder).get_prompts("shared", [f"w{w}-{i}" for w in range(4) for i in range(250)])
    assert len(got) == 1000
    for w in range(4):
        vecs = np.random.default_rng(w).standard_normal((250, 64)).astype("float32")
        assert np.array_equal(got[f"w{w}-17"], vecs[17])


def test_other_process_saves_are_picked_up(tmp_path):
    a, b = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)
    a.refresh_interval = b.refresh_interval = 0
    assert b.get_prompts(FP, ["p0"]) == {}
    a.put_prompts(FP, prompts_of(2))
    a.flush()
    assert set(b.get_prompts(FP, ["p0", "p1"])) == {"p0", "p1"}
    b.put_prompts(FP, {"b": prompts_of(1)["p0"]})
    b.flush()
    a.put_prompts(FP, {"a": prompts_of(1)["p0"]})
    a.flush()
    assert set(EmbeddingCache(tmp_path).get_prompts(FP, ["p0", "p1", "a", "b"])) == {"p0", "p1", "a", "b"}


def test_threads_share_one_cache(tmp_path):
    import threading

    c = EmbeddingCache(tmp_path)
    errors = []

    def work(w):
        try:
            feats = prompts_of(50, tag=f"t{w}-", seed=w)
            for k, v in feats.items():
                c.put_prompts(FP, {k: v})
                assert np.array_equal(c.get_prompts(FP, [k])[k], v)
                if k.endswith("9"):
                    c.flush()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.flush()
    assert errors == []
    assert len(EmbeddingCache(tmp_path).get_prompts(FP, [f"t{w}-{i}" for w in range(4) for i in range(50)])) == 200


def test_lock_held_elsewhere_defers_save(tmp_path, caplog):
    import sqlite3

    EmbeddingCache(tmp_path).put_prompts(FP2, prompts_of(1))
    c = EmbeddingCache(tmp_path, lock_timeout=0.2)
    other = sqlite3.connect(db_file(tmp_path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing for a long time
    c.put_prompts(FP, prompts_of(2))
    assert len(c.get_prompts(FP, ["p0", "p1"])) == 2  # kept in memory meanwhile
    c.flush()
    c.flush()
    other.execute("ROLLBACK")
    assert len(cache_warnings(caplog)) == 1 and EmbeddingCache(tmp_path).get_prompts(FP, ["p0"]) == {}
    c.flush()
    assert len(EmbeddingCache(tmp_path).get_prompts(FP, ["p0", "p1"])) == 2


# ------------------------------------------------------------------------------------------ unwritable
def _check_memory_only(c, caplog, before=0):
    feats = prompts_of(4, d=1024)
    c.put_prompts(FP, feats)
    c.flush()
    c.put_prompts(FP, {"more": feats["p0"]})
    c.flush()
    c.close()
    assert c.memory_only
    assert set(c.get_prompts(FP, list(feats) + ["more"])) == set(feats) | {"more"}
    assert len(cache_warnings(caplog)) == 1
    assert c.stats()["prompts"] == 5 + before


def test_folder_under_a_file_turns_memory_only(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _check_memory_only(EmbeddingCache(blocker / "cache"), caplog)


def test_database_that_is_a_folder_turns_memory_only(tmp_path, caplog):
    db_file(tmp_path).mkdir()
    _check_memory_only(EmbeddingCache(tmp_path), caplog)


def test_full_disk_turns_memory_only(tmp_path, caplog, monkeypatch):
    import sqlite3

    EmbeddingCache(tmp_path).put_prompts(FP2, prompts_of(1))
    pages = sqlite3.connect(db_file(tmp_path)).execute("PRAGMA page_count").fetchone()[0]
    real = sqlite3.connect

    def full(*args, **kw):  # the disk fills up: no page can be added to the file
        conn = real(*args, **kw)
        if args[0] != ":memory:":
            conn.execute(f"PRAGMA max_page_count={pages}")
        return conn

    monkeypatch.setattr(cache_store.sqlite3, "connect", full)
    _check_memory_only(EmbeddingCache(tmp_path), caplog, before=1)  # the memory copy keeps what was on disk


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores chmod")
def test_read_only_folder_really(tmp_path, caplog):
    c = EmbeddingCache(tmp_path)
    c.put_prompts(FP, prompts_of(2))
    c.close()
    os.chmod(tmp_path, 0o500)
    try:
        c2 = EmbeddingCache(tmp_path)
        assert len(c2.get_prompts(FP, ["p0", "p1"])) == 2  # reading still works
        caplog.clear()
        _check_memory_only(c2, caplog)
    finally:
        os.chmod(tmp_path, 0o700)


# ------------------------------------------------------------------------------------------ housekeeping
def test_flush_is_cheap_when_clean(tmp_path, monkeypatch):
    c = EmbeddingCache(tmp_path, max_prompts=3)
    c.put_prompts(FP, prompts_of(3))
    c.flush()
    writes = []
    monkeypatch.setattr(cache_store.Store, "write", lambda self, fn: writes.append(fn))
    c.flush()
    c.get_prompts(FP, ["p0"])  # only a use-time change: deferred ...
    c.flush()
    assert writes == []
    c.flush(force=True)  # ... until forced (close / exit)
    assert len(writes) == 1
    roomy = EmbeddingCache(tmp_path)  # far from its cap: use times never cause a rewrite
    roomy.get_prompts(FP, ["p0", "p1"])
    roomy.close()
    assert len(writes) == 1


def test_use_times_survive_for_a_full_table(tmp_path):
    feats = prompts_of(4)
    c = EmbeddingCache(tmp_path, max_prompts=4)
    c.put_prompts(FP, feats)
    c.flush()
    time.sleep(0.01)
    reader = EmbeddingCache(tmp_path, max_prompts=4)
    reader.get_prompts(FP, ["p0"])  # p0 becomes the most recently used ...
    reader.close()
    time.sleep(0.01)
    writer = EmbeddingCache(tmp_path, max_prompts=4)
    writer.put_prompts(FP, {"new": feats["p1"]})  # ... so p1 (not p0) is the one evicted
    writer.flush()
    assert set(EmbeddingCache(tmp_path).get_prompts(FP, list(feats) + ["new"])) == {"p0", "p2", "p3", "new"}


def test_stats_and_clear(tmp_path):
    c = EmbeddingCache(tmp_path, max_prompts=50)
    c.put_prompts(FP, prompts_of(5))
    c.put_prompts(FP2, prompts_of(2))
    g = gallery_key(FP, FP2)
    c.put_images(g, {f"h{i}": (v, 0.5, f"{i}.png") for i, v in enumerate(prompts_of(3).values())})
    s = c.stats()
    assert s["path"] == str(tmp_path) and s["prompts"] == 7 and s["images"] == 3
    assert s["bytes"] > 0 and set(s["fingerprints"]) == {FP, FP2} and s["galleries"] == [g]
    json.dumps(s)
    other = EmbeddingCache(tmp_path)
    other.refresh_interval = 0
    assert len(other.get_prompts(FP, ["p0"])) == 1
    c.clear(images=False)
    assert c.stats()["prompts"] == 0 and c.stats()["images"] == 3
    assert other.get_prompts(FP, ["p0"]) == {}  # the other instance sees the clear
    c.clear()
    s = c.stats()
    assert s["images"] == 0 and s["prompts"] == 0 and s["tables"] == []


def test_resolve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ICT_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert resolve_cache_dir() == tmp_path / "env"
    assert EmbeddingCache().path == tmp_path / "env"
    monkeypatch.delenv("ICT_CACHE_DIR")
    assert resolve_cache_dir() == tmp_path / "xdg" / "ict-reward"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "ict-reward"


def test_windows_defaults_are_under_localappdata(monkeypatch, tmp_path):
    from ict_core import paths

    for var in ("ICT_CACHE_DIR", "ICT_MODELS_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(paths, "_windows", lambda: True)
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))
    assert resolve_cache_dir() == tmp_path / "AppData" / "Local" / "ict-reward" / "cache"
    assert paths.default_models_dir() == tmp_path / "AppData" / "Local" / "ict-reward" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # an explicit XDG folder still wins
    assert resolve_cache_dir() == tmp_path / "xdg" / "ict-reward"


def test_no_directory_created_until_a_save(tmp_path):
    c = EmbeddingCache(tmp_path / "c")
    c.get_prompts(FP, ["x"])
    c.flush()
    c.stats()
    assert not (tmp_path / "c").exists()


def test_wrong_width_is_not_stored(tmp_path, caplog):
    c = EmbeddingCache(tmp_path)
    c.put_prompts(FP, prompts_of(1))
    c.put_prompts(FP, {"wide": np.ones(32, np.float32)})
    assert c.get_prompts(FP, ["wide"]) == {} and len(cache_warnings(caplog)) == 1


# ------------------------------------------------------------------------------------------ gallery search
def _gallery(c, n=40, d=16, seed=3, hp=True):
    rng = np.random.default_rng(seed)
    vecs = unit(rng, n, d)
    hps = rng.normal(0, 2, n).astype(np.float32)
    g = gallery_key(FP, FP2 if hp else None)
    c.put_images(g, {f"h{i:03d}": (vecs[i], float(hps[i]) if hp else None, f"img{i}.png") for i in range(n)})
    return g, vecs, hps


def test_images_roundtrip(tmp_path):
    c = EmbeddingCache(tmp_path)
    g, vecs, hps = _gallery(c)
    c.put_images(g, {"bad": (np.full(16, np.nan), 1.0, "bad.png")})
    c.flush()
    c2 = EmbeddingCache(tmp_path)
    got = c2.get_images(g, ["h000", "h039", "bad", "zzz"])
    assert set(got) == {"h000", "h039"}
    assert got["h039"][0].tobytes() == vecs[39].tobytes() and got["h039"][1] == float(hps[39])
    assert c2.counters["image_hits"] == 2 and c2.counters["image_misses"] == 2
    g2, *_ = _gallery(c2, hp=False)
    assert np.isnan(c2.get_images(g2, ["h001"])["h001"][1])
    assert c2.image_count(g) == 40


@pytest.mark.parametrize("by", ["ict", "ict*hp"])
def test_search_matches_brute_force_and_engine_ranking(tmp_path, by):
    c = EmbeddingCache(tmp_path)
    g, vecs, hps = _gallery(c)
    q = unit(np.random.default_rng(11), 1)[0]
    hits = c.search(g, q, by=by)
    ict = vecs @ q
    value = ict * (1 / (1 + np.exp(-hps.astype(np.float64)))) if by == "ict*hp" else ict
    assert [h.hash for h in hits] == [f"h{i:03d}" for i in np.argsort(-value, kind="stable")]
    assert np.allclose([h.ict for h in hits], [ict[int(h.hash[1:])] for h in hits], atol=1e-6)
    assert np.allclose([h.value for h in hits], np.sort(value)[::-1], atol=1e-6)
    assert hits[0].label.startswith("img") and isinstance(hits[0], tuple) and len(hits[0]) == 5
    ranking = pytest.importorskip("ict_core.ranking")
    results = [SimpleNamespace(ict=float(ict[i]), hp=float(1 / (1 + np.exp(-float(hps[i])))), hp_raw=float(hps[i]),
                               error=None, prompt="q") for i in range(len(vecs))]
    assert [h.hash for h in hits] == [f"h{i:03d}" for i in ranking.rank(results, by)]
    top = c.search(g, q, top_k=5, by=by)
    assert [h.hash for h in top] == [h.hash for h in hits[:5]]


def test_search_ties_keep_insertion_order_and_nan_last(tmp_path):
    c = EmbeddingCache(tmp_path)
    v = np.eye(4, dtype=np.float32)
    g = gallery_key(FP, FP2)
    c.put_images(g, {"b": (v[0], 0.0, "b"), "a": (v[0], 0.0, "a"), "c": (v[1], None, "c"), "d": (v[0], 0.0, "d")})
    assert [h.hash for h in c.search(g, v[0])] == ["b", "a", "d", "c"]
    assert [h.hash for h in c.search(g, v[0], by="ict*hp")] == ["b", "a", "d", "c"]
    assert [h.hash for h in c.search(g, v[0], top_k=2)] == ["b", "a"]
    assert c.search(g, v[0], top_k=0) == [] and c.search("empty+none", v[0]) == []
    with pytest.raises(ValueError):
        c.search(g, v[0], by="group")
    with pytest.raises(ValueError):
        c.search(g, np.ones(5, np.float32))


def test_search_after_updates_and_eviction(tmp_path):
    c = EmbeddingCache(tmp_path, max_images=30)
    g, vecs, hps = _gallery(c, n=20)
    q = vecs[3]
    assert c.search(g, q, top_k=1)[0].hash == "h003"
    _gallery(c, n=20, seed=4)  # replaces all 20 in place
    rng = np.random.default_rng(4)
    new = unit(rng, 20)
    assert c.search(g, new[5], top_k=1)[0].hash == "h005"
    c.put_images(g, {f"x{i}": (v, 0.0, "x") for i, v in enumerate(unit(np.random.default_rng(8), 15))})
    assert c.image_count(g) == 30 and len(c.search(g, q)) == 30
    c.flush()
    assert len(EmbeddingCache(tmp_path).search(g, q)) == 30


def test_numpy_fallback_without_faiss(tmp_path, caplog, monkeypatch):
    c = EmbeddingCache(tmp_path)
    g, vecs, hps = _gallery(c)
    q = unit(np.random.default_rng(12), 1)[0]
    with_faiss = c.search(g, q, by="ict*hp")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    monkeypatch.setattr(cache_mod, "_faiss", functools.cache(cache_mod._faiss.__wrapped__))
    c2 = EmbeddingCache(tmp_path)
    c.flush()
    without = c2.search(g, q, by="ict*hp")
    c2.search(g, q)
    assert [h.hash for h in without] == [h.hash for h in with_faiss]
    assert np.allclose([h.value for h in without], [h.value for h in with_faiss], atol=1e-6)
    assert len([r for r in cache_warnings(caplog) if "faiss" in r.getMessage()]) == 1


def test_hashes_match_the_engine(tmp_path):
    """`ict index` (the bytes it read) and the scorer (the file) key an image alike."""
    pre = pytest.importorskip("ict_core.preprocess")
    f = tmp_path / "x.png"
    f.write_bytes(b"not really a png")
    assert pre.bytes_ref(str(f), f.read_bytes()).digest() == pre.as_refs([f])[0].digest()


def test_module_imports_light():
    code = PRELUDE + "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------ with the engine
@pytest.fixture
def engine():
    return pytest.importorskip("ict_core.scorer")


def test_prompt_hit_never_runs_text_encoder(engine, tiny_models, images, tmp_path):
    Scorer = engine.Scorer
    imgs = [str(p) for p in images[:3]]
    first = Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu", cache=EmbeddingCache(tmp_path))
    r1 = first.score(imgs, "a red fox in the snow")
    assert first.last_cache_stats["prompt_misses"] == 1

    again = Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu", cache=EmbeddingCache(tmp_path))
    calls = []
    text_model = again.modules.ict.text_model
    text_model.register_forward_hook(lambda *a: calls.append(1))
    r2 = again.score(imgs, "a red fox in the snow")
    assert calls == [] and again.last_cache_stats["prompt_hits"] == 1
    assert [r.ict for r in r2] == [r.ict for r in r1]
    feats = again.encode_prompts(["a red fox in the snow", "a new prompt"])
    assert len(calls) == 1 and feats.shape[0] == 2
    cached = again.cache.get_prompts(again.ict_fingerprint, ["a red fox in the snow"])
    assert cached["a red fox in the snow"].tobytes() == feats[0].numpy().tobytes()


def test_read_only_mount(tmp_path):
    """A read-only file system (a bind mount, so that root is refused too): reads work, the first
    write turns the cache memory-only with one warning."""
    import shutil

    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (mount namespaces)")
    src, ro = tmp_path / "src", tmp_path / "ro"
    ro.mkdir()
    c = EmbeddingCache(src)
    c.put_prompts(FP, prompts_of(2))
    c.close()
    code = PRELUDE + textwrap.dedent(f"""
        import logging; logging.basicConfig()
        c = EmbeddingCache({str(ro)!r})
        assert len(c.get_prompts({FP!r}, ["p0", "p1"])) == 2 and not c.memory_only
        c.put_prompts({FP!r}, {{"new": np.ones(16, np.float32)}})
        c.flush()
        assert c.memory_only and len(c.get_prompts({FP!r}, ["p0", "p1", "new"])) == 3
    """)
    script = tmp_path / "ro.py"
    script.write_text(code)
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {src} {ro} && mount -o remount,bind,ro {ro} && "
                          f"{sys.executable} {script}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("WARNING") == 1 and "memory only" in out.stderr
