"""`--prompt-from-metadata` and `ict show` on files written by real hosts (tests/fixtures) and in their formats.

tests/fixtures/comfyui: PNGs saved by real ComfyUI 0.33.0 and 0.3.64 servers (fixtures/make_comfy_fixtures.py):
`direct` (the prompt typed into CLIPTextEncode, with a weight and an embedding name), `linked` (the text from
PrimitiveStringMultiline + StringConcatenate, through ConditioningSetTimestepRange) and `two_pass` (a second
sampler with another prompt after a latent upscale: the second one made the image).
tests/fixtures/webui: images saved by real A1111 1.10.1 and Forge Classic runs with the extension (see its README).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ict_core import metadata
from ict_core.prompt_source import infotext_fields, prompt_of, webui_prompt

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMFY = sorted((FIXTURES / "comfyui").glob("*.png"))
WEBUI = sorted(p for p in (FIXTURES / "webui").glob("*") if p.suffix in (".png", ".jpg", ".jpeg", ".webp"))
EXPECTED = {"direct": "a red fox in the snow", "linked": "a red fox in the snow", "two_pass": "a ruin at dusk"}
INFOTEXT = ("(masterpiece:1.2), a <lora:detail:0.8> lighthouse at [dawn:dusk:10]\nin the fog, BREAK calm sea\n"
            "Negative prompt: blurry, (worst quality:1.4)\n"
            'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: sd15, '
            'ICT score: 0.3121, HP score: 0.7340, Version: v1.10.1')
INFOTEXT_PROMPT = "masterpiece, a lighthouse at dusk in the fog, calm sea"


def _webui_image(path: Path, infotext: str, fmt: str) -> Path:
    """An image as A1111/Forge save it (modules/images.py save_image_with_geninfo): the infotext in a PNG
    `parameters` chunk, or in the EXIF UserComment (piexif's UNICODE: UTF-16 big-endian) of a JPEG or WebP."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", infotext)
        img.save(path, pnginfo=info)
    else:
        exif = Image.Exif()
        exif[0x8769] = {0x9286: b"UNICODE\0" + infotext.encode("utf-16-be")}  # Pillow 9.5 writes no get_ifd() edit
        img.save(path, exif=exif.tobytes(), quality=90)
    return path


def test_comfyui_fixtures_come_from_both_hosts():
    versions = {p.name.split("-")[0] for p in COMFY}
    assert {"0.33.0", "0.3.64"} <= versions, versions
    for p in COMFY:
        assert p.stat().st_size < 16_000 and "prompt" in metadata.read_texts(p)


@pytest.mark.parametrize("path", COMFY, ids=lambda p: p.name)
def test_the_prompt_reaching_the_sampler_of_a_real_comfyui_png(path):
    found = prompt_of(path)
    assert found.error is None and found.source == "ComfyUI graph"
    assert found.prompt == EXPECTED[path.stem.split("-", 1)[1]]


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_the_positive_prompt_of_a_webui_infotext(tmp_path, fmt):
    path = _webui_image(tmp_path / f"w.{fmt}", INFOTEXT, fmt)
    found = prompt_of(path)
    assert found.error is None and found.source == "webui parameters" and found.prompt == INFOTEXT_PROMPT
    assert infotext_fields(INFOTEXT)["ICT score"] == "0.3121"
    assert webui_prompt("just a prompt, no parameters") == "just a prompt, no parameters"


def test_webui_fixtures_come_from_a1111_and_forge():
    assert {p.name.split("-")[0] for p in WEBUI} == {"a1111", "forge"} and any(p.suffix == ".jpg" for p in WEBUI)


@pytest.mark.parametrize("path", WEBUI, ids=lambda p: p.name)
def test_the_prompt_and_scores_of_a_real_webui_image(path, capsys):
    """The PNGs carry the extension's own record (first source); the JPEG only the infotext in its EXIF."""
    from ict_core.stored_scores import stored

    found = prompt_of(path)
    assert found.error is None and found.prompt == "a red fox in the snow"
    assert found.source == ("webui parameters" if path.suffix == ".jpg" else "ict_reward record")
    row = stored(str(path))
    assert set(row["infotext"]) == {"ICT score", "HP score"}
    if path.suffix == ".png":
        assert f"{row['own']['ict']:.4f}" == row["infotext"]["ICT score"] == row["png_keys"]["ict_score"]


def test_the_packs_own_record_comes_first(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    info = PngInfo()
    rec = {"ict": 0.3, "hp": 0.6, "score": 0.18, "by": "ict", "prompt": "an owl (scored)",
           "pixels": metadata.pixel_digest(arr)}
    info.add_text(metadata.KEY, metadata.dumps([rec]))
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7")
    Image.fromarray(arr).save(tmp_path / "r.png", pnginfo=info)
    found = prompt_of(tmp_path / "r.png")
    assert found.source == "ict_reward record" and found.prompt == "an owl (scored)"  # verbatim: already clean


def _graph_png(path: Path, graph: dict) -> Path:
    info = PngInfo()
    info.add_text("prompt", json.dumps(graph))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _enc(text, clip=("1", 1)):
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": list(clip)}}


def _ks(pos, latent=("5", 0)):
    return {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": [pos, 0], "negative": ["7", 0],
                                                 "latent_image": list(latent)}}


@pytest.mark.parametrize("graph,needle", [
    ({"1": {"class_type": "X"}, "2": _enc("a"), "3": _enc("b"), "7": _enc("n"), "8": _ks("2"), "9": _ks("3"),
      "10": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}},
      "11": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}, "2 last samplers with different prompts"),
    ({"1": {"class_type": "X"}, "4": {"class_type": "LLMWriter", "inputs": {"seed": 1, "topic": "x", "style": "y"}},
      "2": _enc(["4", 0]), "7": _enc("n"), "8": _ks("2")}, "node 4 (LLMWriter)"),
    ({"1": {"class_type": "X"}, "2": _enc(["2", 0]), "7": _enc("n"), "8": _ks("2")}, "deeper than"),
    ({"2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}, "no sampler"),
    ({"1": {"class_type": "X"}, "7": _enc("n"), "8": _ks("99")}, "node 99, which is not in the graph"),
])
def test_a_graph_that_does_not_say_gives_the_reason(tmp_path, graph, needle):
    found = prompt_of(_graph_png(tmp_path / "g.png", graph))
    assert found.prompt is None and needle in found.error and found.error.endswith("pass --prompt")


def test_combined_conditioning_joins_its_texts(tmp_path):
    graph = {"1": {"class_type": "X"}, "2": _enc("a fox"), "3": _enc("in the snow"), "7": _enc("n"),
             "4": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0],
                                                                   "conditioning_2": ["3", 0]}},
             "8": _ks("4")}
    assert prompt_of(_graph_png(tmp_path / "g.png", graph)).prompt == "a fox, in the snow"


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "out"
    f.mkdir()
    for p in COMFY:
        shutil.copy(p, f / p.name)
    _webui_image(f / "webui.jpg", INFOTEXT, "jpg")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(f / "plain.png")
    return f


