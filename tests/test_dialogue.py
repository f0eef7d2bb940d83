"""Dialogue F1 (``fastunlearn.evaluation.dialogue``): SQuAD's normalisation and unigram F1 on cases
worked out by hand, and the batched evaluation against one ``generate`` call per context on a
memorising tiny model (equal tokens, so equal F1)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import stopping as H
from helpers.memorised import memorised
from references.generation import greedy_one_by_one

from fastunlearn.evaluation.dialogue import evaluate_dialogue, normalize_text, unigram_f1

pytestmark = pytest.mark.usefixtures("one_thread")


def test_normalisation_lowercases_and_removes_punctuation_and_articles():
    assert normalize_text("The Cat, a dog & an Emu!") == "cat dog emu"
    assert normalize_text("  Theatre   AND another  ") == "theatre and another"  # words, not substrings
    assert normalize_text("A.") == ""


@pytest.mark.parametrize(
    ("prediction", "reference", "f1"),
    [
        ("The cat sat on the mat.", "a cat sat on the mat", 1.0),
        # 4 predicted words, 5 reference words, 4 shared: P = 1, R = 4/5
        ("the cat sat on mat", "A cat sat on the red mat!", 2 * 1 * 0.8 / 1.8),
        # shared words are counted as a multiset: one "cat" matches
        ("cat cat cat", "cat", 2 * (1 / 3) * 1 / (1 / 3 + 1)),
        ("dog", "cat", 0.0),
        ("the", "a", 1.0),  # both empty after normalisation
        ("", "cat", 0.0),
    ],
)
def test_unigram_f1(prediction, reference, f1):
    assert math.isclose(unigram_f1(prediction, reference), f1)


def test_batched_responses_match_one_by_one(tmp_path):
    model, tok = memorised()
    records = [
        {"context": f"Question: {H.qa_record(i)['question']}\nAnswer:", "response": H.qa_record(i)["answer"]}
        for i in range(5)
    ]
    path = tmp_path / "dialogue.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    got = evaluate_dialogue(model, tok, path, max_new_tokens=12, batch_size=2)
    want = [
        unigram_f1(greedy_one_by_one(model, tok, r["context"], 12).split("\n")[0].strip(), r["response"])
        for r in records
    ]
    assert got["per_item"] == want and got["num_items"] == 5
    assert math.isclose(got["f1"], sum(want) / 5) and got["f1"] > 0.3
    assert evaluate_dialogue(model, tok, records[:2], max_new_tokens=12)["per_item"] == want[:2]
    with pytest.raises(ValueError, match="the dialogue set is empty"):
        evaluate_dialogue(model, tok, [])
    with pytest.raises(ValueError, match=r"dialogue record 1: missing field 'response'"):
        evaluate_dialogue(model, tok, [records[0], {"context": "x"}])
