"""Evaluation and stopping rules on several processes, checked on 2 CPU ranks over gloo.

Each rank evaluates its share of the items (rank ``r`` of ``W``: items ``r, r+W, ...``) and the per-item
results are gathered in item order, so every aggregate is taken on all the items. Two references:

- the same function called in one process on each rank's share, put back in item order: the same
  batches through the same kernels, so the gathered results must be *bitwise* those (this checks
  the sharding and the gather, not the arithmetic);
- one process on all the items (what the user compares against): the ranks batch other examples
  together, so the per-item numbers agree to ``EVAL_RTOL`` / ``EVAL_ATOL`` (derived in
  ``helpers/distributed.py``). Greedy tokens, hits (MA, accuracy) and the answers' ROUGE-L change
  only where two logits tie within that margin; the memorised model has no such ties, so they must
  be equal.

The stopping rule's decision is taken on the main process's numbers: both ranks stop at the same step,
restore the same state, and only the main process writes ``trajectory.csv``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import stopping as H
from helpers.distributed import EVAL_ATOL as ATOL
from helpers.distributed import EVAL_RTOL as RTOL
from helpers.distributed import assert_results_close, spawn, torchrun
from helpers.workspace import build_workspace

from fastunlearn.engines import distributed

# ---------------------------------------------------------------------------------------------------
# The sharding primitive


def _map_worker(rank: int) -> None:
    items = list(range(7))  # odd: 4 and 3 items
    got = distributed.map_sharded(lambda part: [10 * i for i in part], items)
    assert got == [10 * i for i in items]
    tensors = distributed.map_sharded(
        lambda part: {
            "x": torch.tensor(part, dtype=torch.float64)[:, None].repeat(1, 2),
            "n": torch.tensor(part),
        },
        items,
    )
    assert (
        torch.equal(tensors["x"][:, 1], torch.arange(7, dtype=torch.float64))
        and tensors["n"].tolist() == items
    )
    # Fewer items than ranks: rank 1 has nothing and does not call fn.
    calls = []
    assert distributed.map_sharded(lambda part: calls.append(part) or [i + 1 for i in part], [5]) == [6]
    assert calls == ([[5]] if rank == 0 else [])
    # An error on one rank is every rank's error (nobody waits forever in the gather).
    with pytest.raises(ValueError, match="item 1 is bad"):
        distributed.map_sharded(
            lambda part: [(_ for _ in ()).throw(ValueError("item 1 is bad")) if i == 1 else i for i in part],
            [0, 1, 2],
        )
    assert distributed.broadcast_object({"rank": rank}) == {"rank": 0}
    # Weights split between the ranks (ZeRO-3 marks its parameters with ds_id): every rank runs fn on
    # every item, in step.
    layer = torch.nn.Linear(2, 2)
    assert not distributed.parameters_sharded(layer)
    layer.weight.ds_id = 0
    calls.clear()
    assert distributed.map_sharded(lambda part: calls.append(part) or part, [1, 2, 3], model=layer) == [
        1,
        2,
        3,
    ]
    assert distributed.parameters_sharded(layer) and calls == [[1, 2, 3]]


def test_map_sharded_gathers_in_item_order_and_shares_errors():
    spawn(_map_worker)


# ---------------------------------------------------------------------------------------------------
# Evaluation


def _tofu_items(ids):
    from fastunlearn.evaluation import TofuItem

    return [
        TofuItem(
            question=H.qa_record(i)["question"],
            answer=H.qa_record(i)["answer"],
            paraphrased_answer=f"Town {i} is where author {i} was born.",
            perturbed_answers=(f"Author {i} was born in town {i + 3}.", f"Author {i} was born in a village."),
            source=f"item {i}",
        )
        for i in ids
    ]


FORGET, RETAIN = range(0, 7), range(10, 15)
REFERENCE = [0.5, 0.9, 1.1, 1.3, 0.7, 1.0, 0.8]  # another model's forget truth ratios
TOFU_OPTIONS = dict(template="phi", max_new_tokens=12, batch_size=3, reference_truth_ratios=REFERENCE)


def _examples(tok):
    from fastunlearn import data as fdata

    forget = H.examples(tok, [H.qa_record(i) for i in FORGET])
    retain = H.examples(tok, [H.qa_record(i) for i in RETAIN])
    unseen = H.examples(tok, [{"text": t} for t in H.TEXTS[3:]], "text")
    return forget, retain, unseen, fdata.pad_id_of(tok)


def _evaluations(model, tok) -> dict:
    """Everything sharded: TOFU, extraction, the subset evaluator, unlearn's before/after statistics."""
    from fastunlearn.evaluation import evaluate_extraction, evaluate_tofu
    from fastunlearn.evaluation.likelihood import answer_metrics, example_stats
    from fastunlearn.evaluation.sets import SetEvaluator

    forget, retain, unseen, pad = _examples(tok)
    tofu = evaluate_tofu(
        model, tok, {"forget": _tofu_items(FORGET), "retain": _tofu_items(RETAIN)}, **TOFU_OPTIONS
    )
    extraction = evaluate_extraction(model, tok, H.TEXTS[:5], n=4, max_length=24, batch_size=2)
    evaluator = SetEvaluator(tok, forget, retain, unseen, eval_items=6, batch_size=2, max_new_tokens=12)
    subset = evaluator.evaluate(model, sorted(evaluator.available))
    stats = {k: v.tolist() for k, v in example_stats(model, forget, pad, 3).items()}
    return {
        "tofu": tofu,
        "extraction": extraction,
        "subset": subset,
        "stats": stats,
        "basic": answer_metrics(example_stats(model, retain, pad, 3)),
    }


