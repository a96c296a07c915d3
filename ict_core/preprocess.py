"""Image loading and CLIP preprocessing, tensor-native and batched on the scoring device.

Matches the reference CLIPImageProcessor (PIL backend): RGB, shortest edge to 224 with PIL's bicubic
(a=-0.5, antialiased, horizontal pass then vertical pass, each rounded to 8 bits), centre crop 224,
x/255, normalise. Float images (ComfyUI tensors) are first rounded to 8 bits, so an image scores the
same in the graph as the PNG it is saved as.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

log = logging.getLogger(__name__)

SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_PASS_BYTES = 64 * 1024 * 1024  # working-set cap of one resize pass (keeps 8000x8000 images cheap)


# ------------------------------------------------------------------------------------------ decoding to uint8
def pil_to_uint8(img) -> torch.Tensor:
    """PIL image -> uint8 [3,H,W]. Alpha is dropped by PIL's convert('RGB'), as the official code's
    CLIPImageProcessor (transformers 4.x) does; transformers 5 composites onto white instead, which
    would change the scores of transparent images. 16-bit and float images are scaled to 8 bits
    instead of being clipped."""
    from PIL import Image

    if img.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1", "PA", "La", "RGBa", "RGBX", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"))
    else:  # I;16*, I, F and other wide modes
        wide = np.asarray(img)
        if wide.ndim == 3 and wide.shape[-1] >= 3:
            wide = wide[..., :3]
        wide = wide.astype(np.float64)
        top = 1.0 if np.issubdtype(np.asarray(img).dtype, np.floating) and wide.max(initial=0) <= 1.0 else (
            255.0 if wide.max(initial=0) <= 255 else 65535.0)
        eight = np.clip(np.floor(wide * (255.0 / top) + 0.5), 0, 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(eight).convert("RGB")) if eight.ndim == 2 else eight
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)


def tensor_to_uint8(t: torch.Tensor) -> torch.Tensor:
    """CHW (or HWC when the last dim is 1/3/4 and the first is not) tensor -> uint8 [3,H,W].

    Float values are clamped to 0..1 and rounded to 8 bits; alpha is dropped, as for PIL images.
    The arithmetic runs in the input's own layout (ComfyUI's HWC) and only the uint8 result is permuted."""
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise InputError(f"an image tensor must be [C,H,W] or [H,W,C], got shape {tuple(t.shape)}")
    channel = 2 if (t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4)) else 0
    c = t.shape[channel]
    if c not in (1, 3, 4):
        raise InputError(f"an image tensor needs 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    t = t.narrow(channel, 0, 3) if c >= 3 else t
    if t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise InputError(f"image tensors must be float in 0..1 or uint8, got {t.dtype}")
        if torch.isnan(t).any():
            raise InputError("image tensor contains NaN values")
        t = torch.floor(t.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    if channel == 2:
        t = t.permute(2, 0, 1)
    return t if t.shape[0] == 3 else t.expand(3, -1, -1)


# ------------------------------------------------------------------------------------------------ image refs
@dataclass
class ImageRef:
    """One input image, decoded lazily so a long list of files never sits in memory at once."""
    label: str | None
    _load: Callable[[], torch.Tensor]
    _digest: Callable[[], str]

    def load(self) -> torch.Tensor:
        return self._load()

    def digest(self) -> str:
        """Content hash used by the image cache: sha256 of the file bytes, or of the 8-bit pixels."""
        return self._digest()


def _file_ref(path: Path) -> ImageRef:
    def load():
        from PIL import Image, UnidentifiedImageError

        if not path.exists():
            raise InputError(f"{path}: file not found")
        try:
            with Image.open(path) as im:
                im.load()
                return pil_to_uint8(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{path}: cannot read image ({type(e).__name__}: {str(e)[:100]})") from None

    def digest():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    return ImageRef(str(path), load, digest)


def _pixel_digest(pixels: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(pixels.shape)).encode())
    h.update(pixels.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _memory_ref(label: str | None, make: Callable[[], torch.Tensor]) -> ImageRef:
    return ImageRef(label, make, lambda: _pixel_digest(make()))


def as_refs(images: Any, labels: Sequence[str | None] | None = None) -> list[ImageRef]:
    """Accept a ComfyUI IMAGE [B,H,W,C], a list of paths / PIL images / CHW tensors, or a single one of those."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            batch = images
            refs = [_memory_ref(None, (lambda i=i: tensor_to_uint8(batch[i]))) for i in range(batch.shape[0])]
        else:
            refs = [_memory_ref(None, lambda: tensor_to_uint8(images))]
    elif isinstance(images, (str, Path)) or _is_pil(images) or isinstance(images, np.ndarray):
        refs = as_refs([images])
    elif isinstance(images, Iterable):
        refs = []
        for i, item in enumerate(images):
            if isinstance(item, (str, Path)):
                refs.append(_file_ref(Path(item)))
            elif _is_pil(item):
                refs.append(_memory_ref(getattr(item, "filename", None) or None, lambda im=item: pil_to_uint8(im)))
            elif isinstance(item, torch.Tensor):
                if item.ndim == 4 and item.shape[0] == 1:
                    item = item[0]
                refs.append(_memory_ref(None, lambda t=item: tensor_to_uint8(t)))
            elif isinstance(item, np.ndarray):
                refs.append(_memory_ref(None, lambda a=item: tensor_to_uint8(torch.from_numpy(np.asarray(a)))))
            else:
                raise InputError(f"image {i}: unsupported type {type(item).__name__}; give a path, a PIL image "
                                 f"or a tensor")
    else:
        raise InputError(f"unsupported images argument of type {type(images).__name__}")
    if labels is not None:
        if len(labels) != len(refs):
            raise InputError(f"{len(labels)} labels for {len(refs)} images")
        for r, lab in zip(refs, labels):
            r.label = lab
    return refs


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


