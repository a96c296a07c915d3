"""ict_core.best_of_n without any host: seeds, the pruning plan and its cost, ranking of survivors, audit, report."""
from __future__ import annotations

import math

import pytest

import v3_standin
from ict_core.best_of_n import Cut, Plan, Search, candidate_seeds, order, pick, prune_step, spearman
from ict_core.errors import InputError

v3_standin.install()  # the node module imports comfy_api.latest; without ComfyUI the stand-in provides it


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
    assert plan.prunes and plan.cuts == (Cut(6, 2, 0.3),) and plan.bounds == [0, 6, 20]
    assert (plan.pruned_cost, plan.plain_cost, plan.cost, plan.finishers) == (76, 160, 76, 2)
    text = "\n".join(plan.describe())
    assert "cost with pruning: 76 candidate-steps (8x6 + 2x14)" in text and "instead of 160" in text
    audit = Plan.build(n=8, k=1, steps=20, prune_at=0.3, survivors=2, chunk=4, audit=True)
    assert (audit.cost, audit.pruned_cost, audit.finishers) == (160, 76, 8)


def test_funnel_plan_counts_each_stage():
    plan = Plan.build(n=16, k=1, steps=8, prune_at="0.25, 0.5", survivors="4, 2", chunk=1)
    assert plan.cuts == (Cut(2, 4, 0.25), Cut(4, 2, 0.5)) and plan.bounds == [0, 2, 4, 8]
    assert plan.phase_costs() == [(16, 2), (4, 2), (2, 4)] and plan.pruned_cost == 48 and plan.plain_cost == 128
    text = "\n".join(plan.describe())
    assert "funnel: prune_at 0.25, 0.5, survivors 4, 2 (2 cuts)" in text
    assert "steps 1-2: 16 candidates x 2 = 32 candidate-steps, then the best 4" in text
    assert "steps 3-4: 4 candidates x 2 = 8 candidate-steps, then the best 2" in text
    assert "steps 5-8: 2 candidates x 4 = 8 candidate-steps" in text
    assert "(16x2 + 4x2 + 2x4)" in text and "instead of 128 for a plain best-of-16 (16x8): 80 fewer (62%)" in text
    one = "\n".join(Plan.build(n=3, k=1, steps=3, prune_at="0.3, 0.6", survivors="2, 1", chunk=1).describe())
    assert "  step 1: 3 candidates x 1 = 3 candidate-steps, then the best 2" in one
    assert "  step 3: 1 candidate x 1 = 1 candidate-step\n" in one


@pytest.mark.parametrize("prune_at,survivors", [(0.5, 2), ("0.5", "2"), ([0.5], [2]), ("0.5", 2.0), (" 0.5 ", " 2 ")])
def test_a_saved_workflow_number_or_text_gives_the_same_single_cut(prune_at, survivors):
    """A workflow saved with the FLOAT/INT widgets holds 0.5 and 2 as numbers; ComfyUI hands a STRING widget
    str(value); both are one cut."""
    plan = Plan.build(n=8, k=1, steps=10, prune_at=prune_at, survivors=survivors, chunk=1)
    assert plan.cuts == (Cut(5, 2, 0.5),) and plan.prune_at == (0.5,) and plan.survivors == (2,)


@pytest.mark.parametrize("kw,says", [
    (dict(prune_at=1.0, survivors=2), "prune_at 1.0: no cut"),
    (dict(prune_at=0.3, survivors=8), "survivors 8 at prune_at 0.3 is not fewer than the 8 candidates running"),
    (dict(prune_at=0.96, survivors=2), "prune_at 0.96 falls on the last step (20 of 20)"),
    (dict(prune_at=0.3, survivors=9), "survivors 9 at prune_at 0.3"),  # the value the user set, not n
])
def test_no_pruning_when_it_saves_nothing_says_why_with_the_value_set(kw, says):
    plan = Plan.build(n=8, k=1, steps=20, chunk=1, **kw)
    assert not plan.prunes and plan.cost == plan.plain_cost == 160 and plan.finishers == 8
    text = "\n".join(plan.describe())
    assert says in text and "no pruning" in text


def test_survivors_below_k_is_refused_only_when_that_stage_prunes():
    plan = Plan.build(n=4, k=3, steps=10, prune_at=1.0, survivors=2, chunk=1)  # nothing pruned: survivors unused
    assert not plan.prunes
    plan = Plan.build(n=1, k=1, steps=10, prune_at=0.5, survivors=1, chunk=1)  # survivors == n: no cut
    assert not plan.prunes
    with pytest.raises(InputError, match="survivors 2 at prune_at 0.5 must be at least k=3"):
        Plan.build(n=4, k=3, steps=10, prune_at=0.5, survivors=2, chunk=1)