def _load(model_dir: str):
    from fastunlearn.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, None)


def _eval_worker(rank: int, model_dir: str, out: str) -> None:
    model, tok = _load(model_dir)
    results = _evaluations(model, tok)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    tok = H.tokenizer()
    model = H.trained_model(tok)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _single_process_on_shards(model, tok) -> dict:
    """The per-item statistics computed in one process on each rank's share, in item order."""
    from fastunlearn.evaluation.likelihood import example_stats

    forget, _, _, pad = _examples(tok)
    parts = [example_stats(model, forget[r::2], pad, 3) for r in range(2)]
    out = {}
    for key in parts[0]:
        value = torch.empty((len(forget),), dtype=parts[0][key].dtype)
        for r in range(2):
            value[r::2] = parts[r][key]
        out[key] = value.tolist()
    return out


def test_two_rank_evaluation_equals_one_process(model_dir, tmp_path):
    spawn(_eval_worker, model_dir, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank holds the same results, bit for bit
    got = ranks[0]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        model, tok = _load(model_dir)
        want = json.loads(json.dumps(_evaluations(model, tok)))
        on_shards = _single_process_on_shards(model, tok)
    finally:
        torch.set_num_threads(threads)
    assert got["stats"] == on_shards  # the gather puts each rank's numbers back where they belong
    # Per item, then every aggregate computed from the items (means, truth ratios, the KS test).
    for name in ("forget", "retain"):
        got_nll, want_nll = (r["tofu"]["sets"][name]["avg_nll"] for r in (got, want))
        assert_results_close(got_nll, want_nll, f"{name}.avg_nll")
    ratios = "forget_truth_ratios"
    assert_results_close(got["tofu"][ratios], want["tofu"][ratios], "truth ratios")
    assert_results_close(got, want, "results")
    assert want["tofu"]["forget_quality"] is not None and want["subset"]["retain.rougeL"] > 0
    assert 0 < want["extraction"]["ma"] < 1  # something to share: not all hits, not none


@pytest.mark.slow
def test_eval_under_torchrun_prints_and_writes_once_what_one_process_computes(tmp_path):
    from fastunlearn.cli import main

    ws = build_workspace(tmp_path / "ws")

    def args(out: Path) -> list[str]:
        return [
            "eval", str(ws / "model"), "--forget", str(ws / "forget_perturbed.json"), "--retain",
            str(ws / "forget.json"), "--template", "phi", "--max-new-tokens", "8", "--batch-size", "2",
            "--output", str(out / "eval.json"), "--save-reference", str(out / "ref.json"),
        ]  # fmt: skip

    (tmp_path / "two").mkdir()
    proc = torchrun(args(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Results written to") == 1 and proc.stdout.count("forget") >= 1, proc.stdout
    assert sorted(os.listdir(tmp_path / "two")) == ["eval.json", "ref.json"]
    (tmp_path / "one").mkdir()
    assert main(args(tmp_path / "one")) == 0
    for name in ("eval.json", "ref.json"):
        got = json.loads((tmp_path / "two" / name).read_text())
        want = json.loads((tmp_path / "one" / name).read_text())
        for record in (got, want):  # where each run saved its reference
            record.get("tofu", {}).pop("reference_saved_to", None)
        assert_results_close(got, want, name)


# ---------------------------------------------------------------------------------------------------
# Stopping


STEPS = 6
SHRINK = 0.7  # each "training step" scales the final norm: the forget probability falls step by step


def _stop_run(model, tok, out: str | None, threshold: float | None):
    """A stopping callback driven by hand over STEPS fake training steps (the final norm shrinks);
    returns the callback, the step training stopped at and the final norm's weight."""
    from transformers import TrainerControl, TrainerState

    from fastunlearn.evaluation.sets import SetEvaluator
    from fastunlearn.evaluation.stop_callback import StoppingCallback
    from fastunlearn.evaluation.stopping import StoppingController, parse_stop_rule

    forget, retain, _, _ = _examples(tok)
    for p in model.parameters():
        p.requires_grad_(False)
    norm = model.model.norm.weight
    norm.requires_grad_(True)
    rule = None
    if threshold is not None:
        rule = parse_stop_rule(f"forget.prob<={threshold!r}", data={"forget": "qa", "retain": "qa"})
    controller = StoppingController(
        rule,
        every=1,
        patience=0 if rule is None else 2,
        restore="first" if rule is None else "best",
        retain_metrics=("retain.prob", "retain.acc"),
        track=("forget.prob", "retain.prob", "retain.acc"),
    )
    evaluator = SetEvaluator(tok, forget, retain, eval_items=7, batch_size=3, max_new_tokens=12)
    cb = StoppingCallback(controller, evaluator, output_dir=out, plot=False)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = STEPS
    cb.on_train_begin(None, state, control, model=model)
    stopped = None
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            norm.mul_(SHRINK)
        state.global_step, state.epoch = step, step / STEPS
        cb.on_step_end(None, state, control, model=model)
        if control.should_training_stop:
            stopped = step
            break
    cb.on_train_end(None, state, control, model=model)
    return cb, stopped, norm.detach().clone()


def _stop_worker(rank: int, model_dir: str, out: str, threshold: float) -> None:
    from safetensors.torch import save_file

    model, tok = _load(model_dir)
    cb, stopped, norm = _stop_run(model, tok, out, threshold)
    assert (cb.trajectory.path is not None) == (rank == 0)  # the main process alone writes
    record = {"stopped": stopped, "summary": cb.summary, "rows": cb.trajectory.rows}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    save_file({"norm": norm.contiguous()}, os.path.join(out, f"norm{rank}.safetensors"))


def test_two_ranks_stop_at_the_same_step_and_keep_the_same_state(model_dir, tmp_path):
    from safetensors.torch import load_file

    from fastunlearn.evaluation.stop_callback import read_trajectory

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The forget probability along the fake run, to put the threshold between two evaluations.
        model, tok = _load(model_dir)
        cb, _, _ = _stop_run(model, tok, None, None)
        probs = [row["forget.prob"] for row in cb.trajectory.rows]
        assert all(a > b for a, b in itertools.pairwise(probs)), probs  # the premise: it falls
        threshold = (probs[2] + probs[3]) / 2  # first holds at step 3, by a margin far above rounding
        assert min(abs(p - threshold) for p in probs) > 16 * (ATOL + RTOL * threshold), probs
        model, tok = _load(model_dir)
        _, want_stop, want_norm = _stop_run(model, tok, None, threshold)
    finally:
        torch.set_num_threads(threads)
    assert want_stop == 5  # first at 3, patience 2; retain falls too, so "best" keeps step 3

    spawn(_stop_worker, model_dir, str(tmp_path), threshold)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    norms = [load_file(tmp_path / f"norm{r}.safetensors")["norm"] for r in range(2)]
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == want_stop
    for key in ("first_satisfied_step", "stopped_step", "kept_step", "restored", "kept_metrics"):
        assert ranks[0]["summary"][key] == ranks[1]["summary"][key], key
    assert ranks[0]["summary"]["first_satisfied_step"] == 3
    assert ranks[0]["summary"]["kept_step"] == 3 and ranks[0]["summary"]["restored"]
    assert torch.equal(norms[0], norms[1])
    assert torch.equal(norms[0], want_norm)  # the state one process keeps (the same kept step)
    written = read_trajectory(tmp_path / "trajectory.csv")
    assert [row["step"] for row in written] == list(range(want_stop + 1))
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["trajectory.csv", "rank0.json", "rank1.json", "norm0.safetensors", "norm1.safetensors"]
    )


@pytest.mark.slow
def test_torchrun_unlearn_with_a_stopping_rule_stops_every_rank_at_the_same_step(tmp_path):
    from fastunlearn.evaluation.stop_callback import read_trajectory

    ws = build_workspace(tmp_path / "ws")
    out = tmp_path / "run"
    proc = torchrun(
        [
            "unlearn", str(ws / "model"), "--forget", str(ws / "forget.json"), "--retain",
            str(ws / "retain.json"), "--output", str(out), "--template", "phi", "--epochs", "2",
            "--batch-size", "2", "--grad-accum", "1", "--rank", "4", "--init", "lora", "--no-progress",
            # Holds at every evaluation (the untrained model gives its answers ~1/300): stops one
            # evaluation after the first, at step 2 of 4, and keeps the better of steps 1 and 2.
            "--stop-when", "forget.prob<=0.9", "--eval-every", "1", "--patience", "1", "--restore", "best",
            "--eval-items", "5",
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # Had one rank gone on training, the other's DDP gradient all-reduce would have waited for it.
    assert metrics["train"]["global_step"] == 2
    assert metrics["stopping"]["stopped_step"] == 2 and metrics["stopping"]["first_satisfied_step"] == 1
    rows = read_trajectory(out / "trajectory.csv")
    assert [row["step"] for row in rows] == [0, 1, 2]
    best = max(rows[1:], key=lambda row: (row["retain_score"], -row["step"]))
    assert metrics["stopping"]["kept_step"] == best["step"]
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no stray staging files
