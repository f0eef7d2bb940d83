"""Stopping rules (fastunlearn.evaluation.stopping) and trajectory files
(fastunlearn.evaluation.stop_callback): parsing and its errors, the controller's decisions on synthetic
trajectories (first crossing, patience, restore policies, a dip-and-recover retain curve, generation
gated without changing any decision), the CSV and PNG. Pure logic: no model."""

import csv
import math
import random

import pytest
from helpers.stopping import harmonic

from fastunlearn.evaluation import stopping as S
from fastunlearn.evaluation.stop_callback import Trajectory, plot_trajectory, read_trajectory

# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------


def test_parse_threshold_rules():
    rule = S.parse_stop_rule(" forget.prob <= 0.05 , retain.rougeL>=0.5,forget.nll>2.5")
    assert rule.name == "threshold" and rule.resolved
    assert rule.bounds == (
        S.Bound("forget.prob", "<=", 0.05),
        S.Bound("retain.rougeL", ">=", 0.5),
        S.Bound("forget.nll", ">", 2.5),
    )
    assert rule.metrics == ("forget.prob", "retain.rougeL", "forget.nll")
    assert S.parse_stop_rule("threshold:forget.acc<0.3").bounds == (S.Bound("forget.acc", "<", 0.3),)
    # Two bounds on one metric: a band (redundant or not, as long as something satisfies both).
    assert len(S.parse_stop_rule("forget.prob>=0.1,forget.prob<=0.1,forget.prob<0.5").bounds) == 3
    assert str(rule) == "threshold: forget.prob<=0.05 and retain.rougeL>=0.5 and forget.nll>2.5"


def test_parse_extraction_and_tofu_rules(tmp_path):
    rule = S.parse_stop_rule("extraction:ma=0.2994,el10=0.0499")
    assert rule.bounds == (S.Bound("forget.ma", "<", 0.2994), S.Bound("forget.el10", "<", 0.0499))
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text('{"text": "never seen"}\n')
    rule = S.parse_stop_rule("extraction", unseen=str(unseen), data={"forget": "text"})
    assert not rule.resolved and rule.spec.measured == ("unseen.ma", "unseen.el10")
    assert rule.spec.source == "model"
    resolved = rule.with_reference({"unseen.ma": 0.25, "unseen.el10": 0.04})
    assert resolved.bounds == (S.Bound("forget.ma", "<", 0.25), S.Bound("forget.el10", "<", 0.04))
    assert S.parse_stop_rule("extraction", unseen=["a text", "another"]).input == ["a text", "another"]

    rule = S.parse_stop_rule("tofu:acc=0.41,rougeL=0.38", data={"forget": "qa"})
    assert rule.bounds == (S.Bound("forget.acc", "<=", 0.41), S.Bound("forget.rougeL", "<=", 0.38))
    rule = S.parse_stop_rule("tofu", reference_model=str(tmp_path))
    assert rule.spec.source == "reference_model" and rule.spec.measured == rule.metrics
    # A measured reference may make one bound trivially true (the retain-only model answers every
    # forget question perfectly in ROUGE terms): that is data, not a user error.
    assert rule.with_reference({"forget.acc": 0.5, "forget.rougeL": 1.0}).bounds[1].value == 1.0


