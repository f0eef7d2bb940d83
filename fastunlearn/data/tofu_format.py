"""TOFU's format (Maini et al. 2024): its evaluation files (:func:`read_tofu_file`, found in a
directory by TOFU's names by :func:`find_tofu_files`) and its own tokenisation, token for token.

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

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from fastunlearn.data.records import read_records
from fastunlearn.ops import IGNORE_INDEX

TOFU_SETS = ("forget", "retain", "real_authors", "world_facts")


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
    # Left padding: the reversed rows right-padded, then reversed back.
    rows = [torch.tensor(ids, dtype=torch.long).flip(0) for ids in encoded]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=eos).flip(1)
    return input_ids, pad_sequence([torch.ones_like(row) for row in rows], batch_first=True).flip(1)


def tofu_max_new_tokens(width: int, *, max_length: int) -> int:
    """New tokens per row under the reference's ``generate(max_length=200)``: ``max_length`` counts the
    padded batch width ``W``, so every row of a batch gets ``max_length − W`` (0 when ``W`` reaches it),
    whatever its own prompt length; the batches (30 items in file order) therefore matter."""
    if width < 1 or max_length < 1:
        raise ValueError(f"width and max_length must be positive, got {width} and {max_length}")
    return max(max_length - width, 0)


@dataclass(frozen=True)
class TofuItem:
    """One TOFU question with its answers; plain split files (``forget10.json``) have no paraphrased
    and perturbed answers (3 perturbed in real authors / world facts, 5 in forget / retain)."""

    question: str
    answer: str
    paraphrased_answer: str | None
    perturbed_answers: tuple[str, ...] | None
    source: str


def read_tofu_file(path: str | os.PathLike) -> list[TofuItem]:
    """The items of a TOFU-format file; errors name the file and line. Every item must have the same
    fields and number of perturbed answers (the truth ratio is computed on an ``[N, K]`` table)."""
    items = []
    for record in read_records(path, ("question", "answer")):
        where = record["_source"]
        para = record.get("paraphrased_answer")
        if para is not None and not isinstance(para, str):
            raise ValueError(f"{where}: 'paraphrased_answer' must be a string")
        pert = record.get("perturbed_answer")
        if pert is not None:
            if isinstance(pert, str):
                pert = [pert]
            if not isinstance(pert, list) or not pert or not all(isinstance(p, str) for p in pert):
                raise ValueError(f"{where}: 'perturbed_answer' must be a non-empty list of strings")
            pert = tuple(pert)
        items.append(TofuItem(record["question"], record["answer"], para, pert, where))
    first = items[0]
    for item in items[1:]:
        if (item.paraphrased_answer is None) != (first.paraphrased_answer is None):
            raise ValueError(f"{item.source}: 'paraphrased_answer' is present on some lines and not others")
        k0 = None if first.perturbed_answers is None else len(first.perturbed_answers)
        k = None if item.perturbed_answers is None else len(item.perturbed_answers)
        if k != k0:
            raise ValueError(
                f"{item.source}: {k} perturbed answers where {first.source} has {k0}; "
                "every line of a file needs the same number"
            )
    return items


def missing_truth_ratio_reason(items: list[TofuItem], source: str | os.PathLike | None) -> str | None:
    """Why a set read from ``source`` has no truth ratio (no ``perturbed_answer``), or ``None``; TOFU
    keeps them in ``NAME_perturbed.json`` beside ``NAME.json``, which the reason names."""
    if not items or items[0].perturbed_answers is not None:
        return None
    if source is None:
        return "its items have no perturbed_answer"
    path = os.fspath(source)
    stem, ext = os.path.splitext(path)
    sibling = f"{stem}_perturbed{ext or '.json'}"
    if stem.endswith("_perturbed"):
        return f"{path} has no perturbed_answer field"
    state = "use it instead" if os.path.isfile(sibling) else "not found"
    return f"{path} has no perturbed_answer field (TOFU keeps them in {os.path.basename(sibling)}: {state})"


def find_tofu_files(data_dir: str | os.PathLike, *, forget_split: str | None = None) -> dict[str, str]:
    """TOFU's files in a directory by TOFU's names, the ``*_perturbed.json`` first: forget
    (``{forget_split}``, or the only ``forget*``), retain, real authors, world facts; absent sets are
    left out. ``ValueError`` for several candidates or a ``forget_split`` with no file."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"TOFU data directory not found: {data_dir}")
    split = forget_split or "forget*"
    patterns = {
        "forget": [f"{split}_perturbed.json", f"{split}.json"],
        "retain": ["retain_perturbed.json", "retain*.json"],
        "real_authors": ["real_authors_perturbed.json", "real_authors.json"],
        "world_facts": ["world_facts_perturbed.json", "world_facts.json"],
    }
    present = [p for p in patterns["forget"] if os.path.isfile(os.path.join(data_dir, p))]
    if forget_split is not None and not present:
        names = glob.glob("forget*.json", root_dir=data_dir)
        found = sorted({name[: -len(".json")].removesuffix("_perturbed") for name in names})
        raise ValueError(
            f"no forget split {forget_split!r} in {data_dir} (neither {' nor '.join(patterns['forget'])}); "
            f"splits found: {found or 'none'}"
        )
    files = {}
    for name, candidates in patterns.items():
        for pattern in candidates:
            found = sorted(glob.glob(os.path.join(data_dir, pattern)))
            if len(found) > 1:
                raise ValueError(
                    f"several {name.replace('_', ' ')} files in {data_dir}: "
                    f"{[os.path.basename(f) for f in found]}; choose one (forget_split=... for the "
                    "forget set, or pass the set's file explicitly)"
                )
            if found:
                files[name] = found[0]
                break
    if not files:
        raise ValueError(f"no TOFU files (forget*, retain*, real_authors*, world_facts*) in {data_dir}")
    return files
