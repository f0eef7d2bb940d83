"""Data records and where they come from: a JSON Lines or JSON array file, a Parquet or CSV file, a
folder written by ``datasets.Dataset.save_to_disk`` (``folder@split``), a Hub data set
``name[:config][@split]`` read from the local Hugging Face cache (fetched only with ``allow_download``),
or in-memory dicts; their fields checked for the training formats (:func:`load_records`) and the
evaluation sets (:func:`read_records`). Each record's ``"_source"`` (``path:line``, ``name[i]``) names it
in error messages.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastunlearn._hub import is_hub_id, resolve_snapshot

PARQUET = (".parquet", ".pq")
CSV = (".csv",)
# A missing name ending so is a missing file, not a Hub id.
FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".tsv", ".arrow", *PARQUET, *CSV)

DataFormat = Literal["auto", "qa", "text", "prompt_completion"]
FORMATS: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def _require(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"{what} needs the {package} package: pip install 'fastunlearn[data]'")


def _rows(rows: Any, name: str) -> list[dict[str, Any]]:
    return [{**row, "_source": f"{name}[{i}]"} for i, row in enumerate(rows)]


def _array_items(path: str, text: str) -> Iterator[tuple[Any, int]]:
    """``(value, line)`` of each element of the JSON array ``text``, decoded one at a time so that a
    bad element is reported at its line."""
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        if text[pos : pos + 1] == "]" and not text[pos + 1 :].strip():
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        yield value, text.count("\n", 0, pos) + 1
        pos = end + len(text[end:]) - len(text[end:].lstrip())
        if text[pos : pos + 1] == ",":
            pos += 1
        elif text[pos : pos + 1] != "]" or text[pos + 1 :].strip():
            line = text.count("\n", 0, pos) + 1
            raise ValueError(f"{path}:{line}: invalid JSON array (expected ',' or a final ']')")


def _lines(path: str, text: str) -> Iterator[tuple[Any, int]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line), lineno
            except json.JSONDecodeError as err:
                where = "the end of the line" if err.pos >= len(line) else f"column {err.colno}"
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at {where})") from None


def _read_json(path: str) -> list[dict[str, Any]]:
    """A JSON Lines file (one record a line, blank lines skipped) or one JSON array of records, told
    apart by the first character; a JSON string stands for ``{"text": ...}``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (JSON Lines expected)") from None
    records = []
    for value, line in (_array_items if text.lstrip().startswith("[") else _lines)(path, text):
        value = {"text": value} if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object (a record), got {type(value).__name__}")
        records.append({**value, "_source": f"{path}:{line}"})
    return records


def _read_csv(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        # line_num after a row is read: the line it ended on (a quoted field may span lines)
        return [{**row, "_source": f"{path}:{reader.line_num}"} for row in reader]


def _read_parquet(path: str) -> list[dict[str, Any]]:
    _require("pyarrow", f"reading the Parquet file {path}")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's own error types
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    return _rows(table.to_pylist(), path)


def _read_saved(path: str, split: str | None) -> list[dict[str, Any]]:
    """A ``save_to_disk`` folder: a ``Dataset`` or a ``DatasetDict`` (one split chosen)."""
    names = set(os.listdir(path))
    if not names & {"dataset_dict.json", "state.json"}:
        raise ValueError(
            f"{path} is a directory but not a data set saved by datasets' save_to_disk (no state.json or "
            "dataset_dict.json)"
        )
    _require("datasets", f"reading the data set folder {path}")
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(path)
    if not isinstance(data, DatasetDict):
        if split is not None:
            raise ValueError(f"{path} holds one data set without splits; drop @{split}")
        return _rows(data, path)
    if split is None and len(data) != 1:
        raise ValueError(f"{path} holds the splits {sorted(data)}; name one as {path}@SPLIT")
    if split is not None and split not in data:
        raise ValueError(f"{path} has no split {split!r}; it has {sorted(data)}")
    return _rows(data[split or next(iter(data))], path if split is None else f"{path}@{split}")


@dataclass(frozen=True)
class HubDataset:
    """A Hub data set name resolved: repository, configuration, split, the commit read and its cached
    snapshot folder (``None`` when it is to be fetched)."""

    repo_id: str
    config: str | None
    split: str
    revision: str
    folder: str | None = None

    def __str__(self) -> str:
        config = f":{self.config}" if self.config else ""
        return f"{self.repo_id}{config}@{self.split}"


def resolve_hub_dataset(name: str, *, allow_download: bool = False) -> HubDataset:
    """The repository, configuration, split and commit that ``name[:config][@split]`` reads: the
    cached snapshot, or with ``allow_download`` the Hub's current commit (the cached one when the Hub
    cannot be reached). ``FileNotFoundError`` when the name is neither a file nor a Hub id found."""
    rest, _, split = name.partition("@")
    repo_id, _, config = rest.partition(":")
    config, split = config or None, split or "train"
    if not is_hub_id(repo_id) or repo_id.lower().endswith(FILE_SUFFIXES):
        raise FileNotFoundError(f"data file not found: {name}")
    unreachable = None
    if allow_download:
        from huggingface_hub import HfApi

        try:
            return HubDataset(repo_id, config, split, HfApi().dataset_info(repo_id).sha)
        except Exception as err:  # offline, or unreachable: the cache may still have it
            unreachable = err
    try:
        snapshot = resolve_snapshot(repo_id, repo_type="dataset", what="data set")
    except FileNotFoundError:
        if unreachable is None:
            raise
        raise FileNotFoundError(
            f"data set {repo_id!r}: not in the Hugging Face cache, and the Hub cannot be reached "
            f"({unreachable})"
        ) from None
    return HubDataset(repo_id, config, split, snapshot.revision, snapshot.path)


def _read_hub(name: str, allow_download: bool) -> list[dict[str, Any]]:
    hub = resolve_hub_dataset(name, allow_download=allow_download)
    _require("datasets", f"reading the Hub data set {hub.repo_id}")
    from datasets import load_dataset

    try:
        if hub.folder is None:  # fetched into the cache, where the next run finds it offline
            data = load_dataset(hub.repo_id, hub.config, split=hub.split, revision=hub.revision)
        else:  # the cached snapshot is a local folder: streamed from its files, nothing written
            data = load_dataset(hub.folder, hub.config, split=hub.split, streaming=True)
    except ValueError as err:  # an unknown configuration or split
        raise ValueError(f"data set {hub}: {err}") from None
    return _rows(data, str(hub))


def read_source(source: str | os.PathLike, *, allow_download: bool = False) -> list[dict[str, Any]]:
    """The records of a file, a ``save_to_disk`` folder or a Hub data set (module docstring), each a
    dict with ``"_source"``. ``FileNotFoundError`` for a name that is none of them, ``ValueError``
    naming the source for a file it cannot read or an empty data set."""
    path = os.fspath(source)
    folder, _, split = path.rpartition("@")
    if os.path.isdir(path):
        records = _read_saved(path, None)
    elif os.path.isfile(path) and path.lower().endswith(PARQUET):
        records = _read_parquet(path)
    elif os.path.isfile(path) and path.lower().endswith(CSV):
        records = _read_csv(path)
    elif os.path.isfile(path):
        records = _read_json(path)
    elif folder and os.path.isdir(folder):
        records = _read_saved(folder, split)
    else:
        records = _read_hub(path, allow_download)
    if not records:
        raise ValueError(f"{path}: no records (the data set is empty)")
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
    """Training records and their format from a source :func:`read_source`
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
    """The records of an evaluation file (any source :func:`read_source`
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
