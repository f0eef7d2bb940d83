"""Every input form of a data set gives the records of the JSON Lines file it was made from: Parquet,
CSV, a ``datasets`` ``save_to_disk`` folder (one data set, or a split of several), and a Hub data set
resolved offline from a Hugging Face cache built here. Bad input names its source and row."""

from __future__ import annotations

import csv
import json

import pytest
from helpers.hub import cache_repo, offline_cache
from helpers.workspace import build_workspace

from fastunlearn.cli import main
from fastunlearn.data import load_records
from fastunlearn.data.records import read_records, read_source, resolve_hub_dataset

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

# Commas, quotes, line breaks and non-ASCII text: what CSV quoting and Arrow strings must carry intact.
RECORDS = [
    {"question": 'Who wrote "Zürich, at night"?', "answer": "Ana Lúcia, in 1987."},
    {"question": "Where was she born?", "answer": "In Paris;\nthen Lyon."},
    {"question": "Her first novel?", "answer": '"Naïve", a mystery'},
]


def _plain(records):
    return [{k: v for k, v in r.items() if k != "_source"} for r in records]


def _write_all(root):
    """The same records as JSON Lines, Parquet, CSV, a save_to_disk folder and a two-split folder."""
    paths = {"jsonl": root / "d.jsonl", "parquet": root / "d.parquet", "csv": root / "d.csv"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"])
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(RECORDS)
    datasets.Dataset.from_list(RECORDS).save_to_disk(root / "saved")
    paths["saved"] = root / "saved"
    splits = {"train": RECORDS, "test": RECORDS[:1]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        root / "dd"
    )
    paths["split"] = f"{root / 'dd'}@train"
    return paths


def test_every_form_reads_the_records_of_its_json_lines_file(tmp_path):
    paths = _write_all(tmp_path)
    expected, fmt = load_records(paths["jsonl"])
    assert fmt == "qa" and _plain(expected) == RECORDS
    for form, path in paths.items():
        records, found = load_records(path)
        assert found == "qa" and _plain(records) == RECORDS, form
    # where each record came from: the line of a text file, the row of a table
    assert [r["_source"] for r in read_source(paths["parquet"])] == [
        f"{paths['parquet']}[{i}]" for i in range(3)
    ]
    assert [r["_source"] for r in read_source(paths["csv"])] == [f"{paths['csv']}:{n}" for n in (2, 4, 5)]
    # the evaluation readers take the same forms
    assert [r["answer"] for r in read_records(paths["parquet"], ("question", "answer"))] == [
        r["answer"] for r in RECORDS
    ]


def test_a_hub_data_set_resolves_offline_from_the_cache(tmp_path, monkeypatch):
    """``name``, ``name@split`` and ``name:config@split`` from a cached snapshot; its commit recorded."""
    offline_cache(monkeypatch, tmp_path / "hub")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "extra").mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS), repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[:2]), repo / "data" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[1:]), repo / "extra" / "train.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n- config_name: extra\n  data_files:\n  - split: train\n"
        "    path: extra/*.parquet\n---\n"
    )
    commit = cache_repo(tmp_path / "hub", "org/authors", repo, repo_type="dataset", ref=False)
    assert _plain(load_records("org/authors")[0]) == RECORDS
    assert _plain(load_records("org/authors@test")[0]) == RECORDS[:2]
    records, _ = load_records("org/authors:extra@train")
    assert _plain(records) == RECORDS[1:] and records[0]["_source"] == "org/authors:extra@train[0]"
    assert resolve_hub_dataset("org/authors@test").revision == commit
    with pytest.raises(ValueError, match="org/authors@nosuch"):
        load_records("org/authors@nosuch")


def test_bad_input_names_the_source_and_row(tmp_path, monkeypatch):
    offline_cache(monkeypatch, tmp_path / "hub")
    no_fields = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([{"title": "a", "body": "b"}]), no_fields)
    with pytest.raises(
        ValueError, match=r"x\.parquet\[0\]: cannot detect the data format from fields \['body', 'title'\]"
    ):
        load_records(no_fields)
    bad_row = tmp_path / "y.parquet"
    pq.write_table(pa.Table.from_pylist([RECORDS[0], {"question": "q", "answer": None}]), bad_row)
    with pytest.raises(ValueError, match=r"y\.parquet\[1\]: field 'answer' must be a string, got NoneType"):
        load_records(bad_row)
    with pytest.raises(ValueError, match=r"z\.csv:2: missing field 'answer'"):
        (tmp_path / "z.csv").write_text("question,text\na,b\nc,d\n")
        load_records(tmp_path / "z.csv", data_format="qa")
    _write_all(tmp_path)
    with pytest.raises(ValueError, match=r"dd holds the splits \['test', 'train'\]; name one as .*dd@SPLIT"):
        load_records(tmp_path / "dd")
    with pytest.raises(FileNotFoundError, match=r"data set 'org/absent' is neither a local path nor in the "):
        load_records("org/absent")
    with pytest.raises(FileNotFoundError, match=r"data file not found: missing\.json"):
        load_records("missing.json")


def test_a_bad_file_on_the_command_line_is_one_line_and_nothing_is_written(tmp_path, capsys):
    ws = build_workspace(tmp_path / "ws")
    capsys.readouterr()  # the workspace's own progress bars
    no_fields = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([{"title": "a", "body": "b"}]), no_fields)
    out = tmp_path / "out"
    argv = ["unlearn", str(ws / "model"), "--forget", str(no_fields), "--retain", str(ws / "retain.json")]
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{no_fields}[0]: cannot detect the data format" in err[0], err
    assert not out.exists()