def test_parse_muse_rule(tmp_path):
    """MUSE's stopping point (Shi et al. 2024): forget KnowMem at or below the retrained model's, given
    as a number or measured on the retrained model; its metrics need a MUSE directory."""
    muse = {"forget": "text", "retain": "text", "muse": "muse"}
    rule = S.parse_stop_rule("muse:knowmem_forget=0.3", data=muse)
    assert rule.bounds == (S.Bound("muse.knowmem_forget", "<=", 0.3),) and rule.reference == {
        "knowmem_forget": 0.3
    }
    rule = S.parse_stop_rule("muse", retrain_model=str(tmp_path), data=muse)
    assert not rule.resolved and rule.spec.source == "reference_model"
    assert rule.spec.measured == ("muse.knowmem_forget",) and rule.input == str(tmp_path)
    assert str(rule.with_reference({"muse.knowmem_forget": 0.25})) == "muse: muse.knowmem_forget<=0.25"
    bounds = S.parse_stop_rule("muse.knowmem_forget<=0.2,muse.knowmem_retain>=0.4", data=muse).bounds
    assert [b.metric for b in bounds] == ["muse.knowmem_forget", "muse.knowmem_retain"]
    assert {"muse.knowmem_forget", "muse.knowmem_retain", "muse.verbmem_forget"} <= S.available_metrics(muse)
    assert not any(m.startswith("muse.") for m in S.available_metrics({"forget": "text"}))
    assert S.is_generated("muse.knowmem_forget") and S.is_retain("muse.knowmem_retain")
    # The retrained model is PrivLeak's reference too: a rule other than a bare "muse" leaves it be.
    plan = S.plan_stopping("forget.prob<=0.1", retrain_model=str(tmp_path), data=muse)
    assert plan.rule.name == "threshold"
    plan = S.plan_stopping("muse", retrain_model=str(tmp_path), patience=1, restore="best",
                           best_by="muse.knowmem_retain", data=muse)  # fmt: skip
    assert plan.rule.input == str(tmp_path) and plan.retain_metrics == ("muse.knowmem_retain",)
    assert not any(m.startswith("muse.") for m in plan.track)  # generated: never tracked
    with pytest.raises(ValueError, match=r"give that model \(--retrain-model DIR\)"):
        S.plan_stopping("muse", data=muse)


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "match"),
    [
        ("", {}, ValueError, "non-empty string"),
        ("forget.prob=0.05", {}, ValueError, r"malformed bound 'forget.prob=0.05'.*OP one of <=, <, >=, >"),
        ("forget.prob==0.05", {}, ValueError, "malformed bound"),
        ("forget.prob<=0.05,", {}, ValueError, "malformed bound ''"),
        ("forget.prob<=abc", {}, ValueError, "'abc' is not a number"),
        ("forget.prob<=nan", {}, ValueError, "must be finite"),
        ("forget.rouge<=0.5", {}, ValueError, r"unknown metric 'forget.rouge'.*did you mean forget.rougeL"),
        ("loss<=0.1", {}, ValueError, "training loss.*cannot stop on it"),
        ("forget_loss<=0.1", {}, ValueError, "training loss"),
        ("unseen.ma<0.3", {}, ValueError, "extraction rule's reference"),
        ("forget.prob<=5", {}, ValueError, r"always holds \(forget.prob lies in \[0, 1\]\)"),
        ("forget.prob<0", {}, ValueError, "can never hold"),
        ("retain.rougeL>1", {}, ValueError, "can never hold"),
        ("forget.nll>=0", {}, ValueError, "always holds"),
        ("forget.prob>=0.1,forget.prob<=0.05", {}, ValueError, "can never hold together"),
        ("forget.prob>0.1,retain.acc<0.9,forget.prob<=0.1", {}, ValueError, "can never hold together"),
        ("extractoin", {}, ValueError, "unknown stopping rule 'extractoin'"),
        ("foo:forget.prob<0.1", {}, ValueError, "unknown stopping rule 'foo'"),
        ("threshold", {}, ValueError, "needs bounds"),
        ("threshold:", {}, ValueError, "nothing after ':'"),
        ("extraction", {}, ValueError, r"never saw: give that text \(--unseen FILE\) or the values"),
        ("extraction:ma=0.3", {}, ValueError, r"missing \['el10'\]"),
        ("extraction:ma=0.3,el=0.05", {}, ValueError, "unknown value 'el'"),
        ("extraction:ma=0.3,el10=0.05,ma=0.2", {}, ValueError, "'ma' is given twice"),
        ("extraction:ma,el10=0.05", {}, ValueError, "malformed value 'ma'"),
        ("extraction:ma=1.3,el10=0.05", {}, ValueError, r"reference ma=1.3 must lie in \[0, 1\]"),
        ("extraction:ma=0.3,el10=0", {}, ValueError, "nothing is below 0.*needs a threshold rule"),
        ("extraction:ma=0.3,el10=0.05", {"unseen": ["x"]}, ValueError, "not both"),
        ("extraction", {"unseen": "/no/such/file.jsonl"}, FileNotFoundError, "unseen text file not found"),
        ("extraction", {"unseen": []}, ValueError, "non-empty list"),
        ("extraction", {"reference_model": "/tmp"}, ValueError, "tofu rule's input"),
        ("tofu", {}, ValueError, r"retain-only model's: give that model \(--reference-model DIR\)"),
        ("tofu", {"reference_model": "/no/such/dir"}, FileNotFoundError, "reference model directory"),
        ("tofu:acc=0.4,rougeL=0.3", {"reference_model": "/tmp"}, ValueError, "not both"),
        ("tofu:acc=0.4", {}, ValueError, r"missing \['rougeL'\]"),
        ("forget.prob<=0.1", {"unseen": ["x"]}, ValueError, "threshold rule does not use it"),
        ("tofu:acc=0.4,rougeL=0.3", {"data": {"forget": "text"}}, ValueError, "forget.rougeL needs question"),
        ("retain.prob>=0.5", {"data": {"forget": "qa"}}, ValueError, "needs a retain set.*has none"),
        ("extraction:ma=0.3,el10=0.05", {"data": {"forget": "qa"}}, ValueError, "forget.ma needs raw-text"),
        ("muse", {}, ValueError, r"retrained model's \(MUSE, Shi et al. 2024\): give that model"),
        ("muse", {"retrain_model": "/no/such/dir"}, FileNotFoundError, "retrained model directory not found"),
        ("muse:knowmem_forget=0.3", {"retrain_model": "/tmp"}, ValueError, "not both"),
        ("muse:knowmem=0.3", {}, ValueError, r"unknown value 'knowmem'.*\['knowmem_forget'\]"),
        ("muse:knowmem_forget=1.5", {}, ValueError, r"knowmem_forget=1.5 must lie in \[0, 1\]"),
        ("tofu", {"retrain_model": "/tmp"}, ValueError, "retrained model is the muse rule's input"),
        (
            "muse:knowmem_forget=0.3",
            {"data": {"forget": "text"}},
            ValueError,
            r"needs a MUSE directory \(--muse",
        ),
        ("forget.knowmem_forget<=0.3", {}, ValueError, "unknown metric 'forget.knowmem_forget'"),
    ],
)
def test_parse_errors(spec, kwargs, error, match):
    with pytest.raises(error, match=match):
        S.parse_stop_rule(spec, **kwargs)


