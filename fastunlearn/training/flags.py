"""The command-line spelling of :func:`fastunlearn.unlearn`'s options, in one table.

:data:`FLAGS` maps each :class:`~fastunlearn.training.config.UnlearnConfig` field that
``fastunlearn unlearn`` exposes to its flag. The command reads its options through it
(:func:`options_from_args`), :func:`command_line` writes a run back as the equivalent command (recorded
in ``run_config.json`` and printed by the demo), and :func:`to_flags` rewrites an error message from
Python names (``overwrite=True``, ``learning_rate``) to flags (``--overwrite``, ``--lr``), so each
interface speaks its own language with one source of messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
from collections.abc import Mapping
from typing import Any

from fastunlearn.training.config import UnlearnConfig

# UnlearnConfig field -> `fastunlearn unlearn` flag. Boolean fields are switches; those that default to
# True are switched off by a --no-... flag (NEGATED).
FLAGS: dict[str, str] = {
    "template": "--template",
    "data_format": "--format",
    "max_length": "--max-length",
    "num_epochs": "--epochs",
    "learning_rate": "--lr",
    "batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "warmup_epochs": "--warmup-epochs",
    "weight_decay": "--weight-decay",
    "npo_beta": "--npo-beta",
    "fused": "--fused",
    "precision": "--precision",
    "gradient_checkpointing": "--gradient-checkpointing",
    "memory_check": "--no-memory-check",
    "seed": "--seed",
    "lora_r": "--rank",
    "lora_alpha": "--alpha",
    "target_modules": "--target-modules",
    "fisher_mode": "--fisher-mode",
    "fisher_batch_size": "--fisher-batch-size",
    "fisher_memory": "--fisher-memory",
    "eval_batch_size": "--eval-batch-size",
    "logging_steps": "--logging-steps",
    "stop": "--stop-when",
    "eval_every": "--eval-every",
    "patience": "--patience",
    "restore": "--restore",
    "eval_items": "--eval-items",
    "generate_within": "--generate-within",
    "best_by": "--best-by",
    "unseen": "--unseen",
    "reference_model": "--reference-model",
    "fsdp": "--fsdp",
    "merge": "--merge",
    "overwrite": "--overwrite",
    "resume": "--resume",
    "evaluate": "--no-eval",
    "progress": "--no-progress",
    "allow_download": "--allow-download",
    "trust_remote_code": "--trust-remote-code",
    "deepspeed": "--deepspeed",
}
NEGATED = frozenset({"evaluate", "progress", "memory_check"})
# unlearn()'s own arguments
ARGUMENT_FLAGS = {
    "tokenizer": "--tokenizer",
    "forget": "--forget",
    "retain": "--retain",
    "output_dir": "--output",
}
# Options that say how to run, not what: left out of the recorded command (it reproduces the run).
_RUN_CONTROL = frozenset({"overwrite", "resume", "progress"})

__all__ = ["ARGUMENT_FLAGS", "FLAGS", "NEGATED", "command_line", "options_from_args", "to_flags"]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`UnlearnConfig` options of parsed ``fastunlearn unlearn`` arguments."""
    options = {}
    for field, flag in FLAGS.items():
        value = getattr(args, _dest(flag))
        options[field] = not value if field in NEGATED else value
    return options


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def command_line(
    model: Any,
    tokenizer: Any,
    forget: Any,
    retain: Any,
    *,
    method: str,
    init: str,
    output_dir: str | os.PathLike,
    options: Mapping[str, Any],
    threads: int | None = None,
) -> str | None:
    """The ``fastunlearn unlearn`` command that runs what these :func:`fastunlearn.unlearn` arguments do.

    Options at their default are left out, and so are ``overwrite``, ``resume`` and ``progress`` (how
    to run, not what). ``None`` when no command can: a model, tokenizer or data set given as Python
    objects, callbacks, or another option without a flag (``fila_eps``...) away from its default.
    """
    sources = [model, forget] + [x for x in (tokenizer, retain) if x is not None]
    defaults = {f.name: f.default for f in dataclasses.fields(UnlearnConfig)}
    # An option the command cannot spell (callbacks, fila_eps...) away from its default: no command runs this.
    unspellable = [
        k
        for k, v in options.items()
        if k not in FLAGS and v != defaults.get(k) and not (k == "callbacks" and not v)
    ]
    if not all(_is_path(x) for x in sources) or unspellable or isinstance(options.get("deepspeed"), Mapping):
        return None
    argv = ["fastunlearn", "unlearn", os.fspath(model)]
    for name, value in (("tokenizer", tokenizer), ("forget", forget), ("retain", retain)):
        if value is not None:
            argv += [ARGUMENT_FLAGS[name], os.fspath(value)]
    argv += [ARGUMENT_FLAGS["output_dir"], os.fspath(output_dir), "--method", method, "--init", init]
    for field, flag in FLAGS.items():
        value = options.get(field, defaults[field])
        if field in _RUN_CONTROL or value == defaults[field]:
            continue
        if isinstance(value, bool):
            # A switch: only the non-default value is written; a tri-state one (fused: None/True/False)
            # spells False as its --no- form.
            negated = not value and field not in NEGATED
            argv.append("--no-" + flag.removeprefix("--") if negated else flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return shlex.join(argv)


def to_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the Python names of ``flags`` replaced by their flags.

    ``name=True`` becomes ``--flag``, and so does ``name=False`` when the flag is the ``--no-...`` switch
    of an option that defaults to True; ``name=value`` becomes ``--flag value``; a bare name is replaced
    only when it holds an underscore (``learning_rate``), so that words like "resume" in prose stay.
    Names inside paths or quotes are left alone.
    """

    def replace(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        flag = flags.get(name)
        if flag is None or (value is None and "_" not in name):
            return match.group(0)
        if value is None or value == "=True" or (value == "=False" and flag.startswith("--no-")):
            return flag
        return f"{flag} {value[1:]}"

    return re.sub(r"(?<![\w/.\-'\"])([a-z][a-z0-9_]*)(=[^\s,;)]+)?", replace, message)
