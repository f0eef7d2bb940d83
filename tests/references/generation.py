"""Greedy generation one prompt at a time with ``transformers``' own ``generate``: the oracle of the
batched generation of MUSE and the dialogue tasks."""

from __future__ import annotations

import torch


def greedy_one_by_one(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (special tokens added) up to ``max_new_tokens`` or EOS,
    decoded without special tokens."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