def test_parse_eval_every():
    assert S.parse_eval_every("epoch") == "epoch"
    assert S.parse_eval_every("25") == 25 and S.parse_eval_every(3) == 3
    for bad in (0, -1, "0", "x", 1.5, True, "1e3"):
        with pytest.raises(ValueError, match="'epoch' or a positive number of optimiser steps"):
            S.parse_eval_every(bad)


def test_plan_stopping():
    qa = {"forget": "qa", "retain": "qa"}
    assert S.plan_stopping(None, data=qa) is None
    plan = S.plan_stopping(None, eval_every="10", data=qa)
    assert plan.rule is None and plan.every == 10
    plan = S.plan_stopping("forget.prob<=0.1", patience=2, restore="best", data=qa)
    assert plan.every == "epoch"
    assert plan.retain_metrics == ("retain.prob", "retain.acc", "retain.rougeL")
    assert plan.track == (
        "forget.prob",
        "forget.acc",
        "forget.nll",
        "retain.prob",
        "retain.acc",
        "retain.nll",
    )
    text = S.plan_stopping("extraction:ma=0.3,el10=0.05", data={"forget": "text", "retain": "text"})
    assert text.track == (
        "forget.prob", "forget.acc", "forget.nll", "forget.ma",
        "retain.prob", "retain.acc", "retain.nll", "retain.ma",
    )  # fmt: skip
    assert text.retain_metrics == ("retain.prob", "retain.acc")
    with pytest.raises(ValueError, match=r"patience, restore need\(s\) a stopping rule"):
        S.plan_stopping(None, patience=1, restore="best", data=qa)
    with pytest.raises(ValueError, match="give patience >= 1"):
        S.plan_stopping("forget.prob<=0.1", restore="best", data=qa)
    with pytest.raises(ValueError, match="no retain metric is available"):
        S.plan_stopping("forget.prob<=0.1", patience=1, restore="best", data={"forget": "qa"})
    with pytest.raises(ValueError, match="eval_items must be a positive number"):
        S.plan_stopping("forget.prob<=0.1", eval_items=0, data=qa)
    with pytest.raises(ValueError, match="unknown restore policy 'latest'"):
        S.plan_stopping("forget.prob<=0.1", patience=1, restore="latest", data=qa)
    assert plan.generate_within == 0.0
    assert S.plan_stopping("tofu:acc=0.3,rougeL=0.4", generate_within=0.2, data=qa).generate_within == 0.2
    for bad in (-0.1, math.nan, math.inf, True, "0.2"):
        with pytest.raises(ValueError, match="generate_within must be a finite margin >= 0"):
            S.plan_stopping("tofu:acc=0.3,rougeL=0.4", generate_within=bad, data=qa)
    with pytest.raises(ValueError, match=r"generate_within need\(s\) a stopping rule"):
        S.plan_stopping(None, eval_every=5, generate_within=0.2, data=qa)
    # best_by: the retain metrics that rank the states of restore="best".
    rule = "tofu:acc=0.3,rougeL=0.4"
    best = S.plan_stopping(rule, patience=2, restore="best", best_by=" retain.prob,retain.acc", data=qa)
    assert best.retain_metrics == ("retain.prob", "retain.acc")
    listed = S.plan_stopping(rule, patience=2, restore="best", best_by=["retain.rougeL"], data=qa)
    assert listed.retain_metrics == ("retain.rougeL",)
    for bad, match in (
        ("retain.prob,forget.acc", "forget.acc is not a retain metric"),
        ("retain.prb", "unknown metric 'retain.prb'"),
        ("retain.prob,,retain.acc", "give retain metrics separated by ','"),
        ("retain.prob,retain.prob", "names a metric twice"),
        ("retain.ma", "retain.ma needs raw-text"),
    ):
        with pytest.raises(ValueError, match=match):
            S.plan_stopping(rule, patience=2, restore="best", best_by=bad, data=qa)
    with pytest.raises(ValueError, match="best_by ranks the states of restore='best'"):
        S.plan_stopping(rule, patience=2, restore="last", best_by="retain.prob", data=qa)
    with pytest.raises(ValueError, match=r"best_by need\(s\) a stopping rule"):
        S.plan_stopping(None, eval_every=5, best_by="retain.prob", data=qa)
    with pytest.raises(ValueError, match="non-negative number of evaluations"):
        S.plan_stopping("forget.prob<=0.1", patience=-1, data=qa)


