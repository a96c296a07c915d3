"""`ict index` / `ict search` / `ict cache`: the gallery ranks like `ict rank`, without encoding images."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("ict_core.scorer")
from ict_core import cli  # noqa: E402
from ict_core.scorer import Scorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox in the snow"


@pytest.fixture
def gallery(tiny_models, images, tmp_path):
    """A folder of the test images (one in a sub-folder) and the options naming the tiny models."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(images):
        shutil.copy(p, (folder / "sub" if i == 0 else folder) / p.name)
    (folder / "notes.txt").write_text("not an image")
    opts = ["--model", str(tiny_models.ict), "--hp-model", str(tiny_models.hp), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    return folder, opts


@pytest.fixture
def forwards(monkeypatch):
    """Counts images sent through the image towers."""
    seen = []
    real = Scorer._forward_images

    def counting(self, batch, *args):
        seen.append(len(batch))
        return real(self, batch, *args)

    monkeypatch.setattr(Scorer, "_forward_images", counting)
    return seen


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def labels(rows):
    return [str(Path(r["image"]).resolve()) for r in rows]


@pytest.mark.parametrize("by", ["ict", "ict*hp"])
def test_index_then_search_ranks_like_rank(gallery, capsys, forwards, by):
    folder, opts = gallery
    code, out, err = run(capsys, "index", str(folder), *opts)
    assert code == 0, err
    n = len(list(folder.rglob("*.*"))) - 1
    assert sum(forwards) == n

    forwards.clear()
    code, out, err = run(capsys, "search", PROMPT, "--by", by, "--json", *opts)
    assert code == 0, err
    found = json.loads(out)
    assert forwards == [] and found["count"] == n and len(found["results"]) == n

    code, out, err = run(capsys, "rank", str(folder), "--prompt", PROMPT, "--by", by, "--json", "--no-cache",
                         *[o for o in opts if o != "--quiet"], "--quiet")
    assert code == 0, err
    ranked = json.loads(out)
    assert labels(found["results"]) == labels(ranked["results"])
    for a, b in zip(found["results"], ranked["results"]):
        assert a["ict"] == pytest.approx(b["ict"], abs=1e-5)
        assert a["hp"] == pytest.approx(b["hp"], abs=1e-5)
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)

    code, out, err = run(capsys, "search", PROMPT, "--by", by, "--top-k", "3", *opts)
    assert code == 0 and len(out.strip().splitlines()) == 4
    assert out.splitlines()[1].endswith(found["results"][0]["image"])


def test_search_without_a_prompt_ranks_the_gallery_by_hp(gallery, capsys, forwards, monkeypatch):
    """HP needs no prompt: `ict search` alone ranks by the stored HP, like `ict rank` without a prompt,
    and loads no model at all."""
    folder, opts = gallery
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    monkeypatch.setattr(Scorer, "load", lambda *a, **k: pytest.fail("no model is needed to rank by hp"))
    code, out, err = run(capsys, "search", "--json", *opts)
    assert code == 0, err
    found = json.loads(out)
    assert found["by"] == "hp" and found["prompt"] is None
    assert all(r["ict"] is None and r["score"] == r["hp"] == pytest.approx(r["value"]) for r in found["results"])
    monkeypatch.undo()
    code, out, err = run(capsys, "rank", str(folder), "--json", "--no-cache", *opts)
    ranked = json.loads(out)
    assert ranked["by"] == "hp" and labels(found["results"]) == labels(ranked["results"])
    assert [r["hp"] for r in found["results"]] == pytest.approx([r["hp"] for r in ranked["results"]], abs=1e-5)
    code, out, err = run(capsys, "search", "--top-k", "2", *opts)
    assert code == 0 and len(out.strip().splitlines()) == 3 and out.splitlines()[1].split()[1] == "-"
    code, out, err = run(capsys, "search", "--by", "ict", *opts)
    assert code == 1 and "needs a prompt" in err and len(err.strip().splitlines()) == 1


def test_index_skips_stored_images_and_search_skips_model_load(gallery, capsys, forwards, images, monkeypatch):
    folder, opts = gallery
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    forwards.clear()
    code, out, err = run(capsys, "index", str(folder), *[o for o in opts if o != "--quiet"])
    assert code == 0 and forwards == [] and "indexed 0 new" in out
    shutil.copy(images[1], folder / "copy_of_b.jpg")  # same bytes: same hash, nothing to encode
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "new.png")
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    assert forwards == [1]  # only the new image

    assert run(capsys, "search", PROMPT, *opts)[0] == 0  # encodes the prompt once, caches it

    def no_load(*a, **k):
        raise AssertionError("model loaded for a cached prompt")

    monkeypatch.setattr(Scorer, "load", no_load)
    code, out, err = run(capsys, "search", PROMPT, "--json", *opts)
    assert code == 0, err
    assert json.loads(out)["cache"]["prompt_hits"] == 1


def test_search_without_the_indexing_hp_model_explains(gallery, capsys, tiny_models):
    folder, opts = gallery
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    no_hp = [o for o in opts if o not in ("--hp-model", str(tiny_models.hp))] + ["--no-hp"]
    code, out, err = run(capsys, "search", PROMPT, *no_hp)
    assert code == 1 and err.startswith("ict: error:") and "--hp-model" in err and "Traceback" not in err
    code, out, err = run(capsys, "search", PROMPT, "--by", "ict*hp", *no_hp)
    assert code == 1 and "HP model" in err


@pytest.mark.parametrize("extra,needle", [([], "ict index"), (["--no-cache"], "--no-cache"),
                                          (["--top-k", "0"], "--top-k")])
