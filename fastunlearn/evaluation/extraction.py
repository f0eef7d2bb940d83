"""Extraction protocol (Jang et al. 2023, arXiv:2210.01504): MA and EL_n of memorised sequences given as
text, tokenised as the training data is."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from fastunlearn import data as fdata
from fastunlearn.engines import distributed
from fastunlearn.evaluation import metrics as M


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], *, max_length: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of raw texts cut to ``max_length`` tokens (the extraction sets use 200), right padded:
    ``(input_ids, attention_mask)``."""
    records = [{"text": t, "_source": f"text {i}"} for i, t in enumerate(texts)]
    with warnings.catch_warnings():  # cutting to max_length is the protocol here, not an accident
        warnings.simplefilter("ignore", UserWarning)
        examples = fdata.tokenize_records(records, tokenizer, data_format="text", max_length=max_length)
    batch = fdata.collate(examples, fdata.pad_id_of(tokenizer))
    return batch["input_ids"], batch["attention_mask"]


def evaluate_extraction(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | Sequence[str],
    *,
    n: int = 10,
    max_length: int = 200,
    batch_size: int = 64,
    method: str = "batched",
) -> dict[str, Any]:
    """Mean memorisation accuracy and ``EL_n`` over ``{"text"}`` records (a file) or strings, each cut to
    ``max_length`` tokens, shared by the ranks."""
    if isinstance(data, (str, os.PathLike)):
        records, _ = fdata.load_records(data, data_format="text")
        texts = [r["text"] for r in records]
    else:
        texts = list(data)
        if not texts:
            raise ValueError("no sequences to evaluate")

    def per_sequence(part: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = tokenize_texts(tokenizer, part, max_length=max_length)
        ma, el = M.extraction_metrics(
            model, ids, n=n, attention_mask=mask, method=method, batch_size=batch_size
        )
        return {"ma": ma, "el": el}

    scores = distributed.map_sharded(per_sequence, texts, model=model)
    ma, el = scores["ma"], scores["el"]
    return {
        "protocol": "extraction",
        "num_sequences": len(texts),
        "n": n,
        "ma": ma.mean().item(),
        f"el_{n}": el.mean().item(),
        "per_sequence": {"ma": ma.tolist(), f"el_{n}": el.tolist()},
    }
