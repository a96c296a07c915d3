"""ict_core.metadata: the `ict_reward` PNG key that carries an image's scores (ComfyUI and the webuis)."""
from __future__ import annotations

import json

import numpy as np
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
