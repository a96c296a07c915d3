"""Hostile and careless inputs through the real `ict` process: one clear line, no traceback, no hang,
nothing lost or overwritten (issue 10)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def ict(*args, cwd=None, env=None, umask=None, timeout=180):
    """`python -m ict_core ARGS` in a fresh process; stdout/stderr as text."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "ict_core", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout, errors="backslashreplace",
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_error_line(p, *words):
    """Exit code 1, and stderr is exactly one `ict: error:` line holding each of `words`."""
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("ict: error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def score_with(model, image, *extra):
    return ict("score", image, "--prompt", "a fox", "--model", model, "--quiet", "--no-cache", *extra)


# ------------------------------------------------------------------------------------------ 1: own files
def test_convert_accepts_its_own_file_whose_header_length_ends_in_0x80(tiny_models, images, tmp_path):
    """Defect 1: the first byte of a safetensors file is the low byte of its header length; 0x80 was taken
    for pickle magic, so about one file in 32 was refused by the converter that had just written it."""
    from ict_core.weights import convert

    probe = convert(tiny_models.ict_src, tmp_path / "probe.safetensors", tiny_models.config).path.read_bytes()
    n = struct.unpack("<Q", probe[:8])[0]
    raw = n - (len(probe[8:8 + n]) - len(probe[8:8 + n].rstrip(b" ")))  # before the library's padding
    name_len = len("pytorch_model.bin") + (0x80 - raw) % 256  # the source's name is recorded in the header
    src = tmp_path / ("m" * (name_len - 4) + ".bin")
    shutil.copy(tiny_models.ict_src / "pytorch_model.bin", src)
    out = tmp_path / "ict.safetensors"
    p = ict("convert", src, "--out", out, "--config", tiny_models.config)
    assert out.read_bytes()[:1] == b"\x80", "the test must produce a header length whose low byte is 0x80"
    assert p.returncode == 0, p.stderr
    s = score_with(out, images[0], "--json")
    assert s.returncode == 0 and json.loads(s.stdout)["results"][0]["ict"] is not None, s.stderr


# ------------------------------------------------------------------------------------- 2: crafted headers
def _crafted(path: Path, header, data: bytes = b"\0" * 64) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _with_metadata(tiny_models, path: Path, **changes) -> Path:
    """The tiny ICT file with its ict-reward metadata changed (tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_models.ict), "pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(tiny_models.ict), path, metadata=meta)
    return path


def _arch(tiny_models, **vision):
    arch = json.loads(json.dumps(__import__("ict_core.config", fromlist=["TINY"]).TINY))
    arch["vision_config"].update(vision)
    return json.dumps(arch)


@pytest.mark.parametrize("case", ["list", "number", "metadata_list", "dtype_number", "float_offsets",
                                  "arch_not_json", "arch_list", "bad_activation", "bad_heads", "int8_tensors"])
def test_crafted_headers_are_one_line(tiny_models, images, tmp_path, capsys, case):
    """Defect 2: a header of the wrong JSON type or an impossible architecture record is one line
    (in-process `ict score`, so that ten cases cost one interpreter; a traceback would fail the test)."""
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path = tmp_path / f"{case}.safetensors"
    if case == "list":
        _crafted(path, [1, 2])
    elif case == "number":
        _crafted(path, 5)
    elif case == "metadata_list":
        _crafted(path, {"__metadata__": ["ict"], "w": f32}, b"\0" * 8)
    elif case == "dtype_number":
        _crafted(path, {"w": {**f32, "dtype": 5}}, b"\0" * 8)
    elif case == "float_offsets":
        _crafted(path, {"w": {**f32, "data_offsets": [0.0, 8.0]}}, b"\0" * 8)
    elif case == "arch_not_json":
        _with_metadata(tiny_models, path, **{"ict_reward.architecture": "{not json"})
    elif case == "arch_list":
        _with_metadata(tiny_models, path, **{"ict_reward.architecture": "[1, 2]"})
    elif case == "bad_activation":
        _with_metadata(tiny_models, path, **{"ict_reward.architecture": _arch(tiny_models, hidden_act="evil")})
    elif case == "bad_heads":
        _with_metadata(tiny_models, path, **{"ict_reward.architecture": _arch(tiny_models, num_attention_heads=3)})
    else:  # the right names and shapes, int8 storage
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(tiny_models.ict), "pt") as f:
            meta = f.metadata()
        save_file({k: v.to(torch.int8) for k, v in load_file(tiny_models.ict).items()}, path, metadata=meta)
    from ict_core.cli import main

    code = main(["score", str(images[0]), "--prompt", "a fox", "--model", str(path), "--quiet", "--no-cache"])
    p = subprocess.CompletedProcess([], code, *capsys.readouterr())
    one_error_line(p, str(path))


def test_convert_refuses_non_float_tensors(tiny_models, tmp_path):
    """Defect 2: int8 tensors with the right names and shapes were converted into a file that crashed `score`."""
    sd = torch.load(tiny_models.ict_src / "pytorch_model.bin", weights_only=True)
    (tmp_path / "ICT").mkdir()
    torch.save({k: v.to(torch.int8) for k, v in sd.items()}, tmp_path / "ICT" / "pytorch_model.bin")
    out = tmp_path / "x.safetensors"
    p = ict("convert", tmp_path / "ICT", "--out", out, "--config", tiny_models.config)
    one_error_line(p, "not float")
    assert not out.exists()


def test_pickle_and_zip_are_still_named(tiny_models, images, tmp_path):
    """A pickle given as the model is named as such, whatever its file name (it is not valid safetensors)."""
    renamed = tmp_path / "model.safetensors"
    shutil.copy(tiny_models.ict_src / "pytorch_model.bin", renamed)  # torch.save's zip format
    one_error_line(score_with(renamed, images[0]), "PyTorch pickle", "ict convert")
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    one_error_line(score_with(legacy, images[0]), "PyTorch pickle")


# ---------------------------------------------------------------------------------------- 6: convert --out
@pytest.mark.parametrize("case", ["dir", "below_file", "bin_suffix", "fifo"])
def test_convert_out_refused_before_writing(tiny_models, tmp_path, case):
    """Defect 6: --out a folder, a path below a file, a pickle's name: one line, and nothing written."""
    target = {"dir": tmp_path / "d", "below_file": tmp_path / "f" / "x.safetensors", "bin_suffix": tmp_path / "x.bin",
              "fifo": tmp_path / "pipe.safetensors"}[case]
    if case == "dir":
        target.mkdir()
    elif case == "below_file":
        (tmp_path / "f").write_text("a file")
    elif case == "fifo":
        os.mkfifo(target)
    before = sorted(tmp_path.rglob("*"))
    p = ict("convert", tiny_models.ict_src, "--out", target, "--config", tiny_models.config, timeout=120)
    one_error_line(p, "--out")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("how", ["same_path", "symlink"])
def test_convert_never_overwrites_its_input(tiny_models, tmp_path, how):
    """Defect 6: --out equal to the source pickle destroyed the source (and then failed)."""
    src = tmp_path / "weights.safetensors"  # a pickle under a safetensors name: no suffix rule saves it
    shutil.copy(tiny_models.ict_src / "pytorch_model.bin", src)
    before = src.read_bytes()
    out = src
    if how == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(src)
    one_error_line(ict("convert", src, "--out", out, "--config", tiny_models.config), "is the input")
    assert src.read_bytes() == before


def test_convert_file_modes(tiny_models, tmp_path):
    """Defect 6: a new file gets 0666 less the umask (it was 0600 from mkstemp); a replaced one keeps its mode."""
    new = tmp_path / "new.safetensors"
    assert ict("convert", tiny_models.ict_src, "--out", new, "--config", tiny_models.config, umask=0o022).returncode == 0
    assert new.stat().st_mode & 0o777 == 0o644
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"old")
    old.chmod(0o640)
    assert ict("convert", tiny_models.ict_src, "--out", old, "--config", tiny_models.config, umask=0o022).returncode == 0
    assert old.stat().st_mode & 0o777 == 0o640 and old.read_bytes()[:1] != b"o"
