"""Write docs/options.md, the table of every option of every command, from the option schema.

Each command's options are read from the parser the command itself builds (``fastunlearn.cli``) and
described by the schema field behind each flag (``fastunlearn.options``), so the table lists exactly
what each command accepts, with its Python name (the ``unlearn(...)`` keyword and ``--config`` key),
flag, default and help. ``tests/test_docs.py`` fails when the committed file differs from what this
script writes::

    python docs/options.py          # rewrite docs/options.md
    python docs/options.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

from fastunlearn.cli import build_parser
from fastunlearn.cli.unlearn import _DEMO_DEFAULTS as DEMO_DEFAULTS
from fastunlearn.options.evaluate import EvalConfig
from fastunlearn.options.fisher import FisherConfig
from fastunlearn.options.schema import Spec, fields_of, flag_of
from fastunlearn.options.unlearn import DemoOptions, PlanOptions, UnlearnConfig

OUTPUT = Path(__file__).with_name("options.md")

# command -> (the schema classes its options come from, its own defaults where they differ)
COMMANDS: dict[str, tuple[tuple[type, ...], dict[str, Any]]] = {
    "unlearn": ((UnlearnConfig,), {}),
    "fisher": ((FisherConfig,), {}),
    "eval": ((EvalConfig,), {}),
    "plan": ((UnlearnConfig, PlanOptions), {}),
    "demo": ((UnlearnConfig, DemoOptions), DEMO_DEFAULTS),
}

HEADER = """\
# Options

<!-- Written by `python docs/options.py` from the option schema; do not edit by hand. -->

Every option of every `fastunlearn` command, generated from the schema the commands' parsers are built
from (`fastunlearn/options/`). For each option:

- **name**: the Python name: the keyword of `fastunlearn.unlearn(...)` and the field of `UnlearnConfig`
  (for `unlearn`), and a key `--config FILE` accepts (the flag's words, `lr` or `max-length`, are
  accepted too);
- **flag**: what the command line takes (`MODEL` is the positional argument; `--no-x` switches off an
  option that defaults to on; `--x / --no-x`: unset, on or off);
- **resume**: for `unlearn`, ✓ marks the options that are part of a run's identity: `--resume` refuses
  a run whose value differs from the one recorded in `OUTPUT/run_config.json`.

How the commands use them: [cli.md](cli.md); the Python API: [api.md](api.md).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return "`" + ",".join(map(str, value)) + "`" if value else "—"
    return f"`{value}`"


def _flag(name: str, spec: Spec, tp: Any, default: Any) -> str:
    flag = flag_of(name, spec)
    if not spec.cli:
        return "Python only"
    if flag == "":
        return f"`{name.upper()}`"
    if spec.negate:
        shown = f"`--no-{flag[2:]}`"
    elif default is None and set(typing.get_args(tp)) == {bool, type(None)}:
        shown = f"`{flag}` / `--no-{flag[2:]}`"
    else:
        shown = f"`{flag}`"
    for const_flag, value in spec.consts.items():
        shown += f", `{const_flag}` (= `{value}`)"
    return shown


def _description(spec: Spec) -> str:
    text = spec.help
    allowed = spec.choices
    if allowed:
        text += "; one of " + ", ".join(f"`{v}`" for v in allowed)
    return _cell(text)


def _accepted(command: str) -> set[str]:
    """The flags the command's parser accepts, and the names of its positional arguments (argparse
    lists a parser's arguments only in its ``_actions``)."""
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = set()
    for action in sub.choices[command]._actions:
        found.update(action.option_strings or [action.dest])
    return found


def _takes(accepted: set[str], name: str, spec: Spec) -> bool:
    flag = flag_of(name, spec)
    switch = "--no-" + flag[2:] if spec.negate else flag
    return (switch or name) in accepted


def command_table(command: str) -> str:
    schemas, defaults = COMMANDS[command]
    accepted = _accepted(command)
    identity = command == "unlearn"
    head = "| name | flag | default |" + (" resume |" if identity else "") + " what |"
    rule = "|---|---|---|" + ("---|" if identity else "") + "---|"
    rows = [head, rule]
    seen = set()
    for schema in schemas:
        for f, spec, tp in fields_of(schema):
            if f.name in seen or (spec.cli and not _takes(accepted, f.name, spec)):
                continue
            if not spec.cli and command != "unlearn":
                continue
            seen.add(f.name)
            default = f.default_factory() if callable(f.default_factory) else f.default
            default = defaults.get(f.name, default)
            mark = (" ✓ |" if spec.identity else " |") if identity else ""
            rows.append(
                f"| `{f.name}` | {_flag(f.name, spec, tp, default)} | {_default(default)} |{mark} "
                f"{_description(spec)} |"
            )
    return "\n".join(rows)


INTRO = {
    "unlearn": "`fastunlearn unlearn` and `fastunlearn.unlearn(...)`: the fields of `UnlearnConfig`.",
    "fisher": "`fastunlearn fisher`: the fields of `FisherConfig`.",
    "eval": "`fastunlearn eval`: the fields of `EvalConfig`.",
    "plan": "`fastunlearn plan`: the fields of `UnlearnConfig` the memory plan reads, and how the plan is "
    "made (`PlanOptions`).",
    "demo": "`fastunlearn demo` (no `--config`): a few of the run's options, with the demo's own defaults, "
    "and the demo's (`DemoOptions`).",
}


def render() -> str:
    parts = [HEADER]
    for command in COMMANDS:
        parts.append(f"## `fastunlearn {command}`\n\n{INTRO[command]}\n\n{command_table(command)}\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python docs/options.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
