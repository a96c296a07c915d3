"""Image loading and CLIP preprocessing, tensor-native and batched on the scoring device.

Matches the reference CLIPImageProcessor (PIL backend): RGB, shortest edge to 224 with PIL's bicubic
(a=-0.5, antialiased, horizontal pass then vertical pass, each rounded to 8 bits), centre crop 224,
x/255, normalise. Float images (ComfyUI tensors) are first rounded to 8 bits, so an image scores the
same in the graph as the PNG it is saved as.
"""
from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .files import MAX_IMAGE_BYTES, read_regular, sha256_file

log = logging.getLogger(__name__)

SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
_PASS_BYTES = 64 * 1024 * 1024  # working-set cap of one resize pass (keeps 8000x8000 images cheap)
_WINDOW_OUTPUTS = 4 * 1024 * 1024  # an enlarging pass past this many outputs computes only the kept window
CROP_AT_LOAD = 1 << 22  # pixels (a 2048 x 2048 image, 12 MB as uint8): a larger one is reduced when it is loaded
MAX_ASPECT = 50_000  # one resized line of a 1x50000 image is 134 MB of float32: past that, refused


# ------------------------------------------------------------------------------------------ decoding to uint8
def pil_to_uint8(img) -> torch.Tensor:
    """PIL image -> uint8 [3,H,W]. Alpha is dropped by PIL's convert('RGB'), as the official code's
    CLIPImageProcessor (transformers 4.x) does; transformers 5 composites onto white instead, which
    would change the scores of transparent images. Wide modes are scaled by their defined range, never
    by their content: integer modes (I;16*, I) by 65535, as tests/reference.py does, float (F) by 1."""
    from PIL import Image

    if img.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1", "PA", "La", "RGBa", "RGBX", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"))
    else:  # I;16*, I, F and other wide modes
        wide = np.asarray(img)
        if wide.ndim == 3 and wide.shape[-1] >= 3:
            wide = wide[..., :3]
        top = 1.0 if np.issubdtype(wide.dtype, np.floating) else 65535.0
        eight = np.clip(np.floor(wide.astype(np.float64) * (255.0 / top) + 0.5), 0, 255).astype(np.uint8)
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
    _both: Callable[[], tuple[torch.Tensor, str]] | None = None

    def load(self) -> torch.Tensor:
        return bounded(check_shape(self._load(), self.label))

    def digest(self) -> str:
        """Content hash used by the image cache: sha256 of the file bytes, or of the 8-bit pixels."""
        return self._digest()

    def load_with_digest(self) -> tuple[torch.Tensor, str]:
        """The pixels and the hash of the very bytes they were decoded from (one read of the file)."""
        if self._both is None:
            t = self.load()
            return t, _pixel_digest(t)
        t, digest = self._both()
        return bounded(check_shape(t, self.label)), digest


def bounded(t: torch.Tensor) -> torch.Tensor:
    """An image of more than CROP_AT_LOAD pixels, reduced at once to its 224 x 224 crop (uint8): the same
    pixels that pixel_values_for would compute from it (crop_values leaves a 224 x 224 image as it is), so
    a chunk of very large images never holds them all at full size."""
    if t.shape[-1] * t.shape[-2] <= CROP_AT_LOAD:
        return t
    return crop_values(t.unsqueeze(0))[0].to(torch.uint8)


def check_shape(t: torch.Tensor, label: str | None = None) -> torch.Tensor:
    """Refuse images so elongated that one resized line would not fit a bounded working set."""
    h, w = t.shape[-2:]
    if min(h, w) == 0 or max(h, w) > MAX_ASPECT * min(h, w):
        raise InputError(f"{label or 'image'}: {w}x{h} pixels is {'empty' if min(h, w) == 0 else 'too elongated'} "
                         f"to score (the long edge may be at most {MAX_ASPECT} times the short one)")
    return t