def test_search_errors_are_one_line(gallery, capsys, extra, needle):
    folder, opts = gallery
    code, out, err = run(capsys, "search", PROMPT, *opts, *extra)
    assert code == 1 and needle in err and len(err.strip().splitlines()) == 1


def test_cache_stats_and_clear(gallery, capsys, tmp_path):
    folder, opts = gallery
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    assert run(capsys, "search", PROMPT, *opts)[0] == 0
    cdir = ["--cache-dir", str(tmp_path / "cache")]
    code, out, err = run(capsys, "cache", "stats", "--json", *cdir)
    stats = json.loads(out)
    assert code == 0 and stats["path"] == str(tmp_path / "cache") and stats["prompts"] == 1
    assert stats["images"] >= 7 and stats["bytes"] > 0
    code, out, err = run(capsys, "cache", "stats", *cdir)
    assert code == 0 and "images:" in out
    assert run(capsys, "cache", "clear", "--prompts", *cdir)[0] == 0
    stats = json.loads(run(capsys, "cache", "stats", "--json", *cdir)[1])
    assert stats["prompts"] == 0 and stats["images"] >= 7
    code, out, err = run(capsys, "cache", "clear", *cdir)
    assert code == 0 and "cleared" in out
    assert json.loads(run(capsys, "cache", "stats", "--json", *cdir)[1])["images"] == 0


def test_cache_stats_console_script_uses_env(tmp_path):
    env = dict(os.environ, ICT_CACHE_DIR=str(tmp_path / "envcache"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "ict_core", "cache", "stats", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["path"] == str(tmp_path / "envcache")


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_index_hashes_the_bytes_it_decodes(gallery, capsys, monkeypatch, images, tmp_path):
    """A file replaced while `ict index` runs must not get the new image's features under the old
    content's hash (issue 10, defect 9): the bytes hashed are the bytes decoded."""
    from ict_core.cache import EmbeddingCache
    from ict_core.preprocess import bytes_ref

    folder, opts = gallery
    target = folder / images[1].name
    old_hash = bytes_ref(str(target), target.read_bytes()).digest()
    real = Scorer.encode_images

    def swap_then_encode(self, *a, **k):  # another program rewrites the file after it was hashed
        Image.new("RGB", (40, 40), (0, 255, 0)).save(target, format="PNG")
        return real(self, *a, **k)

    monkeypatch.setattr(Scorer, "encode_images", swap_then_encode)
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    monkeypatch.undo()
    code, out, err = run(capsys, "search", PROMPT, "--json", *opts)
    stored = EmbeddingCache(tmp_path / "cache").get_images(json.loads(out)["gallery"], [old_hash])[old_hash][0]
    target.write_bytes(images[1].read_bytes())
    code, out, err = run(capsys, "rank", str(target), "--prompt", PROMPT, "--json", "--no-cache", *opts)
    original = json.loads(out)["results"][0]["ict"]
    found = {r["hash"]: r["ict"] for r in json.loads(run(capsys, "search", PROMPT, "--json", *opts)[1])["results"]}
    assert found[old_hash] == pytest.approx(original, abs=1e-5) and stored.shape[0] > 0


def test_index_that_cannot_save_says_so_and_fails(gallery, tmp_path):
    folder, opts = gallery
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    opts = [o if o != str(tmp_path / "cache") else str(blocker / "cache") for o in opts]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "ict_core", "index", str(folder), *opts], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "could not save" in out.stderr and "indexed" not in out.stdout
    assert "Traceback" not in out.stderr


def test_search_ranks_nan_last_and_writes_null(gallery, capsys):
    """An image whose HP came out NaN: last under --by ict*hp, null in JSON (never a bare NaN)."""
    from ict_core.cache import EmbeddingCache

    folder, opts = gallery
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    found = json.loads(run(capsys, "search", PROMPT, "--json", *opts)[1])
    cache = EmbeddingCache(opts[opts.index("--cache-dir") + 1])
    vec, _ = cache.get_images(found["gallery"], [found["results"][0]["hash"]])[found["results"][0]["hash"]]
    cache.put_images(found["gallery"], {"nan-hp": (vec, float("nan"), "nan.png")})  # the best ict, no HP
    cache.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "ict_core", "search", PROMPT, "--by", "ict*hp", "--json", *opts],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = _strict_json(out.stdout)["results"]
    assert rows[-1]["hash"] == "nan-hp" and rows[-1]["value"] is None and rows[-1]["hp"] is None
    assert all(r["value"] is not None for r in rows[:-1])
    text = subprocess.run([sys.executable, "-m", "ict_core", "search", PROMPT, "--by", "ict*hp", *opts],
                          env=env, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and text.stdout.splitlines()[-1].split()[-2] == "-"


def test_search_with_a_cached_prompt_imports_no_torch(gallery, capsys):
    """A fresh `ict search` whose prompt is cached reads the model files' fingerprints and never imports
    torch (~18 s here), nor does computing a fingerprint alone."""
    folder, opts = gallery
    assert run(capsys, "index", str(folder), *opts)[0] == 0
    assert run(capsys, "search", PROMPT, *opts)[0] == 0  # encodes the prompt once, caches it
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "ict_core", "search", PROMPT, "--json", *opts],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["cache"]["prompt_hits"] == 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "ict_core.weights" in imported and "torch" not in imported
    code = (f"import sys; from ict_core.weights import fingerprint; fingerprint({str(opts[1])!r}); "
            f"print('torch' in sys.modules)")
    fp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert fp.stdout.strip() == "False", fp.stderr[-2000:]
