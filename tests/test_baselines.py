"""The baselines end to end: every method unlearns the memorised tiny model; refusal answers; bad input is
one line; a resumed run, a stopped run and a bf16 run of the reference-using methods.

The model has memorised 20 question/answer pairs (:mod:`helpers.memorised`); 4 are forgotten, 8
retained. A method "moves the forget metrics" when the forget set's answer probability (teacher
forced, ``metrics.json``'s ``before``/``after``) drops by more than 0.05 in a few steps.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from helpers.crash import crash_after_the_first_checkpoint
from helpers.memorised import memorised
from helpers.stopping import qa_record
from helpers.workspace import build_workspace
from transformers import TrainerCallback

from fastunlearn import data as fdata
from fastunlearn.cli import main
from fastunlearn.data.examples import read_refusals, refusal_records
from fastunlearn.methods import METHODS
from fastunlearn.training.pipeline import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET = [qa_record(i) for i in range(4)]
RETAIN = [qa_record(i) for i in range(4, 12)]
OPTIONS = dict(
    template="phi", num_epochs=2, batch_size=2, gradient_accumulation_steps=1, lora_r=4, lora_alpha=8,
    learning_rate=1e-2, warmup_epochs=0, progress=False, fisher_batch_size=2, logging_steps=100,
)  # fmt: skip
# Full fine-tuning moves every weight: a tenth of the rate. RMU's published α = 1200 is for a 7B model's
# activations; on this 32-wide model it holds every activation in place (the forget term cannot move),
# so α = 1 here.
EXTRA = {
    ("rmu", "lora"): dict(retain_weight=1.0, learning_rate=3e-2, num_epochs=4),
    ("rmu", "full"): dict(retain_weight=1.0, learning_rate=1e-2),
}
RUNS = [(m, "lora") for m in METHODS] + [("kl", "fila"), ("dpo", "fila"), ("kl", "full"), ("rmu", "full")]


def run(method: str, init: str, out, **options):
    model, tokenizer = memorised()
    full = {"learning_rate": 1e-3} if init == "full" else {}
    kwargs = {**OPTIONS, **full, **EXTRA.get((method, init), {}), **options}
    return unlearn(
        copy.deepcopy(model), tokenizer, FORGET, RETAIN, method=method, init=init, output_dir=out, **kwargs
    )


@pytest.mark.slow
@pytest.mark.parametrize(("method", "init"), RUNS)
def test_every_method_unlearns(method, init, tmp_path):
    result = run(method, init, tmp_path / "out")
    before, after = result.metrics["before"], result.metrics["after"]
    assert after["forget"]["prob"] < before["forget"]["prob"] - 0.05, (before, after)
    assert all(math.isfinite(v) for part in after.values() for v in part.values())
    options = json.loads((tmp_path / "out" / "run_config.json").read_text())["options"]
    assert options["method"] == method and options["init"] == init
    if method == "rmu":  # only the MLP down-projections of layers ℓ-2..ℓ = 0, 1 trained
        trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
        assert trained and all("mlp.down_proj" in n for n in trained), trained


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_the_package_refusals():
    answers = read_refusals()
    assert len(answers) >= 100 and len(set(answers)) == len(answers)
    assert all(a == a.strip() and len(a.split()) >= 2 for a in answers)


def test_refusal_files(tmp_path):
    (tmp_path / "plain.txt").write_text("No idea.\n\n  I can't say.  \n")
    (tmp_path / "lines.jsonl").write_text('{"answer": "Not known."}\n{"answer": "Unknown to me."}\n')
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"answer": "fine"}\n{"text": "no answer"}\n')
    assert read_refusals(tmp_path / "plain.txt") == ["No idea.", "I can't say."]
    assert read_refusals(tmp_path / "lines.jsonl") == ["Not known.", "Unknown to me."]
    with pytest.raises(ValueError, match=r"empty\.txt: no refusal answers"):
        read_refusals(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'answer'"):
        read_refusals(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match=r"none\.txt"):
        read_refusals(tmp_path / "none.txt")


def test_each_question_gets_a_seeded_refusal():
    records = [{**qa_record(i), "_source": f"f:{i}"} for i in range(40)]
    answers = read_refusals()
    first = refusal_records(records, "qa", answers, seed=3)
    assert first == refusal_records(records, "qa", answers, seed=3)  # the same on resume
    assert [r["answer"] for r in first] != [
        r["answer"] for r in refusal_records(records, "qa", answers, seed=4)
    ]
    assert [r["question"] for r in first] == [r["question"] for r in records]
    assert all(r["answer"] in answers for r in first) and len({r["answer"] for r in first}) > 20
    prompts = refusal_records([{"prompt": "Q?", "completion": "A."}], "prompt_completion", ["No."], seed=0)
    assert prompts[0]["completion"] == "No."
    with pytest.raises(ValueError, match="no question"):
        refusal_records([{"text": "t"}], "text", answers, seed=0)


def test_paired_batches_carry_the_refusals_and_references():
    _, tok = memorised()
    forget = fdata.tokenize_records(FORGET, tok, data_format="qa", template="phi")
    idk = fdata.tokenize_records(
        refusal_records(FORGET, "qa", ["No idea."], 0), tok, data_format="qa", template="phi"
    )
    dataset = fdata.PairedDataset(forget, [], idk=idk)
    dataset.ref_logp = {"forget": torch.arange(4.0), "idk": -torch.arange(4.0)}
    batch = fdata.PairCollator(0)([dataset[i] for i in (1, 3)])
    assert torch.equal(batch["idk"]["input_ids"], fdata.collate([idk[1], idk[3]], 0)["input_ids"])
    assert batch["forget"]["ref_logp"].tolist() == [1.0, 3.0] and batch["idk"]["ref_logp"].tolist() == [
        -1.0,
        -3.0,
    ]
    with pytest.raises(ValueError, match="one example per forget example"):
        fdata.PairedDataset(forget, [], idk=idk[:2])


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = build_workspace(tmp_path_factory.mktemp("baselines"))
    (root / "empty_idk.txt").write_text("\n")
    (root / "text.json").write_text("".join(json.dumps({"text": f"some text {i}"}) + "\n" for i in range(4)))
    (root / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return root


def _unlearn(ws, out, *extra):
    data = ["--forget", str(ws / "forget.json"), "--retain", str(ws / "retain.json")]
    options = ["--output", str(out), "--template", "phi", "--rank", "4", "--alpha", "8", "--no-progress"]
    return ["unlearn", str(ws / "model"), *data, *options, *extra]


BAD = [
    (("--method", "forgetall"), "invalid choice: 'forgetall'"),
    (("--method", "gd", "--retain-term", "l2"), "invalid choice: 'l2'"),
    (
        ("--method", "rmu", "--init", "lora", "--rmu-layer", "9"),
        "9 is out of range: the model has 2 decoder layers",
    ),
    (("--method", "rmu", "--init", "lora", "--rmu-train-layers", "0,1,x"), "'x' is not a layer index"),
    (("--method", "rmu", "--init", "lora", "--rmu-layer", "0", "--rmu-train-layers", "1"), "at or below"),
    (("--method", "rmu", "--init", "fila"), "'fila' does not apply to rmu"),
    (("--method", "rmu", "--init", "lora", "--target-modules", "q_proj"), "target-modules does not apply"),
    (
        ("--method", "idk", "--init", "lora", "--idk", "{ws}/empty_idk.txt"),
        "empty_idk.txt: no refusal answers",
    ),
    (
        ("--method", "dpo", "--init", "lora", "--forget", "{ws}/text.json"),
        "text' forget records have no question",
    ),
    (
        ("--method", "kl", "--init", "full", "--deepspeed", "{ws}/zero3.json"),
        "needs a frozen copy of the model",
    ),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_method_options_are_one_line(ws, tmp_path, capsys, extra, message):
    if "--deepspeed" in extra:
        pytest.importorskip("deepspeed")
    argv = _unlearn(ws, tmp_path / "out", *(e.format(ws=ws) for e in extra))
    if "--forget" in extra:  # the later --forget replaces the workspace's
        i = argv.index("--forget")
        del argv[i : i + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Resume, stopping, bf16


def _adapter(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_a_resumed_dpo_kl_fila_run_is_the_uninterrupted_one(tmp_path, monkeypatch):
    """DPO's refusals and fixed reference, the KL term's reference (FILA's initial adapters): after a
    crash in the second epoch, the resumed run trains what the uninterrupted run trains."""
    options = dict(retain_term="kl", evaluate=False)
    full = run("dpo", "fila", tmp_path / "a", **options)
    crash_after_the_first_checkpoint(monkeypatch, lambda: run("dpo", "fila", tmp_path / "b", **options))
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "checkpoint-2")
    resumed = run("dpo", "fila", tmp_path / "b", resume=True, **options)
    assert resumed.metrics["train"]["global_step"] == 4
    got, want = _adapter(resumed), _adapter(full)
    for name in want:  # the same steps; the optimizer state reloaded from the checkpoint (fp32)
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="differs in retain_term"):
        (tmp_path / "b" / "metrics.json").unlink()
        run("dpo", "fila", tmp_path / "b", resume=True, evaluate=False)


@pytest.mark.slow
def test_stopping_rule_with_the_kl_reference(tmp_path):
    result = run("npo+kl", "lora", tmp_path / "out", stop="forget.prob<=0.999", eval_every=1, patience=1,
                 restore="best", num_epochs=3)  # fmt: skip
    stopping = result.metrics["stopping"]
    assert stopping["satisfied"] and stopping["stopped_step"] < 6


class Log(TrainerCallback):
    def __init__(self) -> None:
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        self.history.append(dict(logs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["npo+kl", "dpo", "rmu"])
def test_bf16_runs_start_at_the_reference(method, tmp_path):
    """Under bf16 autocast the per-step reference is computed by the same bf16 calls as the policy: at
    the first step the KL term and RMU's retain term are exactly 0. DPO's fixed reference was taken on
    other batches (every forget example at once), whose bf16 rounding differs: its log-ratios start
    within 0.05 nats of 0 (a few units of 2⁻⁸ of the summed token log-probabilities), the loss within
    that of (2/β)·log 2 (its slope in the mean log-ratio is 1)."""
    log = Log()
    run(method, "lora", tmp_path / "out", precision="bf16", logging_steps=1, callbacks=[log], evaluate=False)
    history = [entry for entry in log.history if "loss" in entry]
    first = history[0]
    if method == "dpo":
        assert abs(first["forget_loss"] - 2 / 0.1 * math.log(2)) <= 0.05
    else:
        assert first["retain_loss"] == 0
    assert all(math.isfinite(h["loss"]) for h in history)
