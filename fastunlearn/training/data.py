"""Data pipeline: JSON Lines records → tokenised examples → padded forget/retain batches.

Three record formats are read, detected per file from the first record or named explicitly:

- ``qa``: ``{"question", "answer"}`` (TOFU; its ``.json`` files are JSON Lines). The question is
  wrapped in a prompt template and the loss covers the answer tokens and a closing EOS.
  The ``tofu-*`` templates instead tokenise exactly as TOFU does (SPEC §4.1,
  :mod:`fastunlearn.training.tofu_format`): question and answer as one string, the loss on every
  token after the question's.
- ``prompt_completion``: ``{"prompt", "completion"}``. The prompt is used verbatim (it is already
  formatted); the loss covers the completion and a closing EOS.
- ``text``: ``{"text"}``. Raw sequences (the extraction protocol, SPEC §4): the loss covers every token.

Labels follow the Hugging Face convention: ``labels[t] = input_ids[t]`` on supervised positions and
``-100`` elsewhere, and the causal shift (logits at ``t`` predict ``t + 1``) is done by the loss. With
the other templates (fastunlearn's own convention, and the chat template of instruction models) prompt
and answer are tokenised separately and concatenated, so the prompt/answer boundary is exact whatever
the tokenizer merges across it. Masks are built from positions, never by comparing ids with the pad
id: a tokenizer whose pad token is its EOS token still gets its EOS targets.

Pairing (SPEC §3.2): each forget example is paired with a random retain example, re-drawn every epoch
from a generator seeded by ``(seed, epoch)``, so runs and resumed runs see the same pairs.

Evaluation (:mod:`fastunlearn.evaluation`) reads and tokenises with this module too, so an evaluated
prompt is byte for byte the prompt the model was trained on; it imports nothing but
:mod:`fastunlearn.ops` (the ``IGNORE_INDEX`` label) and :mod:`fastunlearn.training.tofu_format`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.training.tofu_format import TOFU_FAMILIES, encode_tofu_example

DataFormat = Literal["auto", "qa", "text", "prompt_completion"]
FORMATS: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# Prompt templates (SPEC §4, legacy protocol): the prompt around the question, and the text put
# between the prompt and the answer.
TEMPLATES: dict[str, tuple[str, str]] = {
    "llama2": ("[INST] {question} [/INST]", " "),
    "phi": ("Question: {question}\nAnswer: ", ""),
    "plain": ("{question}", " "),
}
# "chat": the tokenizer's chat template; "tofu-*": TOFU's joint tokenisation (SPEC §4.1).
TEMPLATE_NAMES = (*TEMPLATES, "chat", *TOFU_FAMILIES)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TEMPLATE_NAMES",
    "Example",
    "PairCollator",
    "PairedDataset",
    "batches",
    "collate",
    "detect_format",
    "load_records",
    "pad_id_of",
    "prepare",
    "read_jsonl",
    "tokenize_records",
]


@dataclass(frozen=True)
class Example:
    """One tokenised example: ``input_ids`` and ``labels`` of equal length (``-100`` = no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str  # "file:line" or "records[i]", for error messages


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON Lines file (one object per line; blank lines skipped).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file, line and column
    for invalid JSON, a line that is not an object, or a file without records. A file that opens with
    ``[`` is a JSON array, not JSON Lines, and is reported as such.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not records and line.lstrip().startswith("["):
                raise ValueError(
                    f"{path}:{lineno}: expected JSON Lines (one object per line), got a JSON array; "
                    "write one record per line"
                )
            # Without its line break, an error at the end of the line is not reported as line 2 column 1.
            text = line.rstrip("\r\n")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                where = "the end of the line" if e.pos >= len(text) else f"column {e.colno}"
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at {where})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object per line (JSON Lines), got "
                    f"{type(record).__name__}"
                )
            record["_source"] = f"{path}:{lineno}"
            records.append(record)
    if not records:
        raise ValueError(f"{path}: the file is empty (no JSON Lines records)")
    return records


def detect_format(record: Mapping[str, Any], where: str) -> str:
    """The format whose fields ``record`` has (``qa`` first, then ``prompt_completion``, then ``text``)."""
    for name, fields in FORMATS.items():
        if all(k in record for k in fields):
            return name
    keys = sorted(k for k in record if k != "_source")
    raise ValueError(
        f"{where}: cannot detect the data format from fields {keys}; expected "
        + ", ".join("{" + ", ".join(f) + "}" for f in FORMATS.values())
    )


def _validate(records: list[dict[str, Any]], fmt: str) -> None:
    for record in records:
        where = record["_source"]
        for field in FORMATS[fmt]:
            if field not in record:
                raise ValueError(
                    f"{where}: missing field {field!r} (format {fmt!r} needs {list(FORMATS[fmt])})"
                )
            if not isinstance(record[field], str):
                raise ValueError(
                    f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}"
                )


