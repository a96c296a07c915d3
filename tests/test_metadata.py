"""ict_core.metadata: the `ict_reward` PNG key that carries an image's scores (ComfyUI and the webuis)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ict_core import metadata
from ict_core.scorer import ScoreResult


def _save(path, arr, text: dict[str, str]):
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.fromarray(arr).save(path, pnginfo=info)


def _arr(seed):
    return np.random.default_rng(seed).integers(0, 256, (8, 6, 3), dtype=np.uint8)


def test_record_fields_and_json_are_plain_values():
    r = ScoreResult(2, None, "a fox", ict=0.3, hp=0.7, hp_raw=0.85, score=0.21)
    rec = metadata.record(r, by="ict*hp", value=0.21, rank=1, model="ict.safetensors", hp_model="hp.safetensors",
                          precision="auto", pixels="sha256:00")
    assert set(rec) == set(metadata.RECORD_FIELDS)
    assert rec["index"] == 2 and rec["prompt"] == "a fox" and rec["ict"] == 0.3
    text = metadata.dumps([rec])
    assert json.loads(text) == {"v": 1, "images": [rec]}
    nan = metadata.record(ScoreResult(0, None, "", error="bad"), by="hp", value=float("nan"))
    assert nan["value"] is None and nan["error"] == "bad"
    metadata.dumps([nan])  # strict JSON: would raise on NaN


def test_each_file_finds_its_own_record_among_the_batch(tmp_path):
    arrs = [_arr(i) for i in range(3)]
    recs = [{"ict": 0.1 * i, "hp": None, "score": 0.1 * i, "by": "ict", "pixels": metadata.pixel_digest(a)}
            for i, a in enumerate(arrs)]
    text = json.dumps(metadata.merge(None, recs))  # as ComfyUI's Save Image writes extra_pnginfo values
    for i, a in enumerate(arrs):
        _save(tmp_path / f"{i}.png", a, {metadata.KEY: text})
        assert metadata.own_scores(tmp_path / f"{i}.png")["score"] == 0.1 * i
        assert len(metadata.read_scores(tmp_path / f"{i}.png")) == 3
    changed = arrs[0].copy()
    changed[0, 0, 0] ^= 1                                     # not the pixels that were scored
    _save(tmp_path / "x.png", changed, {metadata.KEY: text})
    assert metadata.own_scores(tmp_path / "x.png") is None
    _save(tmp_path / "none.png", arrs[0], {})
    assert metadata.own_scores(tmp_path / "none.png") is None and metadata.read_scores(tmp_path / "none.png") == []


def test_single_record_without_digest_is_the_files_own(tmp_path):
    _save(tmp_path / "w.png", _arr(0), {metadata.KEY: metadata.dumps([{"ict": 0.5, "score": 0.5, "by": "ict"}])})
    assert metadata.own_scores(tmp_path / "w.png")["ict"] == 0.5


def test_merge_replaces_a_record_of_the_same_pixels_and_tolerates_garbage():
    a = {"pixels": "sha256:a", "score": 1.0}
    b = {"pixels": "sha256:b", "score": 2.0}
    m = metadata.merge(metadata.merge(None, [a, b]), [{"pixels": "sha256:a", "score": 3.0}])
    assert [r["score"] for r in m["images"]] == [2.0, 3.0]
    assert metadata.merge("not json", [a])["images"] == [a]
    assert metadata.loads("[1, 2]") == [] and metadata.loads('{"images": [1, {"x": 1}]}') == [{"x": 1}]


def test_pixel_digest_matches_comfyuis_save_conversion():
    import torch

    t = torch.rand(5, 7, 3)
    as_saved = np.clip(255.0 * t.numpy(), 0, 255).astype(np.uint8)   # nodes.SaveImage
    assert metadata.pixel_digest(as_saved) == metadata.pixel_digest(np.asarray(Image.fromarray(as_saved)))
    assert metadata.pixel_digest(as_saved[..., 0]) != metadata.pixel_digest(as_saved)


# ------------------------------------------------------------------------- garbage is ignored, never raised
DEEP = "[" * 100_000 + "]" * 100_000
WRONG = json.dumps({"v": 1, "images": [{"ict": "high", "hp": [1], "score": True, "rank": "1", "prompt": 5,
                                        "pixels": ["not", "hashable"], "extra": {"x": 1}}, "not a record", 7]})


@pytest.mark.parametrize("value", [DEEP, '{"v": 1, "images": ' + DEEP + "}", WRONG, "x" * (metadata.MAX_TEXT + 1),
                                   '{"images": "abc"}', "[1, 2]", "null"])
def test_garbage_values_are_ignored(tmp_path, value):
    records = metadata.loads(value)
    assert all(isinstance(r, dict) for r in records)
    for r in records:
        assert r["ict"] is None and r["hp"] is None and r["rank"] is None and r["prompt"] is None
        assert r["pixels"] is None and "extra" not in r
    _save(tmp_path / "g.png", _arr(0), {metadata.KEY: value})
    assert metadata.read_scores(tmp_path / "g.png") == records
    assert metadata.own_scores(tmp_path / "g.png") in (None, *records)


@pytest.mark.parametrize("existing", [DEEP, WRONG, 5, [1, 2], {"images": "abc"}, {"images": [{"pixels": [1]}]},
                                      {"v": 1, "images": None}])
def test_merge_takes_whatever_another_node_left(existing):
    """The ComfyUI node merges into pnginfo[KEY] whatever an earlier node put there (a TypeError reached it)."""
    new = [{"ict": 0.1, "pixels": "sha256:ab"}]
    merged = metadata.merge(existing, new)
    assert merged["images"][-1] == new[0] and all(isinstance(r, dict) for r in merged["images"])
    json.dumps(merged)


@pytest.mark.parametrize("mode", ["I;16", "1", "I", "F"])
def test_wide_and_one_bit_images_have_no_own_record_and_do_not_raise(tmp_path, mode):
    rec = {"ict": 0.2, "pixels": metadata.pixel_digest(_arr(0))}
    img = Image.new(mode, (8, 6))
    info = PngInfo()
    info.add_text(metadata.KEY, metadata.dumps([rec, dict(rec, pixels="sha256:00")]))
    path = tmp_path / ("w.png" if mode in ("I;16", "1") else "w.tif")
    img.save(path, pnginfo=info) if path.suffix == ".png" else img.save(path)
    assert metadata.own_scores(path) is None
    assert len(metadata.read_scores(path)) == (2 if path.suffix == ".png" else 0)


@pytest.mark.parametrize("compressed", [True, False])
def test_oversized_text_chunks_are_ignored(tmp_path, compressed):
    info = PngInfo()
    info.add_itxt(metadata.KEY, metadata.dumps([{"ict": 0.1}]) + " " * (2 << 20), zip=compressed)
    info.add_text("parameters", "x" * (metadata.MAX_TEXT + 10))
    Image.fromarray(_arr(0)).save(tmp_path / "big.png", pnginfo=info)
    assert metadata.read_scores(tmp_path / "big.png") == []
    assert metadata.own_scores(tmp_path / "big.png") is None
    assert "parameters" not in metadata.read_texts(tmp_path / "big.png")


def test_show_and_prompt_from_metadata_survive_garbage_files(tmp_path, capsys):
    """Through the CLI: one line per file, no traceback."""
    from ict_core.cli import main

    _save(tmp_path / "deep.png", _arr(0), {metadata.KEY: DEEP, "prompt": DEEP, "parameters": "\x00" * 10})
    _save(tmp_path / "wrong.png", _arr(1), {metadata.KEY: WRONG, "prompt": '{"1": {"inputs": 5}, "2": []}'})
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    code = main(["show", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err and len(out.strip().splitlines()) == 4  # wrong.png: 2 lines
    from ict_core.prompt_source import prompt_of

    for name in ("deep.png", "wrong.png", "junk.png"):
        found = prompt_of(tmp_path / name)
        assert found.prompt is None and found.error.startswith(str(tmp_path / name))
