"""The `ict` command: outputs, ranking, and one clear line (no traceback) for every error."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ict_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def base(tiny_models, tmp_path):
    return ["--model", tiny_models.ict, "--quiet", "--cache-dir", tmp_path / "cache"]


def test_score_json_rows_in_input_order(capsys, tiny_models, images, base):
    code, out, err = run(capsys, "score", *images[:3], "--prompt", "a cat", *base, "--json")
    assert code == 0
    data = json.loads(out)
    assert [r["image"] for r in data["results"]] == [str(p) for p in images[:3]]
    for r in data["results"]:
        assert set(r) == {"image", "prompt", "ict", "hp", "score"} and r["hp"] is None and r["score"] == r["ict"]
    assert set(data["cache"]) == {"prompt_hits", "prompt_misses", "image_hits", "image_misses"}


def test_score_csv(capsys, images, base):
    code, out, _ = run(capsys, "score", *images[:2], "--prompt", "a cat", *base, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 2 and float(rows[0]["ict"]) == pytest.approx(float(rows[0]["score"]))


def test_unreadable_image_is_reported_and_the_rest_scored(capsys, images, base, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, out, err = run(capsys, "score", images[0], bad, tmp_path / "missing.jpg", images[1], "--prompt", "x",
                         *base, "--json")
    assert code == 0
    rows = json.loads(out)["results"]
    assert rows[0]["ict"] is not None and rows[3]["ict"] is not None
    assert "cannot read image" in rows[1]["error"] and rows[1]["ict"] is None
    assert "not found" in rows[2]["error"]
    assert "broken.png" in err and "missing.jpg" in err


def test_without_a_prompt_images_are_ranked_by_hp_alone(capsys, tiny_models, images, base):
    """HP needs no prompt: `ict rank` without --prompt ranks by hp, with the HP values of a prompted run."""
    code, out, _ = run(capsys, "rank", *images, "--prompt", "a fox", "--hp-model", tiny_models.hp, *base,
                       "--by", "hp", "--json")
    with_prompt = json.loads(out)["results"]
    code, out, _ = run(capsys, "rank", *images, "--hp-model", tiny_models.hp, *base, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["by"] == "hp"
    alone = data["results"]
    assert [r["image"] for r in alone] == [r["image"] for r in with_prompt]
    assert [r["hp"] for r in alone] == pytest.approx([r["hp"] for r in with_prompt], abs=1e-6)
    assert all(r["ict"] is None and r["score"] == r["hp"] and r["prompt"] == "" for r in alone)
    code, out, _ = run(capsys, "rank", *images[:3], "--hp-model", tiny_models.hp, *base)
    assert code == 0 and "hp" in out.splitlines()[0] and "-" in out.splitlines()[1]


def test_rank_top_k_min_score_copy(capsys, tiny_models, images, base, tmp_path):
    code, out, _ = run(capsys, "rank", *images, "--prompt", "a fox", "--hp-model", tiny_models.hp, *base,
                       "--by", "ict*hp", "--json")
    assert code == 0
    full = json.loads(out)["results"]
    values = [r["value"] for r in full]
    assert values == sorted(values, reverse=True) and len(full) == len(images)
    dest = tmp_path / "best"
    code, out, _ = run(capsys, "rank", *images, "--prompt", "a fox", "--hp-model", tiny_models.hp, *base,
                       "--by", "ict*hp", "--top-k", 2, "--copy-to", dest, "--json")
    top = json.loads(out)["results"]
    assert [r["image"] for r in top] == [r["image"] for r in full[:2]]
    assert sorted(p.name for p in dest.iterdir()) == [f"001_{Path(top[0]['image']).name}",
                                                      f"002_{Path(top[1]['image']).name}"]
    code, out, err = run(capsys, "rank", *images, "--prompt", "a fox", *base, "--min-score", 5, "--json")
    data = json.loads(out)
    assert len(data["results"]) == 1 and "no image reaches min_score" in data["notes"][0]


def test_rank_text_report(capsys, images, base):
    code, out, _ = run(capsys, "rank", *images[:3], "--prompt", "a fox", *base)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["rank", "#", "ict"]


def test_models_default_to_the_models_folder(capsys, tiny_models, images, tmp_path, monkeypatch):
    monkeypatch.setenv("ICT_MODELS_DIR", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_models.ict, tmp_path / "models" / "ict.safetensors")
    code, out, _ = run(capsys, "score", images[0], "--prompt", "x", "--quiet", "--no-cache", "--json")
    assert code == 0 and json.loads(out)["results"][0]["hp"] is None


@pytest.mark.parametrize("case", ["missing", "wrong_kind", "truncated", "pickle", "empty_prompt", "no_images",
                                  "hp_rule_without_hp", "no_default_model", "no_prompt_no_hp", "no_prompt_by_ict"])
def test_errors_are_one_line(capsys, tiny_models, images, tmp_path, monkeypatch, case):
    monkeypatch.setenv("ICT_MODELS_DIR", str(tmp_path / "empty"))
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(tiny_models.ict.read_bytes()[:5000])
    argv = {
        "missing": ["score", images[0], "--prompt", "x", "--model", tmp_path / "nope.safetensors"],
        "wrong_kind": ["score", images[0], "--prompt", "x", "--model", tiny_models.hp],
        "truncated": ["score", images[0], "--prompt", "x", "--model", trunc],
        "pickle": ["score", images[0], "--prompt", "x", "--model", tiny_models.ict_src / "pytorch_model.bin"],
        "empty_prompt": ["score", images[0], "--prompt", "  ", "--model", tiny_models.ict],
        "no_images": ["score", "--prompt", "x", "--model", tiny_models.ict],
        "hp_rule_without_hp": ["rank", images[0], "--prompt", "x", "--model", tiny_models.ict, "--by", "group"],
        "no_default_model": ["score", images[0], "--prompt", "x"],
        "no_prompt_no_hp": ["score", images[0], "--model", tiny_models.ict],
        "no_prompt_by_ict": ["rank", images[0], "--model", tiny_models.ict, "--hp-model", tiny_models.hp,
                             "--by", "ict"],
    }[case]
    code, out, err = run(capsys, *argv, "--quiet")
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ict: error: "), err
    assert "Traceback" not in err


def test_python_m_behaves_like_ict(tiny_models, images, tmp_path):
    """`python -m ict_core` and the `ict` entry point are the same program (a real process, exit codes too)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = ["score", str(images[0]), "--prompt", "a fox", "--model", str(tiny_models.ict), "--json", "--quiet",
           "--no-cache"]
    a = subprocess.run([sys.executable, "-m", "ict_core", *cmd], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    b = subprocess.run([sys.executable, "-c", "import sys; from ict_core.cli import main; sys.exit(main())", *cmd],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert a.stdout == b.stdout
    bad = subprocess.run([sys.executable, "-m", "ict_core", "score", str(images[0]), "--prompt", "x", "--model",
                          str(tiny_models.hp), "--no-cache"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    ict = shutil.which("ict", path=str(Path(sys.executable).parent))
    if ict:  # installed as a console script (CI installs the package)
        c = subprocess.run([ict, *cmd], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert c.stdout == a.stdout


def test_fetch_without_network_says_how_to_convert(tmp_path):
    """HF_HUB_OFFLINE=1 (huggingface_hub's offline mode): one line naming the offline commands. In a process of its
    own: huggingface_hub < 1.0 keeps the offline mode in its cached HTTP session for the rest of a process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    c = subprocess.run([sys.executable, "-m", "ict_core", "fetch", "--dest", str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert c.returncode == 1 and "ict convert" in c.stderr and "ict fetch" in c.stderr, c.stderr
    assert len(c.stderr.strip().splitlines()) == 1 and "offline mode" in c.stderr


def test_convert_command_writes_the_same_file_as_the_library(capsys, tiny_models, tmp_path):
    """`ict convert` on the released layouts gives the files the parity tests score."""
    from safetensors.torch import load_file

    for src, ref, cfg in ((tiny_models.ict_src, tiny_models.ict, ["--config", tiny_models.config]),
                          (tiny_models.hp_src, tiny_models.hp, [])):
        out = tmp_path / (ref.name)
        code, stdout, _ = run(capsys, "convert", src, "--out", out, *cfg)
        assert code == 0 and str(out) in stdout
        a, b = load_file(out), load_file(ref)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(capsys, "convert", tiny_models.ict_src, "--out", tmp_path / "x.safetensors")
    assert code == 1 and "wrong shape" in err and len(err.strip().splitlines()) == 1


def test_fetch_downloads_and_converts(capsys, tiny_models, tmp_path, monkeypatch, caplog):
    """`ict fetch --hp` from a local server that answers as the hub does: both files land in the models folder,
    converted, the pickles are gone; a download that differs from the published sha256 is warned about."""
    import ict_core.config as arch_config
    from fake_hub import FakeHub
    from ict_core.weights import read_info

    monkeypatch.setattr(arch_config, "VIT_H_14", json.loads(tiny_models.config.read_text()))
    with FakeHub({"8y/ICT": tiny_models.ict_src, "8y/HP": tiny_models.hp_src}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with caplog.at_level("WARNING", logger="ict_core.official"):
            code, out, err = run(capsys, "fetch", "--hp", "--dest", tmp_path / "models")
    assert code == 0, err
    assert read_info(tmp_path / "models" / "ict.safetensors").kind == "ict"
    assert read_info(tmp_path / "models" / "hp.safetensors").kind == "hp"
    assert any("not the published" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if p.name[0] != ".") == ["hp.safetensors",
                                                                                          "ict.safetensors"]
