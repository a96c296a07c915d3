"""ComfyUI value shapes <-> what ict_core takes: IMAGE/LATENT/MASK batches, lists, prompts.

The scoring nodes set INPUT_IS_LIST, so each input arrives as a list (one item per upstream list
element, usually one).  These helpers also accept a bare value, so tests and scripts can call the
node functions directly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ict_core.errors import InputError
from ict_core.prompt_syntax import clean_prompt

PROMPT_SEPARATOR = re.compile(r"^\s*---\s*$", re.MULTILINE)


def one(value, default=None):
    """A scalar input (widget value): the first list element."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else default
    return default if value is None else value


def many(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ------------------------------------------------------------------------------------------- images
@dataclass
class Images:
    """The images to score: one [B,H,W,C] batch when all share a size, else a list of [H,W,C]."""
    batch: torch.Tensor | None
    items: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.items)

    def for_scorer(self) -> list[torch.Tensor]:
        """CHW float tensors: unambiguous for ict_core even when an image is only 3 or 4 pixels high."""
        return [t[..., :3].permute(2, 0, 1) for t in self.items]

    def take(self, idx: list[int], node: str) -> torch.Tensor:
        """The picked images as one IMAGE batch (they must share one size)."""
        if self.batch is not None:
            return self.batch[idx]
        shapes = {tuple(self.items[i].shape) for i in idx}
        if len(shapes) > 1:
            sizes = ", ".join(sorted(f"{s[1]}x{s[0]}" for s in shapes))
            raise InputError(f"{node}: the images to output have different sizes ({sizes}) and an IMAGE batch needs "
                             f"one size; scale them to one size first (e.g. Upscale Image), or use k=1")
        return torch.stack([self.items[i] for i in idx])


def saved_pixels(image: torch.Tensor):
    """The 8-bit pixels ComfyUI's Save Image writes for one [H,W,C] IMAGE (same arithmetic, same bytes)."""
    import numpy as np

    return np.clip(255. * image.cpu().numpy(), 0, 255).astype(np.uint8)


def gather_images(images, node: str) -> Images:
    items: list[torch.Tensor] = []
    for t in many(images):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{node}: images must be an IMAGE, got {type(t).__name__}")
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
            raise InputError(f"{node}: images must be an IMAGE [batch, height, width, channels], got shape "
                             f"{list(t.shape)}")
        if t.shape[-1] == 1:
            t = t.expand(*t.shape[:3], 3)
        items.extend(t.unbind(0))
    if not items:
        raise InputError(f"{node}: no images were given")
    if len({tuple(t.shape) for t in items}) == 1:
        return Images(torch.stack(items), items)
    return Images(None, items)


# ------------------------------------------------------------------------------------------ prompts
def split_prompts(prompt, n_images: int, node: str, optional: bool = False) -> list[str] | None:
    """One prompt per image (None for an empty prompt when optional: HP alone needs none).

    A prompt text may hold several prompts separated by a line `---`; a list of STRING values
    counts the same.  One prompt covers every image; P prompts for a batch of N (N divisible by P)
    cover N/P consecutive images each, the order batches are concatenated in.
    """
    texts = [t for t in many(prompt)]
    blocks: list[tuple[str, str]] = []          # (as typed, without prompt syntax)
    for t in texts:
        if not isinstance(t, str):
            raise InputError(f"{node}: prompt must be text, got {type(t).__name__}")
        blocks.extend((p, clean_prompt(p)) for p in PROMPT_SEPARATOR.split(t))
    parts = [c for _, c in blocks]
    if not any(parts):
        if optional:
            return None
        raise InputError(f"{node}: the prompt is empty; type the prompt the images were generated from (only "
                         f"score_by hp works without one)")
    if len(parts) > 1 and not all(parts):  # dropping a block would hand the images of one batch another's prompt
        i = parts.index("")
        raw = " ".join(blocks[i][0].split())[:60]
        said = f" ('{raw}' is only prompt syntax: embeddings, weights, LoRA tags)" if raw else ""
        raise InputError(f"{node}: prompt block {i + 1} of {len(parts)} (separated by '---' lines) is empty{said}; "
                         f"give every block the text of its images' prompt, or remove the block and its '---'")
    if len(parts) == 1:
        return parts * n_images
    if n_images % len(parts):
        raise InputError(f"{node}: {len(parts)} prompts (separated by '---' lines) for {n_images} images; give one "
                         f"prompt, one per image, or a number of prompts that divides the batch size")
    each = n_images // len(parts)
    return [p for p in parts for _ in range(each)]


