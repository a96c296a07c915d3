"""Best-of-N seed search: seeds, the pruning funnel (stages of cuts) and its cost in candidate-steps.

A funnel is a list of cuts: at step s_j the candidates still running are scored by the model's
prediction of the final image and the best c_j continue.  One cut is the simple case (prune_at 0.5,
survivors 2); several (prune_at "0.25, 0.5", survivors "4, 2") shrink the set stage by stage.  Here
the user's values are parsed, bounded and turned into the cuts that really prune; the host only samples.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InputError

SEED_SPACE = 2 ** 64  # ComfyUI's seed widget range is 0 .. 2**64-1; seed + i wraps around inside it
MAX_STAGES = 8        # cuts in one funnel; more is not a search schedule anyone needs
MAX_TEXT = 200        # characters of a prune_at / survivors list


def candidate_seeds(seed: int, n: int) -> list[int]:
    """Candidate i samples with seed + i (wrapping at 2**64), so a plain batch-1 run with it regenerates it."""
    if not 0 <= seed < SEED_SPACE:
        raise InputError(f"seed must be between 0 and {SEED_SPACE - 1}, got {seed}")
    return [(seed + i) % SEED_SPACE for i in range(n)]


def prune_step(prune_at: float, steps: int) -> int:
    """The step where candidates are scored: ceil(prune_at * steps), at least 1, at most steps.

    Rounded to 9 decimals first, so that 0.3 * 20 (= 6.000000000000001 in floats) gives 6, not 7."""
    return min(steps, max(1, math.ceil(round(prune_at * steps, 9))))


def _items(value, name: str, what: str) -> list[str]:
    """A number, a list of numbers, or text like '0.25, 0.5' (a saved workflow may hold any of them); at most
    MAX_STAGES items, `what` naming them in the message."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number or a comma-separated list of numbers, got {value}")
    if isinstance(value, (int, float)):
        parts = [repr(value)]
    elif isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        text = str(value)
        if len(text) > MAX_TEXT:
            raise InputError(f"{name} is {len(text)} characters long; give at most {MAX_STAGES} comma-separated "
                             f"numbers")
        parts = [p.strip() for p in text.replace(";", ",").split(",")]
        if not any(parts):
            raise InputError(f"{name} is empty; give a number (e.g. 0.5) or one per stage (e.g. 0.25, 0.5)")
        if not all(parts):
            raise InputError(f"{name} '{text}' has an empty item; separate the numbers by single commas")
    if len(parts) > MAX_STAGES:
        raise InputError(f"{name} lists {len(parts)} {what}; a funnel has at most {MAX_STAGES} stages")
    return parts


def parse_fractions(value) -> tuple[float, ...]:
    """prune_at: one fraction of the steps per cut, each in (0, 1], increasing."""
    items = _items(value, "prune_at", "fractions")
    out = []
    for t in items:
        try:
            f = float(t)
        except ValueError:
            raise InputError(f"prune_at '{t}' is not a number; give fractions of the steps like 0.25, 0.5") from None
        if not 0.0 < f <= 1.0 or math.isnan(f):
            raise InputError(f"prune_at must be fractions of the steps in (0, 1] (1.0 = no pruning), got {t}")
        out.append(f)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise InputError(f"prune_at fractions must increase from stage to stage, got {', '.join(items)}")
    return tuple(out)


def parse_counts(value) -> tuple[int, ...]:
    """survivors: how many candidates continue after each cut, each at least 1, never growing."""
    items = _items(value, "survivors", "counts")
    out = []
    for t in items:
        try:
            c = int(float(t)) if float(t).is_integer() else None
        except (ValueError, OverflowError):
            c = None
        if c is None or c < 1:
            raise InputError(f"survivors '{t}' is not a whole number of at least 1; give counts like 4, 2")
        out.append(c)
    if any(b > a for a, b in zip(out, out[1:])):
        raise InputError(f"survivors must not grow from stage to stage, got {', '.join(items)}")
    return tuple(out)


