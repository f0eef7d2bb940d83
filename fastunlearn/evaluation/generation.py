"""Greedy continuations of text prompts, batched and shared by the ranks: MUSE's VerbMem and KnowMem
and the dialogue tasks. The texts come back unstripped, for a protocol to cut where an answer ends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastunlearn.engines import distributed
from fastunlearn.evaluation.decoding import greedy_completions


def greedy_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """The greedy continuation of each prompt (tokenised with special tokens), up to ``max_new_tokens``
    new tokens or EOS, decoded without special tokens, ``batch_size`` prompts at a time."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    eos = tokenizer.eos_token_id
    tokens = []
    for i, row in enumerate(tokenizer(list(prompts), add_special_tokens=True)["input_ids"]):
        if len(row) > 1 and row[-1] == eos:
            row = row[:-1]  # tokenizers that append EOS to every encoding: a prompt does not end there
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenisation: nothing to continue")
        tokens.append(torch.tensor(row, dtype=torch.long))

    def continue_part(part: list[torch.Tensor]) -> list[str]:
        budgets = [max_new_tokens] * len(part)
        return greedy_completions(model, tokenizer, part, budgets, batch_size=batch_size, strip=False)

    return distributed.map_sharded(continue_part, tokens, model=model)


def cut_at(text: str, marker: str) -> str:
    """``text`` up to the first ``marker`` (all of it without one), stripped."""
    return text.split(marker, 1)[0].strip()
