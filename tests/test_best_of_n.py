"""ict_core.best_of_n without any host: seeds, the pruning plan and its cost, ranking of survivors, audit, report."""
from __future__ import annotations

import math

import pytest

from ict_core.best_of_n import Plan, Search, candidate_seeds, order, pick, prune_step, spearman
from ict_core.errors import InputError


def test_candidate_i_uses_seed_plus_i_and_wraps_in_comfyui_seed_range():
    assert candidate_seeds(100, 4) == [100, 101, 102, 103]
    top = 2 ** 64 - 1
    assert candidate_seeds(top - 1, 3) == [top - 1, top, 0]
    with pytest.raises(InputError, match="seed must be between"):
        candidate_seeds(-1, 2)


@pytest.mark.parametrize("prune_at,steps,expected", [
    (0.3, 20, 6),      # 0.3*20 is 6.000000000000001 in floats: still step 6
    (0.25, 20, 5), (0.26, 20, 6), (0.01, 20, 1), (1.0, 20, 20), (0.5, 3, 2), (0.1, 1, 1), (0.7, 10, 7),
])
def test_prune_step_is_ceil_of_fraction(prune_at, steps, expected):
    assert prune_step(prune_at, steps) == expected


def test_issue_example_cost_76_instead_of_160():
    plan = Plan.build(n=8, k=1, steps=20, prune_at=0.3, survivors=2, chunk=4)
    assert plan.prunes and plan.step == 6
    assert (plan.pruned_cost, plan.plain_cost, plan.cost, plan.finishers) == (76, 160, 76, 2)
    assert "76 candidate-steps (8x6 + 2x14) instead of 160" in plan.cost_line()
    audit = Plan.build(n=8, k=1, steps=20, prune_at=0.3, survivors=2, chunk=4, audit=True)
    assert (audit.cost, audit.pruned_cost, audit.finishers) == (160, 76, 8)


@pytest.mark.parametrize("kw", [dict(prune_at=1.0, survivors=2), dict(prune_at=0.3, survivors=8),
                                dict(prune_at=0.96, survivors=2)])  # ceil(0.96*20) = 20: nothing left to save
def test_no_pruning_when_it_saves_nothing(kw):
    plan = Plan.build(n=8, k=1, steps=20, chunk=1, **kw)
    assert not plan.prunes and plan.step == 20 and plan.cost == plan.plain_cost == 160 and plan.finishers == 8
    assert "no pruning" in plan.cost_line()


def test_survivors_are_capped_at_n_and_chunks_split_the_candidates():
    plan = Plan.build(n=5, k=2, steps=10, prune_at=0.5, survivors=9, chunk=2)
    assert plan.survivors == 5 and not plan.prunes
    assert plan.chunks(range(5)) == [[0, 1], [2, 3], [4]]
    assert plan.chunks([4, 1, 3]) == [[4, 1], [3]]


@pytest.mark.parametrize("kw,msg", [
    (dict(n=0), "n \\(candidates\\) must be at least 1"),
    (dict(k=0), "k \\(kept\\) must be between 1 and n=4"),
    (dict(k=5), "k \\(kept\\) must be between 1 and n=4"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(prune_at=0.0), "prune_at must be a fraction"),
    (dict(prune_at=1.5), "prune_at must be a fraction"),
    (dict(prune_at=float("nan")), "prune_at must be a fraction"),
    (dict(k=3, survivors=2), "survivors must be at least k=3"),
    (dict(chunk=0), "chunk must be at least 1"),
])
def test_bad_plans_are_refused_with_one_line(kw, msg):
    args = dict(n=4, k=1, steps=10, prune_at=0.3, survivors=2, chunk=1) | kw
    with pytest.raises(InputError, match=msg) as e:
        Plan.build(**args)
    assert "\n" not in str(e.value)


def test_order_and_pick_best_first_ties_by_index_unscored_last():
    vals = [0.2, None, 0.5, 0.2, float("nan"), 0.9]
    assert order(vals) == [5, 2, 0, 3, 1, 4]
    assert pick(vals, [0, 1, 2, 3], 2) == [2, 0]
    assert pick(vals, [1, 4, 3], 3) == [3, 1, 4]


