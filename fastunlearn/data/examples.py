"""Data pipeline: records → tokenised examples → padded forget/retain batches.

Formats: ``qa`` (the question in a prompt template, the loss on the answer and a closing EOS; the
``tofu-*`` templates tokenise as TOFU does), ``prompt_completion`` (the prompt verbatim) and ``text``
(raw sequences, Jang et al. 2023: the loss on every token). Labels are ``-100`` where there is no loss
(the loss does the causal shift). Prompt and answer are tokenised separately, so their boundary is
exact; masks come from positions, never from pad ids (a pad equal to EOS keeps its EOS targets).

The IdK and DPO baselines (TOFU, Maini et al. 2024; Rafailov et al. 2023) pair each forget question with
a refusal drawn once per run by a generator seeded by the run's seed, so a resumed run draws the same
and the reference log-probabilities are taken once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from fastunlearn.data.records import FORMATS, DataFormat, check_fields, load_records, read_source
from fastunlearn.data.tofu_format import TOFU_FAMILIES, encode_tofu_example, eos_id
from fastunlearn.ops import IGNORE_INDEX

# Prompt templates: the prompt around the question, and the text between the prompt and the answer.
TEMPLATES: dict[str, tuple[str, str]] = {
    "llama2": ("[INST] {question} [/INST]", " "),
    "phi": ("Question: {question}\nAnswer: ", ""),
    "plain": ("{question}", " "),
}
# "chat": the tokenizer's chat template; "tofu-*": TOFU's joint tokenisation.
TEMPLATE_NAMES = (*TEMPLATES, "chat", *TOFU_FAMILIES)


@dataclass(frozen=True)
class Example:
    """One tokenised example: ``input_ids`` and ``labels`` of equal length (``-100`` = no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str  # "file:line" or "records[i]", for error messages


def _prompt_text(question: str, template: str, tokenizer) -> str:
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template 'chat' needs a tokenizer with a chat template; this one has none")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return TEMPLATES[template][0].format(question=question)


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    data_format: str,
    template: str = "plain",
    max_length: int = 512,
) -> list[Example]:
    """Tokenise records into :class:`Example` s (module docstring). Sequences longer than
    ``max_length`` are cut on the right and counted in one warning; an example whose labels are all
    masked after the cut is a ``ValueError`` naming its file and line."""
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(TEMPLATE_NAMES)}")
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {list(FORMATS)}")
    if template in TOFU_FAMILIES and data_format != "qa":
        raise ValueError(
            f"template {template!r} is TOFU's tokenisation of question/answer records; "
            f"it does not apply to {data_format!r} records"
        )
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id if data_format == "text" else eos_id(tokenizer)
    examples, truncated = [], 0
    for record in records:
        where = record.get("_source", "record")
        if template in TOFU_FAMILIES:
            ids, labels, cut = encode_tofu_example(
                tokenizer, record["question"], record["answer"], template, max_length, where=where
            )
            truncated += cut
            examples.append(Example(tuple(ids), tuple(labels), where))
            continue
        if data_format == "text":
            ids = _encode(tokenizer, record["text"], special=True)
            labels = list(ids)
        else:
            if data_format == "qa":
                # The chat template carries its own special tokens; the others get the tokenizer's BOS.
                prompt = _prompt_text(record["question"], template, tokenizer)
                answer = ("" if template == "chat" else TEMPLATES[template][1]) + record["answer"]
                prompt_ids = _encode(tokenizer, prompt, special=template != "chat")
            else:
                prompt_ids = _encode(tokenizer, record["prompt"], special=True)
                answer = record["completion"]
            if prompt_ids and prompt_ids[-1] == eos and len(prompt_ids) > 1:
                prompt_ids = prompt_ids[:-1]  # tokenizers that append EOS to every encoding
            answer_ids = [*_encode(tokenizer, answer, special=False), eos]
            ids = prompt_ids + answer_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        # Position 0 is never a target after the causal shift.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise ValueError(
                f"{where}: every label is masked (the prompt fills max_length={max_length}); "
                "raise max_length or shorten the prompt"
            )
        examples.append(Example(tuple(ids), tuple(labels), where))
    if truncated:
        warnings.warn(
            f"{truncated} of {len(examples)} examples were truncated to max_length={max_length} tokens",
            stacklevel=2,
        )
    return examples


def pad_id_of(tokenizer) -> int:
    """The id used for padding: the pad token, else EOS, else 0 (padding is masked by position anyway)."""
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    return 0 if pid is None else pid


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one: ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``
    (padding masked by position)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    ids = [torch.tensor(e.input_ids, dtype=torch.long) for e in examples]
    labels = [torch.tensor(e.labels, dtype=torch.long) for e in examples]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "attention_mask": pad_sequence([torch.ones_like(row) for row in ids], batch_first=True),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }


