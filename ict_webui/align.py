"""Keeping the webui's per-image lists aligned with the images when a batch is reordered or cut.

Checked against A1111 (1.8.0 source in Forge's history, and the 1.9/1.10 loop, which is unchanged there), Forge
(main) and Forge Neo: in ``process_images_inner`` the loop for batch ``n`` does

    p.prompts = p.all_prompts[n*bs:(n+1)*bs]; p.negative_prompts = ...      # re-sliced just before the hook
    p.scripts.postprocess_batch_list(p, pp, batch_number=n)
    for i, x in enumerate(pp.images):  save_image(..., p.seeds[i], p.prompts[i], info=infotext(i))

where ``infotext(i)`` is ``create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i,
all_negative_prompts=p.negative_prompts)``. The webui does NOT adjust these lists itself when the number of images
changes (its docstring: "the script has the responsibility to also update p.prompts, p.negative_prompts, p.seeds,
p.subseeds"), so there is no double adjustment to avoid. The next batch re-slices ``p.all_*`` with
``n*batch_size``, so the ``all_*`` lists must keep their length during the loop: within batch ``n``'s slice the
kept entries are moved to the front (best first) and the dropped ones after them; :func:`compact` removes the
dropped ones once the loop is over (``postprocess``), so ``Processed.all_seeds`` etc. (used by the UI's
"reuse seed" and by the API) match the images returned. Forge Neo's ``_all_prompts_c`` (prompts with comments,
sliced by ``n*bs`` for the infotext) is treated like ``all_prompts``.

img2img reuses ``p.overlay_images[i]`` and ``p.color_corrections[i]`` for position ``i`` of every batch; when
they hold one entry per batch position they are permuted per batch from a saved original and restored at the
end.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# batch-local list -> the full-length list it is sliced from
BATCH_LISTS = {
    "prompts": "all_prompts",
    "negative_prompts": "all_negative_prompts",
    "seeds": "all_seeds",
    "subseeds": "all_subseeds",
    "hr_prompts": "all_hr_prompts",
    "hr_negative_prompts": "all_hr_negative_prompts",
}
EXTRA_ALL_LISTS = ("_all_prompts_c", "_all_negative_prompts_c")      # Forge Neo
PROCESSED_LISTS = ("all_prompts", "all_negative_prompts", "all_seeds", "all_subseeds")
POSITION_LISTS = ("overlay_images", "color_corrections")
REQUIRED = ("prompts", "seeds")


@dataclass
class BatchRecord:
    start: int            # offset of this batch in the p.all_* lists
    size: int             # images the batch had
    kept: int             # images it has now (they are at start .. start+kept-1)
    all_lists: tuple[str, ...] = ()   # the all_* lists that were reordered for it


@dataclass
class AlignState:
    batches: list[BatchRecord] = field(default_factory=list)
    originals: dict[str, list] = field(default_factory=dict)     # POSITION_LISTS as they were


def _as_list(x: Any) -> list | None:
    return list(x) if isinstance(x, (list, tuple)) else None


def check_order(order: Sequence[int], n: int) -> list[int]:
    order = [int(i) for i in order]
    if not order or len(set(order)) != len(order) or any(i < 0 or i >= n for i in order):
        raise ValueError(f"bad selection {order!r} for {n} images")
    return order


def can_align(p: Any, n: int) -> str | None:
    """None when the batch-local lists have one entry per image; else why not (another extension changed them)."""
    for name in REQUIRED:
        lst = _as_list(getattr(p, name, None))
        if lst is None or len(lst) != n:
            return f"p.{name} has {0 if lst is None else len(lst)} entries for {n} images"
    return None


def apply_order(p: Any, images: list, order: Sequence[int], batch_number: int, state: AlignState) -> list:
    """Reorder / cut one batch: returns the new image list and updates ``p`` in place (see module doc).

    ``order`` lists the indices to keep, best first. Everything is computed before anything is assigned, so an
    error leaves ``p`` untouched."""
    n = len(images)
    order = check_order(order, n)
    kept = set(order)
    rest = [i for i in range(n) if i not in kept]
    perm = order + rest
    bs = int(getattr(p, "batch_size", n) or n)
    start = batch_number * bs
    updates: dict[str, list] = {}
    reordered_all: list[str] = []

    for local, full in BATCH_LISTS.items():
        before = _as_list(getattr(p, local, None))
        if before is not None and len(before) == n:
            updates[local] = [before[i] for i in order]
        elif before is not None and before:
            log.debug("ICT reward: p.%s has %d entries for %d images; left as is", local, len(before), n)
        all_list = _as_list(getattr(p, full, None))
        if all_list is None or len(all_list) < start + n:
            continue
        seg = all_list[start:start + n]
        if before is not None and len(before) == n and seg != before:
            log.debug("ICT reward: p.%s[%d:%d] differs from p.%s; left as is", full, start, start + n, local)
            continue
        updates[full] = all_list[:start] + [seg[i] for i in perm] + all_list[start + n:]
        reordered_all.append(full)

    for full in EXTRA_ALL_LISTS:
        all_list = _as_list(getattr(p, full, None))
        if all_list is not None and len(all_list) >= start + n:
            seg = all_list[start:start + n]
            updates[full] = all_list[:start] + [seg[i] for i in perm] + all_list[start + n:]
            reordered_all.append(full)

    for name in POSITION_LISTS:
        orig = state.originals.get(name)
        if orig is None:
            orig = _as_list(getattr(p, name, None))
            if orig is None or len(orig) != n or len(orig) != bs:
                continue
            state.originals[name] = orig
        if len(orig) == n:
            updates[name] = [orig[i] for i in perm]

    new_images = [images[i] for i in order]
    for name, value in updates.items():
        setattr(p, name, value)
    state.batches.append(BatchRecord(start=start, size=n, kept=len(order), all_lists=tuple(reordered_all)))
    return new_images


def record_untouched(p: Any, n: int, batch_number: int, state: AlignState) -> None:
    """A batch left as it was (disabled, failed, annotate) still counts for :func:`compact`."""
    bs = int(getattr(p, "batch_size", n) or n)
    state.batches.append(BatchRecord(start=batch_number * bs, size=n, kept=n))


def compact(p: Any, state: AlignState, processed: Any = None) -> None:
    """After the loop: drop the entries of dropped images from the ``all_*`` lists of ``p`` (and ``processed``),
    and restore the per-position img2img lists."""
    for name, orig in state.originals.items():
        setattr(p, name, orig)
    state.originals = {}
    cut = [b for b in state.batches if b.kept < b.size]
    if not cut:
        return
    names = sorted({name for b in cut for name in b.all_lists})
    for name in names:
        old = _as_list(getattr(p, name, None))
        if old is None:
            continue
        keep = [True] * len(old)
        for b in cut:
            if name in b.all_lists:
                for j in range(b.start + b.kept, min(b.start + b.size, len(old))):
                    keep[j] = False
        new = [x for x, k in zip(old, keep) if k]
        setattr(p, name, new)
        if processed is not None and name in PROCESSED_LISTS:
            cur = getattr(processed, name, None)
            if isinstance(cur, list) and len(cur) == len(old):
                setattr(processed, name, list(new))