def decode(source, label) -> torch.Tensor:
    """uint8 [3,H,W] of an open image file or of bytes; any decoder failure, a decompression bomb
    included, is an InputError for that image alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            return pil_to_uint8(im)
    except UnidentifiedImageError:
        raise InputError(f"{label}: cannot read image (not an image format Pillow knows)") from None
    except Exception as e:  # DecompressionBombError is not an OSError; no decoder error may end a batch
        raise InputError(f"{label}: cannot read image ({type(e).__name__}: {str(e)[:100]})") from None


def bytes_ref(label: str, data: bytes) -> ImageRef:
    """An image from bytes already read (`ict index`, a --ray job): it decodes and hashes those very
    bytes, so a file replaced meanwhile cannot put one image's features under another's hash."""
    digest = hashlib.sha256(data).hexdigest()
    return ImageRef(label, lambda: decode(data, label), lambda: digest, lambda: (decode(data, label), digest))


def read_ref(path: str | Path, label: str | None = None) -> ImageRef:
    """An image file read once, within files.MAX_IMAGE_BYTES (`ict index`, a --ray job): decoded and hashed
    from the same bytes. InputError (one line) for a file that is missing, not regular or too large."""
    return bytes_ref(str(path) if label is None else label, read_regular(path))


def _file_ref(path: Path) -> ImageRef:
    """A file read when needed (`ict score`): its bytes through the same bounded reader as `ict index`; its
    hash alone (a gallery lookup) is streamed."""
    return ImageRef(str(path), lambda: decode(read_regular(path), path),
                    lambda: sha256_file(path, MAX_IMAGE_BYTES, "an image file"),
                    lambda: read_ref(path).load_with_digest())


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


def _resize_pass(x: torch.Tensor, out_len: int, axis: int, keep: tuple[int, int]) -> torch.Tensor:
    """One PIL-style bicubic pass along `axis` (3: width, 2: height), rounded to 8 bits like PIL's, of
    which only positions keep[0]:keep[1] along `axis` are kept.

    The pass never mixes lines of the other axis, so it runs in chunks of those lines, sized from the
    input and output lengths (a 20000x1 image resizes to 4.5 million columns: one line at a time), and
    each chunk is cropped at once. The crop of the first pass is exact because the second pass works
    line by line across it; the crop of the second is the final centre crop. An enlargement that would
    compute far more than it keeps (a 1x20000 image: 224 columns of 4.5 million rows) computes only the
    kept window (_window_pass)."""
    other = 2 if axis == 3 else 3
    start, stop = keep
    if x.shape[axis] == out_len:
        return x.float().narrow(axis, start, stop - start)
    lines = x.shape[other]
    if x.shape[axis] < out_len and out_len > 4 * (stop - start) and lines * out_len > _WINDOW_OUTPUTS:
        return _window_pass(x, out_len, axis, keep)
    per_line = x.shape[0] * x.shape[1] * (x.shape[axis] + out_len) * 4
    step = max(1, min(lines, _PASS_BYTES // per_line))
    outs = []
    for s in range(0, lines, step):
        part = x.narrow(other, s, min(step, lines - s)).float()
        size = (part.shape[2], out_len) if axis == 3 else (out_len, part.shape[3])
        y = F.interpolate(part, size=size, mode="bicubic", antialias=True, align_corners=False)
        outs.append(_round8(y.narrow(axis, start, stop - start)))
    return torch.cat(outs, dim=other) if len(outs) > 1 else outs[0]


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _window_pass(x: torch.Tensor, out_len: int, axis: int, keep: tuple[int, int]) -> torch.Tensor:
    """An enlarging pass computed only at output positions keep[0]:keep[1], with the taps and weights of
    torch's (and PIL's) antialiased bicubic in float64: the same 8-bit values but for rare +-1 steps."""
    in_len = x.shape[axis]
    scale = in_len / out_len                       # < 1: enlarging, so the support is 2 input pixels
    center = (torch.arange(*keep, dtype=torch.float64, device=x.device) + 0.5) * scale
    lo = (center - 2 + 0.5).floor().clamp(min=0)
    hi = (center + 2 + 0.5).floor().clamp(max=in_len)
    taps = lo[:, None] + torch.arange(5, dtype=torch.float64, device=x.device)[None, :]
    w = _cubic(taps - center[:, None] + 0.5) * (taps < hi[:, None])
    w = w / w.sum(dim=1, keepdim=True)
    idx = taps.clamp(max=in_len - 1).long()
    picked = x.double().index_select(axis, idx.flatten())          # [n, c, k*5, L] or [n, c, L, k*5]
    if axis == 3:
        picked = picked.unflatten(3, idx.shape)                     # [n, c, L, k, 5]
        return _round8((picked * w).sum(-1)).float()
    picked = picked.unflatten(2, idx.shape)                         # [n, c, k, 5, L]
    return _round8((picked * w[:, :, None]).sum(3)).float()


def crop_values(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [n,3,H,W] -> float [n,3,224,224] of whole numbers 0..255: the resize and centre crop alone."""
    n, c, h, w = batch.shape
    nh, nw = resized_size(h, w)
    top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
    x = _resize_pass(batch, nw, 3, (left, left + SIZE))     # PIL resamples horizontally first,
    return _resize_pass(x, nh, 2, (top, top + SIZE))        # then vertically


def pixel_values(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [n,3,H,W] (all one size, on the scoring device) -> normalised [n,3,224,224] in `dtype`."""
    x = crop_values(batch)
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