def test_best_by_teacher_forced_metrics_spares_the_retain_generation():
    rule = S.parse_stop_rule("tofu:acc=0.3,rougeL=0.4")
    rows = rows_of(forget_acc=[0.5, 0.25, 0.2, 0.1], forget_rougeL=[0.8, 0.3, 0.3, 0.2])
    rows = [
        {**r, "retain.prob": 0.7, "retain.acc": 0.6, "retain.rougeL": 0.5, "forget.prob": 0.4} for r in rows
    ]
    ranked = {}
    for metrics in (S.DEFAULT_RETAIN_METRICS, ("retain.prob", "retain.acc")):
        ctrl = S.StoppingController(rule, patience=2, restore="best", retain_metrics=metrics,
                                    track=("forget.prob", "retain.prob", "retain.acc"))  # fmt: skip
        _, computed = drive(ctrl, BASE | {"forget.rougeL": 0.9}, rows)
        ranked[metrics] = ["retain.rougeL" in c for c in computed]
    # The default criterion generates the retain answers wherever the rule holds; prob and acc never.
    assert ranked[S.DEFAULT_RETAIN_METRICS] == [False, True, True, True]
    assert ranked[("retain.prob", "retain.acc")] == [False, False, False, False]


def test_available_metrics():
    assert S.available_metrics({"forget": "qa"}) == {
        "forget.prob",
        "forget.acc",
        "forget.nll",
        "forget.rougeL",
    }
    assert S.available_metrics({"forget": "prompt_completion"}) == S.available_metrics({"forget": "qa"})
    assert S.available_metrics({"forget": "text", "unseen": "text"}) == {
        f"{s}.{k}" for s in ("forget", "unseen") for k in ("prob", "acc", "nll", "ma", "el10")
    }
    assert S.available_metrics({"forget": "mixed"}) == {"forget.prob", "forget.acc", "forget.nll"}


