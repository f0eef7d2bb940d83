"""The tiny fp64 Llama and the padded batches the Fisher and FILA tests measure on."""

from __future__ import annotations

import torch

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
