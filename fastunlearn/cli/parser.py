"""Command-line parsers built from the option schema, ``--config FILE``, and messages in flags.

Values come from the schema's defaults, then the ``--config`` file (a YAML or JSON mapping of option
names, ``learning_rate`` or the flags' words ``lr``, ``max-length``, to values; of a run's
``run_config.json``, its ``options``), then the command line: the parser records only what was typed
(``argparse.SUPPRESS`` defaults), so the three merge without guessing. An option given twice with
different values is an error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

from fastunlearn.options.schema import Spec, coerce, fields_of, flag_of


class _Once(argparse.Action):
    """Store a value; the same option (or another flag of it) given again with another value is an error."""

    def __init__(self, *args, const_value: Any = None, **kwargs) -> None:
        self.const_value = const_value
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        value = self.const_value if self.nargs == 0 else values
        if hasattr(namespace, self.dest) and getattr(namespace, self.dest) != value:
            parser.error(
                f"argument {option_string}: contradicts an earlier value of the same option; give one"
            )
        setattr(namespace, self.dest, value)


def _names(text: str) -> list[str]:
    """The items of a list option's ``a,b`` (repeated flags extend the list: one value per use, so it
    cannot swallow positionals)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}")
    return items


def _add_one(target, name: str, spec: Spec, tp: Any, default: Any) -> None:
    flag, S = flag_of(name, spec), argparse.SUPPRESS
    shown = f" (default: {default})" if default not in (None, False, True, "") else ""
    text = (spec.help + shown).replace("%", "%%")
    parts = [p for p in typing.get_args(tp) or (tp,) if p is not type(None)]  # the type, None apart
    if flag == "":
        target.add_argument(name, nargs="?", default=S, help=text, metavar=name.upper())
    elif parts == [bool] and default is None:  # tri-state: --x / --no-x
        target.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=S, help=text)
    elif parts == [bool]:
        switch = "--no-" + flag[2:] if spec.negate else flag
        text = ("do not: " if spec.negate else "") + text
        target.add_argument(
            switch, dest=name, action="store_const", const=not spec.negate, default=S, help=text
        )
    elif any(typing.get_origin(p) is list for p in parts):
        target.add_argument(
            flag, dest=name, action="extend", type=_names, default=S, help=text, metavar=spec.metavar
        )
    else:
        scalar = parts[0] if parts in ([int], [float]) else str
        target.add_argument(
            flag, dest=name, action=_Once, type=spec.parse or scalar, choices=spec.choices, default=S,
            help=text, metavar=spec.metavar or (None if spec.choices else name.upper()),
        )  # fmt: skip
    for const_flag, value in spec.consts.items():
        target.add_argument(
            const_flag, dest=name, action=_Once, nargs=0, const_value=value, default=S,
            help=f"the same as {flag} {value}",
        )  # fmt: skip


def add_command(
    subparsers, name: str, func: Callable, schemas: list[type], *, interrupted: Any = None,
    config: bool = True, only: Mapping[type, Callable[[str, Spec], bool]] | None = None,
    defaults: Mapping[str, Any] | None = None, **kwargs: Any,
) -> argparse.ArgumentParser:  # fmt: skip
    """Register subcommand ``name`` running ``func``, with ``--config FILE`` unless ``config=False`` and
    the options of ``schemas`` (``only[schema](name, spec)``: which of a schema's) in argument groups
    named by their specs; ``defaults``: the command's own where they differ from the schema's (shown in
    the help; the command applies them). Its messages name the options by the flags a user types
    (``overwrite=True`` → ``--overwrite``). ``interrupted``: what Ctrl-C prints (or makes of args)."""
    from fastunlearn.cli import SUBCOMMANDS

    p = subparsers.add_parser(name, help=SUBCOMMANDS[name][1], **kwargs)
    if config:
        p.add_argument(
            "--config", metavar="FILE", default=None,
            help="read options from a YAML or JSON file (a run's run_config.json reproduces the run); "
            "options on the command line override it",
        )  # fmt: skip
    flags: dict[str, str] = {}
    groups: dict[str | None, Any] = {None: p}
    for schema in schemas:
        for f, spec, tp in fields_of(schema):
            if not spec.cli:
                continue
            flag = flag_of(f.name, spec)
            flags[f.name] = ("--no-" + flag[2:] if spec.negate else flag) or f.name.upper()
            if schema in (only or {}) and not only[schema](f.name, spec):
                continue
            if spec.group not in groups:
                groups[spec.group] = p.add_argument_group(spec.group)
            default = f.default_factory() if callable(f.default_factory) else f.default
            _add_one(groups[spec.group], f.name, spec, tp, (defaults or {}).get(f.name, default))
    if isinstance(interrupted, str):
        interrupted = lambda args, line=interrupted: line
    p.set_defaults(func=func, interrupted=interrupted, option_flags=flags)
    return p


def _load(path: str) -> Any:
    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"config file {path}: {what}")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise ValueError(f"config file {path}: not a text file (YAML or JSON expected)") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"config file {path}: invalid YAML{where}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def read_config_file(path: str | os.PathLike, schema: type) -> dict[str, Any]:
    """The options of ``schema`` the file at ``path`` sets, by Python name."""
    path = os.fspath(path)
    data = _load(path)
    python_only = {f.name for f, spec, _ in fields_of(schema) if not spec.cli}
    if isinstance(data, dict) and isinstance(data.get("options"), dict) and "versions" in data:
        # a run's run_config.json: its Python-only options (callbacks) are recorded by name only
        data = {k: v for k, v in data["options"].items() if k not in python_only}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option names to values")
    names: dict[str, str] = {}
    types = {f.name: tp for f, _, tp in fields_of(schema)}
    for f, spec, _ in fields_of(schema):
        if spec.cli:
            flag = flag_of(f.name, spec).lstrip("-") or f.name  # the positional one: its name
            names[f.name] = names[flag] = names[flag.replace("-", "_")] = f.name
    options = {}
    for key, value in data.items():
        name = names.get(str(key).lstrip("-"))
        if name is None:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"config file {path}: unknown option {key!r}{hint}")
        options[name] = coerce(value, types[name])
    return options


def options_from_args(args: argparse.Namespace, schema: type) -> dict[str, Any]:
    """The schema's options that were given: the ``--config`` file's, overridden by the command line's."""
    names = {f.name for f, spec, _ in fields_of(schema) if spec.cli}
    typed = {name: value for name, value in vars(args).items() if name in names}
    path = getattr(args, "config", None)
    return {**(read_config_file(path, schema) if path else {}), **typed}


def to_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the Python names of ``flags`` replaced by their flags: ``name=True`` (and
    ``name=False`` of a ``--no-...`` switch) by ``--flag``, ``name=value`` by ``--flag value``, a bare
    name only when it holds an underscore (so "resume" in prose stays); not inside paths or quotes."""

    def replace(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        flag = flags.get(name)
        if flag is None or (value is None and "_" not in name):
            return match.group(0)
        if value is None or value == "=True" or (value == "=False" and flag.startswith("--no-")):
            return flag
        return f"{flag} {value[1:]}"

    return re.sub(r"(?<![\w/.\-'\"])([a-z][a-z0-9_]*)(=[^\s,;)]+)?", replace, message)
