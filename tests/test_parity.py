"""Parity: `ict score` on converted safetensors equals the model card's loop on the released layouts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ict_core import Scorer, ranking
from ict_core.cli import main
from ict_core.preprocess import pil_to_uint8, pixel_values_for
from reference import ReferenceLoop, open_rgb, processor

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_models):
    import json as _json
    return ReferenceLoop(_json.loads(tiny_models.config.read_text()), tiny_models.ict_src, tiny_models.hp_src)


@pytest.fixture(scope="module")
def cli_results(tiny_models, images, tmp_path_factory):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["score", *map(str, images), "--prompt", "a red fox in the snow", "--model", str(tiny_models.ict),
                     "--hp-model", str(tiny_models.hp), "--json", "--quiet",
                     "--cache-dir", str(tmp_path_factory.mktemp("cache"))])
    assert code == 0
    return json.loads(buf.getvalue())


def _comparable(images):
    """The reference loop cannot take a 1x1 image (transformers guesses its channel axis wrongly); the
    project handles it, tested in test_preprocess."""
    return [p for p in images if p.name != "f.png"]


def test_cli_scores_equal_reference_loop(cli_results, reference, images):
    keep = _comparable(images)
    ref = reference([open_rgb(p) for p in keep], ["a red fox in the snow"] * len(keep))
    rows = [r for r in cli_results["results"] if not r["image"].endswith("f.png")]
    assert [r["image"] for r in rows] == [str(p) for p in keep]
    for row, (ict, hp, _raw) in zip(rows, ref):
        assert abs(row["ict"] - ict) <= TOL, row["image"]
        assert abs(row["hp"] - hp) <= TOL, row["image"]
        assert abs(row["score"] - ict * hp) <= TOL
    # and the same ranking, by every rule
    ours = [Row(r["ict"], r["hp"], raw) for r, (_, _, raw) in zip(rows, ref)]
    theirs = [Row(i, h, raw) for i, h, raw in ref]
    for by in ranking.BY:
        assert ranking.rank(ours, by) == ranking.rank(theirs, by), by


class Row:
    """Minimal stand-in for ScoreResult, for ranking reference numbers."""

    def __init__(self, ict, hp, hp_raw, prompt="p"):
        self.ict, self.hp, self.hp_raw, self.prompt, self.error = ict, hp, hp_raw, prompt, None


def test_hp_alone_equals_the_hp_of_a_prompted_run(tiny_models, images, reference):
    """score(images, None): HP needs no prompt; its values are the same bits as with a prompt, and equal the
    reference loop's HP; without an HP model it is a one-line error."""
    from ict_core.errors import InputError

    imgs = _comparable(images)
    scorer = Scorer.load(tiny_models.ict, tiny_models.hp)
    alone = scorer.score(imgs, None)
    prompted = scorer.score(imgs, "a red fox in the snow")
    assert [r.hp_raw for r in alone] == [r.hp_raw for r in prompted]
    assert all(r.ict is None and r.score == r.hp for r in alone)
    ref = reference([open_rgb(p) for p in imgs], ["a red fox in the snow"] * len(imgs))
    assert [r.hp for r in alone] == pytest.approx([hp for _, hp, _ in ref], abs=TOL)
    with pytest.raises(InputError, match="no prompt") as e:
        Scorer.load(tiny_models.ict).score(imgs, None)
    assert "\n" not in str(e.value)


def test_scores_are_spread(cli_results):
    """Guards the parity test itself: random weights must give distinct, non-trivial scores."""
    icts = [r["ict"] for r in cli_results["results"]]
    assert max(icts) - min(icts) > 0.01
    assert len({round(x, 6) for x in icts}) == len(icts)


def test_comfyui_tensor_equals_files(tiny_models, images):
    """A ComfyUI IMAGE batch made the way LoadImage makes it scores like the files themselves."""
    from PIL import Image

    same = [p for p in images if Image.open(p).size == (512, 512)]
    scorer = Scorer.load(tiny_models.ict, tiny_models.hp)
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")).astype(np.float32) / 255.0 for p in same])
    batch = torch.from_numpy(arr)  # [B,H,W,C] in 0..1
    from_tensor = scorer.score(batch, "a red fox")
    from_files = scorer.score(same, "a red fox")
    for a, b in zip(from_tensor, from_files):
        assert a.ict == pytest.approx(b.ict, abs=1e-6) and a.hp == pytest.approx(b.hp, abs=1e-6)


def test_per_image_prompts_match_reference(tiny_models, reference, images):
    images = _comparable(images)
    prompts = (["a red fox", "a blue car", "a red fox", "an old map"] * 3)[:len(images)]
    scorer = Scorer.load(tiny_models.ict, tiny_models.hp)
    got = scorer.score(images, prompts)
    ref = reference([open_rgb(p) for p in images], prompts)
    for r, (ict, hp, _) in zip(got, ref):
        assert abs(r.ict - ict) <= TOL and abs(r.hp - hp) <= TOL


def test_each_distinct_prompt_encoded_once(tiny_models, images, monkeypatch):
    scorer = Scorer.load(tiny_models.ict, None)
    calls = []
    text_model = scorer.modules.ict.text_model
    original = text_model.forward
    monkeypatch.setattr(text_model, "forward",
                        lambda *a, **k: calls.append(k["input_ids"].shape[0]) or original(*a, **k))
    scorer.score(images[:4], ["x", "y", "x", "y"])
    assert calls == [2]


def test_preprocessing_matches_clip_image_processor(images):
    """Pixel values agree with the reference processor to the last 8-bit step, almost everywhere exactly."""
    proc = processor()
    std = min((0.26862954, 0.26130258, 0.27577711))
    for p in _comparable(images):
        im = open_rgb(p)
        ours = pixel_values_for([pil_to_uint8(im)], torch.device("cpu"), torch.float32)
        ref = torch.as_tensor(np.asarray(proc(images=im, return_tensors="np")["pixel_values"]))
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        diff = (ours - ref).abs()
        assert diff.max() <= 1.01 / 255 / std, p
        assert (diff > 1e-5).float().mean() < 0.01, p


def test_half_precision_conversion_round_trip(tiny_models, images, tmp_path):
    """bf16 weights stored as fp32 are the same numbers: same scores."""
    from ict_core.weights import convert

    fp32 = convert(tiny_models.ict_src, tmp_path / "ict32.safetensors", tiny_models.config, "fp32").path
    a = Scorer.load(tiny_models.ict).score(images[:3], "a fox")
    b = Scorer.load(fp32).score(images[:3], "a fox")
    assert [r.ict for r in a] == [r.ict for r in b]
