"""``run_config.json``: every option, fingerprints of the model, tokenizer and data, the Hub commits, the
precision, engine, process count and library versions; and the check that a resumed run is the same run:
the same identity options and the same fingerprints (other weights in the same directory, edited data
or a Hub id now at another commit make another run). A Hub model id is pinned to its commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from fastunlearn._hub import MODEL_FILES, is_hub_id, resolve_snapshot
from fastunlearn.data.records import resolve_hub_dataset
from fastunlearn.options.schema import command_line, fields_of, to_record, with_absolute_paths

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


def _hash_directory(path: str) -> str:
    digest = hashlib.sha256()
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
    return digest.hexdigest()


def fingerprint(value: Any) -> str | None:
    """A content fingerprint of a file, a directory, records, a ``datasets.Dataset`` or a loaded model
    (its config); ``None`` for anything else (a Hub id: its commit is recorded instead)."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if os.path.isdir(path):
            return "dir:" + _hash_directory(path)
        if os.path.isfile(path):
            digest = hashlib.sha256()
            _hash_file(path, digest)
            return "file:" + digest.hexdigest()
        return None
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
    return dataclasses.replace(cfg, revision=source["revision"])


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from fastunlearn import __version__

    return {"fastunlearn": __version__, **{m.__name__: m.__version__ for m in (torch, transformers, peft)}}


def run_record(cfg: Any, *, precision: str, world_size: int, engine: str) -> dict[str, Any]:
    """What ``run_config.json`` holds (module docstring); ``--config`` reads back its ``options``."""
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
        "world_size": world_size,  # the data order and global batch depend on it
        "versions": _versions(),
    }


def _differences(saved: Mapping[str, Any], record: Mapping[str, Any], cfg_type: type) -> list[str]:
    kept = {f.name for f, spec, _ in fields_of(cfg_type) if spec.identity}
    options, before = record["options"], saved.get("options", {})
    found = [name for name in options if name in kept and before.get(name) != options[name]]
    for name, value in record["fingerprints"].items():
        if saved.get("fingerprints", {}).get(name) != value and name not in found:
            found.append(f"{name} (its content changed)" if before.get(name) == options.get(name) else name)
    return found


def check_resumable(build_dir: str, record: Mapping[str, Any], cfg_type: type) -> None:
    """``ValueError`` unless the run recorded in ``build_dir`` is the run ``record`` describes."""
    path = os.path.join(build_dir, "run_config.json")
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
    differences = _differences(saved, record, cfg_type)
    if differences:
        raise ValueError(
            f"cannot resume: the run in {build_dir} differs in {', '.join(differences)}; resume it with its "
            "own options (--config its run_config.json) or start a new run with --overwrite"
        )
