"""Evaluation records from JSON Lines or JSON array files, with errors that name the file and line.

Benchmarks publish the same records both ways (MUSE's files are JSON arrays, most converted copies
JSON Lines), so the format is read from the file, not its name: a file whose first non-blank
character is ``[`` is one JSON array of records, anything else is JSON Lines (one object a line,
blank lines skipped). Every record must be an object holding each required field as a string; in a
set of raw texts (``fields=("text",)``) a JSON string stands for ``{"text": ...}``. Parquet and CSV
files, ``save_to_disk`` folders and Hub data sets are read by :func:`fastunlearn.data.sources.read_source`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from fastunlearn.data.sources import CSV, PARQUET, read_source

__all__ = ["read_records", "text_field"]

TABULAR = (*PARQUET, *CSV)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_error(path: str, err: json.JSONDecodeError) -> ValueError:
    return ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})")


def _array_items(path: str, text: str) -> Iterator[tuple[Any, int]]:
    """``(value, line)`` of each element of the JSON array ``text`` (which starts with ``[``), decoded
    one element at a time so that a bad element can be reported at its line."""
    decoder = json.JSONDecoder()
    counted, line = 0, 1  # lines are counted once, from the previous element on

    def line_at(pos: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _skip_space(text, text.index("[") + 1)
    if text[pos : pos + 1] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(path, err) from None
        yield value, line_at(pos)
        pos = _skip_space(text, end)
        sep = text[pos : pos + 1]
        if sep == "]" and not text[pos + 1 :].strip():
            return
        if sep != ",":
            raise ValueError(f"{path}:{line_at(pos)}: invalid JSON array (expected ',' or a final ']')")
        pos = _skip_space(text, pos + 1)


def _lines(path: str, text: str) -> Iterator[tuple[Any, int]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), lineno
        except json.JSONDecodeError as err:
            err.lineno = lineno  # the file's line, not the line inside the decoded string
            raise _json_error(path, err) from None


def read_records(path: str | os.PathLike, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The records of a JSON Lines or JSON array file (module docstring), each with its ``fields`` as
    strings and ``"_source"`` set to ``"path:line"``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and line for
    invalid JSON, a record that is not an object, a missing or non-string field, and for a file with
    no records.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) or path.lower().endswith(TABULAR):  # Parquet, CSV, data sets, Hub ids
        items = ((r, r.pop("_source")) for r in read_source(path))
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        found = _array_items(path, text) if text.lstrip().startswith("[") else _lines(path, text)
        items = ((value, f"{path}:{line}") for value, line in found)
    records = []
    for value, where in items:
        if isinstance(value, str) and tuple(fields) == ("text",):
            value = {"text": value}
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}: expected a JSON object with fields {list(fields)}, got {type(value).__name__}"
            )
        for field in fields:
            if not isinstance(value.get(field), str):
                state = "missing" if field not in value else f"a {type(value[field]).__name__}, not a string"
                raise ValueError(f"{where}: field {field!r} is {state} (records need {list(fields)})")
        records.append({**value, "_source": where})
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


def text_field(
    data: str | os.PathLike | Sequence[str] | Sequence[dict[str, Any]], field: str, name: str
) -> list[str]:
    """The ``field`` of every record of ``data``: a file (:func:`read_records`), a list of strings (the
    values themselves) or of dicts. ``name`` labels the set in errors; an empty set is a ``ValueError``."""
    if isinstance(data, (str, os.PathLike)):
        return [r[field] for r in read_records(data, (field,))]
    values = []
    for i, item in enumerate(data):
        value = item.get(field) if isinstance(item, dict) else item
        if not isinstance(value, str):
            raise ValueError(f"{name}[{i}]: expected a string or a record with a string {field!r}")
        values.append(value)
    if not values:
        raise ValueError(f"the {name} set is empty")
    return values
