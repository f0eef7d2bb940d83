"""The option schema: the parsers, --config files, run_config.json and the recorded command line all
derive from it, so every option round-trips through each of them."""

from __future__ import annotations

import dataclasses
import json
import shlex
import typing

import pytest

from fastunlearn.cli import build_parser, main
from fastunlearn.cli.parser import options_from_args
from fastunlearn.options.evaluate import EvalConfig
from fastunlearn.options.fisher import FisherConfig
from fastunlearn.options.schema import command_line, fields_of, to_record
from fastunlearn.options.unlearn import UnlearnConfig

COMMANDS = {"unlearn": UnlearnConfig, "fisher": FisherConfig, "eval": EvalConfig}


def _other_value(name: str, spec, tp, default):
    """A valid value of option ``name`` other than its default, chosen from its spec and type."""
    allowed = spec.choices
    if allowed:
        return next(v for v in allowed if v != default)
    if name in ("fisher_memory",):
        return "64MiB"
    if name == "eval_every":
        return 3
    if name == "fsdp":
        return "full_shard auto_wrap"
    if name == "report_to":
        return "tensorboard"
    parts = [p for p in typing.get_args(tp) or (tp,) if p is not type(None)]
    if bool in parts:
        return not default if default is not None else True
    if parts and typing.get_origin(parts[0]) is list:
        return [0, 1] if typing.get_args(parts[0]) == (int,) else ["q_proj", "v_proj"]
    if int in parts and float not in parts:
        return (default or 0) + 3
    if float in parts:
        return (
            (default or 0.25) * 0.5 + 0.125
            if name in ("lora_dropout", "generate_within")
            else (default or 1) * 2
        )
    return f"/tmp/value-of-{name}"


def _changed(schema, skip=()):
    """An instance of ``schema`` with every command-line option away from its default."""
    values = {}
    for f, spec, tp in fields_of(schema):
        if spec.cli and f.name not in skip:
            default = f.default_factory() if callable(f.default_factory) else f.default
            values[f.name] = _other_value(f.name, spec, tp, default)
    return values


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_round_trips_through_the_command_line(command):
    schema = COMMANDS[command]
    # resume excludes overwrite; a quantised base excludes fsdp and merge (tests/test_quantised.py)
    skip = {"resume", "deepspeed", "load_in_4bit", "load_in_8bit"} if schema is UnlearnConfig else set()
    values = _changed(schema, skip)
    cfg = schema(**values)
    line = command_line(cfg, command, skip=())
    assert line is not None
    args = build_parser([command]).parse_args(shlex.split(line)[1:])
    assert schema(**options_from_args(args, schema)) == cfg


def test_defaults_give_an_empty_command_and_python_objects_none():
    assert command_line(UnlearnConfig(), "unlearn") == "fastunlearn unlearn"
    assert command_line(UnlearnConfig(callbacks=[object()]), "unlearn") is None
    assert command_line(UnlearnConfig(forget=[{"text": "a"}]), "unlearn") is None


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_files_are_overridden_by_the_command_line(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    content = {"lr": 0.5, "max-length": 64, "target_modules": ["q_proj"], "no_such": 1}
    for bad in (True, False):
        data = content if bad else {k: v for k, v in content.items() if k != "no_such"}
        text = (
            json.dumps(data)
            if suffix == ".json"
            else "\n".join(f"{k}: {json.dumps(v)}" for k, v in data.items())
        )
        path.write_text(text)
        args = build_parser(["unlearn"]).parse_args(["unlearn", "--config", str(path), "--max-length", "32"])
        if bad:
            with pytest.raises(ValueError, match="unknown option 'no_such'"):
                options_from_args(args, UnlearnConfig)
            continue
        options = options_from_args(args, UnlearnConfig)
        assert options == {"learning_rate": 0.5, "max_length": 32, "target_modules": ["q_proj"]}


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nrank: '8'\n")  # YAML reads 3e-4 as a string
    args = build_parser(["unlearn"]).parse_args(["unlearn", "--config", str(path)])
    cfg = UnlearnConfig(**options_from_args(args, UnlearnConfig))
    assert (cfg.learning_rate, cfg.lora_r) == (3e-4, 8)
    path.write_text("lr: fast\n")
    assert (
        main(["unlearn", "m", "--forget", "f", "--output", str(tmp_path / "o"), "--config", str(path)]) == 2
    )
    assert capsys.readouterr().err.strip() == "fastunlearn unlearn: error: --lr must be float, got 'fast'"


def test_a_run_config_is_a_config_that_reproduces_the_run(tmp_path):
    cfg = UnlearnConfig(**_changed(UnlearnConfig, {"resume", "deepspeed", "load_in_4bit", "load_in_8bit"}))
    record = {"command": "...", "options": to_record(cfg), "versions": {}}
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(record))
    args = build_parser(["unlearn"]).parse_args(["unlearn", "--config", str(path)])
    assert UnlearnConfig(**options_from_args(args, UnlearnConfig)) == cfg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bf16", "--precision", "fp32"], "contradicts an earlier value"),
        (["--lr", "1e-4", "--lr", "2e-4"], "contradicts an earlier value"),
        (["--lr", "-1e-4"], "--lr must be positive"),
        (["--fisher-memory", "-1GB"], "invalid memory size"),
        (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml: not found"),
    ],
)
def test_bad_options_are_one_line(argv, message, capsys):
    assert main(["unlearn", "m", "--forget", "f", "--output", "o", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and message in err[-1], err  # argparse prints its usage line first


def test_values_are_checked_against_the_spec():
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        UnlearnConfig(learning_rate=0)
    with pytest.raises(ValueError, match="unknown method 'x'"):
        UnlearnConfig(method="x")
    with pytest.raises(TypeError, match="lora_r must be int"):
        UnlearnConfig(lora_r=1.5)
    with pytest.raises(ValueError, match="exclude each other"):
        UnlearnConfig(overwrite=True, resume=True)
    assert dataclasses.replace(UnlearnConfig(), lora_r=8).lora_r == 8
