"""Membership inference, MUSE and dialogue F1 on 2 CPU ranks over gloo: each rank scores or continues
its share of the items (``distributed.map_sharded``), every rank gets all of them in item order, and
the results are one process's — per-item scores within ``EVAL_RTOL``/``EVAL_ATOL`` (the ranks batch
other sequences together; bound derived in ``helpers/distributed.py``), the greedy texts and their
ROUGE / F1 exactly (the memorised model has no near-ties)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import stopping as H
from helpers.distributed import assert_results_close, spawn
from helpers.memorised import memorised

pytestmark = pytest.mark.usefixtures("one_thread")

CRITERIA = ("verbmem_forget", "knowmem_forget")
BUDGETS = {"verbmem_max_new_tokens": 8, "knowmem_max_new_tokens": 8}


def _dialogue():
    return [
        {"context": f"Question: {H.qa_record(i)['question']}\nAnswer:", "response": H.qa_record(i)["answer"]}
        for i in range(5)
    ]


def _evaluate(model, tok, muse_dir: str) -> dict:
    from fastunlearn.evaluation.dialogue import evaluate_dialogue
    from fastunlearn.evaluation.mia import evaluate_mia
    from fastunlearn.evaluation.muse import evaluate_muse

    return {
        "mia": evaluate_mia(model, tok, H.TEXTS[:5], H.TEXTS[5:], batch_size=2, retrain_auc=0.5),
        "muse": evaluate_muse(model, tok, muse_dir, criteria=CRITERIA, batch_size=2, **BUDGETS),
        "dialogue": evaluate_dialogue(model, tok, _dialogue(), max_new_tokens=8, batch_size=2),
    }


def _worker(rank: int, model_dir: str, muse_dir: str, out: str) -> None:
    from fastunlearn.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, None)
    Path(out, f"rank{rank}.json").write_text(json.dumps(_evaluate(model, tok, muse_dir)))


def test_two_ranks_equal_one_process(tmp_path):
    model, tok = memorised()
    model_dir, muse_dir = tmp_path / "model", tmp_path / "muse"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (muse_dir / "verbmem").mkdir(parents=True)
    (muse_dir / "knowmem").mkdir()
    verbmem = [{"prompt": " ".join(t.split()[:6]), "gt": " ".join(t.split()[6:])} for t in H.TEXTS[:5]]
    (muse_dir / "verbmem" / "forget.json").write_text(json.dumps(verbmem))
    for name, ids in (("forget_qa", range(5)), ("forget_qa_icl", [10])):
        (muse_dir / "knowmem" / f"{name}.jsonl").write_text(
            "".join(json.dumps(H.qa_record(i)) + "\n" for i in ids)
        )
    spawn(_worker, str(model_dir), str(muse_dir), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        want = json.loads(json.dumps(_evaluate(model, tok, str(muse_dir))))
    finally:
        torch.set_num_threads(threads)
    want["muse"]["dir"] = ranks[0]["muse"]["dir"]
    assert_results_close(ranks[0], want)
