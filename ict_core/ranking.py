"""Ranking rules over score results: one place for rank, best-of-N, top-k and minimum score."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .cli_output import one_line
from .errors import InputError

BY = ("ict", "hp", "ict*hp", "group")


def sort_key(values):
    """Ascending sort keys that put the largest value first and NaN after every number: the one definition
    of "best first, NaN last" (rank, the gallery search and best-of-N sort by it; ties are left to the caller).
    Takes a float or a numpy array; None counts as NaN."""
    v = np.asarray(np.nan if values is None else values, dtype=np.float64)
    return np.where(np.isnan(v), np.inf, -v)


def _check_by(by: str, results: Sequence) -> None:
    if by not in BY:
        raise InputError(f"unknown ranking {by!r}; use one of {', '.join(BY)}")
    if by != "ict" and any(r.error is None and r.hp_raw is None for r in results):
        raise InputError(f"ranking by {by!r} needs an HP model; load one (--hp-model / hp_model) or rank by 'ict'")
    if by != "hp" and any(r.error is None and r.ict is None for r in results):
        raise InputError(f"ranking by {by!r} needs ICT scores, and ICT needs the prompt; give it, or rank by 'hp'")


def values(results: Sequence, by: str) -> list[float | None]:
    """The value each image is ranked by; None for images that failed.

    group: ict_i * softmax_j(hp_raw_j), the softmax over the images that share image i's prompt
    (the official evaluation rule)."""
    _check_by(by, results)
    if by == "ict":
        return [r.ict if r.error is None else None for r in results]
    if by == "hp":
        return [r.hp if r.error is None else None for r in results]
    if by == "ict*hp":
        return [r.ict * r.hp if r.error is None else None for r in results]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        if r.error is None:
            groups.setdefault(r.prompt, []).append(i)
    out: list[float | None] = [None] * len(results)
    for idx in groups.values():
        finite = [i for i in idx if math.isfinite(results[i].hp_raw)]
        top = max((results[i].hp_raw for i in finite), default=0.0)
        exps = {i: math.exp(results[i].hp_raw - top) for i in finite}
        total = sum(exps.values())
        for i in idx:  # an image whose HP is not a number has no share of the softmax: NaN, ranked last
            out[i] = results[i].ict * (exps[i] / total) if i in exps else math.nan
    return out


def _is_nan(v: float | None) -> bool:
    return v is not None and v != v


def rank(results: Sequence, by: str) -> list[int]:
    """Indices best first (sort_key); ties keep input order; NaN values come after every number, then failed
    images, each in input order."""
    vals = values(results, by)
    return sorted(range(len(vals)), key=lambda i: (vals[i] is None, float(sort_key(vals[i])), i))


@dataclass
class Selection:
    indices: list[int]
    values: list[float]
    notes: list[str] = field(default_factory=list)


def select(results: Sequence, by: str, k: int = 1, min_score: float | None = None) -> Selection:
    """The k best images reaching min_score, best first. Never empty while one image could be scored:
    if none reaches min_score the single best is kept and a note says so."""
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if min_score is not None and _is_nan(min_score):
        raise InputError("min_score is NaN, which no score reaches; give a number (or none to keep all)")
    order = rank(results, by)
    vals = values(results, by)
    scorable = [i for i in order if vals[i] is not None]
    if not scorable:
        raise InputError("no image could be scored; see the errors of each image")
    notes = []
    if k > len(scorable):
        notes.append(f"k={k} is more than the {len(scorable)} scored images: keeping all {len(scorable)}")
        k = len(scorable)
    picks = scorable
    if min_score is not None:
        picks = [i for i in scorable if vals[i] >= min_score]
        if not picks:
            best = scorable[0]
            notes.append(f"no image reaches min_score {min_score:g} by {by}; keeping the single best "
                         f"(#{best}, {vals[best]:.4f})")
            picks = [best]
    picks = picks[:k]
    return Selection(picks, [vals[i] for i in picks], notes)


def report(results: Sequence, by: str, selection: Selection | None = None) -> str:
    """A plain-text table (one line per image, best first) shared by the CLI, nodes and webui."""
    vals = values(results, by)
    order = rank(results, by)
    picked = set(selection.indices) if selection else set()
    has_hp = any(r.hp is not None for r in results)
    extra = by not in ("ict", "hp")  # a column for the ranking value unless it is the ict or hp column itself
    head = (f"{'rank':>4} {'#':>3} {'ict':>7}" + (f" {'hp':>7}" if has_hp else "") + (f" {by:>8}" if extra else "")
            + "  image")
    lines = [head]
    for pos, i in enumerate(order, 1):
        r = results[i]
        mark = "*" if i in picked else " "
        if r.error is not None:
            lines.append(f"{'-':>4} {i:>3} error: {one_line(r.error)}")
            continue
        hp = f" {r.hp:7.4f}" if has_hp else ""
        value = f" {vals[i]:8.4f}" if extra else ""
        ict = f"{r.ict:7.4f}" if r.ict is not None else f"{'-':>7}"  # HP alone: no prompt, no ICT
        lines.append(f"{pos:>4}{mark}{i:>3} {ict}{hp}{value}  {one_line(r.label or '')}".rstrip())
    if selection:
        lines.extend(f"note: {n}" for n in selection.notes)
    return "\n".join(lines)
