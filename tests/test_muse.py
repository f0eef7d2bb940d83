"""MUSE (``fastunlearn.evaluation.muse``) on a memorising tiny model against per-item references written
here: one ``generate`` call per prompt (``references/generation.py``), the KnowMem prompt and the cut
at the first blank line written out, ``rouge-score`` without stemming called directly. The memorised
model has no near-ties between its top logits, so batched greedy decoding gives the same tokens and
the ROUGE numbers must be equal; PrivLeak is :func:`evaluate_mia`'s (tested in ``test_mia.py``).
Also the directory's layout (extensions, JSON Lines or arrays) and its errors.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import muse as M
from helpers import stopping as H
from helpers.memorised import memorised
from references.generation import greedy_one_by_one
from rouge_score import rouge_scorer

from fastunlearn.evaluation import decoding
from fastunlearn.evaluation.mia import evaluate_mia, privleak
from fastunlearn.evaluation.muse import evaluate_muse, muse_file, read_muse

pytestmark = pytest.mark.usefixtures("one_thread")

VERBMEM_TOKENS, KNOWMEM_TOKENS = 14, 10


_write, _qa = M.write, M.qa


@pytest.fixture(scope="module")
def trained():
    return memorised()


@pytest.fixture
def muse_dir(tmp_path):
    return M.write_muse_dir(tmp_path)


def _rouge(pred: str, ref: str):
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(ref, pred)["rougeL"]


def _knowmem_reference(model, tok, qa, icl):
    f1, recall = [], []
    for item in qa:
        prompt = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in icl)
        prompt += f"Question: {item['question']}\nAnswer: "
        answer = greedy_one_by_one(model, tok, prompt, KNOWMEM_TOKENS).split("\n\n")[0].strip()
        score = _rouge(answer, item["answer"])
        f1.append(score.fmeasure)
        recall.append(score.recall)
    return f1, recall


def test_metrics_match_per_item_references(trained, muse_dir, monkeypatch):
    model, tok = trained
    decodes = []
    real = decoding.greedy_decode
    monkeypatch.setattr(decoding, "greedy_decode", lambda *a, **kw: decodes.append(1) or real(*a, **kw))
    got = evaluate_muse(
        model, tok, muse_dir, retrain_auc=0.5, batch_size=2,
        verbmem_max_new_tokens=VERBMEM_TOKENS, knowmem_max_new_tokens=KNOWMEM_TOKENS,
    )  # fmt: skip
    assert len(decodes) == 2 + 3 + 2  # batches of 2 over 4, 5 and 3 prompts: never one call per item

    verbmem = [
        _rouge(greedy_one_by_one(model, tok, r["prompt"], VERBMEM_TOKENS).strip(), r["gt"]).fmeasure
        for r in read_muse(muse_dir, "verbmem/forget")
    ]
    assert got["per_item"]["verbmem_forget"] == verbmem
    assert (
        math.isclose(got["verbmem_forget"], sum(verbmem) / 4) and got["verbmem_forget"] > 0.3
    )  # it continues the texts
    for split, qa, icl in (("forget", [0, 1, 2, 3, 4], [10, 11]), ("retain", [5, 6, 7], [12])):
        f1, recall = _knowmem_reference(model, tok, _qa(qa), _qa(icl))
        assert got["per_item"][f"knowmem_{split}"] == f1
        assert math.isclose(got[f"knowmem_{split}"], sum(f1) / len(f1))
        assert math.isclose(got[f"knowmem_{split}_recall"], sum(recall) / len(recall))
    assert got["knowmem_forget"] > 0.5  # the model answers the questions it memorised

    mia = evaluate_mia(model, tok, H.TEXTS[:4], H.TEXTS[4:], batch_size=2)
    assert got["privleak_auc"] == mia["min_k"]["auc"]
    assert got["privleak"] == privleak(mia["min_k"]["auc"], 0.5)
    assert got["privleak_retrain_auc"] == 0.5 and "privleak_convention" in got
    assert got["num_items"] == {
        "verbmem_forget": 4, "knowmem_forget": 5, "knowmem_retain": 3, "privleak_forget": 4,
        "privleak_holdout": 4,
    }  # fmt: skip
    json.dumps(got)


def test_criteria_subset_and_max_items(trained, tmp_path):
    """The stopping rule's criterion alone needs only its two files; ``max_items`` keeps the first
    questions (every in-context example stays)."""
    model, tok = trained
    _write(tmp_path / "knowmem" / "forget_qa.jsonl", _qa([0, 1, 2, 3]), array=False)
    _write(tmp_path / "knowmem" / "forget_qa_icl.jsonl", _qa([10, 11]), array=False)
    got = evaluate_muse(
        model, tok, tmp_path, criteria=("knowmem_forget",), max_items=2, knowmem_max_new_tokens=KNOWMEM_TOKENS
    )
    f1, _ = _knowmem_reference(model, tok, _qa([0, 1]), _qa([10, 11]))
    assert got["per_item"]["knowmem_forget"] == f1
    assert "verbmem_forget" not in got and "privleak_auc" not in got


def test_layout_and_errors(trained, muse_dir):
    model, tok = trained
    assert muse_file(muse_dir, "knowmem/retain_qa").endswith("retain_qa")
    (muse_dir / "knowmem" / "retain_qa").rename(muse_dir / "knowmem" / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"MUSE file not found: .*knowmem/retain_qa\.jsonl"):
        evaluate_muse(model, tok, muse_dir)
    _write(muse_dir / "knowmem" / "retain_qa.json", _qa([5]), array=True)
    _write(muse_dir / "knowmem" / "retain_qa.jsonl", _qa([5]), array=False)
    with pytest.raises(ValueError, match="several MUSE files for knowmem/retain_qa"):
        evaluate_muse(model, tok, muse_dir)
    (muse_dir / "knowmem" / "retain_qa.json").unlink()
    path = muse_dir / "verbmem" / "forget.json"
    path.write_text('[\n  {"prompt": "a", "gt": "b"},\n  {"prompt": "a"}\n]\n')
    with pytest.raises(ValueError, match=r"verbmem/forget.json:3: missing field 'gt'"):
        evaluate_muse(model, tok, muse_dir)
    path.write_text('[\n  {"prompt": "a", "gt": "b"},\n  {"prompt": "a" "gt": "b"}\n]\n')
    with pytest.raises(ValueError, match=r"verbmem/forget.json:3: invalid JSON"):
        evaluate_muse(model, tok, muse_dir)
    with pytest.raises(ValueError, match="unknown MUSE criteria"):
        evaluate_muse(model, tok, muse_dir, criteria=("knowmem",))
