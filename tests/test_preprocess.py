"""Image inputs of every kind, the extremes of size, and the tokenizer's cut."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ict_core import preprocess
from ict_core.errors import InputError
from ict_core.text import tokenize


def test_resized_size_matches_transformers():
    import inspect

    from transformers.image_transforms import get_resize_output_image_size

    fmt = ({"input_data_format": "channels_last"}
           if "input_data_format" in inspect.signature(get_resize_output_image_size).parameters else {})
    for h, w in [(1, 1), (512, 768), (1000, 230), (333, 400), (224, 225), (7, 9000)]:
        if not fmt and min(h, w) <= 4:
            continue  # old transformers cannot be told the channel axis of a tiny image
        ref = get_resize_output_image_size(np.zeros((h, w, 3)), 224, default_to_square=False, **fmt)
        assert preprocess.resized_size(h, w) == tuple(ref)


def test_accepts_every_input_kind(tmp_path):
    arr = (np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    chw_float = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    inputs = [str(path), path, Image.fromarray(arr), chw_float, torch.from_numpy(arr).permute(2, 0, 1)]
    loaded = [r.load() for r in preprocess.as_refs(inputs)]
    for t in loaded:
        assert t.dtype == torch.uint8 and t.shape == (3, 64, 80)
        assert torch.equal(t, loaded[0])
    comfy = torch.from_numpy(np.stack([arr, arr])).float() / 255  # [B,H,W,C]
    assert all(torch.equal(r.load(), loaded[0]) for r in preprocess.as_refs(comfy))


def test_modes_rgba_grayscale_16bit():
    rgba = Image.new("RGBA", (10, 10), (10, 20, 30, 0))
    assert preprocess.pil_to_uint8(rgba)[:, 0, 0].tolist() == [10, 20, 30]  # alpha dropped, as the official code
    half = torch.tensor([0.0, 0.2, 1.0, 0.5]).view(4, 1, 1)
    assert preprocess.tensor_to_uint8(half)[:, 0, 0].tolist() == [0, 51, 255]
    gray = Image.new("L", (4, 4), 77)
    assert preprocess.pil_to_uint8(gray)[:, 0, 0].tolist() == [77, 77, 77]
    sixteen = Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16))
    assert preprocess.pil_to_uint8(sixteen)[:, 0, 0].tolist() == [128, 128, 128]  # scaled, not clipped to 255


def test_one_pixel_and_huge_images():
    tiny = torch.full((3, 1, 1), 200, dtype=torch.uint8)
    out = preprocess.pixel_values_for([tiny], torch.device("cpu"), torch.float32)
    assert out.shape == (1, 3, 224, 224) and torch.allclose(out, out[..., :1, :1].expand_as(out))
    huge = torch.randint(0, 256, (3, 8000, 8000), dtype=torch.uint8)
    out = preprocess.pixel_values_for([huge], torch.device("cpu"), torch.float32)
    assert out.shape == (1, 3, 224, 224) and torch.isfinite(out).all()


def test_huge_pass_is_chunked(monkeypatch):
    """The first pass never materialises the whole image in float: rows go through in slices."""
    seen = []
    real = torch.nn.functional.interpolate
    monkeypatch.setattr(preprocess.F, "interpolate", lambda x, **k: seen.append(x.numel()) or real(x, **k))
    preprocess.pixel_values_for([torch.zeros((3, 8000, 8000), dtype=torch.uint8)], torch.device("cpu"),
                                torch.float32)
    assert max(seen) * 4 <= preprocess._PASS_BYTES


def test_bad_tensors_are_refused():
    with pytest.raises(InputError):
        preprocess.tensor_to_uint8(torch.zeros(5, 6, 7))
    with pytest.raises(InputError):
        preprocess.tensor_to_uint8(torch.full((3, 4, 4), float("nan")))


def test_long_prompt_is_cut_with_a_warning(caplog):
    long = " ".join(["word"] * 120)
    with caplog.at_level(logging.WARNING, logger="ict_core.text"):
        ids = tokenize([long, "short"])
    assert ids.shape == (2, 77)
    assert ids[0, -1].item() == 49407 and ids[0, 0].item() == 49406
    assert any("ignored" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ict_core.text"):
        tokenize(["a short prompt"])
    assert not caplog.records


def _two_pass_then_crop(batch: torch.Tensor) -> torch.Tensor:
    """The definition: both whole passes (each rounded to 8 bits), then the centre crop, then normalise."""
    F = torch.nn.functional
    n, c, h, w = batch.shape
    nh, nw = preprocess.resized_size(h, w)
    x = batch.float()
    for size, changed in (((h, nw), w != nw), ((nh, nw), h != nh)):
        if changed:
            x = torch.floor(F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False) + 0.5)
            x = x.clamp_(0, 255)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    x = x[:, :, top:top + 224, left:left + 224]
    mean, std = torch.tensor(preprocess.MEAN).view(1, 3, 1, 1), torch.tensor(preprocess.STD).view(1, 3, 1, 1)
    return (x * (1 / 255) - mean) / std


@pytest.mark.parametrize("shape", [(1, 3, 512, 512), (2, 3, 768, 512), (1, 3, 300, 640), (1, 3, 1, 1),
                                   (1, 3, 230, 1000), (1, 3, 3, 1000), (1, 3, 1000, 13), (1, 3, 513, 7),
                                   (1, 3, 224, 500), (3, 3, 100, 90), (1, 3, 1500, 1100)])
def test_cropping_inside_the_passes_is_bit_identical(shape):
    """Cropping each pass as it runs (issue 10, defect 4) changes no bit of ordinary images."""
    batch = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(preprocess.pixel_values(batch), _two_pass_then_crop(batch))


@pytest.mark.parametrize("shape", [(1, 3, 3, 1000), (1, 3, 1000, 3), (1, 3, 300, 1), (2, 3, 50, 100)])
def test_window_pass_is_the_same_resize(shape, monkeypatch):
    """The kept-window path of very elongated enlargements agrees with torch's whole pass to 8-bit steps,
    with only rare one-step differences (float64 weights instead of float32)."""
    batch = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    exact = preprocess.pixel_values(batch)
    monkeypatch.setattr(preprocess, "_WINDOW_OUTPUTS", 0)
    window = preprocess.pixel_values(batch)
    steps = (exact - window).abs() * 255 * torch.tensor(preprocess.STD).view(1, 3, 1, 1)
    assert steps.max() <= 2.01 and (steps > 0.5).float().mean() < 0.005


def test_absurd_aspect_ratios_are_refused_per_image(tmp_path):
    Image.new("RGB", (preprocess.MAX_ASPECT + 1, 1)).save(tmp_path / "line.png")
    ref = preprocess.as_refs([tmp_path / "line.png"])[0]
    with pytest.raises(InputError, match="too elongated"):
        ref.load()
    Image.new("RGB", (preprocess.MAX_ASPECT, 1)).save(tmp_path / "ok.png")
    assert preprocess.as_refs([tmp_path / "ok.png"])[0].load().shape == (3, 1, preprocess.MAX_ASPECT)


def test_load_with_digest_hashes_the_decoded_bytes(tmp_path):
    import hashlib

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    pixels, digest = preprocess.as_refs([tmp_path / "a.png"])[0].load_with_digest()
    assert digest == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    assert pixels[:, 0, 0].tolist() == [1, 2, 3]


TOKENIZER_CHECK = r"""
import sys
from ict_core.text import tokenize
prompts = ["a red fox", "A RED Fox &amp; a &lt;b&gt;", "  many   spaces\tand\nlines ", "ünïcödé Straße 東京 🦊",
           "café — “quotes” ‘and’ dashes", " ".join(["word"] * 120), "x", "12,345.67 %$#@!", "ﬁligature ½ ™"]
