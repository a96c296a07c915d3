"""Best-of-N seed search with early pruning: the host-independent part (seeds, plan, costs, ranking, audit, report).

A host (the ComfyUI node) samples candidate i with seed + i, runs every candidate to the prune step,
scores the model's prediction of the final image there, lets the best `survivors` finish, scores
them again and keeps the best k.  Everything that decides or counts lives here so it is tested
without a host; the host only samples, decodes and scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .errors import InputError

SEED_SPACE = 2 ** 64  # ComfyUI's seed widget range is 0 .. 2**64-1; seed + i wraps around inside it


def candidate_seeds(seed: int, n: int) -> list[int]:
    """Candidate i samples with seed + i (wrapping at 2**64), so a plain batch-1 run with it regenerates it."""
    if not 0 <= seed < SEED_SPACE:
        raise InputError(f"seed must be between 0 and {SEED_SPACE - 1}, got {seed}")
    return [(seed + i) % SEED_SPACE for i in range(n)]


def prune_step(prune_at: float, steps: int) -> int:
    """The step where candidates are scored: ceil(prune_at * steps), at least 1, at most steps.

    Rounded to 9 decimals first, so that 0.3 * 20 (= 6.000000000000001 in floats) gives 6, not 7."""
    return min(steps, max(1, math.ceil(round(prune_at * steps, 9))))


@dataclass(frozen=True)
class Plan:
    """What a best-of-N run will do and what it costs, in candidate-steps (one sampler step of one candidate)."""
    n: int
    k: int
    steps: int
    prune_at: float
    survivors: int
    chunk: int
    audit: bool = False

    @classmethod
    def build(cls, n: int, k: int, steps: int, prune_at: float, survivors: int, chunk: int,
              audit: bool = False) -> "Plan":
        if n < 1:
            raise InputError(f"n (candidates) must be at least 1, got {n}")
        if not 1 <= k <= n:
            raise InputError(f"k (kept) must be between 1 and n={n}, got {k}")
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if not (0.0 < prune_at <= 1.0) or math.isnan(prune_at):
            raise InputError(f"prune_at must be a fraction of the steps in (0, 1] (1.0 = no pruning), got {prune_at}")
        if not k <= survivors:
            raise InputError(f"survivors must be at least k={k} (the kept images come from the survivors), "
                             f"got {survivors}")
        if chunk < 1:
            raise InputError(f"chunk must be at least 1, got {chunk}")
        return cls(n, k, steps, float(prune_at), min(survivors, n), chunk, bool(audit))

    @property
    def step(self) -> int:
        """The step where candidates are scored and pruned (== steps when nothing is pruned)."""
        return prune_step(self.prune_at, self.steps) if self.prunes else self.steps

    @property
    def prunes(self) -> bool:
        """Pruning happens only when it saves something: a step before the last and fewer survivors than n."""
        return prune_step(self.prune_at, self.steps) < self.steps and self.survivors < self.n

    @property
    def plain_cost(self) -> int:
        """Candidate-steps of a plain best-of-n: every candidate sampled to the end."""
        return self.n * self.steps

    @property
    def pruned_cost(self) -> int:
        """Candidate-steps with pruning: n * step + survivors * (steps - step)."""
        return self.n * self.step + self.survivors * (self.steps - self.step)

    @property
    def cost(self) -> int:
        """Candidate-steps this run spends (an audit finishes every candidate)."""
        return self.plain_cost if self.audit else self.pruned_cost

    @property
    def finishers(self) -> int:
        """How many candidates are sampled to the last step."""
        return self.n if (self.audit or not self.prunes) else self.survivors

    def chunks(self, indices: Sequence[int]) -> list[list[int]]:
        """The candidates in sampling groups of at most `chunk`."""
        idx = list(indices)
        return [idx[i:i + self.chunk] for i in range(0, len(idx), self.chunk)]

    def cost_line(self) -> str:
        if not self.prunes:
            return (f"cost: {self.plain_cost} candidate-steps ({self.n}x{self.steps}), the same as a plain "
                    f"best-of-{self.n} (no pruning)")
        s, rest = self.step, self.steps - self.step
        saved = self.plain_cost - self.pruned_cost
        pct = 100.0 * saved / self.plain_cost
        line = (f"cost with pruning: {self.pruned_cost} candidate-steps ({self.n}x{s} + {self.survivors}x{rest}) "
                f"instead of {self.plain_cost} for a plain best-of-{self.n} ({self.n}x{self.steps}): "
                f"{saved} fewer ({pct:.0f}%)")
        if self.audit:
            line += f"; this audit run spent all {self.plain_cost} to finish every candidate"
        return line


def order(values: Sequence[float | None]) -> list[int]:
    """Indices best first; ties keep index order; unscored (None or NaN) last, in index order."""
    def bad(v):
        return v is None or (isinstance(v, float) and math.isnan(v))
    return sorted(range(len(values)), key=lambda i: (bad(values[i]), 0.0 if bad(values[i]) else -values[i], i))


def pick(values: Sequence[float | None], among: Sequence[int], count: int) -> list[int]:
    """The `count` best of the candidates `among` (indices into values), best first; unscored ones only
    when nothing better is left."""
    allowed = set(among)
    return [i for i in order(values) if i in allowed][:count]


def _avg_ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    srt = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(srt):
        j = i
        while j + 1 < len(srt) and xs[srt[j + 1]] == xs[srt[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[srt[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks); None when undefined (< 2 pairs or a constant
    side)."""
    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of one length")
    if len(a) < 2:
        return None
    ra, rb = _avg_ranks(a), _avg_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