# --------------------------------------------------------------------------------------------------
# the controller on synthetic trajectories
# --------------------------------------------------------------------------------------------------


def drive(controller, baseline, rows):
    """Run ``controller`` like the callback does: before training the baseline, then each row (a dict
    of every metric's value at steps 1, 2, ...) revealed only as far as ``metrics_to_compute`` asks.
    Returns the decisions and, per evaluated step, the set of metric names computed."""
    controller.set_baseline({m: baseline[m] for m in controller.baseline_metrics()})
    decisions, computed = [], []
    for step, full in enumerate(rows, start=1):
        values = {}
        while todo := controller.metrics_to_compute(values):
            assert not todo & values.keys()
            values.update({m: full[m] for m in todo})
        decisions.append(controller.record(step, step / 2, values, final=step == len(rows)))
        computed.append(set(values))
        if decisions[-1].stop:
            break
    return decisions, computed


def rows_of(**series):
    n = len(next(iter(series.values())))
    return [{name.replace("_", "."): values[i] for name, values in series.items()} for i in range(n)]


BASE = {"forget.prob": 0.9, "retain.prob": 0.8, "retain.acc": 0.6, "retain.rougeL": 0.5, "forget.acc": 0.9}
PROB = [0.5, 0.3, 0.08, 0.05, 0.2, 0.04]  # crosses 0.1 at step 3, relapses at step 5


def prob_rule():
    return S.parse_stop_rule("forget.prob<=0.1")


def test_first_crossing_stops_there():
    ctrl = S.StoppingController(prob_rule())
    decisions, _ = drive(ctrl, BASE, rows_of(forget_prob=PROB))
    assert [d.stop for d in decisions] == [False, False, True]
    assert [d.satisfied for d in decisions] == [False, False, True]
    assert not any(d.keep_state for d in decisions)  # the stopping state is the current one
    assert ctrl.restore_target is None and ctrl.stopped.step == 3
    s = ctrl.summary()
    assert (s["first_satisfied_step"], s["stopped_step"], s["kept_step"], s["restored"]) == (3, 3, 3, False)
    with pytest.raises(ValueError, match="stopped at step 3"):
        ctrl.record(4, 2.0, {"forget.prob": 0.01})


def test_patience_and_restore_first_and_last():
    # patience 2: evaluations 4 and 5 follow the first crossing at 3; step 5 no longer satisfies.
    ctrl = S.StoppingController(prob_rule(), patience=2, restore="first")
    decisions, _ = drive(ctrl, BASE, rows_of(forget_prob=PROB))
    assert [d.stop for d in decisions] == [False, False, False, False, True]
    assert [d.keep_state for d in decisions] == [False, False, True, False, False]
    assert ctrl.stopped.step == 5 and ctrl.restore_target.step == 3

    ctrl = S.StoppingController(prob_rule(), patience=2, restore="last")
    decisions, _ = drive(ctrl, BASE, rows_of(forget_prob=PROB))
    assert [d.keep_state for d in decisions] == [False, False, True, True, False]
    assert ctrl.restore_target.step == 4  # the last state that satisfies the rule, not the relapse

    # Training ends (final row) before the patience runs out: the chosen state is still restored, and
    # the final state needs no copy.
    ctrl = S.StoppingController(prob_rule(), patience=5, restore="first")
    decisions, _ = drive(ctrl, BASE, rows_of(forget_prob=PROB[:4]))
    assert not any(d.stop for d in decisions) and ctrl.stopped is None
    assert ctrl.restore_target.step == 3


