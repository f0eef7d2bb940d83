"""Stopping rules through ``unlearn(...)`` and ``fastunlearn unlearn``: a run that stops, keeps the
state the rule chose (adapter, metrics) and writes its trajectory; a trajectory without a rule; the
tofu rule's reference model measured; and every bad input refused before any model loads (exit 2)."""

import copy
import json
import math
import re

import pytest
from helpers import stopping as helpers
from helpers.models import tiny_llama
from helpers.stopping import TEXTS, qa_record

from fastunlearn.cli import main
from fastunlearn.demo import write_jsonl
from fastunlearn.evaluation.sets import SetEvaluator
from fastunlearn.evaluation.stop_callback import read_trajectory
from fastunlearn.training import pipeline as run_module
from fastunlearn.training.pipeline import unlearn

FORGET = [qa_record(i) for i in range(4)]
RETAIN = [qa_record(i) for i in range(8, 14)]
STEPS = 8  # 4 forget examples, batches of 2, 4 epochs
OPTIONS = dict(
    method="gd",
    init="lora",
    template="phi",
    max_length=128,
    lora_r=4,
    lora_alpha=8,
    learning_rate=3e-2,
    num_epochs=STEPS // 2,
    batch_size=2,
    gradient_accumulation_steps=1,
    warmup_epochs=0,
    logging_steps=1,
    seed=0,
    progress=False,
    eval_items=8,  # the whole forget set: the trajectory's numbers are metrics["after"]'s
)


pytestmark = pytest.mark.usefixtures("one_thread")


tok = pytest.fixture(scope="module", name="tok")(helpers.tokenizer)
trained = pytest.fixture(scope="module", name="trained")(helpers.trained_model)  # of `tok`


@pytest.fixture(scope="module")
def free_run(trained, tok, tmp_path_factory):
    """A run without a rule that evaluates after every step: the trajectory to choose thresholds on."""
    out = tmp_path_factory.mktemp("free")
    result = unlearn(copy.deepcopy(trained), tok, FORGET, RETAIN, output_dir=out, eval_every=1, **OPTIONS)
    return result, read_trajectory(out / "trajectory.csv")


@pytest.mark.slow
def test_eval_every_without_a_rule_records_a_trajectory(free_run):
    result, rows = free_run
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert "satisfied" not in rows[0] and all(r.get("forget.rougeL") is None for r in rows)
    s = result.metrics["stopping"]
    assert s["rule"] is None and s["evaluations"] == STEPS and s["kept_step"] == STEPS
    assert result.metrics["train"]["global_step"] == STEPS
    # The last row is the final model, measured on the same (whole) forget set as metrics["after"].
    assert rows[-1]["forget.prob"] == pytest.approx(result.metrics["after"]["forget"]["prob"], rel=1e-5)
    assert rows[0]["forget.prob"] == pytest.approx(result.metrics["before"]["forget"]["prob"], rel=1e-5)


