"""`ict score|index --ray`: one row per image, the plain path's scores, error rows, a killed actor
retried, resume by content hash, the gallery fed from Parquet; Ray optional, never imported by the
plain path. One local Ray (2 CPUs) serves the whole module; a pipeline run costs ~10-30 s here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ict_core import cli
from ict_core.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox in the snow"
FAULT_ENV = "ICT_TEST_RAY_FAULT"


# -------------------------------------------------------------------------------------------- no Ray needed
def _run_cli(*argv, env=None):
    code = ("import sys\n" + (env or "") + "\nfrom ict_core.cli import main\nrc = main(sys.argv[1:])\n"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY', 'PYARROW' if 'pyarrow' in sys.modules "
            "else 'NO_PYARROW', file=sys.stderr)\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=600)


def test_plain_path_never_imports_ray(tiny_models, images, tmp_path):
    r = _run_cli("score", images[0], "--prompt", PROMPT, "--model", tiny_models.ict, "--device", "cpu",
                 "--no-cache", "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert "NO_RAY NO_PYARROW" in r.stderr


def test_without_ray_one_line_says_how_to_install(tiny_models, images, tmp_path):
    r = _run_cli("score", images[0], "--prompt", PROMPT, "--model", tiny_models.ict, "--device", "cpu",
                 "--ray", "--out", tmp_path / "out", env="sys.modules['ray'] = None  # as if not installed")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("NO_RAY", "RAY_IMPORTED"))]
    assert lines == ['ict: error: --ray needs Ray, which is not installed: pip install -e ".[ray]"  '
                     '(or: pip install "ray[data]")'], r.stderr
    assert not (tmp_path / "out").exists()


def test_ray_option_leaves_images_to_the_images(images):
    """--ray takes an optional ADDRESS; an image right after it is still an image."""
    a, b = str(images[0]), str(images[1])
    args = cli.build_parser().parse_args(["score", "--ray", a, b, "--out", "o"])
    assert (args.ray, args.images) == ("local", [a, b])
    for addr in ("auto", "ray://head:10001", "10.0.0.1:6379"):
        args = cli.build_parser().parse_args(["score", "--ray", addr, a, "--out", "o"])
        assert (args.ray, args.images) == (addr, [a])
    args = cli.build_parser().parse_args(["index", "--ray", a])
    assert (args.ray, args.paths) == ("local", [a])


@pytest.mark.parametrize("argv, msg", [
    (["--out", "o"], "--out is an option of --ray runs"),
    (["--ray"], "pass --out DIR"),
    (["--ray", "--out", "o", "--json"], "--json/--csv print results of the plain path"),
    (["--ray", "--out", "o", "--actors", "0"], "--actors must be at least 1, got 0"),
    (["--ray", "--out", "o", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--ray", "--out", "o", "--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
])
def test_bad_usage_is_one_line(tiny_models, images, capsys, argv, msg):
    code = cli.main(["score", str(images[0]), "--prompt", PROMPT, "--model", str(tiny_models.ict), *argv])
    err = capsys.readouterr().err
    assert code == 1 and msg in err and len(err.strip().splitlines()) == 1, err


def test_lists_of_images(images, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from ict_core.scale.inputs import expand

    txt = tmp_path / "list.txt"
    txt.write_text("# two images\n" + f"{images[0]}\n\n{images[1].name}\n")
    shutil.copy(images[1], tmp_path / images[1].name)
    assert expand([str(txt)]) == [str(images[0]), str(tmp_path / images[1].name)]
    pq.write_table(pa.table({"image": [str(p) for p in images[:3]], "x": [1, 2, 3]}), tmp_path / "l.parquet")
    assert expand([str(tmp_path / "l.parquet")]) == [str(p) for p in images[:3]]
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="column named 'image' or 'path'"):
        expand([str(tmp_path / "bad.parquet")])


def test_crop_is_the_scorers_preprocessing_bit_for_bit(images):
    from ict_core import preprocess
    from ict_core.scale.stages import crop_uint8

    for p in images:
        full = preprocess.as_refs([p])[0].load()
        crop = crop_uint8(full)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
        assert torch.equal(preprocess.pixel_values(crop[None]), preprocess.pixel_values(full[None])), p


def test_prepare_decodes_the_bytes_it_hashed(tmp_path, monkeypatch):
    """A file replaced after the CPU stage read it: its row holds the pixels of the bytes it hashed
    (the stage used to read a local file a second time to decode it)."""
    import hashlib

    import numpy as np
    from PIL import Image

    from ict_core.scale import stages

    path = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(path)
    data = path.read_bytes()

    def read_then_replaced(p):  # another program rewrites the file just after the stage read it
        Image.new("RGB", (40, 40), (0, 255, 0)).save(path)
        return data

    monkeypatch.setattr(stages, "read_bytes", read_then_replaced)
    row = next(stages.prepare({"index": np.array([0]), "path": np.array([str(path)], dtype=object)}))
    assert row["hash"][0] == hashlib.sha256(data).hexdigest() and row["error"][0] is None
    assert row["pixels"][0][0].min() == 255 and row["pixels"][0][1].max() == 0  # red, as hashed


def test_prepare_refuses_an_elongated_image_as_the_plain_path(tmp_path):
    """A 1 x 60,000 image: one resized line would not fit a bounded working set. The plain path refuses it
    (preprocess.check_shape); the CPU stage gives the same error row instead of resizing it."""
    import numpy as np
    from PIL import Image

    from ict_core import preprocess
    from ict_core.scale import stages

    path = tmp_path / "line.png"
    Image.new("RGB", (60_000, 1), (9, 9, 9)).save(path)
    row = next(stages.prepare({"index": np.array([0]), "path": np.array([str(path)], dtype=object)}))
    with pytest.raises(preprocess.InputError) as plain:
        preprocess.as_refs([str(path)])[0].load()
    assert row["error"][0] == str(plain.value) and "elongated" in row["error"][0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_prepare_refuses_a_fifo_without_blocking(tmp_path):
    """A FIFO named in a list file (or on the command line) is an error row, as in the plain path: opening it
    for reading would wait for a writer forever and hang the Ray task."""
    import threading

    import numpy as np

    from ict_core.scale import stages

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rows = []
    worker = threading.Thread(target=lambda: rows.extend(stages.prepare(
        {"index": np.array([0]), "path": np.array([str(fifo)], dtype=object)})), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the CPU stage blocked on a FIFO"
    assert rows[0]["hash"][0] is None and "FIFO" in rows[0]["error"][0].upper()


# ------------------------------------------------------------------------------------------- with Ray
try:
    import ray
except ImportError:  # the tests above still run
    ray = None


def _fault_hook():
    """Installed in every Ray worker: while the file named by $ICT_TEST_RAY_FAULT exists, the first
    actor batch to remove it kills its worker process mid-batch (os._exit), as a crash or OOM kill would."""
    from ict_core.scale import stages

    real = stages.ScoreActor.__call__

    def call(self, batch):
        try:
            os.remove(os.environ[FAULT_ENV])
        except (KeyError, FileNotFoundError):
            return real(self, batch)
        os._exit(1)

    stages.ScoreActor.__call__ = call


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    if ray is None:
        pytest.skip("Ray is an optional extra: pip install -e '.[ray]'")
    fault = tmp_path_factory.mktemp("fault") / "armed"
    os.environ[FAULT_ENV] = str(fault)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",  # never a cluster
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                                       FAULT_ENV: str(fault), "OMP_NUM_THREADS": "1"},
                          "worker_process_setup_hook": _fault_hook})
    yield fault
    ray.shutdown()
    os.environ.pop(FAULT_ENV, None)


@pytest.fixture(scope="module")
def inputs(images, tmp_path_factory):
    """The test images, a corrupt file and a missing one (absolute paths, as rows name them)."""
    folder = tmp_path_factory.mktemp("ray_images")
    for p in images:
        shutil.copy(p, folder / p.name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder.resolve(), str(folder.resolve().parent / "missing.png")


def _models(tiny_models, tmp_path):
    return ["--model", str(tiny_models.ict), "--hp-model", str(tiny_models.hp), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]


def _rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = [f for f in out.glob("*.parquet") if not f.name.startswith("_")]
    return sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=lambda r: r["index"])


@pytest.fixture(scope="module")
def scored(ray_session, tiny_models, inputs, tmp_path_factory):
    """One --ray score run with 2 actors and batches of 3, during which one actor is killed mid-batch."""
    tmp = tmp_path_factory.mktemp("scored")
    folder, missing = inputs
    ray_session.write_text("kill one actor")
    argv = ["score", str(folder), missing, "--prompt", PROMPT, *_models(tiny_models, tmp)]
    code = cli.main([*argv, "--ray", "--out", str(tmp / "out"), "--actors", "2", "--batch-size", "3"])
    assert code == 0
    return tmp / "out", argv, ray_session


def test_every_image_gets_exactly_one_row(scored, inputs):
    out, _, _ = scored
    rows = _rows(out)
    want = sorted(str(p) for p in inputs[0].iterdir()) + [inputs[1]]
    assert [r["path"] for r in rows] == want          # folder order, then the missing file
    assert [r["index"] for r in rows] == list(range(len(want)))


def test_a_killed_actor_is_retried_and_nothing_doubles(scored):
    out, _, fault = scored
    assert not fault.exists(), "the fault was never triggered: the test would prove nothing"
    rows = _rows(out)
    assert len({r["path"] for r in rows}) == len(rows)


def test_scores_equal_the_plain_path(scored, capsys):
    out, argv, _ = scored
    assert cli.main([*argv, "--json", "--no-cache"]) == 0
    plain = json.loads(capsys.readouterr().out)["results"]
    rows = _rows(out)
    assert [p["image"] for p in plain] == [r["path"] for r in rows]
    for p, r in zip(plain, rows):
        assert p.get("error") == r["error"]
        for k in ("ict", "hp", "score"):
            assert (p[k] is None) == (r[k] is None), (k, p, r)
            if p[k] is not None:
                assert abs(p[k] - r[k]) <= 1e-6, (k, p[k], r[k])
    assert sum(r["error"] is None for r in rows) == len(rows) - 2


def test_corrupt_and_missing_images_get_error_rows(scored):
    rows = {Path(r["path"]).name: r for r in _rows(scored[0])}
    assert "cannot read image" in rows["corrupt.png"]["error"] and rows["corrupt.png"]["hash"]
    assert rows["missing.png"]["error"].endswith("file not found") and rows["missing.png"]["hash"] is None
    assert all(rows[n]["ict"] is None and rows[n]["score"] is None for n in ("corrupt.png", "missing.png"))


def test_a_second_run_scores_nothing(scored, capsys):
    out, argv, _ = scored
    before = sorted(f.name for f in out.iterdir())
    assert cli.main([*argv, "--ray", "--out", str(out)]) == 0
    assert "score: 0 new row(s)" in capsys.readouterr().out
    assert sorted(f.name for f in out.iterdir()) == before


def test_another_job_in_the_same_folder_is_refused(scored, capsys):
    out, argv, _ = scored
    argv = [a if a != PROMPT else "another prompt" for a in argv]
    assert cli.main([*argv, "--ray", "--out", str(out)]) == 1
    assert "holds the results of another job (different prompt)" in capsys.readouterr().err


def test_a_killed_job_resumes_where_it_stopped(scored, inputs, tiny_models, tmp_path, capsys):
    """Half the rows written and one file cut short (as a killed job leaves them): the re-run does
    only the rest, and the output again has each image once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, argv, _ = scored
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(src / "_ict_job.json", out)
    rows = _rows(src)
    schema = pq.read_schema(next(src.glob("*.parquet")))
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=schema), out / "ict-rows-done_000000.parquet")
    (out / "ict-rows-cut_000001.parquet").write_bytes(b"PAR1 half a file")
    assert cli.main([*argv, "--ray", "--out", str(out), "--batch-size", "4"]) == 0
    assert f"score: {len(rows) - 4} new row(s)" in capsys.readouterr().out
    again = _rows(out)
    assert [r["path"] for r in again] == [r["path"] for r in rows]
    assert (out / "_broken-ict-rows-cut_000001.parquet").exists()