def test_best_restore_keeps_the_recovered_state_not_the_dip():
    # The IHL+FILA pattern on TOFU: retain performance dips at the crossing (step 2) and recovers while
    # forgetting deepens; "first" would keep the dip.
    rows = rows_of(
        forget_prob=[0.5, 0.09, 0.07, 0.05, 0.04],
        retain_prob=[0.75, 0.40, 0.60, 0.70, 0.65],
        retain_acc=[0.58, 0.30, 0.50, 0.55, 0.56],
        retain_rougeL=[0.5, 0.2, 0.3, 0.45, 0.4],
    )
    ctrl = S.StoppingController(prob_rule(), patience=3, restore="best")
    decisions, computed = drive(ctrl, BASE, rows)
    assert [d.stop for d in decisions] == [False, False, False, False, True]
    expected = {
        i + 1: harmonic(r["retain.prob"] / 0.8, r["retain.acc"] / 0.6, r["retain.rougeL"] / 0.5)
        for i, r in enumerate(rows)
        if r["forget.prob"] <= 0.1
    }
    best = max(expected, key=expected.get)
    assert best == 4  # ratios 0.875, 0.917, 0.9 (H 0.897) beat 0.8125, 0.933, 0.8 (H 0.845)
    assert ctrl.restore_target.step == best and ctrl.chosen.step == best
    for ev in ctrl.history[1:]:
        assert ev.score == pytest.approx(expected[ev.step], rel=1e-12)
    # The retain ROUGE-L (generation) is computed only where the rule holds: the states it ranks.
    assert ["retain.rougeL" in c for c in computed] == [False, True, True, True, True]
    # Step 2 (the dip) became "best" first and was copied; steps 3 and 4 improved on it.
    assert [d.keep_state for d in decisions] == [False, True, True, True, False]


def test_best_ties_go_to_the_earlier_step_and_never_satisfied_keeps_the_last():
    rows = rows_of(forget_prob=[0.05, 0.05, 0.05], retain_prob=[0.7] * 3, retain_acc=[0.5] * 3)
    ctrl = S.StoppingController(
        prob_rule(), patience=2, restore="best", retain_metrics=("retain.prob", "retain.acc")
    )
    drive(ctrl, BASE, rows)
    assert ctrl.chosen.step == 1 and ctrl.restore_target.step == 1

    ctrl = S.StoppingController(prob_rule(), patience=1, restore="best")
    decisions, _ = drive(ctrl, BASE, rows_of(forget_prob=[0.5, 0.4, 0.3]))
    assert not any(d.stop or d.keep_state for d in decisions)
    s = ctrl.summary()
    assert ctrl.restore_target is None and not s["satisfied"] and s["kept_step"] == 3


def test_extraction_rule_is_strict_and_needs_both():
    rule = S.parse_stop_rule("extraction:ma=0.3,el10=0.05")
    assert rule.satisfied({"forget.ma": 0.2, "forget.el10": 0.04}) is True
    assert rule.satisfied({"forget.ma": 0.3, "forget.el10": 0.04}) is False  # "below": strictly
    assert rule.satisfied({"forget.ma": 0.2, "forget.el10": 0.06}) is False  # "and"
    assert rule.satisfied({"forget.ma": 0.4}) is False  # decided without EL: MA already fails
    assert rule.satisfied({"forget.ma": 0.2}) is None  # undecided, never read as satisfied