# ------------------------------------------------------------------------------------------ latents
def gather_latent(latent, n_images: int, node: str) -> dict | None:
    """One LATENT dict for the whole batch, checked against the number of images."""
    dicts = many(latent)
    if not dicts:
        return None
    for d in dicts:
        if not isinstance(d, dict) or "samples" not in d:
            raise InputError(f"{node}: latent must be a LATENT, got {type(d).__name__}")
    if len(dicts) == 1:
        out = dict(dicts[0])
    else:
        try:
            samples = torch.cat([d["samples"] for d in dicts])
        except RuntimeError:
            raise InputError(f"{node}: the latents in the list have different sizes and cannot be batched") from None
        out = {"samples": samples}
        # as LatentBatch: each latent's batch_index, or 0..n-1 for one without
        out["batch_index"] = [i for d in dicts for i in _batch_index(d, d["samples"].shape[0])]
        masks = [d.get("noise_mask") for d in dicts]
        if any(m is not None for m in masks):
            if any(m is None for m in masks):
                raise InputError(f"{node}: only some latents in the list have a noise mask; give all or none")
            out["noise_mask"] = torch.cat([m.expand(d["samples"].shape[0], *m.shape[1:]) if m.shape[0] == 1
                                           else _to_batch(m, d["samples"].shape[0]) for m, d in zip(masks, dicts)])
    b = out["samples"].shape[0]
    if b != n_images:
        raise InputError(f"{node}: the latent holds {b} samples but {n_images} images were given; connect the latent "
                         f"the images were decoded from (same batch size)")
    return out


def _to_batch(mask: torch.Tensor, b: int) -> torch.Tensor:
    """A noise_mask of batch 1 or b as it is; one of another batch repeated (cyclically) to b, as
    ComfyUI's LatentFromBatch and its samplers do."""
    if mask.ndim == 0 or mask.shape[0] in (1, b):
        return mask
    reps = -(-b // mask.shape[0])
    return mask.repeat(reps, *([1] * (mask.ndim - 1)))[:b]


def _batch_index(latent: dict, b: int) -> list:
    bi = latent.get("batch_index")
    return list(bi) if isinstance(bi, (list, tuple)) and len(bi) == b else list(range(b))


def take_latent(latent: dict, idx: list[int]) -> dict:
    """The picked samples, with batch_index (0..B-1 when missing) and the noise_mask picked alike
    (a single mask is kept for all; a mask batch that is neither 1 nor B is repeated to B first)."""
    b = latent["samples"].shape[0]
    out = dict(latent)
    out["samples"] = latent["samples"][idx]
    out["batch_index"] = [_batch_index(latent, b)[i] for i in idx]
    nm = latent.get("noise_mask")
    if isinstance(nm, torch.Tensor) and nm.ndim >= 1 and nm.shape[0] != 1:
        out["noise_mask"] = _to_batch(nm, b)[idx]
    return out


# -------------------------------------------------------------------------------------------- masks
def gather_mask(mask, n_images: int, node: str) -> torch.Tensor | None:
    """One MASK batch; a single mask ([H,W] or batch 1) is kept as one mask shared by all images."""
    ms = many(mask)
    if not ms:
        return None
    parts = []
    for m in ms:
        if not isinstance(m, torch.Tensor) or m.ndim not in (2, 3):
            raise InputError(f"{node}: mask must be a MASK [batch, height, width], got "
                             f"{list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        parts.append(m.unsqueeze(0) if m.ndim == 2 else m)
    try:
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
    except RuntimeError:
        raise InputError(f"{node}: the masks in the list have different sizes and cannot be batched") from None
    if out.shape[0] not in (1, n_images):
        raise InputError(f"{node}: the mask holds {out.shape[0]} masks but {n_images} images were given; give one "
                         f"mask per image or a single mask for all")
    return out


def take_mask(mask: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return mask if mask.shape[0] == 1 else mask[idx]
