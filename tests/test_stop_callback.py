"""The subset evaluator and the evaluating callback (fastunlearn.evaluation.stop_callback) on a tiny
model: the evaluator against independent computations (transformers' own generate, rouge_score, the
naive EL), the reference measurements, and real ``Trainer`` runs that stop at the right step, keep the
right weights and write the trajectory."""

import copy
import math
import time

import pytest
import torch
from helpers import stopping as helpers
from helpers.stopping import TEXTS, examples, harmonic, qa_record

import fastunlearn
from fastunlearn import data as fdata
from fastunlearn.evaluation import metrics as M
from fastunlearn.evaluation import stopping as S
from fastunlearn.evaluation.stop_callback import read_trajectory

# --------------------------------------------------------------------------------------------------
# the subset evaluator and the callback, on a tiny model
# --------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


tok = pytest.fixture(scope="module", name="tok")(helpers.tokenizer)
trained = pytest.fixture(scope="module", name="trained")(helpers.trained_model)  # of `tok`


def test_evaluator_matches_independent_computations(trained, tok):
    from rouge_score import rouge_scorer

    from fastunlearn.evaluation.sets import SetEvaluator

    forget_records = [qa_record(i) for i in range(10)]
    forget, unseen = examples(tok, forget_records), examples(tok, [{"text": t} for t in TEXTS], "text")
    retain = examples(tok, [qa_record(i) for i in range(10, 13)])
    ev = SetEvaluator(tok, forget, retain, unseen, eval_items=4, batch_size=3, max_new_tokens=200)
    picked = [0, 2, 5, 7]  # 4 of 10 spread evenly: (i · 10) // 4
    assert ev.sets["forget"] == [forget[i] for i in picked] and len(ev.sets["retain"]) == 3
    assert len(ev.sets["unseen"]) == 4
    assert ev.available == {
        *(f"{s}.{k}" for s in ("forget", "retain") for k in ("prob", "acc", "nll", "rougeL")),
        *(f"unseen.{k}" for k in ("prob", "acc", "nll", "ma", "el10")),
    }
    got = ev.evaluate(trained, {"forget.prob", "forget.acc", "forget.nll", "forget.rougeL",
                                "unseen.ma", "unseen.el10"})  # fmt: skip

    pad = fdata.pad_id_of(tok)
    want = M.basic_metrics(trained, fdata.batches(ev.sets["forget"], pad, 16))
    # basic_metrics exponentiates and averages in fp32; the evaluator in fp64.
    assert got["forget.prob"] == pytest.approx(want["prob"], rel=1e-5)
    assert got["forget.acc"] == pytest.approx(want["accuracy"], rel=2**-23)  # fp32 division there
    assert got["forget.nll"] == pytest.approx(want["nll"], rel=1e-5)
    batch = fdata.collate(ev.sets["unseen"], pad)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert got["unseen.ma"] == pytest.approx(
        M.memorization_accuracy(trained, ids, mask).mean().item(), abs=1e-12
    )
    el = M.extraction_likelihood(trained, ids, n=10, attention_mask=mask, method="naive", batch_size=1)
    assert got["unseen.el10"] == pytest.approx(el.mean().item(), abs=1e-12)

    # ROUGE-L: each prompt alone through transformers' own greedy generate, scored against the record's
    # answer text (not a decoded one) with rouge_score directly.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    recalls = []
    for i in picked:
        ex = forget[i]
        start = ex.labels.index(next(label for label in ex.labels if label != fdata.IGNORE_INDEX))
        prompt = torch.tensor([ex.input_ids[:start]])
        budget = 2 * (len(ex.input_ids) - start - 1)  # twice the answer's tokens (its EOS excluded)
        out = trained.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=budget,
            eos_token_id=tok.eos_token_id,
            pad_token_id=pad,
        )
        new = out[0, prompt.shape[1] :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        pred = tok.decode(new, skip_special_tokens=True).strip()
        recalls.append(scorer.score(forget_records[i]["answer"], pred)["rougeL"].recall)
    assert got["forget.rougeL"] == pytest.approx(sum(recalls) / len(recalls), abs=1e-12)
    assert got["forget.rougeL"] > 0.3  # the trained model answers: the comparison is not 0 == 0

    with pytest.raises(ValueError, match=r"cannot evaluate \['forget.ma'\] on this data"):
        ev.evaluate(trained, {"forget.ma"})
    with pytest.raises(ValueError, match="unseen text must be raw text"):
        SetEvaluator(tok, forget, unseen=forget)
    with pytest.raises(ValueError, match="the forget set is empty"):
        SetEvaluator(tok, [])
    with pytest.raises(ValueError, match="eval_items must be at least 1"):
        SetEvaluator(tok, forget, eval_items=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_pass_over_all_sets_equals_the_set_by_set_passes(trained, tok, dtype):
    """The evaluator's teacher-forced metrics (every set in one pass, batches sorted by length, inputs
    built once) against the set-by-set path it replaced: each set alone in consecutive
    batches through ``collect_answer_stats``, the metrics formed from its per-example statistics.

    Per example the two differ only in the shape of the batch around it (other rows, padded length):
    right padding is masked and the model causal, so only the order of floating-point reductions can
    change. Reordering a sum of K terms moves it by at most ``K·eps·Σ|terms|`` (Higham, ch. 3); the
    longest reduction here is the vocabulary's log-sum-exp (V terms), so the NLL / probability
    tolerance is ``V·eps`` of the dtype — in fp64 that is 1e-13, agreement to the last digits. Accuracy
    and MA count argmax hits: they are equal wherever the top-2 gap of the logits exceeds that
    tolerance, which the test checks before asserting equality."""
    from fastunlearn.evaluation.likelihood import collect_answer_stats
    from fastunlearn.evaluation.sets import SetEvaluator

    model = copy.deepcopy(trained).to(dtype)
    forget = examples(tok, [qa_record(i) for i in range(10)])
    retain = examples(tok, [qa_record(i) for i in range(10, 17)])
    unseen = examples(tok, [{"text": t} for t in TEXTS], "text")
    # Batches of 3 over 6 + 7 + 5 examples of different lengths: several batches, each mixing sets.
    ev = SetEvaluator(tok, forget, retain, unseen[:5], eval_items=7, batch_size=3)
    names = {f"{s}.{k}" for s in ("forget", "retain", "unseen") for k in ("prob", "acc", "nll")}
    names.add("unseen.ma")
    got = ev.evaluate(model, names)
    again = ev.evaluate(model, names)  # the cached inputs give the same numbers

    tol = len(tok) * torch.finfo(dtype).eps
    pad = fdata.pad_id_of(tok)
    assert again == got and set(got) == names
    for set_name, subset in ev.sets.items():
        batches = fdata.batches(subset, pad, 3)
        stats = collect_answer_stats(model, batches)
        nll_sum, tokens, correct = (stats[k].double() for k in ("nll_sum", "num_tokens", "correct"))
        mean_nll = nll_sum / tokens
        assert got[f"{set_name}.prob"] == pytest.approx(torch.exp(-mean_nll).mean().item(), rel=tol)
        assert got[f"{set_name}.nll"] == pytest.approx(mean_nll.mean().item(), rel=tol)
        with torch.no_grad():  # the argmax margins behind the hit counts
            for batch in batches:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                top2 = logits[:, :-1].topk(2, dim=-1).values
                labelled = batch["labels"][:, 1:] != fdata.IGNORE_INDEX
                gap = (top2[..., 0] - top2[..., 1])[labelled]
                assert gap.min() > tol * logits.abs().max(), "a near-tie: the hit counts may differ"
        assert got[f"{set_name}.acc"] == (correct.sum() / tokens.sum()).item()
        if set_name == "unseen":
            assert got["unseen.ma"] == (correct / tokens).mean().item()
    assert 0.0 < got["retain.acc"] < 1.0 or 0.0 < got["unseen.acc"] < 1.0  # hits and misses both counted


def test_callback_measures_the_unseen_reference_and_refuses_unmeasured_references(trained, tok):
    from transformers import TrainerControl, TrainerState

    from fastunlearn.evaluation.sets import SetEvaluator
    from fastunlearn.evaluation.stop_callback import StoppingCallback, measure_reference

    text = examples(tok, [{"text": t} for t in TEXTS], "text")
    ev = SetEvaluator(tok, text[:4], unseen=text[4:])
    controller = S.StoppingController(
        S.parse_stop_rule("extraction", unseen=TEXTS[4:]), every=1, track=("forget.prob",)
    )
    cb = StoppingCallback(controller, ev)
    cb.on_train_begin(None, TrainerState(), TrainerControl(), model=trained)
    ref = ev.evaluate(trained, {"unseen.ma", "unseen.el10"})
    assert controller.rule.resolved
    assert controller.rule.reference == {"ma": ref["unseen.ma"], "el10": ref["unseen.el10"]}
    row = cb.trajectory.rows[0]
    assert row["step"] == 0 and {"forget.ma", "forget.el10", "forget.prob", "satisfied"} <= set(row)

    qa = examples(tok, [qa_record(i) for i in range(4)])
    ev = SetEvaluator(tok, qa)
    rule = S.parse_stop_rule("tofu", reference_model=trained)
    with pytest.raises(ValueError, match="measure them first"):
        StoppingCallback(S.StoppingController(rule), ev)
    resolved = measure_reference(rule, ev, trained)
    ref = ev.evaluate(trained, {"forget.acc", "forget.rougeL"})
    assert resolved.reference == {"acc": ref["forget.acc"], "rougeL": ref["forget.rougeL"]}
    with pytest.raises(ValueError, match=r"cannot compute \['retain.acc', 'retain.prob'"):
        StoppingCallback(S.StoppingController(resolved, patience=1, restore="best"), ev)
    with pytest.raises(ValueError, match="eval_every must be"):
        StoppingCallback(S.StoppingController(resolved, every=0), ev)


ALL_QA = ("forget.prob", "forget.acc", "forget.nll", "forget.rougeL",
          "retain.prob", "retain.acc", "retain.nll", "retain.rougeL")  # fmt: skip
STEPS = 8  # 4 forget examples, batches of 2, 4 epochs


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def e2e(trained, tok):
    """A LoRA model to unlearn with gradient difference, and a reference run without stopping that
    records every metric and the trainable weights after every step."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    from fastunlearn.evaluation.sets import SetEvaluator

    torch.manual_seed(0)
    lora = get_peft_model(
        copy.deepcopy(trained).train(),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    forget, retain = (
        examples(tok, [qa_record(i) for i in range(4)]),
        examples(tok, [qa_record(i) for i in range(8, 14)]),
    )

    def evaluator():
        return SetEvaluator(tok, forget, retain, eval_items=6, batch_size=8, max_new_tokens=32)

    class Recorder(TrainerCallback):
        def __init__(self):
            self.metrics, self.weights, self.ev = {}, {}, evaluator()

        def _record(self, state, model):
            self.metrics[state.global_step] = self.ev.evaluate(model, ALL_QA)
            self.weights[state.global_step] = _trainable(model)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

    recorder = Recorder()
    _train(copy.deepcopy(lora), tok, forget, retain, recorder, None)
    assert sorted(recorder.metrics) == list(range(STEPS + 1))
    return {"lora": lora, "forget": forget, "retain": retain, "evaluator": evaluator, "ref": recorder}


def _train(model, tok, forget, retain, callback, out):
    import tempfile

    from fastunlearn.methods import resolve_method
    from fastunlearn.methods.objectives import Objective
    from fastunlearn.options.unlearn import UnlearnConfig
    from fastunlearn.training.trainer import build_trainer

    cfg = UnlearnConfig(
        num_epochs=STEPS // 2,
        batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=3e-2,
        warmup_epochs=0,
        logging_steps=1,
        progress=False,
        seed=0,
        callbacks=[callback],
    )
    dataset = fdata.PairedDataset(forget, retain, seed=0)
    fastunlearn.patch(model)  # the training step computes its losses in the patched model
    try:
        with tempfile.TemporaryDirectory() as ckpt:
            trainer = build_trainer(
                model,
                dataset,
                fdata.pad_id_of(tok),
                objective=Objective(resolve_method("gd")),
                cfg=cfg,
                output_dir=ckpt,
            )
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
    finally:
        fastunlearn.unpatch(model)
    return trainer, seconds


def _crossing(values, lowest=3):
    """The first step k ≥ ``lowest`` whose value drops clearly below every earlier one (baseline
    included), and a threshold halfway: the rule ``<= threshold`` first holds at k."""
    for k in range(lowest, STEPS - 1):
        earlier = min(values[:k])
        if values[k] < earlier - 1e-3:
            return k, (values[k] + earlier) / 2
    raise AssertionError(f"no clear crossing in {values}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["first", "patience-first", "patience-best", "tofu"])
def test_training_stops_at_the_right_step_and_keeps_the_right_weights(e2e, tok, tmp_path, case, capsys):
    from fastunlearn.evaluation.stop_callback import StoppingCallback

    ref = e2e["ref"]
    series = {m: [ref.metrics[s][m] for s in range(STEPS + 1)] for m in ALL_QA}
    metric = "forget.acc" if case == "tofu" else "forget.prob"
    k, threshold = _crossing(series[metric])
    patience = 3 if case.startswith("patience") else 0
    restore = case.split("-")[1] if patience else "first"
    spec = f"tofu:acc={threshold!r},rougeL=1.0" if case == "tofu" else f"forget.prob<={threshold!r}"
    near = 0.05  # forget accuracy falls in big steps here: a narrow margin leaves some steps out
    controller = S.plan_stopping(spec, eval_every=1, patience=patience, restore=restore, generate_within=near,
                                 data={"forget": "qa", "retain": "qa"})  # fmt: skip
    cb = StoppingCallback(controller, e2e["evaluator"](), output_dir=tmp_path)
    model = copy.deepcopy(e2e["lora"])
    trainer, seconds = _train(model, tok, e2e["forget"], e2e["retain"], cb, tmp_path)

    stop = k + patience
    if case == "patience-best":
        base = ref.metrics[0]
        score = {
            s: harmonic(*(ref.metrics[s][m] / base[m] for m in controller.retain_metrics if base[m] > 0))
            for s in range(k, stop + 1)
            if ref.metrics[s]["forget.prob"] <= threshold
        }
        kept = max(score, key=lambda s: (score[s], -s))
    else:
        kept = k
    assert trainer.state.global_step == stop
    assert cb.summary["first_satisfied_step"] == k and cb.summary["stopped_step"] == stop
    assert cb.summary["kept_step"] == kept and cb.summary["restored"] == (kept != stop)

    # The weights kept are those the uninterrupted run had after step `kept`.
    weights = _trainable(model)
    assert weights.keys() == ref.weights[kept].keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, ref.weights[kept][name], rtol=1e-5, atol=1e-6, msg=name)
    if kept != stop:  # the restore put something back
        assert max((weights[n] - ref.weights[stop][n]).abs().max().item() for n in weights) > 1e-4

    # The trajectory: one row per step up to the stop, the same numbers as the reference run (evaluating
    # did not disturb training), the loss, and the PNG.
    rows = read_trajectory(tmp_path / "trajectory.csv")
    assert [r["step"] for r in rows] == list(range(stop + 1))
    for r in rows:
        for m in ALL_QA:
            if r.get(m) is not None:
                assert r[m] == pytest.approx(ref.metrics[r["step"]][m], rel=1e-5, abs=1e-6), (r["step"], m)
        assert r["step"] == 0 or (r["loss"] is not None and math.isfinite(r["loss"]))
    if case == "tofu":
        # ROUGE-L (generation) exactly where forget accuracy is within the margin of the threshold.
        gen = [r["step"] for r in rows[1:] if r["forget.acc"] <= threshold * (1 + near)]
        assert [r["step"] for r in rows[1:] if r.get("forget.rougeL") is not None] == gen
        assert k in gen and len(gen) < len(rows) - 1
    assert (tmp_path / "trajectory.png").read_bytes()[:4] == b"\x89PNG"

    s = cb.summary
    with capsys.disabled():
        print(
            f"\n[{case}] stopped at step {stop}/{STEPS}, kept {kept}: training {s['train_s']:.2f} s, "
            f"evaluation {s['eval_s']:.2f} s ({100 * s['eval_fraction']:.0f} % of training; every step, "
            f"{s['eval_items']} items), reference+baseline {s['reference_and_baseline_eval_s']:.2f} s, "
            f"train() {seconds:.2f} s"
        )


@pytest.mark.slow
@pytest.mark.parametrize(("every", "steps"), [(3, [0, 3, 6, 8]), ("epoch", [0, 2, 4, 6, 8])])
def test_schedule_without_a_rule_records_a_trajectory(e2e, tok, tmp_path, every, steps):
    from fastunlearn.evaluation.stop_callback import StoppingCallback

    plan = S.plan_stopping(None, eval_every=every, data={"forget": "qa", "retain": "qa"})
    cb = StoppingCallback(plan, e2e["evaluator"](), output_dir=tmp_path)
    model = copy.deepcopy(e2e["lora"])
    trainer, _ = _train(model, tok, e2e["forget"], e2e["retain"], cb, tmp_path)
    assert trainer.state.global_step == STEPS  # nothing stops it
    rows = read_trajectory(tmp_path / "trajectory.csv")
    assert [r["step"] for r in rows] == steps  # the final step is evaluated whatever the period
    assert set(rows[0]) >= set(plan.track) and "satisfied" not in rows[0]
    assert all(r.get("forget.rougeL") is None for r in rows)  # no rule: no generation
    # The trainer logs at every evaluation: each row after the first has the loss of its own step.
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert [r["loss"] for r in rows[1:]] == [logged[s] for s in steps[1:]]
    for name, value in _trainable(model).items():  # nothing restored: the final weights
        torch.testing.assert_close(value, e2e["ref"].weights[STEPS][name], rtol=1e-5, atol=1e-6)
    assert cb.summary["kept_step"] == STEPS and not cb.summary["restored"]