def test_two_fractions_on_one_step_are_one_cut_and_a_non_cut_stage_is_skipped():
    plan = Plan.build(n=8, k=1, steps=4, prune_at="0.2, 0.25, 0.9", survivors="4, 3, 2", chunk=1)
    assert plan.cuts == (Cut(1, 3, 0.25),)  # 0.2 and 0.25 -> step 1; 0.9 -> step 4 (the last)
    text = "\n".join(plan.describe())
    assert "prune_at 0.2 and 0.25 both fall on step 1: one cut to 3" in text
    assert "prune_at 0.9 falls on the last step (4 of 4)" in text


def test_survivors_are_chunked_and_not_capped_silently():
    plan = Plan.build(n=5, k=2, steps=10, prune_at=0.5, survivors=9, chunk=2)
    assert not plan.prunes and plan.survivors == (9,)
    assert plan.chunks(range(5)) == [[0, 1], [2, 3], [4]]
    assert plan.chunks([4, 1, 3]) == [[4, 1], [3]]


@pytest.mark.parametrize("kw,msg", [
    (dict(n=0), "n \\(candidates\\) must be at least 1"),
    (dict(k=0), "k \\(kept\\) must be between 1 and n=4"),
    (dict(k=5), "k \\(kept\\) must be between 1 and n=4"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(prune_at=0.0), "prune_at must be fractions"),
    (dict(prune_at=1.5), "prune_at must be fractions"),
    (dict(prune_at=float("nan")), "prune_at must be fractions"),
    (dict(prune_at="0.5, 0.25", survivors="2, 1"), "prune_at fractions must increase"),
    (dict(prune_at="half"), "prune_at 'half' is not a number"),
    (dict(prune_at=""), "prune_at is empty"),
    (dict(prune_at="0.25,,0.5"), "has an empty item"),
    (dict(prune_at="0.1," * 100), "characters long"),
    (dict(prune_at=",".join(["0.5"] * 9), survivors="1"), "at most 8 stages"),
    (dict(prune_at="0.25, 0.5", survivors="2"), "give one survivors count per prune_at fraction"),
    (dict(prune_at="0.25, 0.5", survivors="1, 2"), "survivors must not grow"),
    (dict(survivors="0"), "survivors '0' is not a whole number"),
    (dict(survivors="1.5"), "survivors '1.5' is not a whole number"),
    (dict(survivors="1e400"), "survivors '1e400' is not a whole number"),
    (dict(k=3, survivors=2), "survivors 2 at prune_at 0.3 must be at least k=3"),
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


def _rows(rep):
    return [ln.split() for ln in rep.splitlines() if ln.split() and ln.split()[0].isdigit()]


def test_pruned_search_keeps_the_best_survivors_and_reports_cost():
    plan = Plan.build(n=6, k=2, steps=10, prune_at=0.3, survivors=3, chunk=2)
    s = Search.start(plan, seed=40, by="ict")
    assert s.seeds == [40, 41, 42, 43, 44, 45]
    assert s.running(0) == [0, 1, 2, 3, 4, 5]
    assert s.set_stage(0, dict(enumerate([0.1, 0.5, 0.3, 0.9, 0.2, 0.4]))) == [3, 1, 5]
    assert s.running(1) == [3, 1, 5]
    assert s.set_final({3: 0.2, 1: 0.7, 5: 0.6}) == [1, 5]
    assert s.audit() is None
    rep = s.report()
    assert "steps 1-3: 6 candidates x 3 = 18 candidate-steps, then the best 3" in rep
    assert "cost with pruning: 39 candidate-steps (6x3 + 3x7)" in rep and "instead of 60" in rep
    assert "kept: seed 41 (0.7000), seed 45 (0.6000)\n" in rep + "\n"
    rows = _rows(rep)
    assert [r[1] for r in rows] == ["1", "5", "3", "2", "4", "0"]  # finished by final, then cut ones by score
    assert [" ".join(r[5:]) for r in rows] == ["kept", "kept", "finished"] + ["cut at step 3"] * 3


def test_funnel_search_keeps_the_best_of_the_running_at_each_cut():
    plan = Plan.build(n=6, k=1, steps=8, prune_at="0.25, 0.5", survivors="3, 2", chunk=1)
    s = Search.start(plan, seed=0)
    assert s.set_stage(0, dict(enumerate([0.6, 0.1, 0.5, 0.9, 0.2, 0.4]))) == [3, 0, 2]
    assert s.running(1) == [3, 0, 2]
    assert s.set_stage(1, {3: 0.1, 0: 0.7, 2: 0.3}) == [0, 2]
    assert s.running(2) == [0, 2]
    assert s.set_final({0: 0.2, 2: 0.8}) == [2]
    rep = s.report()
    header = next(ln for ln in rep.splitlines() if ln.lstrip().startswith("rank"))
    assert header.split() == ["rank", "#", "seed", "@2", "@4", "final", "status"]
    rows = _rows(rep)
    assert [r[1] for r in rows] == ["2", "0", "3", "5", "4", "1"]
    assert [" ".join(r[6:]) for r in rows] == ["kept", "finished", "cut at step 4"] + ["cut at step 2"] * 3
    with pytest.raises(ValueError, match="out of order"):
        s.set_stage(1, {})


def test_funnel_audit_reports_each_cut():
    plan = Plan.build(n=5, k=1, steps=8, prune_at="0.25, 0.5", survivors="3, 1", chunk=5, audit=True)
    s = Search.start(plan, seed=7)
    assert s.running(0) == [0, 1, 2, 3, 4]
    s.set_stage(0, dict(enumerate([0.5, 0.4, 0.3, 0.2, 0.1])))       # survivors 0, 1, 2
    assert s.running(1) == [0, 1, 2, 3, 4]                             # an audit runs everyone, survivors first
    s.set_stage(1, dict(enumerate([0.3, 0.2, 0.35, 0.9, 0.0])))       # among 0, 1, 2: 2 survives
    assert s.alive == [[0, 1, 2], [2]]
    kept = s.set_final(dict(enumerate([0.3, 0.2, 0.1, 0.9, 0.05])))  # true best: 3, cut at the first cut
    assert kept == [2]                                                 # the pick is what pruning gives
    a = s.audit()
    assert a.true_best == 3 and a.lost_best and a.saved == 40 - (5 * 2 + 3 * 2 + 1 * 4) and a.plain == 40
    assert [st.step for st in a.stages] == [2, 4]
    assert (a.stages[0].best_rank, a.stages[0].best_rank_running, a.stages[0].survived) == (4, 4, False)
    assert (a.stages[1].best_rank, a.stages[1].best_rank_running, a.stages[1].survived) == (1, 0, False)
    assert a.stages[1].spearman == pytest.approx(spearman([0.3, 0.2, 0.35, 0.9, 0.0], [0.3, 0.2, 0.1, 0.9, 0.05]))
    rep = s.report()
    assert "audit: the true best is seed 10 (final 0.9000)" in rep
    assert "audit: cut 1: the true best ranks 4 of 5 there (4 of the 5 running): cut" in rep
    assert "audit: cut 2: the true best already cut" in rep
    assert f"audit: cut 2 at step 4: Spearman rank correlation of early vs final scores = " \
           f"{a.stages[1].spearman:+.3f} over 5 candidates" in rep
    assert "LOST it" in rep and "pruning saves 20 of 40 candidate-steps (50%)" in rep
    assert "cut at step 2 (audit: finished)" in rep and "this audit run spent all 40" in rep


def test_audit_that_keeps_the_best():
    plan = Plan.build(n=4, k=1, steps=4, prune_at=0.5, survivors=2, chunk=1, audit=True)
    s = Search.start(plan, seed=0)
    s.set_stage(0, dict(enumerate([0.1, 0.2, 0.3, 0.4])))
    s.set_final(dict(enumerate([0.1, 0.2, 0.3, 0.4])))
    a = s.audit()
    assert a.stages[0].spearman == pytest.approx(1.0) and not a.lost_best and a.true_best == 3
    rep = s.report()
    assert "kept it" in rep and "the true best ranks 1 of 4 there (1 of the 4 running): survives" in rep


def test_no_pruning_picks_over_all_and_unscorable_run_fails_clearly():
    plan = Plan.build(n=3, k=1, steps=5, prune_at=1.0, survivors=1, chunk=3)
    s = Search.start(plan, seed=1)
    assert s.running(0) == [0, 1, 2]
    assert s.set_final({0: 0.1, 1: 0.3, 2: 0.2}) == [1]
    rep = s.report()
    assert "no pruning (prune_at 1.0: no cut)" in rep and [" ".join(r[4:]) for r in _rows(rep)] == [
        "kept", "finished", "finished"]
    s2 = Search.start(plan, seed=1)
    with pytest.raises(InputError, match="no candidate image could be scored"):
        s2.set_final({0: None, 1: None, 2: None})


def test_node_is_v3_with_ksampler_inputs_plus_the_search_and_imports_without_comfyui():
    import nodes
    from nodes.best_of_n import ICTBestOfNSampler

    assert nodes.NODE_CLASS_MAPPINGS["ICTBestOfNSampler"] is ICTBestOfNSampler
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ICTBestOfNSampler"] == "ICT Best-of-N Sampler"
    schema = ICTBestOfNSampler.GET_SCHEMA()
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                            "latent_image", "denoise", "vae", "ict_model", "prompt", "n", "k", "score_by",
                            "prune_at", "survivors", "chunk", "audit"]  # the classic names and order
    assert inputs["seed"].max == 2 ** 64 - 1 and inputs["seed"].control_after_generate
    # text widgets (a funnel is a list); a saved workflow's number arrives as its text (see the plan tests)
    assert inputs["prune_at"].io_type == "STRING" and inputs["prune_at"].default == "0.5"
    assert inputs["survivors"].io_type == "STRING" and inputs["survivors"].default == "2"
    assert inputs["score_by"].options == ["ict", "hp", "ict*hp", "group"] and inputs["audit"].io_type == "BOOLEAN"
    assert inputs["ict_model"].io_type == "ICT_MODEL"
    assert [o.display_name for o in schema.outputs] == ["latent", "images", "seeds", "scores", "report"]
    assert [o.io_type for o in schema.outputs] == ["LATENT", "IMAGE", "INT", "FLOAT", "STRING"]
    assert [o.is_output_list for o in schema.outputs] == [False, False, True, True, False]
    assert schema.is_output_node and "EXTRA_PNGINFO" in [str(h.value) for h in schema.hidden]


def test_node_refuses_bad_input_before_sampling_with_one_line():
    from nodes.best_of_n import ICTBestOfNSampler

    class FakeICT:  # only what the checks read; sampling would need ComfyUI
        class scorer:
            has_hp = False

    base = dict(model=None, seed=0, steps=10, cfg=7.0, sampler_name="euler", scheduler="normal", positive=None,
                negative=None, latent_image={"samples": None}, denoise=1.0, vae=None, ict_model=FakeICT(),
                prompt="a fox", n=4, k=1, score_by="ict", prune_at="0.5", survivors="2", chunk=1, audit=False)
    for kw, msg in [(dict(ict_model=object()), "connect an ICT Model Loader"),
                    (dict(score_by="ict*hp"), "needs an HP model"),
                    (dict(k=3), "survivors 2 at prune_at 0.5 must be at least k=3"),
                    (dict(prune_at="0.5, 0.25"), "prune_at fractions must increase"),
                    (dict(survivors="two"), "survivors 'two' is not a whole number"),
                    (dict(prompt="  "), "the prompt is empty"),
                    (dict(prompt="a\n---\nb"), "give one prompt"),
                    (dict(latent_image="x"), "latent_image must be a LATENT")]:
        with pytest.raises(InputError, match=msg) as e:
            v3_standin.run(ICTBestOfNSampler, **(base | kw))
        assert str(e.value).startswith("ICTBestOfNSampler") and "\n" not in str(e.value)


@pytest.mark.parametrize("sampler,chunk,run_chunk,noisy,own,prune_at,says", [
    ("euler", 1, 1, False, False, 0.5, "bit for bit"), ("dpmpp_2m", 1, 1, False, False, 1.0, "bit for bit"),
    ("euler", 4, 4, False, False, 0.5, "up to the last bits"),
    ("euler_ancestral", 2, 2, True, True, 0.5, "up to the last bits"),
    ("dpmpp_2m", 1, 1, False, False, 0.5, "restarts its multistep history"),
    ("dpmpp_2m_sde", 1, 1, True, True, 0.5, "restarts its multistep history"),
    ("euler_ancestral", 1, 1, True, True, 0.5, "bit for bit"),
    ("lcm", 1, 1, True, False, 0.5, "restarts its per-step noise"),
    ("sa_solver", 4, 1, True, False, 1.0, "sampled one at a time (chunk 1 instead of 4)")])
def test_report_says_when_a_plain_ksampler_regenerates_the_kept_image(sampler, chunk, run_chunk, noisy, own,
                                                                       prune_at, says):
    from types import SimpleNamespace

    from nodes.best_of_n import _reproducibility

    run = SimpleNamespace(chunk=run_chunk, noisy=noisy, own_noise=own,
                          shared_stream=f"{sampler} draws per-step noise from one stream per batch")
    notes = _reproducibility(Plan.build(8, 1, 10, prune_at, 2, chunk), sampler, run)
    assert says in " ".join(notes)
    if run_chunk < chunk:
        assert notes[-1].endswith("bit for bit")
