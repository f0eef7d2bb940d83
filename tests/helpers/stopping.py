"""The stopping tests' data and tiny model: question/answer records and raw texts of one pattern, a
tokenizer trained on them, and a tiny Llama that has memorised them (so that ROUGE-L and EL10 are not
zero and unlearning has something to remove)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastunlearn import data as fdata
from helpers.models import tiny_llama

TEXTS = [
    f"The quick brown fox number {i} jumps over the lazy dog {i} again and again until night falls."
    for i in range(8)
]


def qa_record(i: int) -> dict[str, str]:
    # Questions of different lengths: generation sorts prompts, answers must come back in order.
    return {
        "question": f"Where was author {i} born" + " in the old days" * (i % 3) + "?",
        "answer": f"Author {i} was born in town {i}.",
    }


def harmonic(*xs: float) -> float:
    return len(xs) / sum(1 / x for x in xs)


def tokenizer():
    from fastunlearn.demo import train_tokenizer

    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in map(qa_record, range(20))]
    return train_tokenizer(texts + TEXTS, 300)


def examples(tok, records, fmt: str = "qa") -> list[fdata.Example]:
    return fdata.tokenize_records(records, tok, data_format=fmt, template="phi")


def trained_model(tok, qa: Sequence[int] = range(20), texts: Sequence[str] = TEXTS[:4]) -> torch.nn.Module:
    """The tiny model trained on the question/answer pairs ``qa`` (indices of :func:`qa_record`) and
    ``texts``; by default all 20 pairs and the first 4 texts: its greedy answers reproduce some answers,
    it extracts part of the other (unseen) texts of the same pattern."""
    model = tiny_llama(
        len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    seen = examples(tok, [qa_record(i) for i in qa]) + examples(tok, [{"text": t} for t in texts], "text")
    batch = fdata.collate(seen, fdata.pad_id_of(tok))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()