def test_index_feeds_the_gallery(ray_session, tiny_models, inputs, tmp_path, capsys, monkeypatch):
    """`ict index --ray` writes embeddings + raw HP, stores them in the gallery, and `ict search`
    ranks them as it ranks a plain `ict index`; --ingest reads the same Parquet into another cache.
    A relative --out is the driver's (Ray workers run elsewhere)."""
    folder, _ = inputs
    opts = _models(tiny_models, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["index", str(folder), *opts, "--ray", "--out", "out", "--batch-size", "4"]) == 0
    n = len(list(folder.iterdir())) - 1  # all but corrupt.png
    assert f"gallery: {n} image(s) stored" in capsys.readouterr().out
    rows = _rows(tmp_path / "out")
    ok = [r for r in rows if r["error"] is None]
    assert len(rows) == n + 1 and len(ok) == n
    assert all(len(r["embedding"]) == tiny_models.ict_clip.config.projection_dim and r["hp_raw"] is not None
               for r in ok)

    def search(cache_dir):
        o = [x if x != str(tmp_path / "cache") else str(cache_dir) for x in opts]
        assert cli.main(["search", PROMPT, "--by", "ict*hp", "--json", *o]) == 0
        return json.loads(capsys.readouterr().out)["results"]

    plain_cache = tmp_path / "plain"
    o = [x if x != str(tmp_path / "cache") else str(plain_cache) for x in opts]
    assert cli.main(["index", str(folder), *o]) == 0
    capsys.readouterr()
    want = search(plain_cache)
    assert cli.main(["index", "--ingest", str(tmp_path / "out"),
                     *[x if x != str(tmp_path / "cache") else str(tmp_path / "ingested") for x in opts]]) == 0
    capsys.readouterr()
    for got in (search(tmp_path / "cache"), search(tmp_path / "ingested")):
        assert [Path(g["image"]).name for g in got] == [Path(w["image"]).name for w in want]
        for g, w in zip(got, want):
            assert abs(g["value"] - w["value"]) <= 1e-6 and g["hash"] == w["hash"]


