"""The option schema: every option of every command is a dataclass field whose :class:`Spec` (made by
:func:`option`) gives its flag, help, validation, identity, plan input and record; its annotation gives
its type. From it: validation, ``run_config.json``'s record and the command line that reruns a config."""

from __future__ import annotations

import dataclasses
import os
import shlex
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_META = "fastunlearn.option"


@dataclass(frozen=True)
class Spec:
    """What the package derives from one option. ``flag``: default ``--name-with-dashes``, ``""`` for the
    positional argument; ``negate``: switched off by ``--no-...``; ``consts``: extra flags setting a
    constant; ``identity``: a resumed run must keep the value; ``plan``: a memory-plan input; ``cli``:
    False for Python-only options; ``parse``: command-line string to value; ``check``: extra validation;
    ``path``: recorded absolute (``True``: when it exists; ``"output"``: always)."""

    help: str
    flag: str | None = None
    choices: tuple[Any, ...] | None = None
    group: str | None = None
    metavar: str | None = None
    minimum: float | None = None
    positive: bool = False
    negate: bool = False
    consts: Mapping[str, Any] = field(default_factory=dict)
    identity: bool = True
    plan: bool = False
    cli: bool = True
    parse: Callable[[str], Any] | None = None
    check: Callable[[Any], None] | None = None
    path: bool | str = False
    required: bool = False


def option(default: Any = None, help: str = "", **spec: Any) -> Any:
    """A dataclass field with its :class:`Spec` (``default`` may be a list: each instance gets a copy)."""
    metadata = {_META: Spec(help=help, **spec)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(name: str, spec: Spec) -> str:
    """The long flag of option ``name`` (``""`` for the positional argument)."""
    return spec.flag if spec.flag is not None else "--" + name.replace("_", "-")


def fields_of(cls_or_obj: Any) -> Iterator[tuple[dataclasses.Field, Spec, Any]]:
    """``(field, spec, type)`` of every option of a schema class or instance, in declaration order."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f, f.metadata.get(_META) or Spec(help="", cli=False), hints[f.name]


def _parts(tp: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None`` → ``(int, NoneType)``), or the type alone."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _type_ok(value: Any, tp: Any) -> bool:
    for part in _parts(tp):
        origin = typing.get_origin(part) or part
        if part is Any or (part is type(None) and value is None):
            return True
        if origin in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return origin is float or isinstance(value, int)
        if origin is list and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(part) or (Any,)
            return all(_type_ok(v, item) for v in value)
        if origin is dict and isinstance(value, Mapping):
            return True
        if isinstance(origin, type) and origin is not int and isinstance(value, origin):  # True is an int
            return True
    return False


def _type_name(tp: Any) -> str:
    names = [getattr(typing.get_origin(part) or part, "__name__", str(part)) for part in _parts(tp)]
    return " or ".join("None" if name == "NoneType" else name for name in names)


class OptionTypeError(TypeError, ValueError):
    """A value of the wrong type: a ``TypeError`` in Python, a user error from a ``--config`` file."""


def validate(obj: Any) -> None:
    """``ValueError`` (:class:`OptionTypeError` for a wrong type) for the first option of a schema
    instance that breaks its spec (type, choices, bounds, check)."""
    for f, spec, tp in fields_of(obj):
        name, value = f.name, getattr(obj, f.name)
        if not _type_ok(value, tp):
            raise OptionTypeError(f"{name} must be {_type_name(tp)}, got {value!r}")
        if value is None:
            continue
        if spec.choices is not None and isinstance(value, (str, int)) and value not in spec.choices:
            raise ValueError(f"unknown {name} {value!r}; expected one of {list(spec.choices)}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and spec.positive and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if number and spec.minimum is not None and value < spec.minimum:
            raise ValueError(f"{name} must be at least {spec.minimum:g}, got {value}")
        if spec.check is not None:
            spec.check(value)


class Validated:
    """A schema class whose options are validated (:func:`validate`) when an instance is made."""

    def __post_init__(self) -> None:
        validate(self)


def require(obj: Any) -> None:
    """``ValueError`` naming the first required option (the positional one included) left unset."""
    for f, spec, _ in fields_of(obj):
        if (spec.required or flag_of(f.name, spec) == "") and getattr(obj, f.name) is None:
            raise ValueError(f"{f.name} is required")


def coerce(value: Any, tp: Any) -> Any:
    """A number written as a string in a config file (YAML reads ``3e-4`` as one) as the type's number."""
    if not isinstance(value, str) or _type_ok(value, tp):
        return value
    for number in (int, float):
        if number in _parts(tp):
            try:
                return number(value)
            except ValueError:
                continue
    return value


def record_value(value: Any, spec: Spec) -> Any:
    """How ``run_config.json`` records a value: paths absolute, objects by class name, JSON as it is."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        absolute = spec.path == "output" or (spec.path and os.path.exists(path))
        return os.path.abspath(path) if absolute else path
    if isinstance(value, Mapping):
        return {str(k): record_value(v, Spec(help="")) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, int, float, bool)) for v in value):
            return list(value)
        if all(isinstance(v, Mapping) for v in value):
            return "<in-memory records>"
        return [type(v).__name__ for v in value]
    return f"<{type(value).__name__}>"


def with_absolute_paths(obj: Any) -> Any:
    """A copy of ``obj`` with its path options absolute (the recorded command must run from anywhere)."""
    changes = {
        f.name: record_value(getattr(obj, f.name), spec)
        for f, spec, _ in fields_of(obj)
        if spec.path and isinstance(getattr(obj, f.name), (str, os.PathLike))
    }
    return dataclasses.replace(obj, **changes)


def to_record(obj: Any) -> dict[str, Any]:
    """Every option of ``obj`` as a JSON value (what ``run_config.json`` holds and ``--config`` reads)."""
    return {f.name: record_value(getattr(obj, f.name), spec) for f, spec, _ in fields_of(obj)}


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
