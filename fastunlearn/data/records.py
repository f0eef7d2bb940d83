"""Data records: files, data sets (:mod:`fastunlearn.data.sources`) or in-memory dicts, their format
detected and checked."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

DataFormat = Literal["auto", "qa", "text", "prompt_completion"]


FORMATS: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON Lines file (one object per line; blank lines skipped).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file, line and column
    for invalid JSON, a line that is not an object, or a file without records. A file that opens with
    ``[`` is a JSON array, not JSON Lines, and is reported as such.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"data file {path} is a directory; give a JSON Lines file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return _read_lines(path, f)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (JSON Lines expected)") from None


def _read_lines(path: str, f) -> list[dict[str, Any]]:
    records = []
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
                f"{path}:{lineno}: expected a JSON object per line (JSON Lines), got {type(record).__name__}"
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
            if not record[field].strip():  # nothing to learn or unlearn: a silent no-op otherwise
                raise ValueError(f"{where}: field {field!r} is empty")


def load_records(
    data: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    data_format: DataFormat = "auto",
    name: str = "data",
    allow_download: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """Records and their format from a source :func:`~fastunlearn.data.sources.read_source` reads (a JSON
    Lines, Parquet or CSV file, a ``save_to_disk`` folder, a Hub data set ``name[:config][@split]``,
    fetched only with ``allow_download``) or an iterable of dicts (a ``datasets.Dataset`` among them).

    ``data_format="auto"`` detects the format from the first record; every record must then carry that
    format's fields. ``name`` ("forget", "retain") labels in-memory records in error messages.
    """
    if isinstance(data, (str, os.PathLike)):
        from fastunlearn.data.sources import read_source

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
    _validate(records, fmt)
    return records, fmt
