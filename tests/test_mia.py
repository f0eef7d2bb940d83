"""Membership inference (``fastunlearn.evaluation.mia``): per-sequence scores against the one-sequence-
a-forward fp64 oracle of ``references/mia.py``, the AUC against a count over every pair, PrivLeak's
sign, and bad input.

Tolerance of the scores: the evaluation batches sequences of other lengths together (right padding)
and computes the statistics at the output head in fp32, the oracle one sequence at a time in fp64
from fp32 logits; the difference is fp32 rounding of the tiny model's reductions, bounded by
``helpers.distributed.EVAL_RTOL``/``EVAL_ATOL`` (derived there). Min-K%++ divides by σ ≥ 1e-3, which
can amplify an absolute error in ``log p_y − μ`` by up to 10³; the memorised model's σ are O(1), so
the same bound applies, times 10 for the division.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import stopping as H
from helpers.distributed import EVAL_ATOL, EVAL_RTOL
from helpers.memorised import memorised
from helpers.models import tiny_llama
from references.mia import auc_reference, sequence_scores_reference

from fastunlearn.evaluation.mia import ATTACKS, auc, evaluate_mia, privleak
from fastunlearn.models.patching import patch, unpatch

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET, HOLDOUT = H.TEXTS[:4], H.TEXTS[4:]  # the model is trained on the first four texts


@pytest.fixture(scope="module")
def trained():
    return memorised()


def _untrained(tok):
    return tiny_llama(len(tok), seed=3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()


def test_auc_is_the_pairwise_probability_with_ties_half():
    gen = torch.Generator().manual_seed(0)
    for m, n in [(7, 5), (1, 9), (30, 30)]:
        member = torch.randint(0, 6, (m,), generator=gen).tolist()  # many ties
        nonmember = torch.randint(0, 6, (n,), generator=gen).tolist()
        assert math.isclose(auc(member, nonmember), auc_reference(member, nonmember), rel_tol=1e-12)
    assert auc([1.0, 2.0], [3.0, 4.0]) == 1.0  # every holdout sequence scores higher: members found
    assert auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert auc([2.0, 2.0], [2.0]) == 0.5


def test_privleak_sign():
    """Positive: the forget set still separates from the holdout better than under the retrained model."""
    assert math.isclose(privleak(0.9, 0.5), 80.0)
    assert math.isclose(privleak(0.25, 0.5), -50.0)
    assert privleak(0.6, 0.6) == 0.0
    with pytest.raises(ValueError, match="AUCs must lie in"):
        privleak(0.5, 0.0)


@pytest.mark.parametrize("fused", [True, False], ids=["at-head", "logits"])
def test_scores_match_one_sequence_at_a_time(trained, fused):
    """Every attack's per-item score, from one forward per batch (2 + 2 batches of 3 for 5 + 4 texts,
    one of them cut at ``max_length``), on the fused path at the head and on the logits path."""
    model, tok = trained
    forget = [*FORGET, "Author 3 was born in town 3 and wrote many books about history and war."]
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    if not fused:
        patch(model, fused=False)
    try:
        got = evaluate_mia(model, tok, forget, HOLDOUT, batch_size=3, max_length=16)
    finally:
        hook.remove()
        unpatch(model)
    assert len(calls) == 4
    for name, texts in (("forget", forget), ("holdout", HOLDOUT)):
        want = [sequence_scores_reference(model, tok, t, max_length=16) for t in texts]
        for attack in ATTACKS:
            scale = 10 if attack == "min_k_plus_plus" else 1
            for g, w in zip(got[attack][name], (x[attack] for x in want)):
                assert abs(g - w) <= scale * (EVAL_ATOL + EVAL_RTOL * abs(w)), (attack, name, g, w)
    for attack in ATTACKS:
        assert got[attack]["auc"] == auc_reference(got[attack]["forget"], got[attack]["holdout"])
    json.dumps(got)


def test_reference_attack_and_privleak_from_a_retrained_model(trained):
    """``reference`` is the per-item loss difference; PrivLeak takes the retrained model's Min-K% AUC.
    The memorising model separates its training texts from unseen ones (AUC 1), the untrained one
    does not, so the memorising model leaks: PrivLeak > 0."""
    model, tok = trained
    other = _untrained(tok)
    got = evaluate_mia(model, tok, FORGET, HOLDOUT, reference_model=other, retrain_model=other)
    alone = evaluate_mia(other, tok, FORGET, HOLDOUT)
    for name in ("forget", "holdout"):
        diff = [a - b for a, b in zip(got["loss"][name], alone["loss"][name])]
        assert got["reference"][name] == pytest.approx(diff, rel=1e-12, abs=1e-12)
    assert got["retrain_auc"] == alone["min_k"]["auc"] < 1.0
    assert got["min_k"]["auc"] == 1.0
    assert got["privleak"] == privleak(1.0, alone["min_k"]["auc"]) > 0
    assert "positive = " in got["privleak_convention"]
    given = evaluate_mia(model, tok, FORGET, HOLDOUT, retrain_auc=0.5)
    assert given["privleak"] == 100.0 and given["retrain_auc"] == 0.5


def test_reads_records_files(trained, tmp_path):
    model, tok = trained
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in FORGET))
    (tmp_path / "holdout.json").write_text(json.dumps(HOLDOUT))  # a JSON array of strings
    got = evaluate_mia(model, tok, tmp_path / "forget.jsonl", tmp_path / "holdout.json")
    want = evaluate_mia(model, tok, FORGET, HOLDOUT)
    assert got == want


def test_bad_input_is_one_clear_error(trained, tmp_path):
    model, tok = trained
    with pytest.raises(ValueError, match="the holdout set is empty"):
        evaluate_mia(model, tok, FORGET, [])
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        evaluate_mia(model, tok, FORGET, tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        evaluate_mia(model, tok, FORGET, bad)
    bad.write_text('{"text": "fine"}\n{"txt": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'text'"):
        evaluate_mia(model, tok, FORGET, bad)
    with pytest.raises(ValueError, match="not both"):
        evaluate_mia(model, tok, FORGET, HOLDOUT, retrain_auc=0.5, retrain_model=model)
    with pytest.raises(ValueError, match="k must lie"):
        evaluate_mia(model, tok, FORGET, HOLDOUT, k=0.0)
    with pytest.raises(ValueError, match="holdout item 1 has 1 token"):
        evaluate_mia(model, tok, FORGET, ["fine text", ""])
