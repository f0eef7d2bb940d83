"""The command line that runs what a schema instance holds: every option away from its default, spelled
as :mod:`fastunlearn.cli.parser` reads it."""

from __future__ import annotations

import os
import shlex
import typing
from typing import Any

from fastunlearn.options.schema import fields_of, flag_of


def _spell(flag: str, value: Any, negate: bool, tp: Any) -> list[str]:
    if isinstance(value, bool):
        tri_state = type(None) in typing.get_args(tp)
        if negate or (tri_state and not value):
            return ["--no-" + flag[2:]]
        return [flag]
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(map(str, value))]
    if isinstance(value, float):
        return [flag, repr(value)]
    return [flag, str(os.fspath(value) if isinstance(value, os.PathLike) else value)]


def command_line(
    obj: Any, command: str, *, skip: tuple[str, ...] = ("overwrite", "resume", "progress")
) -> str | None:
    """``fastunlearn COMMAND ...`` running what ``obj`` holds, or ``None`` when none can (Python objects
    as values). ``skip``: options saying how to run, left out."""
    positional: list[str] = []
    argv: list[str] = []
    for f, spec, tp in fields_of(obj):
        value = getattr(obj, f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if value == default or f.name in skip:
            continue
        plain = value is None or isinstance(value, (str, os.PathLike, bool, int, float, list, tuple))
        if (
            not spec.cli
            or not plain
            or (isinstance(value, (list, tuple)) and not all(isinstance(v, (str, int)) for v in value))
        ):
            return None
        flag = flag_of(f.name, spec)
        if flag == "":
            positional.append(os.fspath(value))
        elif value is not None:
            argv += _spell(flag, value, spec.negate, tp)
    return shlex.join(["fastunlearn", command, *positional, *argv])
