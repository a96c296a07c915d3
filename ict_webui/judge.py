"""Scoring one webui batch and deciding what to keep, in which order: the part of the extension that asks the engine.

:func:`judge` never raises for the user's mistakes (no model, bad file, empty prompt, cancelled): it says why with
``notify`` and returns a :class:`Verdict` that leaves the batch as it is. Unexpected errors are caught by the
caller (:mod:`.reward`), which keeps the generation.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ict_core.prompt_syntax import clean_prompt

from . import align
from .options import MODE_ANNOTATE, MODE_KEEP, MODE_RERANK, NEEDS_HP

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    order: list[int] | None = None          # indices to keep, best first; None: leave the batch as it is
    results: list | None = None             # ict_core ScoreResult per input image; None: nothing was scored
    values: list | None = None              # each image's value under `by`
    by: str = "ict"                         # the rule actually used (falls back to ict without HP)
    ranked: bool = False                    # whether `order` is a ranking (rank numbers mean something)
    has_hp: bool = False


class _Cancelled(Exception):
    pass


def _empty_result(index: int, prompt: str, error: str):
    from ict_core import ScoreResult
    return ScoreResult(index=index, label=None, prompt=prompt, error=error)


def to_scorable(x: Any) -> Any:
    """The webui's batch images are CHW float tensors in 0..1 on the CPU (A1111 >= 1.6, Forge); other
    extensions may have put numpy HWC arrays or PIL images there. Anything else goes to the engine as it is and
    comes back as a per-image error."""
    try:
        import numpy as np
        import torch
    except ImportError:          # pragma: no cover
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
            t = t.permute(2, 0, 1)
        return t.float() if t.is_floating_point() else t
    return x


def judge(holder: Any, p: Any, state: Any, images: list, batch_number: int,
          notify: Callable[..., None], should_stop: Callable[[], bool] | None = None) -> Verdict:
    """Score ``images`` (one batch of ``p``) and choose; ``state`` is the run's :class:`~.reward.RunState`."""
    from ict_core import ICTError, ranking

    args, n = state.args, len(images)
    if state.disabled:
        return Verdict()
    why = align.can_align(p, n)
    raw_prompts = list(getattr(p, "prompts", None) or [])
    if len(raw_prompts) != n:       # e.g. video frames (Forge Neo), or another extension changed the batch
        notify(f"ICT reward: batch {batch_number + 1} has {n} images for {len(raw_prompts)} prompts; it is left "
               f"unscored.")
        return Verdict()
    prompts = [clean_prompt(t) for t in raw_prompts]

    try:
        scorer = holder.get(state.ict_path, state.hp_path, state.settings.device, state.settings.precision)
    except ICTError as e:
        state.disabled = f"ICT reward: {e}"
        notify(state.disabled + " Images are left unscored.")
        return Verdict()

    by = args.by
    has_hp = bool(getattr(scorer, "has_hp", False))
    if by in NEEDS_HP and not has_hp:
        by = "ict"
    # ICT needs the prompt; HP does not, so when ranking by hp an empty prompt is scored by HP alone
    groups = [([i for i in range(n) if prompts[i]], True)]
    blank = [i for i in range(n) if not prompts[i]]
    if blank and by == "hp":
        groups.append((blank, False))
    elif blank:
        notify("ICT reward: ICT needs a prompt; images with an empty prompt are left unscored (ranking by hp scores "
               "them by HP alone).")
    results: list[Any] = [None] * n

    def stop() -> bool:
        if should_stop is not None and should_stop():
            raise _Cancelled()
        return False

    try:
        for todo, with_prompt in groups:
            if not todo:
                continue
            try:
                got = scorer.score([to_scorable(images[i]) for i in todo],
                                   [prompts[i] for i in todo] if with_prompt else None, should_stop=stop)
            except (_Cancelled, InterruptedError):
                notify("ICT reward: scoring cancelled; images left unscored.", logging.INFO)
                return Verdict()
            except ICTError as e:
                notify(f"ICT reward: {e}; images left unscored.")
                return Verdict()
            for i, r in zip(todo, got):
                results[i] = r
    finally:
        holder.done_scoring(state.settings.after)
    for i in range(n):
        if results[i] is None:
            results[i] = _empty_result(i, prompts[i], "empty prompt")
        elif results[i].error:
            notify(f"ICT reward: image {i + 1} of batch {batch_number + 1} could not be scored ({results[i].error}); "
                   f"it is kept unscored, after the scored ones.")
    values = ranking.values(results, by)
    verdict = Verdict(results=results, values=values, by=by, has_hp=has_hp)
    if all(r.error for r in results):
        return verdict
    if why is not None and args.mode != MODE_ANNOTATE:
        notify(f"ICT reward: cannot reorder this batch ({why}, changed by another extension); scores only.")
        return verdict

    selection = None
    if args.mode == MODE_ANNOTATE:
        verdict.order = list(range(n))
    elif args.mode == MODE_RERANK:
        verdict.order, verdict.ranked = ranking.rank(results, by), True
    else:
        if args.mode == MODE_KEEP:
            selection = ranking.select(results, by, k=args.k)
        else:   # MODE_MIN
            selection = ranking.select(results, by, k=n, min_score=args.min_score)
        verdict.order, verdict.ranked = list(selection.indices), True
        for note in selection.notes:
            notify(f"ICT reward: {note}.", logging.INFO)
    report = ranking.report(results, by, selection)
    state.reports.append(report)
    log.info("ICT reward, batch %d (%s by %s):\n%s", batch_number + 1, args.mode, by, report)
    return verdict
