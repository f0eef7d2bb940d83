"""The field's evaluations from the command line on the memorised tiny model: ``fastunlearn eval`` runs
membership inference, MUSE, an lm-evaluation-harness task and dialogue F1 in one call (the model loaded
once, the retrained model once for both PrivLeaks), and writes exactly what the evaluation functions
return when called directly; bad input is one line (exit 2) before any model loads; ``unlearn --muse``
trains on the directory's raw text, stops by the muse rule and reports the evaluations after training."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from helpers import stopping as H
from helpers.memorised import memorised
from helpers.models import tiny_llama
from helpers.muse import write, write_muse_dir

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing may download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastunlearn.cli import main
from fastunlearn.evaluation import harness
from fastunlearn.models import loading

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = Path(__file__).parent / "data" / "lm_eval"
TASK = "fastunlearn_tiny_mc"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The memorised model and an untrained one (the "retrained" reference, same tokenizer) as model
    directories, a MUSE directory, membership sets and a dialogue file."""
    model, tok = memorised()
    root = tmp_path_factory.mktemp("suite")
    retrained = tiny_llama(len(tok), seed=3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for name, m in (("model", model), ("retrained", retrained)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_muse_dir(root / "muse")
    write(root / "forget.jsonl", [{"text": t} for t in H.TEXTS[:4]], array=False)
    write(root / "holdout.json", H.TEXTS[4:], array=True)  # a JSON array of strings is a set of texts
    qa = [H.qa_record(i) for i in range(6)]
    dialogue = [{"context": f"Question: {r['question']}\nAnswer:", "response": r["answer"]} for r in qa]
    write(root / "dialogue.jsonl", dialogue, array=False)
    return root


@pytest.fixture
def in_task_dir(monkeypatch, tmp_path):
    """The local lm-eval task reads its data by a relative path: run from its directory, with the
    datasets cache under ``tmp_path``."""
    import datasets

    monkeypatch.chdir(TASKS)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")


def _eval(ws: Path, *extra: str) -> list[str]:
    return ["eval", str(ws / "model"), "--device", "cpu", "--batch-size", "4", *extra]


def test_every_evaluation_in_one_call_writes_what_the_functions_return(
    ws, tmp_path, in_task_dir, monkeypatch, capsys
):
    from fastunlearn.evaluation import evaluator
    from fastunlearn.evaluation.dialogue import evaluate_dialogue
    from fastunlearn.evaluation.evaluator import headline
    from fastunlearn.evaluation.harness import evaluate_lm_eval
    from fastunlearn.evaluation.mia import evaluate_mia
    from fastunlearn.evaluation.muse import evaluate_muse

    loads = []
    real_load = loading.load_model_and_tokenizer
    for module in (loading, evaluator):
        monkeypatch.setattr(
            module, "load_model_and_tokenizer", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k)
        )
    out = tmp_path / "eval.json"
    argv = _eval(
        ws, "--mia-forget", str(ws / "forget.jsonl"), "--mia-holdout", str(ws / "holdout.json"),
        "--retrain-model", str(ws / "retrained"), "--muse", str(ws / "muse"), "--lm-eval", TASK,
        "--lm-eval-include", str(TASKS), "--dialogue", str(ws / "dialogue.jsonl"), "--output", str(out),
    )  # fmt: skip
    assert main(argv) == 0
    # The evaluated model once; the retrained model once, for both PrivLeaks.
    assert [os.path.basename(os.fspath(p)) for p in loads] == ["model", "retrained"]
    printed = capsys.readouterr().out
    for title in ("Membership inference", "MUSE", "lm-evaluation-harness", "Dialogue", "PrivLeak"):
        assert title in printed
    saved = json.loads(out.read_text())
    assert list(saved) == ["model", "mia", "muse", "dialogue", "lm_eval"]

    model, tok = memorised()
    retrained, _ = real_load(str(ws / "retrained"), tok)
    mia = evaluate_mia(
        model, tok, ws / "forget.jsonl", ws / "holdout.json", retrain_model=retrained, batch_size=4
    )
    muse = evaluate_muse(model, tok, ws / "muse", retrain_model=retrained, batch_size=4)
    dialogue = evaluate_dialogue(model, tok, ws / "dialogue.jsonl", batch_size=4)
    lm = evaluate_lm_eval(model, tok, TASK, include_path=TASKS, include_defaults=False, batch_size=4)
    assert saved["mia"] == json.loads(json.dumps(mia))
    assert saved["muse"] == json.loads(json.dumps(muse))
    assert saved["dialogue"] == json.loads(json.dumps(dialogue))
    assert saved["lm_eval"]["results"] == lm["results"]
    # What the issue names: every attack's AUC, PrivLeak with its sign convention, MUSE's C1-C4.
    assert {"loss", "zlib", "min_k", "min_k_plus_plus"} <= set(saved["mia"])
    assert saved["mia"]["min_k"]["auc"] > 0.5 and "privleak_convention" in saved["mia"]
    for key in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak"):
        assert isinstance(saved["muse"][key], float)
    # The headline numbers by flat name (what a trajectory column or a threshold would read).
    numbers = headline({k: v for k, v in saved.items() if k != "model"})
    assert numbers["mia.min_k.auc"] == saved["mia"]["min_k"]["auc"]
    assert numbers["muse.knowmem_forget"] == saved["muse"]["knowmem_forget"]
    assert numbers["dialogue.f1"] == saved["dialogue"]["f1"]
    assert numbers[f"lm_eval.{TASK}.acc"] == saved["lm_eval"]["results"][TASK]["acc,none"]


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(
        loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded")
    )


def _local_tasks_only(monkeypatch):
    """The harness's own ~15k task files take tens of seconds to index here: index the local directory
    alone (what is checked is that an unknown name is one line, not the harness's index)."""
    real = harness._task_manager.__wrapped__
    monkeypatch.setattr(harness, "_task_manager", lambda paths, defaults: real(paths, False))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--muse", "{muse_missing}"], r"MUSE file not found: .*knowmem/retain_qa\.jsonl"),
        (["--mia-forget", "{ws}/forget.jsonl", "--mia-holdout", "{empty}"], r"empty\.json: no records"),
        (["--mia-forget", "{ws}/forget.jsonl"], r"needs a holdout set \(--mia-holdout FILE\)"),
        (["--muse", "{ws}/muse", "--retrain-model", "{ws}/retrained", "--retrain-auc", "0.5"], "not both"),
        (["--muse", "{ws}/muse", "--retrain-auc", "1.5"], r"AUC must lie in \(0, 1\]"),
        (["--mia-forget", "{ws}/forget.jsonl", "--mia-holdout", "{ws}/holdout.json", "--mia-k", "1.5"],
         r"k must lie in \(0, 1\]"),
        (["--muse", "{ws}/muse", "--retrain-model", "{ws}/nowhere"], "nowhere"),
        (["--mia-forget", "{ws}/forget.jsonl", "--mia-holdout", "{ws}/holdout.json", "--muse", "{ws}/muse",
          "--retrain-auc", "0.5"], "--retrain-auc is the retrained model's AUC on one pair of sets"),
        (["--lm-eval-limit", "3", "--dialogue", "{ws}/dialogue.jsonl"], "--lm-eval-limit is used with"),
        (["--lm-eval", f"{TASK},no_such_task", "--lm-eval-include", str(TASKS)],
         r"unknown lm-eval task\(s\) \['no_such_task'\]"),
        (["--lm-eval", TASK], r'lm-evaluation-harness is not installed .*pip install "fastunlearn\[eval\]"'),
        (["--dialogue", "{ws}/forget.jsonl"], "missing field 'context'"),
        ([], "nothing to evaluate"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_model_loads(
    ws, tmp_path, no_model, monkeypatch, capsys, extra, message
):
    muse_missing = tmp_path / "muse"
    shutil.copytree(ws / "muse", muse_missing)
    (muse_missing / "knowmem" / "retain_qa").unlink()
    write(tmp_path / "empty.json", [], array=True)
    if "no_such_task" in message:
        _local_tasks_only(monkeypatch)
    if "not installed" in message:
        monkeypatch.setitem(sys.modules, "lm_eval", None)
    fill = dict(ws=ws, muse_missing=muse_missing, empty=tmp_path / "empty.json")
    out = tmp_path / "eval.json"
    assert main(_eval(ws, *(e.format(**fill) for e in extra), "--output", str(out))) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastunlearn eval: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.slow
def test_unlearn_on_a_muse_directory_stops_by_the_muse_rule(tmp_path):
    from fastunlearn.evaluation.muse import evaluate_muse
    from fastunlearn.evaluation.stop_callback import read_trajectory
    from fastunlearn.training.pipeline import unlearn

    model, tok = memorised()
    muse = write_muse_dir(tmp_path / "muse")
    # The retrained model: every question but the forget set's (its forget KnowMem is the rule's bound).
    retrained = H.trained_model(tok, qa=range(5, 20), texts=())
    out = tmp_path / "run"
    options = dict(
        method="gd", init="lora", lora_r=4, lora_alpha=8, learning_rate=3e-2, num_epochs=4, batch_size=4,
        gradient_accumulation_steps=1, warmup_epochs=0, logging_steps=1, seed=0, progress=False,
        eval_every=1, eval_items=5, max_length=128, eval_batch_size=8,
    )  # fmt: skip
    result = unlearn(
        copy.deepcopy(model), tok, None, None, output_dir=out, muse=str(muse), stop="muse",
        retrain_model=retrained, mia_forget=H.TEXTS[:4], mia_holdout=H.TEXTS[4:], **options,
    )  # fmt: skip
    want = evaluate_muse(retrained, tok, muse, criteria=("knowmem_forget",), max_items=5, batch_size=8)
    s = result.metrics["stopping"]
    assert s["rule"] == f"muse: muse.knowmem_forget<={want['knowmem_forget']:g}"
    rows = read_trajectory(out / "trajectory.csv")
    assert all(r["muse.knowmem_forget"] is not None for r in rows)  # generated at every evaluation
    first = next((r["step"] for r in rows[1:] if r["muse.knowmem_forget"] <= want["knowmem_forget"]), None)
    assert first is not None and s["first_satisfied_step"] == s["stopped_step"] == first
    assert rows[0]["muse.knowmem_forget"] > want["knowmem_forget"]  # the memorised model knows more
    # It trained on the directory's raw text: 7 forget texts in batches of 4 is 2 steps an epoch.
    assert result.metrics["train"]["global_step"] == first and first <= 8
    after = result.metrics["after"]
    assert {"forget", "retain", "muse", "mia"} <= set(after)
    # The state kept is the one that stopped: its KnowMem after training is the trajectory's.
    assert (
        after["muse"]["knowmem_forget"] == next(r for r in rows if r["step"] == first)["muse.knowmem_forget"]
    )
    assert "privleak" in after["muse"] and "privleak" in after["mia"]  # the retrained model's AUCs
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["muse"]["privleak"] == after["muse"]["privleak"]
    if (out / "trajectory.png").exists():
        assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"


def test_unlearn_muse_rule_without_a_retrained_reference_is_one_line(ws, tmp_path, capsys, no_model):
    argv = ["unlearn", str(ws / "model"), "--muse", str(ws / "muse"), "--output", str(tmp_path / "out"),
            "--init", "lora", "--stop-when", "muse"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "give that model (--retrain-model DIR)" in err, err
    assert not (tmp_path / "out").exists()
