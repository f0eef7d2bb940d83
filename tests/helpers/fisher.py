"""The tiny fp64 Llama and the padded batches the Fisher and FILA tests measure on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers.models import tiny_llama

VOCAB = 48


def fisher_llama(dtype=torch.float64, seed=0):
    """fp64 by default: the per-example oracle compares sums of squares at 1e-6."""
    return tiny_llama(VOCAB, seed=seed, dtype=dtype, intermediate_size=48, attn_implementation="sdpa")


def make_batch(B, T, seed, prompt=3, pad_rows=()):
    """Right-padded batch; the first ``prompt`` labels of each row are -100 (a "question")."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, length in pad_rows:
        mask[row, length:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fisher_record(model, batches) -> dict[str, torch.Tensor]:
    """What the multi-process Fisher tests compare with one process: ``estimate_fisher`` in both modes
    (``"per_example/NAME"``, ``"batch/NAME"``) and ``fila_row_weights`` with the first three batches,
    reversed, as the retain data (``"d/NAME"``); contiguous, for ``safetensors``. ``batches`` is a
    callable giving fresh batches (each pass reads its own)."""
    from fastunlearn.fisher import estimate_fisher, fila_row_weights

    record = {}
    for mode in ("per_example", "batch"):
        est = estimate_fisher(model, batches(), mode=mode, backend="torch", progress=False)
        record.update({f"{mode}/{k}": v.contiguous() for k, v in est.items()})
    d = fila_row_weights(model, batches(), batches()[::-1][:3], backend="torch", progress=False)
    record.update({f"d/{k}": v.contiguous() for k, v in d.items()})
    return record


def linear_weights(model, names):
    params = dict(model.named_parameters())
    return {name: params[name + ".weight"] for name in names}


def per_example_oracle(model, batches, names):
    """One forward/backward per example *alone*, its weight gradients squared, averaged over the examples
    that carry a label: the definition of the per-example estimate (SPEC §3.1), the slow way."""
    weights = linear_weights(model, names)
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    count = 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            labels = batch["labels"][row : row + 1]
            if not (labels[:, 1:] != -100).any():
                continue
            count += 1
            logits = model(
                input_ids=batch["input_ids"][row : row + 1],
                attention_mask=batch["attention_mask"][row : row + 1],
            ).logits
            loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, grad in zip(weights, grads):
                sums[name] += grad.square()
    return {n: s / count for n, s in sums.items()}, count