@dataclass
class Audit:
    """What finishing every candidate showed about the early scores."""
    spearman: float | None
    pairs: int
    true_best: int
    true_best_early_rank: int          # 1-based rank of the true best among the early scores
    lost_best: bool                    # pruning would have dropped the candidate with the best final score
    saved: int                         # candidate-steps pruning would have saved
    plain: int


@dataclass
class Search:
    """The state of one run: seeds, early and final values per candidate, survivors and the kept ones."""
    plan: Plan
    seeds: list[int]
    by: str = "ict"
    early: list[float | None] = field(default_factory=list)
    final: list[float | None] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, plan: Plan, seed: int, by: str = "ict") -> "Search":
        return cls(plan, candidate_seeds(seed, plan.n), by, [None] * plan.n, [None] * plan.n)

    def set_early(self, values: Sequence[float | None]) -> list[int]:
        """Early values of all n candidates: returns the survivors, best first."""
        if len(values) != self.plan.n:
            raise ValueError(f"{len(values)} early values for {self.plan.n} candidates")
        self.early = list(values)
        self.survivors = pick(self.early, range(self.plan.n), self.plan.survivors)
        return self.survivors

    def to_finish(self) -> list[int]:
        """The candidates sampled to the end, survivors first (then, in an audit, the pruned ones)."""
        if not self.plan.prunes:
            return list(range(self.plan.n))
        rest = [i for i in range(self.plan.n) if i not in self.survivors] if self.plan.audit else []
        return self.survivors + rest

    def contenders(self) -> list[int]:
        """The candidates the kept ones are chosen from: the survivors (all n without pruning)."""
        return list(self.survivors) if self.plan.prunes else list(range(self.plan.n))

    def set_final(self, values: dict[int, float | None]) -> list[int]:
        """Final values by candidate index: returns the k kept, best first."""
        for i, v in values.items():
            self.final[i] = v
        self.kept = pick(self.final, self.contenders(), self.plan.k)
        if not any(_ok(self.final[i]) for i in self.kept):
            raise InputError("no candidate image could be scored; see the log for why")
        return self.kept

    def audit(self) -> Audit | None:
        if not (self.plan.audit and self.plan.prunes):
            return None
        both = [i for i in range(self.plan.n) if _ok(self.early[i]) and _ok(self.final[i])]
        rho = spearman([self.early[i] for i in both], [self.final[i] for i in both])
        best = order(self.final)[0]
        early_rank = order(self.early).index(best) + 1
        return Audit(rho, len(both), best, early_rank, best not in self.survivors,
                     self.plan.plain_cost - self.plan.pruned_cost, self.plan.plain_cost)

    def report(self, header: str = "") -> str:
        p = self.plan
        lines = []
        if header:
            lines.append(header)
        lines.append(f"best-of-{p.n}: seeds {self.seeds[0]}..{self.seeds[-1]} (candidate i uses seed+i), keep {p.k}, "
                     f"score by {self.by}, chunk {p.chunk}")
        if p.prunes:
            lines.append(f"pruned at step {p.step} of {p.steps} (prune_at {p.prune_at:g}): the best {p.survivors} "
                         f"of {p.n} by the predicted final image continue")
        else:
            why = "prune_at 1.0" if prune_step(p.prune_at, p.steps) >= p.steps else f"survivors {p.survivors} >= n"
            lines.append(f"no pruning ({why}): every candidate sampled to step {p.steps}")
        lines.append(p.cost_line())
        lines.append(f"{'rank':>4} {'#':>3} {'seed':>20} {'early':>8} {'final':>8}  status")
        kept, surv = set(self.kept), set(self.survivors)
        for pos, i in enumerate(self.table_order(), 1):
            status = ("kept" if i in kept else "survivor" if (i in surv or not p.prunes)
                      else "pruned (audit: finished)" if p.audit else "pruned")
            early = f"{self.early[i]:8.4f}" if _ok(self.early[i]) else f"{'-':>8}"
            final = f"{self.final[i]:8.4f}" if _ok(self.final[i]) else f"{'-':>8}"
            lines.append(f"{pos:>4} {i:>3} {self.seeds[i]:>20} {early} {final}  {status}".rstrip())
        if self.kept:
            lines.append("kept: " + ", ".join(f"seed {self.seeds[i]} ({self.final[i]:.4f})" for i in self.kept))
        a = self.audit()
        if a is not None:
            rho = "undefined (fewer than 2 distinct scores)" if a.spearman is None else f"{a.spearman:+.3f}"
            lines.append(f"audit: Spearman rank correlation of early vs final scores = {rho} over {a.pairs} candidates")
            verdict = ("LOST it: pruning would have dropped the true best" if a.lost_best
                       else "kept it: pruning keeps the true best")
            lines.append(f"audit: the true best is seed {self.seeds[a.true_best]} (final {self.final[a.true_best]:.4f}, "
                         f"early rank {a.true_best_early_rank} of {p.n}); {verdict}")
            lines.append(f"audit: pruning saves {a.saved} of {a.plain} candidate-steps "
                         f"({100.0 * a.saved / a.plain:.0f}%)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def table_order(self) -> list[int]:
        """Rows of the report: the finished candidates by final value, then the pruned ones by early value."""
        finished = [i for i in order(self.final) if _ok(self.final[i])]
        return finished + [i for i in order(self.early) if i not in finished]
