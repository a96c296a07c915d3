"""What the webui Script does, without the webui: score each batch, pick / reorder, keep ``p`` aligned.

The Script (scripts/ict_reward.py) calls, for one generation ``p``:

- :meth:`WebuiReward.process` once, before sampling (A1111 ``Script.process``): checks the settings and the model
  files (cheap, nothing is loaded), installs the infotext fields;
- :meth:`WebuiReward.postprocess_batch_list` once per batch (``Script.postprocess_batch_list``), before anything of
  the batch is saved: scores the images (loading the models the first time), keeps / reorders them and keeps
  ``p.prompts``, ``p.seeds`` ... aligned (:mod:`.align`);
- :meth:`WebuiReward.postprocess_image` per image (``Script.postprocess_image``): copies the scores into
  ``image.info`` (what the API and the gallery get);
- :meth:`WebuiReward.postprocess` at the end (``Script.postprocess``): removes the dropped images' entries from
  ``p.all_*`` / ``processed.all_*`` and offloads the models as the Settings say.

Failures never fail the generation: the images are then kept as they are, unscored, and a one-line message goes to
the UI (``p.comment``, shown under the images), to the log, and to ``ui_notify`` (the Script passes
``gr.Warning``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from . import align
from .holder import ScorerHolder, find_models, missing_message, search_dirs
from .infotext import (HP_INFOTEXT_KEY, HP_PNG_KEY, ICT_INFOTEXT_KEY, ICT_PNG_KEY, STATE_ATTR, ScoreField, fmt)
from .options import MODE_ANNOTATE, MODE_KEEP, MODE_RERANK, NEEDS_HP, RunArgs, Settings
from ict_core.prompt_syntax import clean_prompt

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything the extension knows about one generation; stored on ``p`` as ``p._ict_reward_state``."""
    args: RunArgs
    settings: Settings
    ict_path: Any = None
    hp_path: Any = None
    disabled: str | None = None                  # why nothing is scored in this run
    align: align.AlignState = field(default_factory=align.AlignState)
    iteration: int | None = None                 # the batch whose scores are in `current`
    current: list[tuple[float | None, float | None]] = field(default_factory=list)
    all_scores: list[tuple[float | None, float | None]] = field(default_factory=list)
    finished: bool = False
    messages: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    def score_text(self, which: str, index: int, iteration: Any) -> str | None:
        if self.finished:
            table = self.all_scores
        elif iteration is not None and iteration == self.iteration:
            table = self.current
        else:
            return None
        if index >= len(table):
            return None
        return fmt(table[index][0 if which == "ict" else 1])


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


