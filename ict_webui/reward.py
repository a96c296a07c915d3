"""What the webui Script does, without the webui: score each batch, pick / reorder, keep ``p`` aligned.

The Script (scripts/ict_reward.py) calls, for one generation ``p``:

- :meth:`WebuiReward.process` once, before sampling (A1111 ``Script.process``): checks the settings, the model
  files (cheap, nothing is loaded) and the selected script, installs the infotext fields;
- :meth:`WebuiReward.postprocess_batch_list` once per batch (``Script.postprocess_batch_list``), before anything of
  the batch is saved: scores the images (:mod:`.judge`), keeps / reorders them and keeps ``p.prompts``,
  ``p.seeds`` ... aligned (:mod:`.align`);
- :meth:`WebuiReward.postprocess_image` per image (``Script.postprocess_image``): copies the scores into
  ``image.info`` (what the API and the gallery get);
- :meth:`WebuiReward.add_png_info` per saved file (``on_before_image_saved``): the PNG keys;
- :meth:`WebuiReward.postprocess` at the end (``Script.postprocess``): removes the dropped images' entries from
  ``p.all_*`` / ``processed.all_*``, turns the infotext fields into the lists of scores of the images returned
  (the API's ``extra_generation_params``; in an X/Y/Z plot, the plot's images: :mod:`.plots`), and releases the
  models as the Settings say.

Failures never fail the generation: the images are then kept as they are, unscored, and a one-line message goes to
the UI (``p.comment``, shown under the images), to API clients (``extra_generation_params["ICT reward
messages"]``, in the API's ``info``), to the log, and to ``ui_notify`` (the Script passes ``gr.Warning``).
Every command a message suggests is written as it runs in this webui (:mod:`.hints`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ict_core import metadata

from . import align, hints, other_scripts, plots
from .download import WHERE
from .holder import ScorerHolder, missing_message, search_dirs, search_models
from .infotext import (
    HP_INFOTEXT_KEY,
    HP_PNG_KEY,
    ICT_INFOTEXT_KEY,
    ICT_PNG_KEY,
    MESSAGES_KEY,
    RECORD_PNG_KEY,
    STATE_ATTR,
    ApiList,
    ScoreField,
    add_png_keys,
    fmt,
    scores_from_infotext,
    with_message,
)
from .judge import Verdict, judge
from .options import MODE_ANNOTATE, NEEDS_HP, RunArgs, Settings

log = logging.getLogger(__name__)
_FIELDS = ((ICT_INFOTEXT_KEY, "ict"), (HP_INFOTEXT_KEY, "hp"))
LOGGERS = ("ict_reward", "ict_webui", "ict_core")


def keep_warnings_visible() -> None:
    """Forge Neo sets the root logger to ERROR unless ``--loglevel`` is given (A1111 / Forge leave warnings on), and
    its API's info has no ``comments``: our one-line messages would reach no one over the API. Our loggers are set
    to WARNING when they would drop warnings; a level set on them explicitly is kept."""
    for name in LOGGERS:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET and not lg.isEnabledFor(logging.WARNING):
            lg.setLevel(logging.WARNING)


@dataclass
class RunState:
    """Everything the extension knows about one generation; stored on ``p`` as ``p._ict_reward_state``."""
    args: RunArgs
    settings: Settings
    ict_path: Any = None
    hp_path: Any = None
    disabled: str | None = None                  # why nothing is scored in this run
    align: align.AlignState = field(default_factory=align.AlignState)
    iteration: int | None = None                 # the batch whose records are in `current`
    current: list[dict | None] = field(default_factory=list)      # metadata records of the kept images
    all_records: list[dict | None] = field(default_factory=list)
    finished: bool = False
    messages: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    plot: plots.PlotCell | None = None           # the X/Y/Z cell this generation is
    plot_before: dict[str, tuple] = field(default_factory=dict)   # the plot's score lists from earlier cells
    plot_unplaced: bool = False                  # an X/Y/Z plot whose cell could not be found: no list is written

    def record(self, index: Any, iteration: Any = None) -> dict | None:
        if self.finished:
            table = self.all_records
        elif iteration is None or iteration == self.iteration:
            table = self.current
        else:
            return None
        return table[index] if isinstance(index, int) and 0 <= index < len(table) else None

    def score_text(self, which: str, index: int, iteration: Any) -> str | None:
        if not self.finished and iteration is None:
            return None
        rec = self.record(index, iteration)
        return fmt(rec.get(which)) if rec else None


def make_records(state: RunState, v: Verdict, n: int) -> list[dict | None]:
    """The :mod:`ict_core.metadata` record of each input image (None: not scored)."""
    if v.results is None:
        return [None] * n
    rank: dict[int, int] = {}
    if v.ranked and v.order:
        for pos, i in enumerate(i for i in v.order if v.results[i].error is None):
            rank[i] = pos + 1
    model = getattr(state.ict_path, "name", None)
    hp_model = getattr(state.hp_path, "name", None) if v.has_hp else None
    return [None if r.error else metadata.record(r, by=v.by, value=v.values[i], rank=rank.get(i), model=model,
                                                 hp_model=hp_model, precision=state.settings.precision)
            for i, r in enumerate(v.results)]


class WebuiReward:
    def __init__(self, holder: ScorerHolder | None = None, ui_notify: Callable[[str], None] | None = None):
        self.holder = holder or ScorerHolder()
        self.ui_notify = ui_notify

    # ------------------------------------------------------------------------------------------- messages
    def notify(self, p: Any, state: RunState | None, msg: str, level: int = logging.WARNING) -> None:
        """One message, once per generation (and once per X/Y/Z plot, whose cells share ``p``'s dicts)."""
        msg = hints.runnable(msg)
        egp = getattr(p, "extra_generation_params", None)
        shown = egp.get(MESSAGES_KEY) if isinstance(egp, dict) else None
        if (state is not None and msg in state.messages) or (isinstance(shown, ApiList) and msg in shown):
            return
        if state is not None:
            state.messages.append(msg)
        if isinstance(egp, dict):
            egp[MESSAGES_KEY] = with_message(shown, msg)
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
        script = other_scripts.selected_script(p)
        if script is not None:
            state.plot = plots.find_cell()
            state.plot_unplaced = state.plot is None and other_scripts.is_plot(script)
        if state.plot is not None and isinstance(egp, dict):
            state.plot_before = {k: tuple(egp[k]) for k, _ in _FIELDS if isinstance(egp.get(k), ApiList)}
        blocker = other_scripts.positional_script(p)
        if blocker is not None and args.mode != MODE_ANNOTATE:
            state.args = replace(args, mode=MODE_ANNOTATE)
            self.notify(p, state, f"ICT reward: the {blocker} script needs every image in its place, so '{args.mode}'"
                                  f" is not applied; the scores are written (annotate).")
        if isinstance(egp, dict):
            egp[ICT_INFOTEXT_KEY] = ScoreField("ict")
            egp[HP_INFOTEXT_KEY] = ScoreField("hp")
        dirs = search_dirs(settings.models_dir)
        found = search_models(dirs)
        if found.ict is None:
            state.disabled = (f"ICT reward: {found.ict_problem}; images are left unscored." if found.ict_problem
                              else missing_message(dirs, "ict"))
            self.notify(p, state, state.disabled)
            return state
        if found.ict_problem:
            self.notify(p, state, f"ICT reward: {found.ict_problem}; using {found.ict} instead.")
        state.ict_path = found.ict
        if args.needs_hp:
            if found.hp is None:
                why = found.hp_problem or f"no HP model found in {dirs[0]}"
                if args.by in NEEDS_HP:
                    fix = ("" if found.hp_problem else
                           f"; {WHERE} or {hints.fetch_hint(dirs[0])} installs it")
                    self.notify(p, state, f"ICT reward: ranking by 'ict' instead of '{args.by}': {why}{fix}.")
                else:
                    self.notify(p, state, f"ICT reward: {why}; only ICT scores are written.")
            state.hp_path = found.hp
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

        def notify(msg: str, level: int = logging.WARNING) -> None:
            self.notify(p, state, msg, level)

        try:
            verdict = judge(self.holder, p, state, images, batch_number, notify, should_stop)
        except Exception as e:       # never lose a generation to the reward model
            log.exception("ICT reward: scoring batch %d failed", batch_number + 1)
            notify(f"ICT reward: scoring failed ({type(e).__name__}: {e}); images left unscored.")
            verdict = Verdict()
        records = make_records(state, verdict, n)
        order = verdict.order
        if order is None or order == list(range(n)):
            align.record_untouched(p, n, batch_number, state.align)
            kept = records
        else:
            pp.images = align.apply_order(p, images, order, batch_number, state.align)
            kept = [records[i] for i in order]
        state.current = list(kept)
        state.all_records.extend(state.current)

    def postprocess_image(self, p: Any, image: Any, index: int | None = None) -> None:
        """``index``: position in the current batch (``p.batch_index`` in the webui's loop)."""
        state: RunState | None = getattr(p, STATE_ATTR, None)
        if state is None or state.finished or image is None:
            return
        if index is None:
            index = getattr(p, "batch_index", None)
        rec = state.record(index)
        info = getattr(image, "info", None)
        if rec is None or not isinstance(info, dict):
            return
        info.update(_png_values(rec))

    def add_png_info(self, p: Any, pnginfo: Any) -> None:
        """``on_before_image_saved``: the flat keys from the infotext being written, and the image's own record
        when that infotext carries its scores (never on the grid, whose infotext has none)."""
        if not isinstance(pnginfo, dict):
            return
        add_png_keys(pnginfo)
        state: RunState | None = getattr(p, STATE_ATTR, None)
        if state is None or state.finished:
            return
        rec = state.record(getattr(p, "batch_index", None))
        if rec is not None and _png_values(rec, flat_only=True) == \
                {k: fmt(v) for k, v in scores_from_infotext(pnginfo.get("parameters")).items()}:
            pnginfo[RECORD_PNG_KEY] = metadata.dumps([rec])

    def postprocess(self, p: Any, processed: Any = None) -> None:
        state: RunState | None = getattr(p, STATE_ATTR, None)
        if state is None:
            return
        try:
            align.compact(p, state.align, processed)
        finally:
            state.finished = True
            finish_params(state, p, processed)
            try:
                self.holder.release(state.settings.after)
            except Exception:      # pragma: no cover
                log.exception("ICT reward: could not release the reward models")


def _png_values(rec: dict, flat_only: bool = False) -> dict[str, str]:
    out = {}
    if rec.get("ict") is not None:
        out[ICT_PNG_KEY] = fmt(rec["ict"])
    if rec.get("hp") is not None:
        out[HP_PNG_KEY] = fmt(rec["hp"])
    if not flat_only:
        out[RECORD_PNG_KEY] = metadata.dumps([rec])
    return out


def finish_params(state: RunState, p: Any, processed: Any = None) -> None:
    """Replace the :class:`ScoreField` values by :class:`ApiList` s (plain JSON, never in an infotext) of the scores
    of the images returned after the grid, in order, or drop them when no image returned is scored; copy the
    messages to ``processed`` when its dict is another one. Forge Classic's ``Processed.js()`` has no JSON fallback;
    A1111's would write null."""
    dicts = [d for d in (getattr(p, "extra_generation_params", None),
                         getattr(processed, "extra_generation_params", None)) if isinstance(d, dict)]
    for key, which in _FIELDS:
        values: list = [fmt(r.get(which)) if r else None for r in state.all_records]
        if state.plot is not None:      # X/Y/Z returns this cell's first image (a grid when the cell made one)
            first = None if int(getattr(processed, "index_of_first_image", 0) or 0) else (values or [None])[0]
            values = state.plot.api_values(state.plot_before.get(key), first)
        elif state.plot_unplaced:       # a list that may not follow the plot's images is worse than none
            values = []
        for d in dicts:
            if isinstance(d.get(key), (ScoreField, ApiList)):
                if any(v is not None for v in values):
                    d[key] = ApiList(values)
                else:
                    d.pop(key, None)
    messages = dicts[0].get(MESSAGES_KEY) if dicts else None
    for d in dicts[1:]:
        if isinstance(messages, ApiList):
            d[MESSAGES_KEY] = messages