@pytest.mark.slow
def test_unlearn_stops_keeps_the_first_crossing_and_writes_the_trajectory(free_run, trained, tok, tmp_path):
    from peft import PeftModel

    _, free = free_run
    probs = [r["forget.prob"] for r in free]
    # The first step k >= 2 clearly below every earlier value; the threshold halfway.
    k = next(s for s in range(2, STEPS - 2) if probs[s] < min(probs[:s]) - 1e-3)
    threshold = (probs[k] + min(probs[:k])) / 2
    base = copy.deepcopy(trained)
    out = tmp_path / "run"
    result = unlearn(
        copy.deepcopy(trained),
        tok,
        FORGET,
        RETAIN,
        output_dir=out,
        stop=f"forget.prob<={threshold!r}",
        eval_every=1,
        patience=2,
        restore="first",
        **OPTIONS,
    )
    s = result.metrics["stopping"]
    assert (s["first_satisfied_step"], s["stopped_step"], s["kept_step"]) == (k, k + 2, k)
    assert s["restored"] and s["satisfied"] and result.metrics["train"]["global_step"] == k + 2
    assert s["trajectory_csv"] == str(out / "trajectory.csv")

    rows = read_trajectory(out / "trajectory.csv")
    assert [r["step"] for r in rows] == list(range(k + 3))
    assert [r["satisfied"] for r in rows] == [float(p <= threshold) for p in probs[: k + 3]]
    for r, f in zip(rows, free):  # the same training as the run without a rule, up to the stop
        assert r["forget.prob"] == pytest.approx(f["forget.prob"], rel=1e-5)
        assert r["step"] == 0 or math.isfinite(r["loss"])
    assert (out / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # What was saved is the state of step k, not the state training stopped in.
    after = result.metrics["after"]["forget"]["prob"]
    assert after == pytest.approx(rows[k]["forget.prob"], rel=1e-5)
    assert abs(after - rows[k + 2]["forget.prob"]) > 1e-3
    assert json.loads((out / "metrics.json").read_text())["stopping"]["kept_step"] == k
    adapter = PeftModel.from_pretrained(base, out / "adapter")
    reloaded = SetEvaluator(tok, helpers.examples(tok, FORGET)).evaluate(adapter, {"forget.prob"})
    assert reloaded["forget.prob"] == pytest.approx(rows[k]["forget.prob"], rel=1e-5)
    config = json.loads((out / "run_config.json").read_text())["options"]
    assert config["stop"] == f"forget.prob<={threshold!r}" and config["patience"] == 2


@pytest.mark.slow
def test_tofu_rule_measures_the_reference_model(trained, tok, tmp_path):
    # The retain-only model: trained on every pair but the forget set's. The answers share a pattern, so
    # its forget accuracy and ROUGE-L are well above 0 (a reference the rule can reach).
    reference = helpers.trained_model(tok, qa=range(4, 20), texts=())
    ref_dir = tmp_path / "reference"
    reference.save_pretrained(ref_dir)
    options = {**OPTIONS, "num_epochs": 3}
    result = unlearn(
        copy.deepcopy(trained),
        tok,
        FORGET,
        RETAIN,
        output_dir=tmp_path / "run",
        stop="tofu",
        reference_model=str(ref_dir),
        **options,
    )
    want = SetEvaluator(tok, helpers.examples(tok, FORGET), max_new_tokens=200).evaluate(
        reference, {"forget.acc", "forget.rougeL"}
    )
    rule = result.metrics["stopping"]["rule"]
    assert rule == f"tofu: forget.acc<={want['forget.acc']:g} and forget.rougeL<={want['forget.rougeL']:g}"
    rows = read_trajectory(tmp_path / "run" / "trajectory.csv")
    steps = [r["step"] for r in rows]
    assert steps == list(range(0, steps[-1] + 1, 2))  # every epoch (the default with a rule)
    for r in rows:
        holds = r["forget.acc"] <= want["forget.acc"] and (
            r["forget.rougeL"] is not None and r["forget.rougeL"] <= want["forget.rougeL"]
        )
        assert r["satisfied"] == float(holds)
    # It stops at the first evaluation that satisfies the rule, or runs to the end.
    first = next((r["step"] for r in rows[1:] if r["satisfied"]), None)
    assert result.metrics["stopping"]["stopped_step"] == first
    assert steps[-1] == (first if first is not None else 2 * options["num_epochs"])
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())["options"]
    assert config["reference_model"] == str(ref_dir) and config["unseen"] is None

    # Another vocabulary: refused before training.
    other = tiny_llama(len(tok) + 1, seed=1)
    with pytest.raises(ValueError, match=r"reference model's vocabulary \(301\) differs"):
        unlearn(
            copy.deepcopy(trained),
            tok,
            FORGET,
            RETAIN,
            output_dir=tmp_path / "run2",
            stop="tofu",
            reference_model=other,
            **options,
        )
    assert not (tmp_path / "run2" / "trajectory.csv").exists()


def test_extraction_rule_that_can_never_fire_fails_before_the_fisher_estimate(tok, tmp_path):
    # A random model extracts nothing of the unseen text (EL10 = 0): nothing can be below that.
    model = tiny_llama(len(tok), seed=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="nothing is below 0"):
        unlearn(
            model,
            tok,
            [{"text": t} for t in TEXTS[:4]],
            [{"text": t} for t in TEXTS[6:]],
            output_dir=tmp_path / "run",
            **{**OPTIONS, "init": "fila"},
            stop="extraction",
            unseen=TEXTS[4:6],
        )
    assert not (tmp_path / "run" / "fisher").exists()


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    for name, records in (("forget", FORGET), ("retain", RETAIN)):
        write_jsonl(str(tmp_path / f"{name}.json"), records)
    write_jsonl(str(tmp_path / "unseen.json"), [{"text": t} for t in TEXTS[4:]])
    return tmp_path