# --------------------------------------------------------------------------------------------- the transform
def resized_size(h: int, w: int, size: int = SIZE) -> tuple[int, int]:
    """Shortest edge to `size`, the long edge truncated as transformers' get_resize_output_image_size does."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _round8(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp_(0, 255)


def _resize_pass(x: torch.Tensor, out_h: int, out_w: int, axis: int) -> torch.Tensor:
    """One PIL-style bicubic pass along `axis` (3: width, 2: height), rounded to 8 bits like PIL's."""
    n, c, h, w = x.shape
    if (h, w) == (out_h, out_w):
        return x.float()
    # chunk along the axis that is not resized, so a huge image never needs a full float copy
    rows = h if axis == 3 else w
    per_row = n * c * (w if axis == 3 else h) * 4 * 2
    step = max(1, min(rows, _PASS_BYTES // max(per_row, 1)))
    outs = []
    for s in range(0, rows, step):
        part = x[:, :, s:s + step, :] if axis == 3 else x[:, :, :, s:s + step]
        size = (part.shape[2], out_w) if axis == 3 else (out_h, part.shape[3])
        outs.append(_round8(F.interpolate(part.float(), size=size, mode="bicubic", antialias=True,
                                          align_corners=False)))
    return torch.cat(outs, dim=2 if axis == 3 else 3) if len(outs) > 1 else outs[0]


def pixel_values(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [n,3,H,W] (all one size, on the scoring device) -> normalised [n,3,224,224] in `dtype`."""
    n, c, h, w = batch.shape
    nh, nw = resized_size(h, w)
    x = _resize_pass(batch, h, nw, axis=3)      # PIL resamples horizontally first,
    x = _resize_pass(x, nh, nw, axis=2)         # then vertically
    top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
    x = x[:, :, top:top + SIZE, left:left + SIZE]
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x * (1 / 255) - mean) / std
    return x.to(dtype)


def pixel_values_for(images: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Preprocess uint8 images of any sizes: runs of equal size are resized together."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(images):
        j = i + 1
        while j < len(images) and images[j].shape == images[i].shape:
            j += 1
        batch = torch.stack(images[i:j]).to(device, non_blocking=True)
        out.append(pixel_values(batch, dtype))
        i = j
    return torch.cat(out) if len(out) > 1 else out[0]
