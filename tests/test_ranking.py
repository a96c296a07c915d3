"""Ranking rules: ties by input order, the official group rule, best-of-N and minimum score."""
from __future__ import annotations

import math

import pytest

from ict_core import ranking
from ict_core.errors import InputError
from ict_core.scorer import ScoreResult


def R(i, ict, hp_raw=None, prompt="p", error=None):
    hp = None if hp_raw is None else 1 / (1 + math.exp(-hp_raw))
    return ScoreResult(i, None, prompt, ict=None if error else ict, hp=None if error else hp,
                       hp_raw=None if error else hp_raw, score=None, error=error)


def test_ties_keep_input_order_and_failures_go_last():
    rs = [R(0, 0.2), R(1, 0.3), R(2, 0.0, error="bad"), R(3, 0.3), R(4, 0.2)]
    assert ranking.rank(rs, "ict") == [1, 3, 0, 4, 2]


def test_group_rule_is_ict_times_softmax_per_prompt():
    rs = [R(0, 0.30, 1.0, "a"), R(1, 0.25, 3.0, "a"), R(2, 0.40, 0.0, "b"), R(3, 0.10, 2.0, "a")]
    vals = ranking.values(rs, "group")
    za = math.exp(1.0) + math.exp(3.0) + math.exp(2.0)
    assert vals[0] == pytest.approx(0.30 * math.exp(1.0) / za)
    assert vals[1] == pytest.approx(0.25 * math.exp(3.0) / za)
    assert vals[2] == pytest.approx(0.40)  # alone in its group
    assert ranking.rank(rs, "group")[0] == 2


def test_ict_times_hp_and_hp():
    rs = [R(0, 0.3, -2.0), R(1, 0.2, 2.0)]
    assert ranking.rank(rs, "ict") == [0, 1]
    assert ranking.rank(rs, "hp") == [1, 0]
    assert ranking.rank(rs, "ict*hp") == [1, 0]


def test_select_k_clamped_and_min_score_fallback():
    rs = [R(0, 0.1), R(1, 0.5), R(2, 0.3)]
    sel = ranking.select(rs, "ict", k=10)
    assert sel.indices == [1, 2, 0] and "k=10" in sel.notes[0]
    sel = ranking.select(rs, "ict", k=2, min_score=0.2)
    assert sel.indices == [1, 2] and not sel.notes
    sel = ranking.select(rs, "ict", k=2, min_score=0.9)
    assert sel.indices == [1] and "no image reaches min_score" in sel.notes[0]


def test_bad_requests():
    rs = [R(0, 0.1)]
    with pytest.raises(InputError, match="needs an HP model"):
        ranking.rank(rs, "ict*hp")
    with pytest.raises(InputError, match="unknown ranking"):
        ranking.rank(rs, "clip")
    with pytest.raises(InputError, match="at least 1"):
        ranking.select(rs, "ict", k=0)
    with pytest.raises(InputError, match="no image could be scored"):
        ranking.select([R(0, 0, error="x")], "ict")


def test_report_lists_best_first_and_notes():
    rs = [R(0, 0.1, 0.0), R(1, 0.5, 0.0), R(2, 0.0, error="cannot read")]
    sel = ranking.select(rs, "ict*hp", k=5)
    text = ranking.report(rs, "ict*hp", sel)
    lines = text.splitlines()
    assert lines[1].split()[1] == "1" and "error: cannot read" in text and text.endswith(sel.notes[0])


def test_hp_alone_ranks_by_hp_only():
    """Results scored without a prompt (HP alone) have no ict: only 'hp' can rank them."""
    rs = [R(0, None, -1.0, ""), R(1, None, 2.0, ""), R(2, None, 0.5, "")]
    assert ranking.rank(rs, "hp") == [1, 2, 0]
    for by in ("ict", "ict*hp", "group"):
        with pytest.raises(InputError, match="needs ICT scores.*rank by 'hp'"):
            ranking.values(rs, by)
    lines = ranking.report(rs, "hp").splitlines()
    assert len(lines) == 4 and lines[1].split()[:3] == ["1", "1", "-"]


def test_nan_sorts_last_everywhere():
    """Issue 10, defect 10: with [0.2, nan, 0.9, 0.5], select(k=1) picked 0.2 (NaN compares false)."""
    nan = float("nan")
    rs = [R(0, 0.2, 0.0), R(1, nan, 0.0), R(2, 0.9, 0.0), R(3, 0.5, 0.0), R(4, 0.1, error="bad")]
    assert ranking.rank(rs, "ict") == [2, 3, 0, 1, 4]
    assert ranking.select(rs, "ict", k=1).indices == [2]
    assert ranking.select(rs, "ict", k=2, min_score=0.3).indices == [2, 3]
    assert ranking.select(rs, "ict*hp", k=1).indices == [2]
    lines = ranking.report(rs, "ict").splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["2", "3", "0", "1", "4"]
    with pytest.raises(InputError, match="NaN"):
        ranking.select(rs, "ict", min_score=nan)


def test_group_rule_with_a_nan_hp():
    """An image whose HP is NaN takes no share of its group's softmax; the others keep theirs."""
    nan = float("nan")
    rs = [R(0, 0.3, 1.0), R(1, 0.4, nan), R(2, 0.2, 0.0)]
    vals = ranking.values(rs, "group")
    z = math.exp(1.0) + math.exp(0.0)
    assert vals[0] == pytest.approx(0.3 * math.exp(1.0) / z) and vals[2] == pytest.approx(0.2 / z)
    assert math.isnan(vals[1]) and ranking.rank(rs, "group") == [0, 2, 1]
