"""Small inputs never cause unbounded work: a model's architecture record, one long word in a prompt, a chunk
of very large images; and the out-of-memory split on every supported torch. Also what ict_core.text relies
on in open_clip's tokenizer file, pinned (set ICT_OPEN_CLIP_TOKENIZERS to other versions' tokenizer.py files,
os.pathsep-separated, to check them too: .ci/run's oldest venv holds open_clip 2.20)."""
from __future__ import annotations

import gc
import json
import os
import random
import string
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from ict_core import text
from ict_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_line(p: subprocess.CompletedProcess, *words: str) -> None:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and all(w in lines[0] for w in words), p.stderr[-2000:]


# --------------------------------------------------------------------------------------- architecture record
def _tiny_arch(**text_config) -> dict:
    from tiny_config import TINY

    arch = json.loads(json.dumps(TINY))
    arch["text_config"].update(text_config)
    return arch


def test_a_few_hundred_bytes_never_build_a_huge_model(tiny_models, images, tmp_path):
    """A crafted 'ict' file of a few hundred bytes whose architecture record asks for a million layers: `ict
    score` refuses it in one line, before any model is built (it used to build the layers until memory ran out)."""
    arch = _tiny_arch(num_hidden_layers=1_000_000)
    header = {"__metadata__": {"ict_reward.kind": "ict", "ict_reward.architecture": json.dumps(arch)},
              "logit_scale": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    assert crafted.stat().st_size < 1000
    p = subprocess.run([sys.executable, "-m", "ict_core", "score", str(images[0]), "--prompt", "a fox", "--model",
                        str(crafted), "--no-cache", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    _one_line(p, str(crafted), "0 text_model layers where the architecture has 1000000")


def test_a_config_asking_for_millions_of_layers_is_refused_before_building(tiny_models, tmp_path):
    """`ict convert --config` with a config of a million layers: refused against the checkpoint's tensors."""
    cfg = tmp_path / "huge.json"
    cfg.write_text(json.dumps(_tiny_arch(num_hidden_layers=1_000_000)))
    p = subprocess.run([sys.executable, "-m", "ict_core", "convert", str(tiny_models.ict_src), "--out",
                        str(tmp_path / "x.safetensors"), "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    _one_line(p, "2 text_model layers where the architecture has 1000000", "--config")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------------- tokenizer
def _words(seed: int) -> list[str]:
    rnd = random.Random(seed)
    alphabets = [string.ascii_lowercase, "abc", "etaoinshrdlu", "!?.,;:-()[]", "\U0001F602\U0001F60D\U0001F525",
                 "éèàçô", "a"]
    return [("photo of " * (i % 3)) + "".join(rnd.choice(a) for _ in range(n)) + " tail"
            for i, a in enumerate(alphabets) for n in (300, 2500)]


def test_one_long_word_is_bounded_work(tiny_models, images, capsys, monkeypatch):
    """`ict score --prompt` with a 200,000-letter word: the BPE (quadratic in a word's length) never sees
    more than a few thousand characters, and the prompt is encoded once (it used to be encoded twice, whole)."""
    _, encode, _ = text._tokenizer()
    tok, seen = encode.__self__, []
    real = type(tok).bpe

    def bpe(token):
        seen.append(len(token))
        assert len(token) <= 8192, f"the BPE was given a {len(token)}-character word"
        return real(tok, token)

    monkeypatch.setattr(tok, "bpe", bpe)
    word = "".join(random.Random(0).choice(string.ascii_lowercase) for _ in range(200_000))
    assert main(["score", str(images[0]), "--prompt", f"a fox {word}", "--model", str(tiny_models.ict),
                 "--no-hp", "--no-cache", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["ict"] is not None
    assert sum(seen) < 20_000, seen


def _tokenizer_files() -> list[str]:
    return [p for p in os.environ.get("ICT_OPEN_CLIP_TOKENIZERS", "").split(os.pathsep) if p]


@pytest.mark.parametrize("source", ["installed", *_tokenizer_files()])
def test_the_tokenizer_file_gives_open_clips_ids_with_bounded_work(source):
    """What ict_core.text relies on in open_clip's tokenizer.py, and the same ids as its own tokenize on
    long words of several alphabets (cut and not cut), on odd text, and on the special token names."""
    if source == "installed":
        import open_clip

        module = text.load_alone(os.path.join(os.path.dirname(open_clip.__file__), "tokenizer.py"))
    else:
        module = text.load_alone(source)
    parts = text.parts(module)
    tok = parts[1].__self__
    assert {"pat", "byte_encoder", "encoder", "bpe", "encode"} <= set(dir(tok))
    assert hasattr(tok, "clean_fn") or (hasattr(module, "basic_clean") and hasattr(module, "whitespace_clean"))
    assert (tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"]) == (49406, 49407)
    prompts = [*_words(1), "a red fox", "A RED Fox &amp; a &lt;b&gt;", "  many   spaces\tand\nlines ",
               "ünïcödé Straße 東京 🦊", " ".join(["word"] * 120), "<start_of_text> x <end_of_text>", "½ ™ ﬁ"]
    assert (text.tokenize_with(parts, prompts) == parts[2](prompts, context_length=77)).all()


# -------------------------------------------------------------------------------------------------- scorer
def test_out_of_memory_split_on_torch_before_2_5(tiny_models, images, capsys, monkeypatch):
    """torch 2.1-2.4 have torch.cuda.OutOfMemoryError but no torch.OutOfMemoryError: a chunk that runs out
    of memory is halved and the scores are the same (catching torch.OutOfMemoryError raised AttributeError)."""
    from ict_core.scorer import Scorer

    argv = ["score", *map(str, images[:4]), "--prompt", "a fox", "--model", str(tiny_models.ict), "--no-hp",
            "--no-cache", "--json", "-q"]
    assert main(argv) == 0
    want = [r["ict"] for r in json.loads(capsys.readouterr().out)["results"]]
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    real, sizes = Scorer._forward_images, []

    def forward(self, batch, with_ict=True):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch, with_ict)

    monkeypatch.setattr(Scorer, "_forward_images", forward)
    assert main(argv) == 0
    got = [r["ict"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert sizes[0] == 4 and 1 in sizes
    assert got == pytest.approx(want, abs=1e-6)


def test_a_chunk_of_very_large_images_is_not_decoded_at_once(tiny_models, tmp_path, capsys, monkeypatch):
    """Four 2500x2500 images, one chunk of 8: at most CHUNK_BYTES of decoded pixels (set to 20 MB here, one
    image is 18.75 MB) plus the image that crossed it are held before the chunk is scored (an image over
    preprocess's pixel bound is cropped as it is decoded, so it holds less still)."""
    from PIL import Image

    from ict_core import preprocess, scorer

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"big{i}.png")
        Image.new("RGB", (2500, 2500), (60 * i, 90, 200)).save(paths[-1])
    alive: list[weakref.ref] = []
    real_load, real_forward, held = preprocess.ImageRef.load, scorer.Scorer._forward_images, []

    def load(self):
        t = real_load(self)
        alive.append(weakref.ref(t))
        return t

    def forward(self, batch, with_ict=True):
        gc.collect()  # count what the chunk holds, not what a collection has yet to free (older torch: cycles)
        held.append(sum(t.numel() for t in (r() for r in alive) if t is not None))  # decoded bytes held
        return real_forward(self, batch, with_ict)

    monkeypatch.setattr(preprocess.ImageRef, "load", load)
    monkeypatch.setattr(scorer.Scorer, "_forward_images", forward)
    monkeypatch.setattr(scorer, "CHUNK_BYTES", 20 << 20, raising=False)
    assert main(["score", *map(str, paths), "--prompt", "a fox", "--model", str(tiny_models.ict), "--no-hp",
                 "--no-cache", "--json", "-q", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 4
    assert max(held) <= (20 << 20) + 2500 * 2500 * 3, held  # CHUNK_BYTES, plus the image that crossed it