def batches(examples: Sequence[Example], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive padded batches of ``examples`` (for evaluation and Fisher estimation)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


class PairedDataset(torch.utils.data.Dataset):
    """Forget examples, each paired with a random retain example re-drawn every epoch by a generator
    seeded by ``seed + 1_000_003·epoch`` (runs and resumed runs see the same pairs); ``retain`` may be
    empty (no retain term). ``idk``: each forget question with a refusal (IdK, DPO); ``ref_logp``:
    ``{part: [len(forget)]}``, the reference model's sequence log-probabilities (NPO, DPO)."""

    def __init__(
        self,
        forget: Sequence[Example],
        retain: Sequence[Example],
        *,
        seed: int = 0,
        idk: Sequence[Example] | None = None,
    ) -> None:
        if not forget:
            raise ValueError("the forget set is empty: there is nothing to unlearn")
        if idk is not None and len(idk) != len(forget):
            raise ValueError(
                f"idk must hold one example per forget example, got {len(idk)} for {len(forget)}"
            )
        self.forget, self.retain, self.seed = list(forget), list(retain), seed
        self.idk = None if idk is None else list(idk)
        self.ref_logp: dict[str, torch.Tensor] = {}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.retain:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
            self.pairing = torch.randint(len(self.retain), (len(self.forget),), generator=g).tolist()
        else:
            self.pairing = None

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"forget": self.forget[i]}
        if self.pairing is not None:
            item["retain"] = self.retain[self.pairing[i]]
        if self.idk is not None:
            item["idk"] = self.idk[i]
        if self.ref_logp:
            item["ref_logp"] = {part: values[i] for part, values in self.ref_logp.items()}
        return item


@dataclass(frozen=True)
class PairCollator:
    """Collate :class:`PairedDataset` items into ``{"forget": batch, "retain": batch, "idk": batch}`` (the
    parts they hold, each padded alone), their ``ref_logp`` as ``batch[part]["ref_logp"]`` ``[B]`` fp32."""

    pad_id: int

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        out = {
            key: collate([item[key] for item in items], self.pad_id)
            for key in ("forget", "retain", "idk")
            if key in items[0]
        }
        for part in items[0].get("ref_logp", {}):
            values = [torch.as_tensor(item["ref_logp"][part]) for item in items]
            out[part]["ref_logp"] = torch.stack(values).float()
        return out


def prepare(
    data: str | os.PathLike | Iterable[Mapping[str, Any]],
    tokenizer,
    *,
    name: str,
    data_format: DataFormat = "auto",
    template: str = "plain",
    max_length: int = 512,
    allow_download: bool = False,
) -> list[Example]:
    """:func:`load_records` then :func:`tokenize_records`: the one call the trainer and the CLI use."""
    records, fmt = load_records(data, data_format=data_format, name=name, allow_download=allow_download)
    return tokenize_records(records, tokenizer, data_format=fmt, template=template, max_length=max_length)


_SEED_OFFSET = 7_000_003  # kept apart from the retain pairing's generator (seeded by the same seed)


def read_refusals(path: str | os.PathLike | None = None) -> list[str]:
    """The refusal answers of ``path`` (the package's list when ``None``): one a line, blank lines
    skipped, or JSON Lines ``{"answer"}`` when the first non-blank line is a JSON object."""
    name = "the package's refusals" if path is None else os.fspath(path)
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"refusal file not found: {name}")
    file = resources.files("fastunlearn.data").joinpath("refusals.txt") if path is None else Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not a UTF-8 text file (one refusal a line expected)") from None
    answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"{name}: no refusal answers (the file is empty)")
    if answers[0].startswith("{"):
        records = read_source(path)
        check_fields(records, ("answer",), "a JSON Lines refusal file", empty=False)
        answers = [r["answer"].strip() for r in records]
    return answers


def refusal_records(
    records: Sequence[Mapping[str, Any]], data_format: str, refusals: Sequence[str], seed: int
) -> list[dict[str, Any]]:
    """Each forget record with its answer (``qa``) or completion (``prompt_completion``) replaced by a
    refusal drawn uniformly from ``refusals`` by a generator seeded from ``seed``."""
    fields = {"qa": "answer", "prompt_completion": "completion"}
    if data_format not in fields:
        raise ValueError(
            f"idk and dpo answer each forget question with a refusal; {data_format!r} forget records have no "
            "question (give question/answer or prompt/completion records)"
        )
    if not refusals:
        raise ValueError("no refusal answers to pair the forget questions with")
    g = torch.Generator().manual_seed(seed + _SEED_OFFSET)
    drawn = torch.randint(len(refusals), (len(records),), generator=g).tolist()
    field = fields[data_format]
    return [
        {**record, field: refusals[k], "_source": f"{record.get('_source', f'records[{i}]')} (refusal)"}
        for i, (record, k) in enumerate(zip(records, drawn, strict=True))
    ]


def refusal_examples(
    records: Sequence[Mapping[str, Any]],
    data_format: str,
    tokenizer: Any,
    *,
    path: str | os.PathLike | None,
    seed: int,
    template: str,
    max_length: int,
) -> list[Example]:
    """The forget records with refusal answers (:func:`refusal_records` over :func:`read_refusals` of
    ``path``), tokenised as the forget set is."""
    records = refusal_records(records, data_format, read_refusals(path), seed)
    return tokenize_records(
        records, tokenizer, data_format=data_format, template=template, max_length=max_length
    )
