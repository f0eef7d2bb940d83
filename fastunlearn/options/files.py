"""``--config FILE``: a YAML or JSON mapping of option names (``learning_rate``, or the flags' words
``lr``, ``max-length``) to values; of a run's ``run_config.json`` its ``options`` are read."""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

from fastunlearn.options.schema import coerce, fields_of, flag_of


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
            names[f.name] = f.name
            flag = flag_of(f.name, spec).lstrip("-")
            if flag:
                names[flag] = names[flag.replace("-", "_")] = f.name
    options = {}
    for key, value in data.items():
        name = names.get(str(key).lstrip("-"))
        if name is None:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"config file {path}: unknown option {key!r}{hint}")
        options[name] = coerce(value, types[name])
    return options
