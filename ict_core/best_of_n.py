"""Best-of-N seed search with early pruning: ranking, the audit and the report, without any host.

A host (the ComfyUI node) samples candidate i with seed + i and follows a Plan (best_of_n_plan): it
samples the running candidates up to each cut, scores the model's prediction of the final image there,
lets the best continue, scores the finished ones and keeps the best k.  Everything that decides or
counts lives here and in best_of_n_plan, so it is tested without a host; the host samples and scores.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .best_of_n_plan import SEED_SPACE, Cut, Plan, candidate_seeds, parse_counts, parse_fractions, prune_step
from .errors import InputError

__all__ = ["SEED_SPACE", "Cut", "Plan", "candidate_seeds", "parse_counts", "parse_fractions", "prune_step", "order",
           "pick", "spearman", "StageAudit", "Audit", "Search"]


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def order(values: Sequence[float | None]) -> list[int]:
    """Indices best first; ties keep index order; unscored (None or NaN) last, in index order."""
    return sorted(range(len(values)), key=lambda i: (not _ok(values[i]), -values[i] if _ok(values[i]) else 0.0, i))


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


@dataclass
class StageAudit:
    """What finishing every candidate showed about one cut."""
    step: int
    spearman: float | None   # rank correlation of this cut's scores with the final scores
    pairs: int
    best_rank: int           # 1-based rank of the true best among this cut's scores (all n in an audit)
    best_rank_running: int   # ... among the candidates this cut chose from (0: already cut before)
    running: int
    survived: bool           # the true best is among this cut's survivors


@dataclass
class Audit:
    true_best: int
    stages: list[StageAudit]
    lost_best: bool          # pruning drops the candidate with the best final score
    saved: int               # candidate-steps pruning saves
    plain: int


@dataclass
class Search:
    """The state of one run: seeds, each cut's and the final values per candidate, survivors, the kept ones."""
    plan: Plan
    seeds: list[int]
    by: str = "ict"
    stage: list[list[float | None]] = field(default_factory=list)  # per cut, per candidate
    final: list[float | None] = field(default_factory=list)
    alive: list[list[int]] = field(default_factory=list)           # each cut's survivors, best first
    kept: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, plan: Plan, seed: int, by: str = "ict") -> Search:
        return cls(plan, candidate_seeds(seed, plan.n), by, [], [None] * plan.n)

    def _before(self, j: int) -> list[int]:
        """The candidates cut j chooses from (all n for the first)."""
        return list(range(self.plan.n)) if j == 0 else list(self.alive[j - 1])

    def running(self, phase: int) -> list[int]:
        """The candidates sampled in phase `phase` (between cut phase-1 and cut phase), survivors first; an
        audit also runs the cut ones, after them."""
        alive = self._before(phase)
        if not self.plan.audit:
            return alive
        return alive + [i for i in range(self.plan.n) if i not in set(alive)]

    def set_stage(self, j: int, values: dict[int, float | None]) -> list[int]:
        """Cut j's values by candidate index: returns its survivors, best first."""
        if j != len(self.stage) or j >= len(self.plan.cuts):
            raise ValueError(f"cut {j} out of order ({len(self.stage)} of {len(self.plan.cuts)} done)")
        vals: list[float | None] = [None] * self.plan.n
        for i, v in values.items():
            vals[i] = v
        self.stage.append(vals)
        self.alive.append(pick(vals, self._before(j), self.plan.cuts[j].keep))
        return self.alive[-1]

    def contenders(self) -> list[int]:
        """The candidates the kept ones are chosen from: the last cut's survivors (all n without pruning)."""
        return list(self.alive[-1]) if self.alive else list(range(self.plan.n))

    def set_final(self, values: dict[int, float | None]) -> list[int]:
        """Final values by candidate index: returns the k kept, best first."""
        for i, v in values.items():
            self.final[i] = v
        self.kept = pick(self.final, self.contenders(), self.plan.k)
        if not any(_ok(self.final[i]) for i in self.kept):
            raise InputError("no candidate image could be scored; see the log for why")
        return self.kept

    def audit(self) -> Audit | None:
        if not (self.plan.audit and self.plan.prunes) or not any(_ok(v) for v in self.final):
            return None
        best = order(self.final)[0]
        stages = []
        for j, cut in enumerate(self.plan.cuts):
            vals = self.stage[j]
            both = [i for i in range(self.plan.n) if _ok(vals[i]) and _ok(self.final[i])]
            rho = spearman([vals[i] for i in both], [self.final[i] for i in both])
            before = self._before(j)
            in_running = [i for i in order(vals) if i in set(before)]
            rank_running = in_running.index(best) + 1 if best in in_running else 0
            stages.append(StageAudit(cut.step, rho, len(both), order(vals).index(best) + 1, rank_running,
                                     len(before), best in self.alive[j]))
        return Audit(best, stages, best not in self.alive[-1], self.plan.plain_cost - self.plan.pruned_cost,
                     self.plan.plain_cost)

    def table_order(self) -> list[int]:
        """Rows of the report: the finished candidates by final value, then the cut ones, latest cut first,
        each by its last score."""
        rows = [i for i in order(self.final) if _ok(self.final[i])]
        for j in reversed(range(len(self.stage))):
            rows += [i for i in order(self.stage[j]) if i not in rows and _ok(self.stage[j][i])]
        return rows + [i for i in range(self.plan.n) if i not in rows]

    def _status(self, i: int, kept: set[int]) -> str:
        if i in kept:
            return "kept"
        for j, cut in enumerate(self.plan.cuts):
            if i in self._before(j) and i not in self.alive[j]:
                return f"cut at step {cut.step}" + (" (audit: finished)" if self.plan.audit else "")
        return "finished" if _ok(self.final[i]) else "not scored"

    def report(self, header: str = "") -> str:
        p = self.plan
        lines = [header] if header else []
        lines.append(f"best-of-{p.n}: seeds {self.seeds[0]}..{self.seeds[-1]} (candidate i uses seed+i), keep {p.k}, "
                     f"score by {self.by}, chunk {p.chunk}")
        lines.extend(p.describe())
        sw = max(4, max(len(str(s)) for s in self.seeds))
        cols = [f"@{c.step}" for c in p.cuts[:len(self.stage)]]
        lines.append(f"{'rank':>4} {'#':>3} {'seed':>{sw}} " + "".join(f"{c:>8} " for c in cols) + f"{'final':>8}"
                     "  status")
        kept = set(self.kept)

        def cell(v):
            return f"{v:8.4f}" if _ok(v) else f"{'-':>8}"

        for pos, i in enumerate(self.table_order(), 1):
            early = "".join(cell(vals[i]) + " " for vals in self.stage)
            lines.append(f"{pos:>4} {i:>3} {self.seeds[i]:>{sw}} {early}{cell(self.final[i])}  "
                         f"{self._status(i, kept)}")
        if self.kept:
            lines.append("kept: " + ", ".join(f"seed {self.seeds[i]} ({self.final[i]:.4f})" for i in self.kept))
        a = self.audit()
        if a is not None:
            lines.extend(self._audit_lines(a))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _audit_lines(self, a: Audit) -> list[str]:
        n = self.plan.n
        out = [f"audit: the true best is seed {self.seeds[a.true_best]} (final {self.final[a.true_best]:.4f})"]
        for j, s in enumerate(a.stages):
            rho = "undefined (fewer than 2 distinct scores)" if s.spearman is None else f"{s.spearman:+.3f}"
            out.append(f"audit: cut {j + 1} at step {s.step}: Spearman rank correlation of early vs final scores "
                       f"= {rho} over {s.pairs} candidates")
            if s.best_rank_running == 0:
                where = "already cut"
            else:
                where = (f"ranks {s.best_rank} of {n} there ({s.best_rank_running} of the {s.running} running): "
                         + ("survives" if s.survived else "cut"))
            out.append(f"audit: cut {j + 1}: the true best {where}")
        out.append("audit: LOST it: pruning would have dropped the true best" if a.lost_best
                   else "audit: kept it: pruning keeps the true best")
        out.append(f"audit: pruning saves {a.saved} of {a.plain} candidate-steps ({100.0 * a.saved / a.plain:.0f}%)")
        return out