def test_spearman_matches_the_textbook_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # 1 - 6*sum(d^2)/(n(n^2-1)) without ties: ranks (1,2,3,4,5) vs (2,1,4,3,5): d^2 sum 4 -> 1 - 24/120 = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties take their average rank: Pearson of (1.5,1.5,3) and (1,2,3) = sqrt(3)/2
    assert spearman([0.1, 0.1, 0.3], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert spearman([1.0], [2.0]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_pruned_search_keeps_the_best_survivors_and_reports_cost():
    plan = Plan.build(n=6, k=2, steps=10, prune_at=0.3, survivors=3, chunk=2)
    s = Search.start(plan, seed=40, by="ict")
    assert s.seeds == [40, 41, 42, 43, 44, 45]
    assert s.set_early([0.1, 0.5, 0.3, 0.9, 0.2, 0.4]) == [3, 1, 5]
    assert s.to_finish() == [3, 1, 5]
    assert s.set_final({3: 0.2, 1: 0.7, 5: 0.6}) == [1, 5]
    assert s.audit() is None
    rep = s.report()
    assert "pruned at step 3 of 10" in rep
    assert "cost with pruning: 39 candidate-steps (6x3 + 3x7) instead of 60" in rep
    assert "kept: seed 41 (0.7000), seed 45 (0.6000)\n" in rep + "\n"
    rows = [ln.split() for ln in rep.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert [r[1] for r in rows] == ["1", "5", "3", "2", "4", "0"]  # finished by final, then pruned by early
    assert [r[-1] for r in rows] == ["kept", "kept", "survivor", "pruned", "pruned", "pruned"]


def test_audit_reports_correlation_lost_best_and_savings():
    plan = Plan.build(n=5, k=1, steps=10, prune_at=0.5, survivors=2, chunk=5, audit=True)
    s = Search.start(plan, seed=7)
    s.set_early([0.5, 0.4, 0.3, 0.2, 0.1])          # survivors 0, 1
    assert s.to_finish() == [0, 1, 2, 3, 4]           # an audit finishes everyone, survivors first
    kept = s.set_final({0: 0.3, 1: 0.2, 2: 0.9, 3: 0.1, 4: 0.05})
    assert kept == [0]                                # the pick is what pruning gives, candidate 2 was pruned
    a = s.audit()
    assert a.lost_best and a.true_best == 2 and a.true_best_early_rank == 3
    assert a.saved == 50 - 35 and a.plain == 50 and a.pairs == 5
    assert a.spearman == pytest.approx(spearman([5, 4, 3, 2, 1], [3, 2, 5, 1, 0]))
    rep = s.report()
    assert f"Spearman rank correlation of early vs final scores = {a.spearman:+.3f} over 5" in rep
    assert "true best is seed 9" in rep and "LOST it" in rep
    assert "pruning saves 15 of 50 candidate-steps (30%)" in rep
    assert "pruned (audit: finished)" in rep and "this audit run spent all 50" in rep


def test_audit_that_keeps_the_best():
    plan = Plan.build(n=4, k=1, steps=4, prune_at=0.5, survivors=2, chunk=1, audit=True)
    s = Search.start(plan, seed=0)
    s.set_early([0.1, 0.2, 0.3, 0.4])
    s.set_final({0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4})
    a = s.audit()
    assert a.spearman == pytest.approx(1.0) and not a.lost_best and a.true_best == 3
    assert "kept it" in s.report()


def test_no_pruning_picks_over_all_and_unscorable_run_fails_clearly():
    plan = Plan.build(n=3, k=1, steps=5, prune_at=1.0, survivors=1, chunk=3)
    s = Search.start(plan, seed=1)
    assert s.to_finish() == [0, 1, 2]
    assert s.set_final({0: 0.1, 1: 0.3, 2: 0.2}) == [1]
    assert "no pruning (prune_at 1.0)" in s.report()
    s2 = Search.start(plan, seed=1)
    with pytest.raises(InputError, match="no candidate image could be scored"):
        s2.set_final({0: None, 1: None, 2: None})


def test_node_takes_ksampler_inputs_plus_the_search_and_imports_without_comfyui():
    import nodes
    from nodes.best_of_n import ICTBestOfNSampler

    assert nodes.NODE_CLASS_MAPPINGS["ICTBestOfNSampler"] is ICTBestOfNSampler
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ICTBestOfNSampler"] == "ICT Best-of-N Sampler"
    req = ICTBestOfNSampler.INPUT_TYPES()["required"]
    assert list(req) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                         "latent_image", "denoise", "vae", "ict_model", "prompt", "n", "k", "score_by", "prune_at",
                         "survivors", "chunk", "audit"]
    assert req["seed"][1]["max"] == 2 ** 64 - 1 and req["prune_at"][1]["max"] == 1.0
    assert req["score_by"][0] == ["ict", "hp", "ict*hp", "group"] and req["audit"][0] == "BOOLEAN"
    assert ICTBestOfNSampler.RETURN_NAMES == ("latent", "images", "seeds", "scores", "report")
    assert ICTBestOfNSampler.RETURN_TYPES == ("LATENT", "IMAGE", "INT", "FLOAT", "STRING")
    assert ICTBestOfNSampler.OUTPUT_IS_LIST == (False, False, True, True, False)


def test_node_refuses_bad_input_before_sampling_with_one_line():
    from nodes.best_of_n import ICTBestOfNSampler

    class FakeICT:  # only what the checks read; sampling would need ComfyUI
        class scorer:
            has_hp = False

    node = ICTBestOfNSampler()
    base = dict(model=None, seed=0, steps=10, cfg=7.0, sampler_name="euler", scheduler="normal", positive=None,
                negative=None, latent_image={"samples": None}, denoise=1.0, vae=None, ict_model=FakeICT(),
                prompt="a fox", n=4, k=1, score_by="ict", prune_at=0.5, survivors=2, chunk=1, audit=False)
    for kw, msg in [(dict(ict_model=object()), "connect an ICT Model Loader"),
                    (dict(score_by="ict*hp"), "needs an HP model"),
                    (dict(k=3), "survivors must be at least k=3"),
                    (dict(prompt="  "), "the prompt is empty"),
                    (dict(prompt="a\n---\nb"), "give one prompt")]:
        with pytest.raises(InputError, match=msg) as e:
            node.sample(**(base | kw))
        assert str(e.value).startswith("ICTBestOfNSampler") and "\n" not in str(e.value)


@pytest.mark.parametrize("sampler,chunk,prune_at,says", [
    ("euler", 1, 0.5, "bit for bit"), ("dpmpp_2m", 1, 1.0, "bit for bit"), ("euler", 4, 0.5, "up to the last bits"),
    ("dpmpp_2m", 1, 0.5, "restarts its multistep history"), ("euler_ancestral", 2, 0.5, "slightly different")])
def test_report_says_when_a_plain_ksampler_regenerates_the_kept_image(sampler, chunk, prune_at, says):
    from nodes.best_of_n import _reproducibility

    assert says in _reproducibility(Plan.build(8, 1, 10, prune_at, 2, chunk), sampler)
