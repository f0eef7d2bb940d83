"""What a run writes: its output directory's states, where a run is built, the swap, and ``run_config.json``.

``metrics.json``, written last, marks a finished run. A directory is ``empty``, ``complete``,
``interrupted`` (run entries without ``metrics.json``) or ``foreign`` (files fastunlearn did not write);
``OUTPUT/.fastunlearn-new`` (*staged*) holds a run started to replace a finished one. :func:`plan_run`
decides what a run does in each state (the table in docs/cli.md), :func:`start_run` acts once the model
and data are known to be good, :func:`finish_run` publishes. ``overwrite`` builds beside a finished run
and swaps only when the new one has finished (a crash inside the swap is rolled forward by the next
:func:`inspect_output`), so a failed run never costs a finished one.

``run_config.json`` (:func:`run_record`) holds every option, fingerprints of the model, tokenizer and
data, the Hub commits (a Hub model id is pinned to one), the precision, engine, process count and
versions. A resumed run must be the same run (:func:`check_resumable`): the same identity options and
fingerprints (other weights in the same directory, edited data or a Hub id now at another commit differ).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fastunlearn._hub import MODEL_FILES, is_hub_id, resolve_snapshot
from fastunlearn.data.records import resolve_hub_dataset
from fastunlearn.engines import distributed
from fastunlearn.options.schema import command_line, fields_of, to_record, with_absolute_paths

# Entries a run writes; nothing else in an output directory is ever removed.
OUTPUT_ENTRIES = ("adapter", "model", "merged", "fisher", "checkpoints", "logs", "run_config.json")
OUTPUT_ENTRIES += ("trajectory.csv", "trajectory.png", "metrics.json")
COMPLETE_MARKER = "metrics.json"
CONFIG = "run_config.json"
STAGING = ".fastunlearn-new"  # a run being built to replace a finished one
PREVIOUS = ".fastunlearn-old"  # the finished run's entries during the swap
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# _io's temporaries next to an entry: ".metrics.json.x1y2.tmp", ".adapter.x1y2.old"
_TEMPORARY = re.compile(r"^\.(" + "|".join(re.escape(e) for e in OUTPUT_ENTRIES) + r")\..+\.(tmp|old)$")


@dataclass(frozen=True)
class OutputState:
    """What an output directory holds (module docstring)."""

    path: str
    state: str  # "empty", "complete", "interrupted" or "foreign"
    staged: bool  # OUTPUT/.fastunlearn-new holds a run
    has_run: bool  # OUTPUT itself holds a run's run_config.json
    foreign: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunDirs:
    """Where a run ends up (``output``) and where it is built as it goes (``build``)."""

    output: str
    build: str
    resume: bool

    @property
    def staged(self) -> bool:
        return self.build != self.output


def _ours(name: str) -> bool:
    return name in OUTPUT_ENTRIES or name in (STAGING, PREVIOUS) or _TEMPORARY.match(name) is not None


def _roll_forward(path: str) -> None:
    """Finish a swap that a crash cut short: the staged run had finished, so it is the one to keep."""
    previous, staging = os.path.join(path, PREVIOUS), os.path.join(path, STAGING)
    if not os.path.isdir(previous):
        return
    if os.path.isdir(staging):
        # The marker moves last: while it is still staged, some entries may still be too.
        if os.path.exists(os.path.join(staging, COMPLETE_MARKER)):
            _move_entries(staging, path)
        if not os.listdir(staging):
            os.rmdir(staging)
    shutil.rmtree(previous)


def inspect_output(path: str | os.PathLike) -> OutputState:
    """The state of an output directory; ``NotADirectoryError`` if ``path`` is a file."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"output_dir {path!r} exists and is not a directory")
    if not os.path.isdir(path):
        return OutputState(path, "empty", staged=False, has_run=False)
    _roll_forward(path)
    names = os.listdir(path)
    foreign = tuple(sorted(n for n in names if not _ours(n)))
    staged = os.path.isfile(os.path.join(path, STAGING, CONFIG))
    has_run = CONFIG in names
    run = [n for n in names if n in OUTPUT_ENTRIES]
    if foreign:
        state = "foreign"
    elif COMPLETE_MARKER in names:
        state = "complete"
    elif run:
        state = "interrupted"
    else:
        state = "empty"
    return OutputState(path, state, staged=staged, has_run=has_run, foreign=foreign)


