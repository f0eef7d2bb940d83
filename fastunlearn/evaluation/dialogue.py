"""Dialogue utility (Jang et al. 2023, arXiv:2210.01504, four dialogue tasks after unlearning): unigram
F1 of the greedy response, cut at its first line break, against the reference, as ParlAI scores it:
both normalised as SQuAD's script does (lower case, no punctuation, no articles), ``F1 = 2PR/(P + R)``
over the multiset of shared words.
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from fastunlearn.data.records import check_fields, read_records
from fastunlearn.evaluation.decoding import greedy_texts

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def unigram_f1(prediction: str, reference: str) -> float:
    """Unigram F1 after :func:`normalize_text` (0 when no word is shared, 1 when both are empty)."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def evaluate_dialogue(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | Sequence[dict[str, str]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_items: int | None = None,
) -> dict[str, Any]:
    """Mean unigram F1 of the greedy responses to ``data``'s contexts: ``{"context", "response"}``
    records in a file or a list (``max_items``: the first ones)."""
    if isinstance(data, (str, os.PathLike)):
        records = read_records(data, ("context", "response"))
    else:
        records = [{**r, "_source": f"dialogue record {i}"} for i, r in enumerate(data)]
        check_fields(records, ("context", "response"), "a dialogue record", empty=True)
        if not records:
            raise ValueError("the dialogue set is empty")
    records = records[:max_items]
    contexts = [r["context"] for r in records]
    outputs = greedy_texts(model, tokenizer, contexts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    responses = [o.split("\n", 1)[0].strip() for o in outputs]
    scores = [unigram_f1(pred, r["response"]) for pred, r in zip(responses, records)]
    return {
        "protocol": "dialogue",
        "f1": sum(scores) / len(scores),
        "num_items": len(scores),
        "per_item": scores,
        "examples": [
            {"context": c[-300:], "reference": r["response"], "generated": g}
            for c, r, g in list(zip(contexts, records, responses))[:3]
        ],
    }
