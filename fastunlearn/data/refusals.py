"""Refusal answers for the IdK and DPO baselines (TOFU, Maini et al. 2024; Rafailov et al. 2023): each
forget question paired with an "I don't know" drawn once per run by a generator seeded by the run's
seed, so a resumed run draws the same and the reference log-probabilities are taken once."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import torch

from fastunlearn.data.examples import Example, tokenize_records
from fastunlearn.data.records import check_fields
from fastunlearn.data.sources import read_source

_SEED_OFFSET = 7_000_003  # kept apart from the retain pairing's generator (seeded by the same seed)


def read_refusals(path: str | os.PathLike | None = None) -> list[str]:
    """The refusal answers of ``path`` (the package's list when ``None``): one a line, blank lines
    skipped, or JSON Lines ``{"answer"}`` when the first non-blank line is a JSON object."""
    name = "the package's refusals" if path is None else os.fspath(path)
    if path is None:
        text = resources.files("fastunlearn.data").joinpath("refusals.txt").read_text(encoding="utf-8")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"refusal file not found: {name}")
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
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