def _fmt_list(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class Cut:
    """One stage of the funnel: at `step` the running candidates are scored and the best `keep` continue."""
    step: int
    keep: int
    fraction: float  # the prune_at value the user set for it


@dataclass(frozen=True)
class Plan:
    """What a best-of-N run does and what it costs, in candidate-steps (one sampler step of one candidate)."""
    n: int
    k: int
    steps: int
    prune_at: tuple[float, ...]   # as the user set them
    survivors: tuple[int, ...]    # as the user set them
    cuts: tuple[Cut, ...]         # the stages that prune (step before the last, fewer than those running)
    chunk: int
    audit: bool = False
    idle: tuple[str, ...] = ()    # why a stage the user set prunes nothing

    @classmethod
    def build(cls, n: int, k: int, steps: int, prune_at, survivors, chunk: int, audit: bool = False) -> Plan:
        if n < 1:
            raise InputError(f"n (candidates) must be at least 1, got {n}")
        if not 1 <= k <= n:
            raise InputError(f"k (kept) must be between 1 and n={n}, got {k}")
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if chunk < 1:
            raise InputError(f"chunk must be at least 1, got {chunk}")
        fractions, counts = parse_fractions(prune_at), parse_counts(survivors)
        if len(counts) != len(fractions):
            raise InputError(f"give one survivors count per prune_at fraction: prune_at has {len(fractions)} "
                             f"({_fmt_list(fractions)}), survivors {len(counts)} ({_fmt_list(counts)})")
        cuts: list[Cut] = []
        idle: list[str] = []
        running = n
        for f, c in zip(fractions, counts):
            s = prune_step(f, steps)
            if s >= steps:
                idle.append(f"prune_at {f:g} falls on the last step ({s} of {steps}): no cut there"
                            if f < 1.0 else "prune_at 1.0: no cut")
            elif c >= running:
                idle.append(f"survivors {c} at prune_at {f:g} is not fewer than the {running} candidates running: "
                            f"no cut there")
            else:
                if c < k:
                    raise InputError(f"survivors {c} at prune_at {f:g} must be at least k={k} (the kept images come "
                                     f"from the survivors)")
                if cuts and cuts[-1].step == s:  # two fractions on one step: one cut to the smaller count
                    idle.append(f"prune_at {cuts[-1].fraction:g} and {f:g} both fall on step {s}: one cut to {c}")
                    cuts.pop()
                cuts.append(Cut(s, c, f))
                running = c
        return cls(n, k, steps, fractions, counts, tuple(cuts), chunk, bool(audit), tuple(idle))

    @property
    def prunes(self) -> bool:
        return bool(self.cuts)

    @property
    def bounds(self) -> list[int]:
        """Step boundaries of the phases: 0, each cut's step, steps."""
        return [0] + [c.step for c in self.cuts] + [self.steps]

    @property
    def running(self) -> list[int]:
        """How many candidates each phase samples when pruning acts (n, then each cut's keep)."""
        return [self.n] + [c.keep for c in self.cuts]

    @property
    def plain_cost(self) -> int:
        """Candidate-steps of a plain best-of-n: every candidate sampled to the end."""
        return self.n * self.steps

    def phase_costs(self) -> list[tuple[int, int]]:
        """(candidates, steps) of each phase with pruning."""
        b = self.bounds
        return [(r, b[j + 1] - b[j]) for j, r in enumerate(self.running)]

    @property
    def pruned_cost(self) -> int:
        return sum(r * s for r, s in self.phase_costs())

    @property
    def cost(self) -> int:
        """Candidate-steps this run spends (an audit finishes every candidate)."""
        return self.plain_cost if self.audit else self.pruned_cost

    @property
    def finishers(self) -> int:
        """How many candidates are sampled to the last step."""
        return self.n if self.audit else self.running[-1]

    def chunks(self, indices: Sequence[int]) -> list[list[int]]:
        """The candidates in sampling groups of at most `chunk`."""
        idx = list(indices)
        return [idx[i:i + self.chunk] for i in range(0, len(idx), self.chunk)]

    def describe(self) -> list[str]:
        """The funnel in words: each phase's candidates and candidate-steps, then the cost against plain."""
        if not self.prunes:
            why = "; ".join(self.idle) if self.idle else "no cut"
            return [f"no pruning ({why}): every candidate sampled to step {self.steps}",
                    f"cost: {self.plain_cost} candidate-steps ({self.n}x{self.steps}), the same as a plain "
                    f"best-of-{self.n}"]
        lines = [f"funnel: prune_at {_fmt_list(self.prune_at)}, survivors {_fmt_list(self.survivors)} "
                 f"({len(self.cuts)} cut{'s' if len(self.cuts) > 1 else ''})"]
        b = self.bounds
        for j, (r, s) in enumerate(self.phase_costs()):
            then = (f", then the best {self.cuts[j].keep} by the predicted final image continue"
                    if j < len(self.cuts) else "")
            span = f"step {b[j + 1]}" if s == 1 else f"steps {b[j] + 1}-{b[j + 1]}"
            lines.append(f"  {span}: {r} candidate{'s' if r > 1 else ''} x {s} = {r * s} candidate-step"
                         f"{'s' if r * s > 1 else ''}{then}")
        lines.extend(f"  note: {t}" for t in self.idle)
        saved = self.plain_cost - self.pruned_cost
        terms = " + ".join(f"{r}x{s}" for r, s in self.phase_costs())
        lines.append(f"cost with pruning: {self.pruned_cost} candidate-steps ({terms})")
        lines.append(f"  instead of {self.plain_cost} for a plain best-of-{self.n} ({self.n}x{self.steps}): "
                     f"{saved} fewer ({100.0 * saved / self.plain_cost:.0f}%)")
        if self.audit:
            lines.append(f"  this audit run spent all {self.plain_cost} to finish every candidate")
        return lines