def plan_run(
    output_dir: str | os.PathLike, *, overwrite: bool, resume: bool, resume_offered: bool = True
) -> RunDirs:
    """Where a run into ``output_dir`` is built, or a refusal (``FileExistsError``, ``ValueError``);
    writes nothing. ``resume_offered=False`` keeps ``resume`` out of the messages."""
    out = inspect_output(output_dir)
    path, staging = out.path, os.path.join(out.path, STAGING)
    finished = os.path.isfile(os.path.join(path, COMPLETE_MARKER))
    if resume:
        if out.staged:
            return RunDirs(path, staging, resume=True)
        if finished:
            raise ValueError(
                f"output_dir {path!r} holds a finished run: there is nothing to resume (pass overwrite=True "
                "to run it again)"
            )
        if out.has_run:
            return RunDirs(path, path, resume=True)
        raise ValueError(f"resume=True but output_dir {path!r} holds no run to resume")
    if out.state == "empty" or (out.state == "interrupted" and overwrite):
        return RunDirs(path, path, resume=False)
    if out.state == "interrupted":
        checkpoint = last_checkpoint(path)
        at = "" if checkpoint is None else f" at step {_step(checkpoint)}"
        how = "resume=True to continue it, or overwrite=True" if resume_offered else "overwrite=True"
        raise FileExistsError(f"output_dir {path!r} holds an interrupted run{at}: pass {how} to start again")
    if overwrite:
        return RunDirs(path, staging, resume=False)
    if out.state == "foreign":
        shown = ", ".join(out.foreign[:5]) + (", ..." if len(out.foreign) > 5 else "")
        raise FileExistsError(
            f"output_dir {path!r} is not empty: it holds files fastunlearn did not write ({shown}); choose "
            "another output_dir, or pass overwrite=True to write the run beside them (only a run's own "
            "entries are ever replaced)"
        )
    hint = "pass overwrite=True to replace it (it is kept until the new run finishes)"
    if out.staged and resume_offered:
        hint += ", or resume=True to continue the unfinished run started to replace it"
    raise FileExistsError(f"output_dir {path!r} is not empty: it holds a finished run; {hint}")


def _step(checkpoint: str) -> int:
    return int(_CHECKPOINT.match(os.path.basename(checkpoint)).group(1))


def _clear(directory: str) -> None:
    for name in os.listdir(directory):
        if _ours(name):
            target = os.path.join(directory, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)


def start_run(dirs: RunDirs) -> None:
    """Prepare ``dirs.build``: a new run starts empty (a finished run is never touched), a resumed one
    loses its incomplete checkpoints (those without ``trainer_state.json``, saved last)."""
    if dirs.resume:
        checkpoints = os.path.join(dirs.build, "checkpoints")
        if os.path.isdir(checkpoints):
            for name in os.listdir(checkpoints):
                folder = os.path.join(checkpoints, name)
                if _CHECKPOINT.match(name) and not os.path.isfile(os.path.join(folder, "trainer_state.json")):
                    shutil.rmtree(folder)
        return
    os.makedirs(dirs.output, exist_ok=True)
    if dirs.staged:
        if os.path.isdir(dirs.build):
            shutil.rmtree(dirs.build)
    else:
        _clear(dirs.output)
    os.makedirs(dirs.build, exist_ok=True)


