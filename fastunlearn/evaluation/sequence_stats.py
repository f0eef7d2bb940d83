"""Teacher-forced per-token statistics of raw texts (every token after the first a target, as the
membership-inference attacks score them): ``(log p(x_{t+1} | x_≤t), μ_t, σ_t)`` per target, one
forward per right-padded batch, at the output head where the architecture allows (no ``[B, T, V]``
logits)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastunlearn.data.examples import Example, collate, pad_id_of
from fastunlearn.evaluation.likelihood import backend_for, eval_mode, model_inputs, stats_at_head
from fastunlearn.models.devices import model_device
from fastunlearn.models.patching import takes_fused_path
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.ihl import check_label_range
from fastunlearn.ops.nll import shift_labels
from fastunlearn.ops.token_stats import linear_token_stats, token_stats


def tokenize_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int, name: str) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, cut at ``max_length``. A text of fewer
    than two tokens has nothing to score: ``ValueError`` naming it (``name`` labels the set)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) < 2:
            raise ValueError(f"{name} item {i} has {len(row)} token(s): no target token to score")
    return [list(row) for row in ids]


def batch_token_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T, 3]`` ``(log p_y, μ, σ)`` of one right-padded CPU batch: position ``t`` holds the label at
    ``t + 1``'s, NaN where there is none. Right padding needs no attention mask in a causal model (a
    real token attends only to real ones before it), so the mask is passed only for other padding."""
    mask = batch["attention_mask"]
    right_padded = not bool((mask[:, 1:] > mask[:, :-1]).any())  # a host check: the batch is on the CPU
    inputs = model_inputs(model, batch["input_ids"], None if right_padded else mask)
    host_targets = shift_labels(batch["labels"])  # range-checked here, with no device synchronisation
    targets = host_targets.to(model_device(model))

    def row_stats(h: torch.Tensor, y: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
        check_label_range(host_targets, head.weight.shape[0], IGNORE_INDEX)
        stats = linear_token_stats(h, head.weight, y, bias=head.bias, backend=backend_for(h), validate=False)
        return torch.stack(stats, dim=-1)

    with torch.no_grad():
        if takes_fused_path(model):
            return stats_at_head(model, inputs, targets, host_targets, row_stats, float("nan"))
        logits = model(**inputs).logits
        check_label_range(host_targets, logits.shape[-1], IGNORE_INDEX)
        return torch.stack(token_stats(logits, targets, backend=backend_for(logits), validate=False), dim=-1)


def map_text_batches(
    model: torch.nn.Module,
    tokenizer: Any,
    token_ids: Sequence[Sequence[int]],
    reduce: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    *,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """``reduce`` (a batch's ``[B, T, 3]`` statistics → per-sequence ``[B]`` tensors) over batches of
    ``token_ids`` sorted by length, in item order on the CPU, in eval mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    pad_id = pad_id_of(tokenizer)
    parts: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = [token_ids[i] for i in order[start : start + batch_size]]
            batch = collate([Example(tuple(r), tuple(r), "") for r in rows], pad_id)  # every token a label
            for key, value in reduce(batch_token_stats(model, batch)).items():
                parts.setdefault(key, []).append(value)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {key: torch.cat(values).cpu()[inverse] for key, values in parts.items()}
