"""Greedy decoding with a KV cache for a batch of prompts of any lengths (left padded), to a fixed
length (the extraction metrics) or to EOS within each prompt's budget (:func:`greedy_completions`), and
of text prompts shared by the ranks (:func:`greedy_texts`: MUSE, dialogue)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastunlearn.data.examples import pad_id_of
from fastunlearn.engines import distributed
from fastunlearn.models.devices import eval_mode, model_device
from fastunlearn.models.naming import unwrap_model

# Decoding steps between two checks that every row has stopped, on an accelerator: a few wasted steps
# of a batch that has finished cost less than a host synchronisation every step.
EOS_CHECK_EVERY = 8


def _decode_arguments(model: torch.nn.Module) -> tuple[str, dict[str, int]]:
    """The forward's KV-cache argument (``cache`` from transformers 5.2x, else ``past_key_values``) and
    the one limiting logits to the last position, where there is one: prefill then skips the
    vocabulary projection of every prompt position."""
    import inspect

    # The class's forward: fastunlearn.patch replaces the instance's with a ``**kwargs`` wrapper.
    params = inspect.signature(type(unwrap_model(model)).forward).parameters
    keep = next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})
    return ("cache" if "cache" in params else "past_key_values"), keep


def greedy_decode(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    eos_check_every: int | None = None,
) -> torch.Tensor:
    """Greedy continuation ``[R, ≤ max_new_tokens]`` of left-padded prompts with a KV cache; call under
    ``eval_mode``. Without ``eos_token_id`` exactly ``max_new_tokens`` tokens per prompt; with it a row
    stops at its first EOS (then ``pad_token_id``) and decoding ends once every row has, checked every
    ``eos_check_every`` steps (a host sync: every step on the CPU, :data:`EOS_CHECK_EVERY` elsewhere).
    With weights split between the ranks each forward is a collective, so the ranks stop together.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if eos_check_every is not None and eos_check_every < 1:
        raise ValueError(f"eos_check_every must be ≥ 1, got {eos_check_every}")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("greedy_decode needs at least one prompt, each of at least one token")
    device = model_device(model)
    if eos_check_every is None:
        eos_check_every = 1 if device.type == "cpu" else EOS_CHECK_EVERY
    in_step = distributed.parameters_sharded(model)
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = p.to(device)
        mask[r, width - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padded: the first real token at position 0
    cache_arg, keep_last = _decode_arguments(model)
    step_args = dict(use_cache=True, **keep_last)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **step_args)
    next_tok = out.logits[:, -1].argmax(dim=-1)
    position = positions[:, -1:]
    generated = [next_tok]
    done = next_tok == eos_token_id if eos_token_id is not None else None
    for step in range(1, max_new_tokens):
        if done is not None and step % eos_check_every == 0:
            stopped = bool(done.all())  # a host sync
            if distributed.every_rank(stopped) if in_step else stopped:
                break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        position = position + 1
        cache = {cache_arg: out.get("cache") if out.get("cache") is not None else out.get("past_key_values")}
        out = model(
            input_ids=next_tok[:, None], attention_mask=mask, position_ids=position, **step_args, **cache
        )
        next_tok = out.logits[:, -1].argmax(dim=-1)
        if done is not None:
            next_tok = next_tok.masked_fill(done, pad_token_id)
            done = done | (next_tok == eos_token_id)
        generated.append(next_tok)
    return torch.stack(generated, dim=1)


def greedy_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[torch.Tensor],
    budgets: Sequence[int],
    *,
    batch_size: int,
    strip: bool = True,
) -> list[str]:
    """Greedy continuations of token ``prompts``, each stopped at EOS or after ``budgets[i]`` new tokens
    (below 1: ``""``), decoded without special tokens, stripped unless ``strip=False``. Batches of
    ``batch_size`` are sorted by budget then length: a batch runs to its largest budget."""
    order = sorted(
        (i for i in range(len(prompts)) if budgets[i] >= 1), key=lambda i: (budgets[i], len(prompts[i]))
    )
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)
    texts = [""] * len(prompts)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            steps = max(budgets[i] for i in chunk)
            gen = greedy_decode(model, [prompts[i] for i in chunk], steps, eos_token_id=eos, pad_token_id=pad)
            for row, i in zip(gen.tolist(), chunk):  # one transfer per batch
                tokens = row[: budgets[i]]
                if eos is not None and eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                texts[i] = text.strip() if strip else text
    return texts


def greedy_texts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int
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
