"""lm-evaluation-harness on the model in memory (``fastunlearn.evaluation.harness``): a local
multiple-choice task (``tests/data/lm_eval``, a YAML over a JSON Lines file, offline) gives exactly
what ``lm_eval.simple_evaluate`` gives when called directly on the same model; unknown tasks and a
missing ``lm-eval`` are one-line errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing may download: before datasets is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers.memorised import memorised

from fastunlearn.evaluation.harness import evaluate_lm_eval

pytestmark = pytest.mark.usefixtures("one_thread")
lm_eval = pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lm_eval"
TASK = "fastunlearn_tiny_mc"
COMPARED = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


@pytest.fixture(scope="module")
def trained():
    return memorised()


@pytest.fixture
def task_dir(monkeypatch, tmp_path):
    """Run from the task's directory (its ``data_files`` path is relative), with the datasets cache
    under ``tmp_path``."""
    import datasets

    monkeypatch.chdir(TASKS)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return TASKS


def _direct(model, tok, **options):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    return lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, log_samples=False, **options)


@pytest.mark.parametrize("options", [{}, {"limit": 4, "num_fewshot": 1}], ids=["all", "limit-fewshot"])
def test_equals_simple_evaluate_called_directly(trained, task_dir, options):
    model, tok = trained
    model.train()
    try:
        got = evaluate_lm_eval(
            model, tok, TASK, include_path=task_dir, include_defaults=False, batch_size=4, **options
        )
        assert model.training  # the mode is restored
    finally:
        model.eval()
    want = _direct(model, tok, **options)
    for key in COMPARED:
        assert got[key] == want[key], key
    assert "samples" not in got
    json.dumps(got, allow_nan=False)
    assert got["n-samples"][TASK]["effective"] == options.get("limit", 6)
    assert got["n-shot"][TASK] == options.get("num_fewshot", 0)
    assert 0.0 <= got["results"][TASK]["acc,none"] <= 1.0


def test_unknown_task_is_one_clear_error(trained, task_dir):
    model, tok = trained
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate_lm_eval(model, tok, f"{TASK},no_such_task", include_path=task_dir, include_defaults=False)


def test_missing_lm_eval_names_the_extra(trained, monkeypatch):
    model, tok = trained
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "fastunlearn\[eval\]"'):
        evaluate_lm_eval(model, tok, TASK)