def argv(ws, *extra):
    return [
        "unlearn",
        str(ws / "model"),
        "--forget",
        str(ws / "forget.json"),
        "--retain",
        str(ws / "retain.json"),
        "--output",
        str(ws / "out"),
        *extra,
    ]


def test_cli_passes_the_stopping_options(files, monkeypatch):
    seen = {}

    def fake_run(cfg):
        seen.update(vars(cfg))
        raise ValueError("stop here")

    monkeypatch.setattr(run_module, "run_unlearning", fake_run)
    extra = ["--stop-when", "forget.prob<=0.1", "--eval-every", "5", "--patience", "2", "--restore", "best"]
    extra += ["--eval-items", "8", "--generate-within", "0.25", "--best-by", "retain.prob,retain.acc"]
    assert main(argv(files, *extra)) == 2
    names = ("stop", "eval_every", "patience", "restore", "eval_items", "generate_within", "best_by")
    assert {k: seen[k] for k in names} == {
        "stop": "forget.prob<=0.1",
        "eval_every": 5,
        "patience": 2,
        "restore": "best",
        "eval_items": 8,
        "generate_within": 0.25,
        "best_by": "retain.prob,retain.acc",
    }
    assert seen["unseen"] is None and seen["reference_model"] is None
    main(argv(files, "--stop-when", "extraction", "--unseen", str(files / "unseen.json")))
    assert seen["unseen"] == str(files / "unseen.json") and seen["eval_every"] is None
    main(argv(files))
    assert seen["stop"] is None and seen["patience"] == 0 and seen["restore"] == "first"
    assert seen["generate_within"] == 0.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stop-when", "forget.rouge<=0.5"], "unknown metric 'forget.rouge'.*did you mean forget.rougeL"),
        (["--stop-when", "forget.prob=0.05"], "malformed bound 'forget.prob=0.05'"),
        (["--stop-when", "forget.prob<=5"], "always holds"),
        (["--stop-when", "loss<=0.1"], "training loss"),
        (["--stop-when", "forget.ma<0.3"], "forget.ma needs raw-text"),
        (["--stop-when", "tofu"], r"give that model \(--reference-model DIR\)"),
        (["--stop-when", "tofu", "--reference-model", "{ws}/nope"], "reference model directory not found"),
        (["--stop-when", "extraction", "--unseen", "{ws}/unseen.json"], "forget.ma needs raw-text"),
        (["--stop-when", "extraction"], r"give that text \(--unseen FILE\)"),
        (["--stop-when", "forget.prob<=0.1", "--unseen", "{ws}/unseen.json"], "does not use it"),
        (["--stop-when", "forget.prob<=0.1", "--restore", "best"], "give patience >= 1"),
        (["--stop-when", "forget.prob<=0.1", "--eval-every", "0"], "'epoch' or a positive number"),
        (["--stop-when", "forget.prob<=0.1", "--eval-every", "often"], "'epoch' or a positive number"),
        (["--stop-when", "forget.prob<=0.1", "--eval-items", "0"], "--eval-items must be positive"),
        (["--patience", "2"], r"patience need\(s\) a stopping rule"),
        (["--stop-when", "tofu:acc=0.3,rougeL=0.4", "--generate-within", "-1"], "--generate-within must be"),
        (
            ["--stop-when", "forget.prob<=0.1", "--patience", "1", "--best-by", "retain.prob"],
            "--best-by ranks",
        ),
    ],
)
def test_cli_bad_stopping_input_exits_2_before_the_model_loads(files, monkeypatch, capsys, extra, message):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "load_model_and_tokenizer", no_load)
    assert main(argv(files, *(e.format(ws=files) for e in extra))) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastunlearn unlearn: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (files / "out").exists()


def test_cli_unseen_file_must_exist(files, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    text = files / "text.json"
    write_jsonl(str(text), [{"text": t} for t in TEXTS[:4]])
    args = argv(files, "--stop-when", "extraction", "--unseen", str(files / "missing.json"))
    args[args.index("--forget") + 1] = str(text)
    assert main(args) == 2
    assert "unseen text file not found" in capsys.readouterr().err
