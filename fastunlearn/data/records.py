"""Data records from any source (:mod:`fastunlearn.data.sources`) or in-memory dicts, their fields checked:
the training formats (:func:`load_records`) and the evaluation sets' own fields (:func:`read_records`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from fastunlearn.data.sources import read_source

DataFormat = Literal["auto", "qa", "text", "prompt_completion"]


FORMATS: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


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


def check_fields(
    records: Iterable[Mapping[str, Any]], fields: Sequence[str], what: str, *, empty: bool
) -> None:
    """Every record holds each of ``fields`` as a string (non-blank unless ``empty``); errors name the
    record's ``_source`` and ``what`` needs the fields."""
    for record in records:
        for field in fields:
            if field not in record:
                raise ValueError(
                    f"{record['_source']}: missing field {field!r} ({what} needs {list(fields)})"
                )
            if not isinstance(record[field], str):
                kind = type(record[field]).__name__
                raise ValueError(f"{record['_source']}: field {field!r} must be a string, got {kind}")
            if not empty and not record[field].strip():  # nothing to learn or unlearn: a silent no-op
                raise ValueError(f"{record['_source']}: field {field!r} is empty")


def load_records(
    data: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    data_format: DataFormat = "auto",
    name: str = "data",
    allow_download: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """Training records and their format from a source :func:`~fastunlearn.data.sources.read_source`
    reads or an iterable of dicts (a ``datasets.Dataset`` among them). ``"auto"`` detects the format
    from the first record; ``name`` ("forget", "retain") labels in-memory records in errors."""
    if isinstance(data, (str, os.PathLike)):
        records = read_source(data, allow_download=allow_download)
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
    check_fields(records, FORMATS[fmt], f"format {fmt!r}", empty=False)
    return records, fmt


def read_records(path: str | os.PathLike, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The records of an evaluation file (any source :func:`~fastunlearn.data.sources.read_source`
    reads: JSON Lines or a JSON array whatever the extension), each holding ``fields`` as strings."""
    records = read_source(path)
    check_fields(records, fields, "the records", empty=True)
    return records


def text_field(
    data: str | os.PathLike | Sequence[str] | Sequence[Mapping[str, Any]], field: str, name: str
) -> list[str]:
    """The ``field`` of every record of ``data``: a file (:func:`read_records`), a list of strings (the
    values themselves) or of dicts. ``name`` labels the set in errors; an empty set is a ``ValueError``."""
    if isinstance(data, (str, os.PathLike)):
        return [r[field] for r in read_records(data, (field,))]
    values = [item.get(field) if isinstance(item, Mapping) else item for item in data]
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{name}[{i}]: expected a string or a record with a string {field!r}")
    if not values:
        raise ValueError(f"the {name} set is empty")
    return values