def test_rouge_only_near_the_threshold():
    rule = S.parse_stop_rule("tofu:acc=0.3,rougeL=0.4")
    rows = rows_of(forget_acc=[0.9, 0.37, 0.35, 0.25, 0.2], forget_rougeL=[0.8, 0.6, 0.5, 0.45, 0.3])
    ctrl = S.StoppingController(rule, generate_within=0.2, track=("forget.prob",))
    rows = [{**r, "forget.prob": 0.5} for r in rows]
    decisions, computed = drive(ctrl, BASE | {"forget.rougeL": 0.9}, rows)
    # near: acc ≤ 0.3·1.2 = 0.36. Steps 1, 2 are farther: no generation.
    assert ["forget.rougeL" in c for c in computed] == [False, False, True, True, True]
    assert all("forget.prob" in c and "forget.acc" in c for c in computed)
    assert [d.satisfied for d in decisions] == [False, False, False, False, True]
    assert decisions[-1].stop
    # By default (near = 0) only where the teacher-forced bound holds: there alone can ROUGE-L decide.
    default = S.StoppingController(rule, track=("forget.prob",))
    _, computed = drive(default, BASE | {"forget.rougeL": 0.9}, rows)
    assert ["forget.rougeL" in c for c in computed] == [False, False, False, True, True]
    # A rule that needs ROUGE-L is never declared satisfied without it.
    ctrl = S.StoppingController(rule)
    ctrl.set_baseline({})
    with pytest.raises(
        ValueError, match=r"cannot decide the rule at step 1: \['forget.rougeL'\] not computed"
    ):
        ctrl.record(1, 0.5, {"forget.acc": 0.1})
    # With no teacher-forced bound, generation runs at every evaluation.
    ctrl = S.StoppingController(S.parse_stop_rule("forget.rougeL<=0.2"))
    assert ctrl.metrics_to_compute({}) == {"forget.rougeL"}


@pytest.mark.parametrize("restore", ["first", "best", "last"])
def test_gating_never_changes_a_decision(restore):
    """Random trajectories: the gated controller (generation only near the threshold) takes exactly
    the decisions of one given every metric at every evaluation."""
    rng = random.Random(0)
    generated = evaluations = 0
    names = ("forget.acc", "forget.rougeL", "forget.prob", "retain.prob", "retain.acc", "retain.rougeL")
    for trial in range(200):
        rule = S.parse_stop_rule(
            f"forget.acc<={rng.uniform(0.1, 0.5):.3f},forget.rougeL<={rng.uniform(0.1, 0.5):.3f},"
            f"retain.prob>={rng.uniform(0.01, 0.3):.3f}"
        )
        rows = [{n: rng.random() for n in names} for _ in range(rng.randint(1, 12))]
        patience = 0 if restore == "first" and trial % 2 else rng.randint(1, 3)
        kwargs = dict(patience=patience, restore=restore, generate_within=rng.choice([0.0, 0.1, 0.5]))
        gated = S.StoppingController(rule, **kwargs)
        baseline = BASE | {"forget.rougeL": 0.9}
        gated_decisions, computed = drive(gated, baseline, rows)
        full = S.StoppingController(rule, **kwargs)
        full.set_baseline(baseline)
        full_decisions = []
        for step, row in enumerate(rows[: len(gated_decisions)], start=1):
            full_decisions.append(full.record(step, step / 2, row, final=step == len(rows)))
        assert [(d.stop, d.satisfied, d.keep_state) for d in gated_decisions] == [
            (d.stop, d.satisfied, d.keep_state) for d in full_decisions
        ]
        assert gated.summary()["kept_step"] == full.summary()["kept_step"]
        assert (gated.restore_target is None) == (full.restore_target is None)
        # ... generating exactly where every teacher-forced bound is within the margin.
        margin = kwargs["generate_within"]
        for row, c in zip(rows, computed):
            acc, prob = rule.bounds[0], rule.bounds[2]
            near = row["forget.acc"] <= acc.value * (1 + margin) and row["retain.prob"] >= prob.value * (
                1 - margin
            )
            assert ("forget.rougeL" in c) == near
            generated += near
        evaluations += len(computed)
    assert generated < evaluations / 2  # and that is a saving