def _run(capsys, *argv):
    from ict_core.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _opts(tiny_models, tmp_path):
    return ["--model", tiny_models.ict, "--hp-model", tiny_models.hp, "--device", "cpu", "--cache-dir",
            tmp_path / "cache", "--quiet"]


def test_score_from_metadata_one_row_per_path_each_prompt_encoded_once(tiny_models, folder, tmp_path, capsys):
    opts = _opts(tiny_models, tmp_path)
    code, out, err = _run(capsys, "score", folder, "--prompt-from-metadata", "--json", *opts)
    assert code == 0, err
    rows = {Path(r["image"]).name: r for r in json.loads(out)["results"]}
    assert len(rows) == len(COMFY) + 2
    for p in COMFY:
        assert rows[p.name]["prompt"] == EXPECTED[p.stem.split("-", 1)[1]] and rows[p.name]["ict"] is not None
    assert rows["webui.jpg"]["prompt"] == INFOTEXT_PROMPT
    assert rows["plain.png"]["ict"] is None and "no prompt in its metadata" in rows["plain.png"]["error"]
    assert json.loads(out)["cache"]["prompt_misses"] == 3  # three distinct prompts, each encoded once
    assert len([line for line in err.splitlines() if "plain.png" in line]) == 1

    alone = json.loads(_run(capsys, "score", folder / COMFY[0].name, "--prompt", EXPECTED["direct"], "--json",
                            "--no-cache", *opts)[1])["results"][0]
    assert rows[COMFY[0].name]["ict"] == pytest.approx(alone["ict"], abs=1e-6)

    code, out, err = _run(capsys, "score", folder, "--prompt-from-metadata", "--prompt", "an owl", "--json", *opts)
    assert code == 0 and {r["prompt"] for r in json.loads(out)["results"]} == {"an owl"}  # --prompt overrides


