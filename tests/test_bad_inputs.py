"""A careless user's bad inputs, table-driven: every one exits 2 with one line on stderr naming the
problem, and leaves the output directory exactly as it was (a content hash of every file)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.workspace import build_workspace

from fastunlearn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = build_workspace(tmp_path_factory.mktemp("bad"))
    (root / "empty.json").write_text("")
    (root / "garbage.json").write_bytes(bytes(range(128, 256)) * 4)
    (root / "blank_answers.json").write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": ""}) + "\n" for i in range(3))
    )
    (root / "no_tokenizer").mkdir()
    for name, text in (("empty_config", ""), ("broken_config", "{not json")):
        shutil.copytree(root / "model", root / name)
        (root / name / "config.json").write_text(text)
    short = root / "short_context"
    shutil.copytree(root / "model", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    (root / "a_file").write_text("not a directory")
    finished = root / "finished"
    assert main(_unlearn(root, finished, "--init", "lora", "--no-eval")) == 0
    interrupted = root / "interrupted"
    shutil.copytree(finished, interrupted)
    (interrupted / "metrics.json").unlink()
    return root


def _unlearn(ws: Path, out: Path, *extra: str, model: str = "model") -> list[str]:
    argv = [
        "unlearn",
        str(ws / model),
        "--forget",
        str(ws / "forget.json"),
        "--retain",
        str(ws / "retain.json"),
    ]
    argv += [
        "--output",
        str(out),
        "--template",
        "phi",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--rank",
        "4",
    ]
    argv += ["--alpha", "8", "--no-progress"]
    if "--epochs" not in extra:
        argv += ["--epochs", "1"]
    return [*argv, *extra]


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (workspace, output) -> argv
    message: str
    output: str = "absent"  # the output directory beforehand: absent, finished or interrupted


CASES = [
    # runs that must never be lost or replaced
    Case(
        "resume with another model",
        lambda w, o: _unlearn(w, o, "--init", "lora", "--no-eval", "--resume", model="short_context"),
        "differs in model",
        "interrupted",
    ),
    Case(
        "resume a finished run",
        lambda w, o: _unlearn(w, o, "--init", "lora", "--resume"),
        "holds a finished run: there is nothing to resume",
        "finished",
    ),
    Case(
        "rerun an interrupted run",
        lambda w, o: _unlearn(w, o, "--init", "lora"),
        "holds an interrupted run",
        "interrupted",
    ),
    Case(
        "a failed --overwrite",
        lambda w, o: _unlearn(w, o, "--overwrite", "--stop-when", "forget.nonsense<=1"),
        "nonsense",
        "finished",
    ),
    # silent wrong answers
    Case(
        "longer than the context",
        lambda w, o: _unlearn(w, o, "--max-length", "1000000", model="short_context"),
        "more than the model's context of 8 positions",
    ),
    Case(
        "every answer empty",
        lambda w, o: _replace(_unlearn(w, o), "--forget", str(w / "blank_answers.json")),
        "field 'answer' is empty",
    ),
    Case(
        "forget is retain",
        lambda w, o: _replace(_unlearn(w, o), "--retain", str(w / "forget.json")),
        "forget and retain are the same file",
    ),
    Case("bf16 and fp32", lambda w, o: _unlearn(w, o, "--bf16", "--precision", "fp32"), "contradicts"),
    Case("fp32 and bf16", lambda w, o: _unlearn(w, o, "--precision", "fp32", "--bf16"), "contradicts"),
    Case("an option twice", lambda w, o: _unlearn(w, o, "--lr", "1e-4", "--lr", "1e-3"), "contradicts"),
    # crashes and confusing messages
    Case("empty config.json", lambda w, o: _unlearn(w, o, model="empty_config"), "config.json"),
    Case("broken config.json", lambda w, o: _unlearn(w, o, model="broken_config"), "config.json"),
    Case(
        "binary data file",
        lambda w, o: _replace(_unlearn(w, o), "--forget", str(w / "garbage.json")),
        "garbage.json",
    ),
    Case(
        "empty data file", lambda w, o: _replace(_unlearn(w, o), "--forget", str(w / "empty.json")), "empty"
    ),
    Case(
        "a directory as data",
        lambda w, o: _replace(_unlearn(w, o), "--forget", str(w / "model")),
        "is a directory",
    ),
    Case(
        "tokenizer folder without one",
        lambda w, o: _unlearn(w, o, "--tokenizer", str(w / "no_tokenizer")),
        "no_tokenizer",
    ),
    Case(
        "fisher memory too small",
        lambda w, o: _unlearn(w, o, "--fisher-memory", "1"),
        "the most of any layer",
    ),
    Case("a negative size", lambda w, o: _unlearn(w, o, "--fisher-memory", "-1GB"), "invalid memory size"),
    Case(
        "a model that is not there", lambda w, o: _unlearn(w, o, model="nothere"), "nor a Hugging Face Hub id"
    ),
    Case(
        "a Hub id not in the cache",
        lambda w, o: [*_unlearn(w, o)[:1], "nobody/nothere", *_unlearn(w, o)[2:]],
        "--allow-download",
    ),
    Case("an unknown method", lambda w, o: _unlearn(w, o, "--method", "forgetall"), "invalid choice"),
    Case(
        "a config file that is not there",
        lambda w, o: _unlearn(w, o, "--config", str(w / "none.yaml")),
        "none.yaml",
    ),
    Case(
        "an unknown key in a config file",
        lambda w, o: _unlearn(w, o, "--config", str(w / "forget.json")),
        "config file",
    ),
    Case(
        "eval without a template",
        lambda w, o: [
            "eval",
            str(w / "model"),
            "--forget",
            str(w / "forget_perturbed.json"),
            "--output",
            str(o / "e.json"),
        ],
        "give --template",
    ),
    Case(
        "eval a model that is not there",
        lambda w, o: ["eval", str(w / "nothere"), "--extraction", str(w / "forget.json")],
        "nor a Hugging Face Hub id",
    ),
    Case(
        "fisher into a directory",
        lambda w, o: [
            "fisher",
            str(w / "model"),
            "--data",
            str(w / "forget.json"),
            "--output",
            str(w / "model"),
        ],
        "is a directory",
    ),
    Case(
        "demo cache at a file",
        lambda w, o: ["demo", "--size", "tiny", "--cache-dir", str(w / "a_file"), "--output", str(o)],
        "a_file",
    ),
]


def _snapshot(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(case, ws, tmp_path, capsys):
    out = tmp_path / "out"
    if case.output != "absent":
        shutil.copytree(ws / case.output, out)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(case.argv(ws, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert case.message in err[0], err[0]
    assert "Traceback" not in err[0]
    assert _snapshot(out) == before
    assert not any(name.startswith(".fastunlearn") for name in os.listdir(out)) if out.exists() else True
