"""One memorising tiny model for the evaluation-suite tests (MIA, MUSE, dialogue, lm-eval), trained
once per test session: :func:`helpers.stopping.trained_model` on the stopping tests' tokenizer. Tests
share the instance and must leave it as they found it (eval mode, unpatched)."""

from __future__ import annotations

import functools

import torch

from helpers import stopping


@functools.cache
def memorised() -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)``: the model has memorised every ``qa_record(0..19)`` and ``TEXTS[:4]``."""
    tok = stopping.tokenizer()
    return stopping.trained_model(tok), tok
