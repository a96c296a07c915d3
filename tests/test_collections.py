"""Collections you can trust (issue 21): a write that did not happen is never reported as done, the paths of a
content follow its files, every input is bounded before the work it causes, and the output keeps its contract.
Each test goes through the real `ict` entry point."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ict_core.scorer")
from ict_core import cli  # noqa: E402
from ict_core.scorer import Scorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox in the snow"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ict(*args, stdout=subprocess.PIPE, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ict_core", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=timeout, errors="backslashreplace")


@pytest.fixture
def setup(tiny_models, images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images[:3]:
        shutil.copy(p, folder / p.name)
    cache = tmp_path / "cache"
    opts = ["--model", tiny_models.ict, "--hp-model", tiny_models.hp, "--device", "cpu", "--cache-dir", cache,
            "--quiet"]
    return folder, cache, opts


def _held(cache: Path) -> sqlite3.Connection:
    """Another process's long write: the database's write lock, held until rolled back."""
    other = sqlite3.connect(cache / "cache.sqlite3", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


# ------------------------------------------------------------------------------- 1: work reported as done
def test_index_under_a_held_write_lock_waits_then_fails_without_claiming_work(setup, capsys, images):
    folder, cache, opts = setup
    one = folder.parent / "one"
    one.mkdir()
    shutil.copy(images[3], one / images[3].name)
    assert run(capsys, "index", one, *opts)[0] == 0  # the database exists
    other = _held(cache)
    try:
        code, out, err = run(capsys, "index", folder, *opts, "--lock-wait", "1.5")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert code == 1 and "indexed" not in out, (out, err)
    assert "stayed locked" in err and "not saved" in err and "--lock-wait" in err
    assert err.strip().splitlines()[-1].startswith("ict: error:")
    code, out, err = run(capsys, "index", folder, *opts)  # the lock is gone: the same run stores them
    assert code == 0 and "indexed 3 new image(s)" in out


def test_index_waits_for_a_lock_released_within_the_wait(setup, capsys, images):
    """The other process finishes while `ict index` waits (released at the first "waiting" line): stored, exit 0."""
    import logging

    folder, cache, opts = setup
    assert run(capsys, "index", folder, *opts)[0] == 0
    Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / "new.png")
    other = _held(cache)
    said = []

    class Release(logging.Handler):
        def emit(self, record):
            if "waiting for it" in record.getMessage() and not said:
                said.append(record.getMessage())
                other.execute("ROLLBACK")

    handler = Release()
    logging.getLogger("ict_core.cache").addHandler(handler)
    try:
        code, out, err = run(capsys, "index", folder, *opts, "--lock-wait", "60")
    finally:
        logging.getLogger("ict_core.cache").removeHandler(handler)
        other.close()
    assert said and code == 0 and "indexed 1 new image(s)" in out, (said, out, err)


def test_cache_clear_under_a_held_write_lock_fails_and_clears_nothing(setup, capsys):
    folder, cache, opts = setup
    assert run(capsys, "index", folder, *opts)[0] == 0
    other = _held(cache)
    try:
        code, out, err = run(capsys, "cache", "clear", "--cache-dir", cache, "--lock-wait", "1")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert code == 1 and "cleared" not in out and "not cleared" in err
    stats = json.loads(run(capsys, "cache", "stats", "--json", "--cache-dir", cache)[1])
    assert stats["images"] == 3
    code, out, err = run(capsys, "cache", "clear", "--cache-dir", cache)
    assert code == 0 and "cleared" in out


# ------------------------------------------------------------------------------------- 4: stale paths
def test_a_moved_file_is_listed_under_its_new_path(setup, capsys, forwards):
    folder, cache, opts = setup
    assert run(capsys, "index", folder, *opts)[0] == 0
    first = sorted(folder.iterdir())[0]
    moved = folder / "sub" / ("renamed_" + first.name)
    moved.parent.mkdir()
    first.rename(moved)
    forwards.clear()
    code, out, err = run(capsys, "index", folder, *opts)
    assert code == 0 and forwards == [] and "1 now under their new path" in out
    rows = json.loads(run(capsys, "search", PROMPT, "--json", *opts)[1])["results"]
    listed = {r["image"] for r in rows}
    assert str(moved.resolve()) in listed and str(first.resolve()) not in listed
    assert all(Path(p).exists() for p in listed)


@pytest.fixture
def forwards(monkeypatch):
    seen = []
    real = Scorer._forward_images

    def counting(self, batch, *args):
        seen.append([tuple(t.shape) for t in batch])
        return real(self, batch, *args)

    monkeypatch.setattr(Scorer, "_forward_images", counting)
    return seen


# ------------------------------------------------------------------------------------- 5: bounds
def test_index_refuses_a_huge_non_image_file_without_reading_it(setup, capsys, monkeypatch):
    """`ict index` read a whole multi-GB file into memory: one bounded reader for index and score."""
    import ict_core.files as files

    folder, cache, opts = setup
    big = folder / "huge.png"
    with open(big, "wb") as f:  # sparse: 64 MiB on paper, nothing on disk
        f.truncate(64 << 20)
    monkeypatch.setattr(files, "MAX_IMAGE_BYTES", 8 << 20)
    reads = []
    real_read = files.read_regular

    def spy(path, limit=None, what="an image file"):
        reads.append(limit)
        return real_read(path, files.MAX_IMAGE_BYTES, what)

    monkeypatch.setattr(files, "read_regular", spy)
    import ict_core.preprocess as pre
    monkeypatch.setattr(pre, "read_regular", spy)
    for command in (["index", folder], ["score", big, "--prompt", PROMPT]):
        code, out, err = run(capsys, *command, *opts)
        lines = [line for line in err.splitlines() if "huge.png" in line]
        assert len(lines) == 1 and "more than the 8 MiB an image file may have" in lines[0], err
        assert "Traceback" not in err and "MemoryError" not in err
    assert reads  # both commands went through the one reader


def test_a_chunk_of_very_large_images_is_never_held_at_full_size(setup, capsys, forwards, tmp_path):
    folder, cache, opts = setup
    big = tmp_path / "big"
    big.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (1500, 3000, 3), dtype=np.uint8)).save(big / f"b{i}.png")
    code, out, err = run(capsys, "score", big, "--prompt", PROMPT, "--json", "--no-cache", *opts)
    assert code == 0, err
    shapes = [s for batch in forwards for s in batch]
    assert len(shapes) == 3 and all(h * w <= 1 << 22 for _, h, w in shapes)
    alone = json.loads(run(capsys, "score", big / "b1.png", "--prompt", PROMPT, "--json", "--no-cache", *opts)[1])
    together = json.loads(out)["results"][1]
    assert together["ict"] == pytest.approx(alone["results"][0]["ict"], abs=1e-6)


def test_a_huge_top_k_sizes_the_ivf_candidates_by_the_gallery(tmp_path, monkeypatch):
    """--top-k 10**9 asked the IVF index for 10**10 candidates (allocated by faiss before any search)."""
    from ict_core.cache import EmbeddingCache
    from ict_core.cache import gallery_search as gs

    monkeypatch.setattr(gs, "IVF_MIN", 500)
    asked = []
    real = gs.Ivf.search
    monkeypatch.setattr(gs.Ivf, "search", lambda self, faiss, q, k: asked.append(k) or real(self, faiss, q, k))
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(2000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    c = EmbeddingCache(tmp_path)
    c.put_images("g", {f"h{i}": (v, 0.0, f"{i}.png") for i, v in enumerate(vecs)})
    hits = c.search("g", vecs[0], top_k=10 ** 9)
    assert len(hits) == 2000 and hits[0].hash == "h0"
    assert all(k <= 2000 for k in asked)
    c.search("g", vecs[0], top_k=5)
    assert asked and asked[-1] == 100  # a small k still goes through the index


# ------------------------------------------------------------------------------------- 6: output contract
def test_search_into_a_closed_pipe_ends_quietly(setup, capsys):
    folder, cache, opts = setup
    assert run(capsys, "index", folder, *opts)[0] == 0
    assert run(capsys, "search", PROMPT, *opts)[0] == 0  # the prompt is cached: the process below loads no model
    r, w = os.pipe()
    os.close(r)  # `| head -1` that has already read its line
    try:
        p = ict("search", PROMPT, *opts, stdout=w)
    finally:
        os.close(w)
    assert p.returncode == 141 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_control_characters_in_file_names_stay_on_one_line(setup, capsys, images):
    folder, cache, opts = setup
    bad = folder / "evil\nname\x1b[31m.png"
    bad.write_bytes(b"not an image")
    good = folder / "tab\tname.png"
    shutil.copy(images[0], good)
    code, out, err = run(capsys, "score", folder, "--prompt", PROMPT, *opts)
    assert code == 0
    assert len(out.strip().splitlines()) == 5  # 4 images + the bad one, one line each
    assert "evil\\nname\\x1b[31m.png" in out and "\x1b" not in out + err
    assert len([line for line in err.splitlines() if "evil" in line]) == 1
    code, out, err = run(capsys, "rank", folder, "--prompt", PROMPT, *opts)
    assert code == 0 and "\x1b" not in out and "tab\\tname.png" in out and len(out.strip().splitlines()) == 7


@pytest.mark.parametrize("prompt", ["&nbsp;", "&amp;nbsp; &#32;", " &#x20;\u00a0"])
def test_a_prompt_that_cleans_to_nothing_is_refused(setup, capsys, prompt):
    folder, cache, opts = setup
    code, out, err = run(capsys, "score", folder, "--prompt", prompt, *opts)
    assert code == 1 and out == "" and "empty" in err and len(err.strip().splitlines()) == 1


def test_a_sqlite_file_of_another_program_is_named_and_left_alone(setup, capsys):
    folder, cache, opts = setup
    cache.mkdir()
    db = cache / "cache.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE entries(user TEXT, password TEXT)")
        conn.execute("INSERT INTO entries VALUES('me', 'secret')")
    before = db.read_bytes()
    code, out, err = run(capsys, "index", folder, *opts)
    assert code == 1 and "another program" in err and "read-only" not in err
    assert db.read_bytes() == before and sorted(p.name for p in cache.iterdir()) == ["cache.sqlite3"]
    code, out, err = run(capsys, "cache", "clear", "--cache-dir", cache)
    assert code == 1 and "another program" in err and db.read_bytes() == before