def test_nothing_scored_exits_non_zero_as_the_plain_path(ray_session, tiny_models, tmp_path, capsys):
    """Every input unreadable: the rows are written, and the exit code says that nothing was scored."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    argv = ["score", str(bad), "--prompt", PROMPT, *_models(tiny_models, tmp_path)]
    assert cli.main([*argv, "--ray", "--out", str(tmp_path / "out")]) != 0
    assert "no image could be scored" in capsys.readouterr().err
    assert [r["error"] is not None for r in _rows(tmp_path / "out")] == [True, True]


def test_index_that_cannot_save_to_the_gallery_says_so(ray_session, tiny_models, images, tmp_path, capsys):
    """The cache folder is a file: the Parquet rows stay, and the exit code and one line say the gallery was not fed."""
    (tmp_path / "cache").write_text("not a folder")
    argv = ["index", str(images[0]), *_models(tiny_models, tmp_path)]
    assert cli.main([*argv, "--ray", "--out", str(tmp_path / "out")]) != 0
    assert "could not save to the cache folder" in capsys.readouterr().err
    assert len(_rows(tmp_path / "out")) == 1


def test_out_naming_a_file_is_one_line(tiny_models, images, tmp_path, capsys):
    """--out names an existing file: one line, no traceback, the file untouched (checked before Ray starts)."""
    target = tmp_path / "results.parquet"
    target.write_bytes(b"the user's own file")
    argv = ["score", str(images[0]), "--prompt", PROMPT, *_models(tiny_models, tmp_path)]
    assert cli.main([*argv, "--ray", "--out", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ict: error: --out {target} is a file; --out takes a folder (new, or the --out of an earlier run)"]
    assert target.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("with_manifest", [False, True])
def test_out_holding_the_users_parquet_is_refused_untouched(tiny_models, images, tmp_path, capsys, with_manifest):
    """A folder of the user's own Parquet files (one of them unreadable): refused in one line, before Ray
    starts, and nothing in it is renamed or written (the tool used to rename the unreadable one `_broken-*`)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = tmp_path / "mine"
    out.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), out / "sales.parquet")
    (out / "draft.parquet").write_bytes(b"PAR1 not finished")
    argv = ["score", str(images[0]), "--prompt", PROMPT, *_models(tiny_models, tmp_path)]
    if with_manifest:  # the folder of an earlier run, into which the user copied their own files
        (out / "_ict_job.json").write_text("{}")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert cli.main([*argv, "--ray", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this tool did not write (draft.parquet, sales.parquet" in err[0], err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_ingest_never_reports_rows_it_did_not_store(tiny_models, tmp_path, capsys):
    """An `ict index --ray` output with a row whose embedding the gallery refuses (another width): the
    ingest says how many rows were not stored and exits non-zero; it used to count them as stored."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from ict_core.scale.output import schema

    out = tmp_path / "out"
    out.mkdir()
    rows = [{"index": i, "path": f"/x/{i}.png", "hash": f"{i:064x}", "gallery": "g+none", "hp_raw": None,
             "embedding": [1.0] + [0.0] * (dim - 1), "error": None} for i, dim in enumerate((16, 16, 8))]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema("index")), out / "ict-rows-x_000000.parquet")
    argv = ["index", "--ingest", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "gallery:" not in captured.out
    assert captured.err.strip().splitlines() == [
        f"ict: error: 1 row(s) of {out} could not be stored in the gallery at {tmp_path / 'cache'} (locked, "
        f"read-only, or not a valid embedding); 2 were: run `ict index --ingest {out}` again"]


def test_one_row_per_input_path_on_every_run(ray_session, tiny_models, images, tmp_path, capsys):
    """Resume is by input: a byte copy of a file already done gets its own row, a file changed since its
    row was written and a file that failed once keep their one row, and a file name that is not UTF-8
    is scored as the plain path scores it (its `path` written with \\xNN escapes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(images[0], folder / "a.png")
    shutil.copy(images[0], folder / "copy.png")                     # the same bytes as a.png
    odd = os.path.join(os.fsencode(folder), b"\xff-odd.png")         # not UTF-8: surrogate escapes in Python
    shutil.copy(images[1], odd)
    missing = tmp_path / "late.png"                                  # fails on the first run
    out = tmp_path / "out"
    argv = ["score", str(folder), str(missing), "--prompt", PROMPT, *_models(tiny_models, tmp_path)]
    assert cli.main([*argv, "--ray", "--out", str(out), "--batch-size", "2"]) == 0
    first = _rows(out)
    names = [Path(r["path"]).name for r in first]
    assert names == ["a.png", "copy.png", "\\xff-odd.png", "late.png"], names
    assert first[3]["error"].endswith("file not found")
    capsys.readouterr()
    assert cli.main([*argv, "--no-cache", "--json"]) == 0           # the plain path on the same inputs
    plain = json.loads(capsys.readouterr().out)["results"]
    assert abs(plain[2]["score"] - first[2]["score"]) <= 1e-6

    # a killed job: copy.png's row was never written
    schema = pq.read_schema(next(out.glob("ict-rows-*.parquet")))
    for f in out.glob("ict-rows-*.parquet"):
        f.unlink()
    kept = [r for r in first if Path(r["path"]).name != "copy.png"]
    pq.write_table(pa.Table.from_pylist(kept, schema=schema), out / "ict-rows-killed_000000.parquet")
    shutil.copy(images[2], folder / "a.png")                        # a.png changed since its row
    shutil.copy(images[0], missing)                                 # late.png readable now
    assert cli.main([*argv, "--ray", "--out", str(out), "--batch-size", "2"]) == 0
    assert "score: 1 new row(s) (0 failed), 3 input(s) already done" in capsys.readouterr().out
    shutil.copy(images[0], folder / "new.png")                      # the folder's list changed: refused
    assert cli.main([*argv, "--ray", "--out", str(out)]) == 1
    assert "holds the rows of another input list (4 paths, 5 now)" in capsys.readouterr().err
    again = _rows(out)
    assert [r["index"] for r in again] == [0, 1, 2, 3]
    assert [Path(r["path"]).name for r in again] == names
    assert again[1]["hash"] == first[0]["hash"] and again[1]["error"] is None   # the copy: a row of its own
    assert [again[i] for i in (0, 2, 3)] == [first[i] for i in (0, 2, 3)]      # one row each, as first written


def test_the_cpu_stage_reads_through_the_bounded_reader(tmp_path):
    """A --ray input that is a huge non-image file is an error row, never read into memory whole."""
    import os

    import numpy as np

    from ict_core.scale import stages

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:  # sparse: 2 GiB on paper, nothing on disk
        f.truncate(2 << 30)
    rows = list(stages.prepare({"index": np.array([0]), "path": np.array([os.fsencode(big)], dtype=object)}))
    error = rows[0]["error"][0]
    assert "huge.png" in error and "MiB an image file may have" in error
