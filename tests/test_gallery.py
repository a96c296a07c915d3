"""ict_core.gallery.Gallery: `ict index` / `ict search` for Python callers, ranking as Scorer.score does."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("ict_core.scorer")
from ict_core import gallery as gallery_mod  # noqa: E402
from ict_core.cache import EmbeddingCache  # noqa: E402
from ict_core.errors import ICTError, InputError  # noqa: E402
from ict_core.gallery import Gallery  # noqa: E402
from ict_core.ranking import rank  # noqa: E402
from ict_core.scorer import Scorer  # noqa: E402

PROMPT = "a red fox in the snow"


@pytest.fixture
def folder(images, tmp_path):
    out = tmp_path / "imgs"
    (out / "sub").mkdir(parents=True)
    for i, p in enumerate(images):
        shutil.copy(p, (out / "sub" if i == 0 else out) / p.name)
    return out


@pytest.fixture
def forwards(monkeypatch):
    seen = []
    real = Scorer._forward_images
    monkeypatch.setattr(Scorer, "_forward_images",
                        lambda self, batch, *a: seen.append(len(batch)) or real(self, batch, *a))
    return seen


def make(tiny_models, tmp_path, hp=True) -> Gallery:
    return Gallery(tiny_models.ict, tiny_models.hp if hp else None, cache=EmbeddingCache(tmp_path / "cache"),
                   device="cpu")


@pytest.mark.parametrize("by", ["ict", "ict*hp", "hp"])
def test_index_then_search_ranks_like_the_scorer(tiny_models, folder, tmp_path, forwards, by):
    gallery = make(tiny_models, tmp_path)
    files = sorted(str(f.resolve()) for f in folder.rglob("*.*"))
    calls = []
    report = gallery.index([str(folder)], progress=lambda done, total: calls.append((done, total)))
    assert (report.added, report.already, report.failed) == (len(files), 0, 0) and sum(forwards) == len(files)
    assert calls[0] == (0, len(files)) and calls[-1] == (len(files), len(files))  # the bar starts with the work
    assert len(gallery) == len(files)

    forwards.clear()
    hits = gallery.search(PROMPT if by != "hp" else None, by=by)
    assert forwards == [] and [h.rank for h in hits] == list(range(1, len(files) + 1))

    scorer = Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu")
    results = scorer.score(files, PROMPT if by != "hp" else None, labels=files)
    best = rank(results, by)
    assert [h.image for h in hits] == [results[i].label for i in best]
    for h, i in zip(hits, best):
        r = results[i]
        assert h.hp == pytest.approx(r.hp, abs=1e-6) and h.score == pytest.approx(r.score, abs=1e-5)
        assert math.isnan(h.ict) if by == "hp" else h.ict == pytest.approx(r.ict, abs=1e-5)
    top = gallery.search(PROMPT if by != "hp" else None, by=by, top_k=2)
    assert [h.as_dict() for h in top] == [h.as_dict() for h in hits[:2]]
    row = hits[0].as_dict()
    assert set(row) == {"rank", "image", "hash", "ict", "hp", "hp_raw", "value", "score"}
    assert (row["ict"] is None) == (by == "hp")


def test_index_again_encodes_only_new_images_and_reports_bad_ones(tiny_models, folder, images, tmp_path, forwards):
    gallery = make(tiny_models, tmp_path)
    n = gallery.index([str(folder)]).added
    shutil.copy(images[1], folder / "copy.png")  # same bytes: same hash
    Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / "new.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    os.mkfifo(tmp_path / "pipe.png")  # named on its own (a folder's listing skips it): would block a plain open()
    forwards.clear()
    lines = []
    report = make(tiny_models, tmp_path).index([str(folder), str(tmp_path / "pipe.png")], on_error=lines.append)
    assert forwards == [1] and (report.added, report.already, report.failed) == (1, n, 2)  # the copy: stored
    assert report.errors == lines and len(lines) == 2
    assert any("broken.png" in line for line in lines) and any("pipe.png" in line for line in lines)


def test_a_cached_prompt_loads_no_model(tiny_models, folder, tmp_path, monkeypatch):
    gallery = make(tiny_models, tmp_path)
    gallery.index([str(folder)])
    first = gallery.search(PROMPT)
    monkeypatch.setattr(Scorer, "load", lambda *a, **k: pytest.fail("model loaded for a cached prompt"))
    again = make(tiny_models, tmp_path)
    assert again.search(PROMPT) == first and again.cache.counters["prompt_hits"] == 1


def test_keys_match_the_scorer(tiny_models, tmp_path):
    gallery = make(tiny_models, tmp_path)
    scorer = Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu")
    assert (gallery.key, gallery.prompt_key) == (scorer.gallery_key, scorer.prompt_key)


@pytest.mark.parametrize("kwargs,needle", [(dict(by="size"), "by must be"), (dict(top_k=0), "at least 1"),
                                           (dict(prompt=None, by="ict"), "needs a prompt"),
                                           (dict(by="ict*hp"), "HP model"), (dict(), "ict index")])
def test_search_refuses_what_cannot_rank(tiny_models, folder, tmp_path, kwargs, needle):
    gallery = make(tiny_models, tmp_path, hp=False)
    if needle != "ict index":
        gallery.index([str(folder)])
    with pytest.raises(InputError, match=needle):
        gallery.search(**{"prompt": PROMPT, **kwargs})


def test_index_into_a_folder_that_cannot_be_written_stops_at_the_first_round(tiny_models, folder, tmp_path,
                                                                              forwards, monkeypatch):
    """Hours of encoding would be lost: the first round that cannot be saved ends the run."""
    monkeypatch.setattr(gallery_mod, "INDEX_ROUND", 2)
    (tmp_path / "blocker").write_text("x")
    gallery = Gallery(tiny_models.ict, None, cache=EmbeddingCache(tmp_path / "blocker" / "cache"), device="cpu")
    with pytest.raises(ICTError, match="could not save.*0 new image"):
        gallery.index([str(folder)])
    assert sum(forwards) == 2 and not Path(tmp_path / "blocker").is_dir()


def test_a_cache_kept_in_memory_by_choice_indexes_and_searches(tiny_models, folder, tmp_path):
    gallery = Gallery(tiny_models.ict, None, cache=EmbeddingCache(tmp_path / "c", memory_only=True), device="cpu")
    n = gallery.index([str(folder)]).added
    assert n == len(gallery) > 0 and len(gallery.search(PROMPT)) == n and not (tmp_path / "c").exists()