def test_rank_from_metadata_by_group(tiny_models, folder, tmp_path, capsys):
    code, out, err = _run(capsys, "rank", folder, "--prompt-from-metadata", "--by", "group", "--json",
                          *_opts(tiny_models, tmp_path))
    assert code == 0, err
    found = json.loads(out)
    assert len(found["results"]) == len(COMFY) + 1 and [Path(r["image"]).name for r in found["failed"]] == ["plain.png"]


def test_index_from_metadata_caches_the_prompts_for_search(tiny_models, folder, tmp_path, capsys, monkeypatch):
    opts = _opts(tiny_models, tmp_path)
    code, out, err = _run(capsys, "index", folder, "--prompt-from-metadata", *opts)
    assert code == 0, err
    assert "3 distinct prompt(s)" in out and "1 image(s) without one" in out and "plain.png" in err
    from ict_core.scorer import Scorer

    monkeypatch.setattr(Scorer, "load", lambda *a, **k: pytest.fail("a prompt from the metadata is cached"))
    code, out, err = _run(capsys, "search", "a ruin at dusk", "--json", *opts)
    assert code == 0 and json.loads(out)["cache"]["prompt_hits"] == 1


def test_show_prints_the_stored_scores(tmp_path, capsys):
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    info = PngInfo()
    info.add_text(metadata.KEY, metadata.dumps([{"ict": 0.3121, "hp": 0.734, "score": 0.2291, "by": "ict*hp",
                                                 "rank": 1, "prompt": "an owl", "pixels": metadata.pixel_digest(arr)}]))
    Image.fromarray(arr).save(tmp_path / "comfy.png", pnginfo=info)
    _webui_image(tmp_path / "webui.png", INFOTEXT, "png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    code, out, err = _run(capsys, "show", tmp_path / "comfy.png", tmp_path / "webui.png", tmp_path / "plain.png")
    assert code == 0, err
    assert "ict=0.3121 hp=0.7340 score=0.2291" in out and 'prompt="an owl"' in out
    assert "ICT score: 0.3121, HP score: 0.7340" in out and "plain.png\tno stored scores" in out
    code, out, err = _run(capsys, "show", tmp_path, "--json")
    rows = {Path(r["image"]).name: r for r in json.loads(out)["images"]}
    assert rows["comfy.png"]["own"]["ict"] == 0.3121 and rows["webui.png"]["infotext"]["HP score"] == "0.7340"
    code, out, err = _run(capsys, "show", tmp_path / "plain.png", tmp_path / "missing.png")
    assert code == 1 and "missing.png: cannot read" in err and err.strip().splitlines()[-1].startswith("ict: error:")


def test_from_metadata_is_refused_with_ray_before_any_work(tmp_path, capsys):
    """--ray runs elsewhere (H5's scale.cli) and would score without the images' prompts: refused up front."""
    code, out, err = _run(capsys, "score", tmp_path, "--prompt-from-metadata", "--ray", "--out", tmp_path / "o")
    assert code == 2 and "--prompt-from-metadata" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