ours = tokenize(prompts)
assert "open_clip" not in sys.modules, "the open_clip package was imported"
import weakref
from ict_core import text
tok = text._tokenizer()[0]._tokenizer
through_module = not callable(tok)  # open_clip < 2.24 tokenizes through a module function: tables kept
tables = weakref.ref(tok)
del tok
text.release()  # what a host's "free memory" does
assert through_module or tables() is None, "the tokenizer's tables were kept"
assert (tokenize(prompts) == ours).all()
_, encode, call = text._tokenizer()
text.release()  # while a tokenize is in flight: it keeps what it holds
assert (call(prompts, context_length=77) == ours).all()
from open_clip import get_tokenizer
assert (ours == get_tokenizer("ViT-H-14")(prompts)).all()
print("same ids")
"""


def test_tokenizer_gives_open_clips_ids_without_importing_open_clip():
    """The tokenizer file is loaded alone (the package would bring timm: memory a host's /free cannot give
    back); its ids are get_tokenizer('ViT-H-14')'s on odd text (html, unicode, whitespace, long); release()
    frees its tables and the next prompt loads them again."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TOKENIZER_CHECK], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "same ids" in out.stdout, out.stderr[-2000:]


def test_tokenizer_uses_open_clip_when_the_host_imported_it(monkeypatch):
    import open_clip

    from ict_core import text

    monkeypatch.setattr(text, "_tokenizer", functools.lru_cache(maxsize=1)(text._tokenizer.__wrapped__))
    assert text._tokenizer()[0] is open_clip.tokenizer
    assert (text.tokenize(["a red fox"]) == open_clip.get_tokenizer("ViT-H-14")(["a red fox"])).all()