def load_records(
    data: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    data_format: DataFormat = "auto",
    name: str = "data",
) -> tuple[list[dict[str, Any]], str]:
    """Records and their format from a JSON Lines path or an iterable of dicts.

    ``data_format="auto"`` detects the format from the first record; every record must then carry that
    format's fields. ``name`` ("forget", "retain") labels in-memory records in error messages.
    """
    if isinstance(data, (str, os.PathLike)):
        records = read_jsonl(data)
    else:
        records = []
        for i, record in enumerate(data):
            if not isinstance(record, Mapping):
                raise TypeError(f"{name}[{i}]: expected a dict record, got {type(record).__name__}")
            records.append({**record, "_source": f"{name}[{i}]"})
        if not records:
            raise ValueError(f"{name}: no records (the data set is empty)")
    if data_format == "auto":
        fmt = detect_format(records[0], records[0]["_source"])
    elif data_format in FORMATS:
        fmt = data_format
    else:
        raise ValueError(f"unknown data format {data_format!r}; expected 'auto' or one of {list(FORMATS)}")
    _validate(records, fmt)
    return records, fmt


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
    """Tokenise records into :class:`Example` s.

    QA: ``prompt(question) + sep + answer + EOS`` with labels on the answer and the EOS, or with a
    ``tofu-*`` template :func:`~fastunlearn.training.tofu_format.encode_tofu_example` (SPEC §4.1: one
    string, the first ``len(question tokens)`` labels masked, cut at ``max_length`` before the EOS);
    prompt/completion like the first without a template; text: every token labelled (no EOS appended).
    Sequences longer than ``max_length`` are cut on the right and counted in one warning; an example
    whose labels are all masked after the cut raises ``ValueError`` with its file and line.
    """
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(TEMPLATE_NAMES)}")
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {list(FORMATS)}")
    if template in TOFU_FAMILIES and data_format != "qa":
        raise ValueError(
            f"template {template!r} is TOFU's tokenisation of question/answer records (SPEC §4.1); "
            f"it does not apply to {data_format!r} records"
        )
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if data_format != "text" and eos is None:
        raise ValueError("the tokenizer has no EOS token, which is needed as the target after each answer")
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
    """Right-pad examples to the longest one: ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``.

    Padding gets ``attention_mask = 0`` and label ``-100`` by position, so a pad id equal to EOS never
    masks a real EOS target.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: Sequence[Example], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive padded batches of ``examples`` (for evaluation and Fisher estimation)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


class PairedDataset(torch.utils.data.Dataset):
    """Forget examples, each paired with a random retain example (re-drawn per epoch, seeded).

    Item ``i`` of epoch ``e`` is ``{"forget": forget[i], "retain": retain[π_e[i]]}`` with
    ``π_e ~ Uniform{0..len(retain)-1}^len(forget)`` drawn from ``torch.Generator`` seeded by
    ``seed + 1_000_003·e``. ``retain`` may be empty for objectives that use no retain term (GA).
    ``ref_logp`` (one value per forget example: NPO's reference log-probability) rides along when set.
    """

    def __init__(self, forget: Sequence[Example], retain: Sequence[Example], *, seed: int = 0) -> None:
        if not forget:
            raise ValueError("the forget set is empty: there is nothing to unlearn")
        self.forget, self.retain, self.seed = list(forget), list(retain), seed
        self.ref_logp: torch.Tensor | None = None
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
        if self.ref_logp is not None:
            item["ref_logp"] = self.ref_logp[i]
        return item


class PairCollator:
    """Collate :class:`PairedDataset` items into ``{"forget": batch, "retain": batch}``, each padded alone.

    A ``ref_logp`` carried by the items becomes ``forget["ref_logp"]`` ``[B]`` (fp32).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        out = {
            key: collate([item[key] for item in items], self.pad_id)
            for key in ("forget", "retain")
            if key in items[0]
        }
        if "ref_logp" in items[0]:
            out["forget"]["ref_logp"] = torch.stack(
                [torch.as_tensor(item["ref_logp"]) for item in items]
            ).float()
        return out


def prepare(
    data: str | os.PathLike | Iterable[Mapping[str, Any]],
    tokenizer,
    *,
    name: str,
    data_format: DataFormat = "auto",
    template: str = "plain",
    max_length: int = 512,
) -> list[Example]:
    """:func:`load_records` then :func:`tokenize_records`: the one call the trainer and the CLI use."""
    records, fmt = load_records(data, data_format=data_format, name=name)
    return tokenize_records(records, tokenizer, data_format=fmt, template=template, max_length=max_length)