def _move_entries(source: str, target: str) -> None:
    names = sorted(os.listdir(source), key=lambda n: n == COMPLETE_MARKER)  # the marker last
    for name in names:
        os.replace(os.path.join(source, name), os.path.join(target, name))


def finish_run(dirs: RunDirs) -> None:
    """Publish a finished staged run: the old entries renamed aside (marker first), the new ones in
    (marker last), the old ones deleted."""
    if not dirs.staged:
        return
    previous = os.path.join(dirs.output, PREVIOUS)
    if os.path.isdir(previous):
        shutil.rmtree(previous)
    os.makedirs(previous)
    for name in sorted(OUTPUT_ENTRIES, key=lambda n: n != COMPLETE_MARKER):  # the marker first
        source = os.path.join(dirs.output, name)
        if os.path.lexists(source):
            os.replace(source, os.path.join(previous, name))
    _move_entries(dirs.build, dirs.output)
    os.rmdir(dirs.build)
    shutil.rmtree(previous)


def last_checkpoint(build_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint of the highest step in ``build_dir/checkpoints``, or ``None``."""
    folder = os.path.join(os.fspath(build_dir), "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := _CHECKPOINT.match(name)) and os.path.isfile(os.path.join(folder, name, "trainer_state.json"))
    ]
    return os.path.join(folder, max(steps)[1]) if steps else None


def interrupted_message(output_dir: str | os.PathLike, *, resume_offered: bool = True) -> str:
    """One line saying what an interruption left in ``output_dir`` and how to go on from there."""
    out = inspect_output(output_dir)
    if out.staged:
        build, kept = os.path.join(out.path, STAGING), f"; the finished run in {out.path} is untouched"
    elif out.state == "interrupted" or (out.state == "foreign" and out.has_run):
        build, kept = out.path, ""
    elif out.state == "complete":
        return f"interrupted; {out.path} still holds its finished run"
    else:
        return f"interrupted before anything was written to {out.path}; rerun to start"
    if not resume_offered:
        return f"interrupted; rerun with overwrite=True to start again{kept}"
    checkpoint = last_checkpoint(build)
    if checkpoint is None:
        return (
            f"interrupted before the first checkpoint; rerun with resume=True to train from step 0 again "
            f"(reusing what was computed) or with overwrite=True to start over{kept}"
        )
    return f"interrupted; rerun with resume=True to continue from step {_step(checkpoint)}{kept}"


# Files of a model, tokenizer or data set directory hashed whole (data sets' Arrow and Parquet files
# included); weights are fingerprinted by name and size.
_SMALL_SUFFIXES = (".json", ".model", ".txt", ".py", ".tiktoken", ".arrow", ".parquet")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
# Options naming a model or tokenizer (a Hub id there is a model repository; elsewhere a data set).
_MODEL_OPTIONS = ("model", "tokenizer", "reference_model", "base_model")


def _hash_file(path: str, digest: Any) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def fingerprint(value: Any) -> str | None:
    """A content fingerprint of a file, a directory, records, a ``datasets.Dataset`` or a loaded model
    (its config); ``None`` for anything else (a Hub id: its commit is recorded instead)."""
    if isinstance(value, (str, os.PathLike)):
        path, digest = os.fspath(value), hashlib.sha256()
        if os.path.isfile(path):
            _hash_file(path, digest)
            return "file:" + digest.hexdigest()
        if not os.path.isdir(path):
            return None
        for folder, dirs, names in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, path)
                if name.endswith(_WEIGHT_SUFFIXES):
                    digest.update(f"{rel}:{os.path.getsize(full)}\n".encode())
                elif name.endswith(_SMALL_SUFFIXES):
                    digest.update(f"{rel}\n".encode())
                    _hash_file(full, digest)
        return "dir:" + digest.hexdigest()
    if isinstance(getattr(value, "_fingerprint", None), str):  # a datasets.Dataset: its own content hash
        return "dataset:" + value._fingerprint
    config = getattr(value, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        return "config:" + hashlib.sha256(config.to_json_string().encode()).hexdigest()
    if isinstance(value, (list, tuple)) and value and all(isinstance(r, Mapping) for r in value):
        text = json.dumps(list(value), sort_keys=True, default=str)
        return "records:" + hashlib.sha256(text.encode()).hexdigest()
    return None


def _hub_source(name: str, value: Any, cfg: Any) -> dict[str, Any] | None:
    """The repository and commit a Hub id option resolved to (``None`` for anything else)."""
    if (
        not isinstance(value, str)
        or os.path.exists(value)
        or not is_hub_id(value.partition(":")[0].partition("@")[0])
    ):
        return None
    if name in _MODEL_OPTIONS:
        revision = cfg.revision if name == "model" else None
        snapshot = resolve_snapshot(
            value, revision=revision, allow_download=cfg.allow_download, patterns=MODEL_FILES
        )
        return {"hub": snapshot.repo_id, "revision": snapshot.revision}
    dataset = resolve_hub_dataset(value, allow_download=cfg.allow_download)
    return {"hub": str(dataset), "revision": dataset.revision}


def pin_revision(cfg: Any) -> Any:
    """``cfg`` with ``revision`` the commit its Hub model id resolves to: the run loads and records one."""
    source = _hub_source("model", cfg.model, cfg)
    if source is None or source["revision"] == cfg.revision:
        return cfg
    return replace(cfg, revision=source["revision"])


def run_record(cfg: Any, *, precision: str, engine: str) -> dict[str, Any]:
    """What ``run_config.json`` holds (module docstring); ``--config`` reads back its ``options``."""
    import peft
    import torch
    import transformers

    import fastunlearn

    absolute = with_absolute_paths(cfg)
    sources = {
        f.name: (fingerprint(getattr(cfg, f.name)), _hub_source(f.name, getattr(cfg, f.name), cfg))
        for f, spec, _ in fields_of(cfg)
        if spec.path and spec.identity and getattr(cfg, f.name) is not None
    }
    identity = {
        name: found if hub is None else f"hub:{hub['hub']}@{hub['revision']}"
        for name, (found, hub) in sources.items()
    }
    if "model" in identity and cfg.tokenizer is None:
        identity["tokenizer"] = identity["model"]  # the model directory's own tokenizer
    return {
        "command": command_line(absolute, "unlearn"),
        "options": to_record(absolute),
        "fingerprints": identity,
        "hub": {name: hub for name, (_, hub) in sources.items() if hub is not None},
        "precision": precision,
        "engine": engine,
        "world_size": distributed.world_size(),  # the data order and global batch depend on it
        "versions": {m.__name__: m.__version__ for m in (fastunlearn, torch, transformers, peft)},
    }


def check_resumable(build_dir: str, record: Mapping[str, Any], cfg_type: type) -> None:
    """``ValueError`` unless the run recorded in ``build_dir`` is the run ``record`` describes."""
    path = os.path.join(build_dir, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"cannot resume: {path} is missing")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    started = saved.get("world_size", 1)
    if started != record["world_size"]:
        raise ValueError(
            f"cannot resume: the run in {build_dir} was started on {started} process(es), this one has "
            f"{record['world_size']} (the data order and global batch depend on it)"
        )
    kept = {f.name for f, spec, _ in fields_of(cfg_type) if spec.identity}
    options, before = record["options"], saved.get("options", {})
    found = [name for name in options if name in kept and before.get(name) != options[name]]
    for name, value in record["fingerprints"].items():
        if saved.get("fingerprints", {}).get(name) != value and name not in found:
            found.append(f"{name} (its content changed)" if before.get(name) == options.get(name) else name)
    if found:
        raise ValueError(
            f"cannot resume: the run in {build_dir} differs in {', '.join(found)}; resume it with its "
            "own options (--config its run_config.json) or start a new run with --overwrite"
        )
