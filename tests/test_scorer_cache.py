"""`ict score` with the embedding cache: same scores, prompt hits across runs, gallery features reused."""
from __future__ import annotations

import json

from ict_core.cli import main


def _score(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_score_reuses_prompts_and_indexed_images(capsys, tiny_models, images, tmp_path):
    models = ["--model", tiny_models.ict, "--hp-model", tiny_models.hp, "--quiet"]
    cache = ["--cache-dir", tmp_path / "cache"]
    plain = _score(capsys, "score", *images, "--prompt", "a fox", *models, "--no-cache", "--json")
    first = _score(capsys, "score", *images, "--prompt", "a fox", *models, *cache, "--json")
    assert first["cache"] == {"prompt_hits": 0, "prompt_misses": 1, "image_hits": 0, "image_misses": len(images)}
    again = _score(capsys, "score", *images, "--prompt", "a fox", *models, *cache, "--json")
    assert again["cache"]["prompt_hits"] == 1 and again["cache"]["prompt_misses"] == 0
    assert main(["index", str(images[0].parent), *map(str, models), *map(str, cache)]) == 0
    capsys.readouterr()
    indexed = _score(capsys, "score", *images, "--prompt", "a fox", *models, *cache, "--json")
    assert indexed["cache"]["image_hits"] == len(images) and indexed["cache"]["image_misses"] == 0
    for runs in zip(plain["results"], first["results"], again["results"], indexed["results"]):
        assert len({(r["ict"], r["hp"]) for r in runs}) == 1  # bit-identical through every path


def test_half_precision_features_are_cached_apart(tiny_models):
    import torch

    from ict_core import Scorer

    fp32 = Scorer.load(tiny_models.ict, tiny_models.hp)
    fp16 = Scorer.load(tiny_models.ict, tiny_models.hp, device="cpu", run_device=torch.device("cuda"),
                       precision="fp16")
    assert fp32.prompt_key == fp32.ict_fingerprint and fp16.prompt_key == fp32.ict_fingerprint + "@float16"
    assert fp16.gallery_key != fp32.gallery_key and fp16.gallery_key.endswith("@float16")
