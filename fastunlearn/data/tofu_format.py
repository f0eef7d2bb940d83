"""TOFU's own tokenisation, token for token (Maini et al. 2024): training/scoring examples and prompts.

The public TOFU checkpoints were trained, and the paper's numbers computed (reused by Cha et al.
2025), with one convention; another tokenisation changes every number. Per model family:

    full   = question_start + q + question_end + answer_tag + a      (one string)
    ids    = tokenize(full, with special tokens), cut at max_length
    k      = #tokens of tokenize(question_start + q + question_end, with special tokens)
    labels = ids + [EOS] (ids alone when they reach max_length), the first k set to -100

so the answer tag is scored and the boundary tokens are whatever the tokenizer makes of the joint
string. The reference pads with EOS (attention 0) and puts one EOS target at the first padding
position; here that EOS is part of ``input_ids`` (attention 1): the same loss, since under the causal
shift the EOS target is predicted from the position before it, and the EOS position predicts a masked
label. Position 0 is always masked (``k ≥ 1``), so the mean NLL over shifted targets is the
reference's ``loss / (labels != -100).sum()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastunlearn.ops import IGNORE_INDEX


@dataclass(frozen=True)
class TofuTags:
    """One model family's TOFU format: the question's wrapping and the answer's tag; a decoded example
    is split at ``split_marker`` into prompt and reference, the marker kept at the prompt's end or not
    (Llama-2 keeps it, Llama-3.1 does not; Phi's prompt stops before ``"Answer: "``)."""

    question_start: str
    question_end: str
    answer_tag: str
    split_marker: str
    prompt_ends_with_marker: bool


_LLAMA_TAGS = ("[INST] ", " [/INST]", "")
_QA_TAGS = ("Question: ", "\n", "Answer: ")

TOFU_FAMILIES: dict[str, TofuTags] = {
    "tofu-llama2": TofuTags(*_LLAMA_TAGS, split_marker=" [/INST]", prompt_ends_with_marker=True),
    "tofu-llama3": TofuTags(*_LLAMA_TAGS, split_marker=" [/INST]", prompt_ends_with_marker=False),
    "tofu-phi": TofuTags(*_QA_TAGS, split_marker="Answer: ", prompt_ends_with_marker=False),
}


class TofuExample(NamedTuple):
    """``input_ids`` and ``labels`` (equal length); ``cut``: ``max_length`` was reached (no EOS target)."""

    input_ids: list[int]
    labels: list[int]
    cut: bool


def tofu_family(family: str) -> TofuTags:
    """The tags of a TOFU family name; ``ValueError`` listing the known ones."""
    try:
        return TOFU_FAMILIES[family]
    except (KeyError, TypeError):
        raise ValueError(f"unknown TOFU family {family!r}; expected one of {sorted(TOFU_FAMILIES)}") from None


def eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which is needed as the target after each answer")
    return eos


def encode_tofu_example(
    tokenizer, question: str, answer: str, family: str, max_length: int, *, where: str = "example"
) -> TofuExample:
    """Tokenise one (question, answer) pair exactly as TOFU does (module docstring), cut by the
    tokenizer's own truncation. ``ValueError`` naming ``where`` when the question fills ``max_length``
    (every label masked: the reference would divide 0 by 0)."""
    tags = tofu_family(family)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos = eos_id(tokenizer)
    new_question = tags.question_start + question + tags.question_end
    full = new_question + tags.answer_tag + answer
    ids = list(tokenizer(full, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
    k = len(tokenizer(new_question, add_special_tokens=True)["input_ids"])
    cut = len(ids) >= max_length
    input_ids = ids if cut else [*ids, eos]
    labels = [IGNORE_INDEX] * min(k, len(input_ids)) + input_ids[k:]
    if not input_ids[k:]:
        raise ValueError(
            f"{where}: every label is masked (the question takes {k} tokens, max_length={max_length}); "
            "raise max_length or shorten the question"
        )
    return TofuExample(input_ids, labels, cut)


def tofu_generation_prompt(
    tokenizer, input_ids: Sequence[int] | torch.Tensor, family: str
) -> tuple[str, str]:
    """The generation prompt and the ROUGE reference of an example encoded at the evaluation length:
    decoded without special tokens and split at the family's marker (the reference code's
    ``split(marker)[0]`` / ``[1]``), so a long answer's reference is cut where its scored tokens are."""
    tags = tofu_family(family)
    text = tokenizer.decode(input_ids, skip_special_tokens=True)
    parts = text.split(tags.split_marker)
    if len(parts) < 2:
        raise ValueError(
            f"the decoded example has no {tags.split_marker!r} to split prompt from answer "
            "(was the question cut by max_length?)"
        )
    prompt = parts[0] + (tags.split_marker if tags.prompt_ends_with_marker else "")
    return prompt, parts[1]


def tofu_generation_batch(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, W]`` of the prompts re-tokenised with special tokens and
    left padded with EOS, as the reference's tokenizer (``padding_side="left"``, ``pad_token = eos``)."""
    if not prompts:
        raise ValueError("tofu_generation_batch needs at least one prompt")
    eos = eos_id(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), eos, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def tofu_max_new_tokens(width: int, *, max_length: int) -> int:
    """New tokens per row under the reference's ``generate(max_length=200)``: ``max_length`` counts the
    padded batch width ``W``, so every row of a batch gets ``max_length − W`` (0 when ``W`` reaches it),
    whatever its own prompt length; the batches (30 items in file order) therefore matter."""
    if width < 1 or max_length < 1:
        raise ValueError(f"width and max_length must be positive, got {width} and {max_length}")
    return max(max_length - width, 0)