class WebuiReward:
    def __init__(self, holder: ScorerHolder | None = None, ui_notify: Callable[[str], None] | None = None):
        self.holder = holder or ScorerHolder()
        self.ui_notify = ui_notify

    # ------------------------------------------------------------------------------------------- messages
    def notify(self, p: Any, state: RunState | None, msg: str, level: int = logging.WARNING) -> None:
        if state is not None:
            if msg in state.messages:
                return
            state.messages.append(msg)
        log.log(level, "%s", msg)
        comment = getattr(p, "comment", None)
        if callable(comment):
            try:
                comment(msg)
            except Exception:       # pragma: no cover - a p without comments
                pass
        if self.ui_notify is not None and level >= logging.WARNING:
            try:
                self.ui_notify(msg)
            except Exception as e:  # gr.Warning outside a request, ...
                log.debug("ICT reward: ui_notify failed: %s", e)

    # ------------------------------------------------------------------------------------------- hooks
    def process(self, p: Any, args: RunArgs, settings: Settings) -> RunState | None:
        if not args.enabled:
            if hasattr(p, STATE_ATTR):
                setattr(p, STATE_ATTR, None)
            return None
        state = RunState(args=args, settings=settings)
        setattr(p, STATE_ATTR, state)
        egp = getattr(p, "extra_generation_params", None)
        if isinstance(egp, dict):
            egp[ICT_INFOTEXT_KEY] = ScoreField("ict")
            egp[HP_INFOTEXT_KEY] = ScoreField("hp")
        dirs = search_dirs(settings.models_dir)
        ict_path, hp_path = find_models(dirs)
        if ict_path is None:
            state.disabled = missing_message(dirs, "ict")
            self.notify(p, state, state.disabled)
            return state
        state.ict_path = ict_path
        if args.needs_hp:
            if hp_path is None:
                if args.by in NEEDS_HP:
                    self.notify(p, state, f"ICT reward: no HP model found in {dirs[0]}, so ranking by 'ict' "
                                          f"instead of '{args.by}'; `ict fetch --hp --dest \"{dirs[0]}\"` "
                                          f"installs it.")
                else:
                    self.notify(p, state, f"ICT reward: no HP model found in {dirs[0]}; only ICT scores are "
                                          f"written.")
            state.hp_path = hp_path
        return state

    def postprocess_batch_list(self, p: Any, pp: Any, batch_number: int = 0,
                               should_stop: Callable[[], bool] | None = None) -> None:
        state: RunState | None = getattr(p, STATE_ATTR, None)
        if state is None or not state.args.enabled:
            return
        images = list(getattr(pp, "images", None) or [])
        n = len(images)
        state.iteration, state.current = batch_number, []
        if n == 0:
            return
        try:
            order, scores = self._judge(p, state, images, batch_number, should_stop)
        except Exception as e:       # never lose a generation to the reward model
            log.exception("ICT reward: scoring batch %d failed", batch_number + 1)
            self.notify(p, state, f"ICT reward: scoring failed ({type(e).__name__}: {e}); images left unscored.")
            order, scores = None, None
        if order is None or order == list(range(n)):
            align.record_untouched(p, n, batch_number, state.align)
            kept_scores = scores if scores is not None else [(None, None)] * n
        else:
            pp.images = align.apply_order(p, images, order, batch_number, state.align)
            kept_scores = [scores[i] for i in order]
        state.current = list(kept_scores)
        state.all_scores.extend(state.current)

    def _judge(self, p: Any, state: RunState, images: list, batch_number: int,
               should_stop: Callable[[], bool] | None):
        """``(order, scores)``: indices to keep best first (None: leave the batch as it is), and
        ``(ict, hp)`` per input image."""
        from ict_core import ICTError, ranking

        args, n = state.args, len(images)
        if state.disabled:
            return None, None
        why = align.can_align(p, n)
        raw_prompts = list(getattr(p, "prompts", None) or [])
        if len(raw_prompts) != n:       # e.g. video frames (Forge Neo), or another extension changed the batch
            self.notify(p, state, f"ICT reward: batch {batch_number + 1} has {n} images for {len(raw_prompts)} "
                                  f"prompts; it is left unscored.")
            return None, None
        prompts = [clean_prompt(t) for t in raw_prompts]

        try:
            scorer = self.holder.get(state.ict_path, state.hp_path, state.settings.device,
                                     state.settings.precision)
        except ICTError as e:
            state.disabled = f"ICT reward: {e}"
            self.notify(p, state, state.disabled + " Images are left unscored.")
            return None, None

        by = args.by
        if by in NEEDS_HP and not getattr(scorer, "has_hp", False):
            by = "ict"
        # ICT needs the prompt; HP does not, so when ranking by hp an empty prompt is scored by HP alone
        groups = [([i for i in range(n) if prompts[i]], True)]
        blank = [i for i in range(n) if not prompts[i]]
        if blank and by == "hp":
            groups.append((blank, False))
        elif blank:
            self.notify(p, state, "ICT reward: ICT needs a prompt; images with an empty prompt are left unscored "
                                  "(ranking by hp scores them by HP alone).")
        results: list[Any] = [None] * n

        def stop() -> bool:
            if should_stop is not None and should_stop():
                raise _Cancelled()
            return False

        for todo, with_prompt in groups:
            if not todo:
                continue
            try:
                got = scorer.score([to_scorable(images[i]) for i in todo],
                                   [prompts[i] for i in todo] if with_prompt else None, should_stop=stop)
            except (_Cancelled, InterruptedError):
                self.notify(p, state, "ICT reward: scoring cancelled; images left unscored.", logging.INFO)
                return None, None
            except ICTError as e:
                self.notify(p, state, f"ICT reward: {e}; images left unscored.")
                return None, None
            for i, r in zip(todo, got):
                results[i] = r
        for i in range(n):
            if results[i] is None:
                results[i] = _empty_result(i, prompts[i], "empty prompt")
            elif results[i].error:
                self.notify(p, state, f"ICT reward: image {i + 1} of batch {batch_number + 1} could not be "
                                      f"scored ({results[i].error}); it is kept unscored, after the scored ones.")
        scores = [(r.ict, r.hp) for r in results]
        if all(r.error for r in results):
            return None, scores
        if why is not None and args.mode != MODE_ANNOTATE:
            self.notify(p, state, f"ICT reward: cannot reorder this batch ({why}, changed by another "
                                  f"extension); scores only.")
            return None, scores

        selection = None
        if args.mode == MODE_ANNOTATE:
            order = list(range(n))
        elif args.mode == MODE_RERANK:
            order = ranking.rank(results, by)
        else:
            if args.mode == MODE_KEEP:
                selection = ranking.select(results, by, k=args.k)
            else:   # MODE_MIN
                selection = ranking.select(results, by, k=n, min_score=args.min_score)
            order = list(selection.indices)
            for note in selection.notes:
                self.notify(p, state, f"ICT reward: {note}.", logging.INFO)
        report = ranking.report(results, by, selection)
        state.reports.append(report)
        log.info("ICT reward, batch %d (%s by %s):\n%s", batch_number + 1, args.mode, by, report)
        return order, scores

    def postprocess_image(self, p: Any, image: Any, index: int | None = None) -> None:
        """``index``: position in the current batch (``p.batch_index`` in the webui's loop)."""
        state: RunState | None = getattr(p, STATE_ATTR, None)
        if state is None or state.finished or image is None:
            return
        if index is None:
            index = getattr(p, "batch_index", None)
        if not isinstance(index, int) or not 0 <= index < len(state.current):
            return
        info = getattr(image, "info", None)
        if not isinstance(info, dict):
            return
        ict, hp = state.current[index]
        if ict is not None:
            info[ICT_PNG_KEY] = fmt(ict)
        if hp is not None:
            info[HP_PNG_KEY] = fmt(hp)

    def postprocess(self, p: Any, processed: Any = None) -> None:
        state: RunState | None = getattr(p, STATE_ATTR, None)
        if state is None:
            return
        try:
            align.compact(p, state.align, processed)
        finally:
            state.finished = True
            try:
                self.holder.release(state.settings.after)
            except Exception:      # pragma: no cover
                log.exception("ICT reward: could not offload the reward models")
