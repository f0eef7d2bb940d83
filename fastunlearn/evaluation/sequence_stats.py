"""Teacher-forced per-token statistics of raw texts (every token after the first a target, as the
membership-inference attacks score them): ``(log p(x_{t+1} | x_≤t), μ_t, σ_t)`` per target, one
forward per right-padded batch, at the output head where the architecture allows (no ``[B, T, V]``
logits)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastunlearn.data.examples import pad_id_of
from fastunlearn.evaluation.likelihood import eval_mode
from fastunlearn.models.devices import model_device
from fastunlearn.models.naming import unwrap_model
from fastunlearn.models.patching import head_computes, takes_fused_path
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.ihl import check_label_range
from fastunlearn.ops.nll import labelled_rows, shift_labels
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
    device = model_device(model)
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device)}
    mask = batch["attention_mask"]
    if bool((mask[:, 1:] > mask[:, :-1]).any()):  # not right padded (a host check: the batch is on the CPU)
        inputs["attention_mask"] = mask.to(device)
    if getattr(getattr(unwrap_model(model), "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    host_targets = shift_labels(batch["labels"])  # range-checked here, with no device synchronisation
    targets = host_targets.to(device)

    with torch.no_grad():
        if takes_fused_path(model):
            # Only the positions with a target reach the head (not the padding, not each last token).
            rows = labelled_rows(host_targets).to(device, non_blocking=True)

            def at_head(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
                check_label_range(host_targets, head.weight.shape[0], IGNORE_INDEX)
                h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
                stats = linear_token_stats(
                    h, head.weight, targets.reshape(-1)[rows], bias=head.bias, backend=_backend(hidden),
                    validate=False,
                )  # fmt: skip
                out = torch.full((targets.numel(), 3), float("nan"), dtype=stats[0].dtype, device=device)
                return out.index_copy_(0, rows, torch.stack(stats, dim=-1)).view(*targets.shape, 3)

            return head_computes(model, targets, at_head, lambda: model(**inputs)).logits
        logits = model(**inputs).logits
        check_label_range(host_targets, logits.shape[-1], IGNORE_INDEX)
        return torch.stack(token_stats(logits, targets, backend=_backend(logits), validate=False), dim=-1)


def _backend(x: torch.Tensor) -> str:
    return "torch" if x.dtype == torch.float64 else "auto"  # fp64 stays fp64 on the PyTorch path


def _raw_text_batch(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` of raw texts (``-100`` on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, IGNORE_INDEX)}


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
            batch = _raw_text_batch([token_ids[i] for i in order[start : start + batch_size]], pad_id)
            for key, value in reduce(batch_token_stats(model, batch)).items():
                parts.setdefault(key, []).append(value)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {key: torch.cat(values).cpu()[inverse] for key, values in parts.items()}
