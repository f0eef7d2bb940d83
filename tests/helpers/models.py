"""Tiny random models built from ``transformers`` configs (no download) for the tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    vocab: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config
) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, 4 heads, 2 key/value heads) with seeded random weights.

    ``config`` overrides any ``LlamaConfig`` field (token ids, sizes, attention implementation).
    """
    torch.manual_seed(seed)
    fields = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **config,
    }
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **fields)).to(dtype)