def test_controller_errors():
    with pytest.raises(ValueError, match="need a stopping rule"):
        S.StoppingController(None, patience=1)
    with pytest.raises(ValueError, match="generate_within must be a finite margin"):
        S.StoppingController(prob_rule(), generate_within=-0.1)
    with pytest.raises(ValueError, match="retain_metrics must be retain-set metrics"):
        S.StoppingController(prob_rule(), retain_metrics=("forget.prob",))
    with pytest.raises(ValueError, match="teacher-forced metrics only"):
        S.StoppingController(prob_rule(), track=("forget.rougeL",))
    with pytest.raises(ValueError, match=r"unknown metric 'retain\.bleu'"):
        S.StoppingController(prob_rule(), track=("retain.bleu",))
    ctrl = S.StoppingController(S.StopRule("extraction", input=["x"]))
    with pytest.raises(ValueError, match="not measured yet"):
        ctrl.record(1, 1.0, {"forget.ma": 0.1, "forget.el10": 0.0})
    with pytest.raises(ValueError, match=r"reference needs \['unseen.el10'\]"):
        ctrl.rule.with_reference({"unseen.ma": 0.3})
    ctrl = S.StoppingController(prob_rule(), patience=1, restore="best")
    with pytest.raises(ValueError, match="call set_baseline"):
        ctrl.record(
            1, 1.0, {"forget.prob": 0.01, "retain.prob": 0.5, "retain.acc": 0.5, "retain.rougeL": 0.5}
        )
    with pytest.raises(ValueError, match="scores 0 on every retain metric"):
        ctrl.set_baseline({"retain.prob": 0.0, "retain.acc": 0.0, "retain.rougeL": 0.0})
    ctrl = S.StoppingController(prob_rule())
    ctrl.record(2, 1.0, {"forget.prob": 0.5})
    with pytest.raises(ValueError, match="not after the last evaluated step 2"):
        ctrl.record(2, 1.0, {"forget.prob": 0.5})


def test_retain_score():
    base = {"a": 0.8, "b": 0.5, "c": 0.0}
    assert S.retain_score({"a": 0.4, "b": 0.5, "c": 0.3}, base, "abc") == pytest.approx(harmonic(0.5, 1.0))
    assert S.retain_score({"a": 0.0, "b": 0.5, "c": 0.3}, base, "abc") == 0.0
    assert S.retain_score({"a": 1.6, "b": 0.5, "c": 0.3}, base, "ab") == pytest.approx(harmonic(2.0, 1.0))
    with pytest.raises(ValueError, match="b is missing"):
        S.retain_score({"a": 0.4}, base, "ab")


# --------------------------------------------------------------------------------------------------
# trajectory files
# --------------------------------------------------------------------------------------------------


def test_trajectory_csv(tmp_path):
    path = tmp_path / "out" / "trajectory.csv"
    traj = Trajectory(path)
    traj.append({"step": 0, "epoch": 0.0, "retain.prob": 0.8, "forget.prob": 0.9, "satisfied": False})
    first = path.read_text()
    assert first.splitlines() == ["step,epoch,forget.prob,retain.prob,satisfied", "0,0.0,0.9,0.8,0"]
    traj.append(
        {"step": 5, "epoch": 1.0, "forget.prob": 0.1 / 3, "forget.rougeL": 0.25, "loss": 1.5, "zz": "x",
         "retain.prob": 0.7, "satisfied": True, "eval_s": 0.01}
    )  # fmt: skip
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "step", "epoch", "forget.prob", "forget.rougeL", "retain.prob", "loss", "satisfied", "eval_s", "zz"
    ]  # fmt: skip
    assert rows[1] == ["0", "0.0", "0.9", "", "0.8", "", "0", "", ""]
    back = read_trajectory(path)
    assert back[1]["forget.prob"] == 0.1 / 3  # exact round trip
    assert back[0]["forget.rougeL"] is None and back[1]["step"] == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["trajectory.csv"]  # no temporaries left
    with pytest.raises(ValueError, match="needs a 'step'"):
        traj.append({"epoch": 1.0})


def _rows():
    return [
        {"step": s, "epoch": s / 4, "forget.prob": 0.9 * 0.6**s, "retain.prob": 0.8 - 0.02 * s,
         "forget.acc": 0.9 - 0.1 * s, "retain.acc": 0.6, "loss": 2.0 - 0.1 * s,
         **({"forget.rougeL": 0.5 - 0.05 * s} if s > 2 else {})}
        for s in range(8)
    ]  # fmt: skip


def test_trajectory_png(tmp_path):
    import matplotlib.image

    path = tmp_path / "trajectory.png"
    plot_trajectory(
        _rows(),
        path,
        bounds=S.parse_stop_rule("forget.prob<=0.05,forget.rougeL<=0.3").bounds,
        marks={"rule first holds": 5, "stopped": 7, "kept": None},
        title="test",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something was drawn
