"""TOFU's own tokenisation, token for token (SPEC §4.1): training/scoring examples and generation prompts.

The public TOFU checkpoints were fine-tuned, and the paper's numbers computed, with one convention
(Maini et al. 2024's ``convert_raw_data_to_model_format`` and ``run_generation``, reused unchanged by
the IHL/FILA paper); a different tokenisation changes every number. Per model family there are three
tags, and

    new_question = question_start + q + question_end
    full         = new_question + answer_tag + a            (one string: no other separator)
    ids          = tokenize(full, with special tokens), cut at max_length
    k            = #tokens of tokenize(new_question, with special tokens)
    labels       = ids + [EOS]  (ids alone when they reach max_length), first k set to -100

so the answer tag (``"Answer: "`` for Phi) is scored, the tokens at the question/answer boundary are
whatever the tokenizer makes of the joint string (byte-level BPE merges the tag's trailing space into
the answer's first word; SentencePiece puts no dummy prefix ``▁`` before the answer), and ``k`` may
even differ from the position where the answer's tokens start in ``ids`` — it is still the mask.

Families (:data:`TOFU_FAMILIES`):

- ``tofu-llama2``: Llama-2-7B, ``("[INST] ", " [/INST]", "")``;
- ``tofu-llama3``: Llama-3.1-8B, the same tags, but its generation prompt does not end with
  ``" [/INST]"`` (the reference appends the split marker back for Llama-2 only, SPEC §4.1);
- ``tofu-phi``: Phi-1.5, StableLM-3B, Pythia, ``("Question: ", "\\n", "Answer: ")``; the generation
  prompt is ``"Question: q\\n"`` (the part before ``"Answer: "``), so the model writes the tag itself.

:mod:`fastunlearn.data.examples` uses these families as the templates ``tofu-llama2``,
``tofu-llama3`` and ``tofu-phi`` of question/answer records (training at the paper's
``max_length = 500``), and :func:`fastunlearn.evaluation.evaluate_tofu` scores and generates with
them (``mode="legacy"``: at ``max_length = 200``, SPEC §4.1). This module imports only
:mod:`fastunlearn.ops`, so that both layers can use it.

Representation for :class:`~fastunlearn.data.examples.Example` and
:func:`~fastunlearn.data.examples.collate`: the reference pads every sequence to ``max_length`` with
EOS (attention 0) and its labels carry one EOS target at the first padding position. Here that EOS
is part of ``input_ids`` (``input_ids`` and ``labels`` have equal length, as ``Example`` requires) and
``collate`` gives it attention 1. Both give the same loss: under the causal shift the EOS target is
predicted from the position before it, which never attends to it, and the logits at the EOS position
predict a masked label. Right padding beyond that changes nothing
either, so the per-item NLLs equal the reference's.

Per-item average NLL: :func:`fastunlearn.metrics.answer_stats` on these labels gives
``nll_sum / num_tokens`` = Σ NLL over targets / #targets with the causal shift, which is the
reference's ``get_batch_loss(...) / (labels != -100).sum()``: the reference counts unshifted labels,
ours shifted ones, equal because position 0 is always masked (``k ≥ 1``, ``question_start`` is
non-empty). So no separate function is defined here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastunlearn.ops import IGNORE_INDEX

__all__ = [
    "TOFU_FAMILIES",
    "TofuExample",
    "TofuTags",
    "encode_tofu_example",
    "tofu_family",
    "tofu_generation_batch",
    "tofu_generation_prompt",
    "tofu_max_new_tokens",
]


@dataclass(frozen=True)
class TofuTags:
    """One model family's TOFU format (SPEC §4.1).

    ``question_start``/``question_end`` wrap the question, ``answer_tag`` precedes the answer;
    ``split_marker`` is where a decoded example is split into generation prompt and reference answer,
    and ``prompt_ends_with_marker`` whether the marker is put back at the end of the prompt.
    """

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
    """``input_ids`` and ``labels`` (equal length, ``-100`` = no loss); ``cut``: the tokenised string
    reached ``max_length`` (cut, or exactly filling it), so it has no EOS target."""

    input_ids: list[int]
    labels: list[int]
    cut: bool


def tofu_family(family: str | TofuTags) -> TofuTags:
    """The tags of a TOFU family name (``TofuTags`` pass through); ``ValueError`` listing the known ones."""
    if isinstance(family, TofuTags):
        return family
    try:
        return TOFU_FAMILIES[family]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown TOFU family {family!r}; SPEC §4.1 defines {sorted(TOFU_FAMILIES)}"
        ) from None


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which is needed as the target after each answer")
    return eos


def encode_tofu_example(
    tokenizer,
    question: str,
    answer: str,
    family: str | TofuTags,
    max_length: int,
    *,
    where: str = "example",
) -> TofuExample:
    """Tokenise one (question, answer) pair exactly as TOFU does (SPEC §4.1).

    ``full = question_start + question + question_end + answer_tag + answer`` is tokenised once with
    special tokens and cut at ``max_length`` by the tokenizer's own truncation (as the reference does).
    ``k`` is the length of the question part ``question_start + question + question_end`` tokenised
    alone with special tokens (counted as ids, which is ``len(tokenizer.tokenize(..., add_special_tokens=
    True))`` for the fast tokenizers TOFU loads). Labels are ``ids + [eos]`` — or ``ids`` when they
    reached ``max_length``, so a cut sequence gets no EOS target — with the first ``k`` set to -100;
    ``input_ids`` carry the same EOS (see the module docstring for why this equals the reference's
    padding). Raises ``ValueError`` (naming ``where``) when every label is masked, i.e. the question
    fills ``max_length``: the reference would divide 0 by 0 there.
    """
    tags = tofu_family(family)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos = _eos_id(tokenizer)
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
    tokenizer, input_ids: Sequence[int] | torch.Tensor, family: str | TofuTags
) -> tuple[str, str]:
    """The generation prompt and the ROUGE reference of an encoded example (SPEC §4.1).

    ``input_ids`` are :func:`encode_tofu_example`'s at the evaluation length (200 in the paper), so a
    long answer's reference is cut where its scored tokens are. They are decoded without special
    tokens (EOS and BOS vanish) and split at the family's marker: the prompt is the text before its
    first occurrence (plus the marker for Llama-2), the reference the text between the first and a
    second occurrence, if any — the reference's ``split(marker)[0]`` / ``[1]``. Raises
    ``ValueError`` when the marker is missing (the question was cut before it).
    """
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
    """``(input_ids, attention_mask)`` ``[B, W]`` for greedy generation (SPEC §4.1).

    Each prompt is re-tokenised with special tokens and the batch is left padded with EOS (attention
    0), as the reference's tokenizer call with ``padding_side="left"`` and ``pad_token = eos`` does —
    without changing the tokenizer's own settings. Generate :func:`tofu_max_new_tokens` tokens.
    """
    if not prompts:
        raise ValueError("tofu_generation_batch needs at least one prompt")
    eos = _eos_id(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), eos, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def tofu_max_new_tokens(width: int, *, max_length: int) -> int:
    """New tokens per row under ``generate(max_length=...)`` (SPEC §4.1: 200 tokens in total).

    ``max_length`` counts the *padded* batch width ``W``, so every row of a batch gets ``max_length − W``
    new tokens (fewer when it stops at EOS), whatever its own prompt length. The reference batches 30
    items in file order; grouping them differently changes the budget of rows that never emit EOS.
    ``W ≥ max_length`` gives 0 (nothing to generate: empty answers), where ``generate`` refuses the batch.
    """
    if width < 1 or max_length < 1:
        raise ValueError(f"width and max_length must be positive, got {width} and {max_length}")
    return max(max_length - width, 0)
