"""Models and data sets named by a Hugging Face Hub id, found in the local Hugging Face cache.

A Hub id (``org/name`` or ``name``) that is not a local path is its snapshot folder in the cache at the
requested revision, read without network access unless ``allow_download``; the folder's name is the
commit hash, which a run records so that it can be repeated exactly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# What a model loads from (safetensors weights, configs, tokenizers, chat templates): never pickles.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
_SNAPSHOT = re.compile(r"(models|datasets)--(.+?)/snapshots/([0-9a-f]{40})(/|$)")


@dataclass(frozen=True)
class Snapshot:
    """A repository at one commit in the local cache: its id, type, commit hash and folder."""

    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str  # the commit hash
    path: str


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repository id (``org/name`` or ``name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _newest_snapshot(repo_id: str, repo_type: str) -> str | None:
    """The newest snapshot folder of a repository (``datasets`` caches by commit, without ``refs/main``)."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{repo_id.replace('/', '--')}", "snapshots")
    found = [os.path.join(folder, n) for n in os.listdir(folder)] if os.path.isdir(folder) else []
    return max(found, key=os.path.getmtime) if found else None


def resolve_snapshot(
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    allow_download: bool = False,
    patterns: list[str] | None = None,
    what: str = "model",
) -> Snapshot:
    """The cached snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit; default ``main``);
    with ``allow_download``, the files matching ``patterns`` fetched first. ``FileNotFoundError`` in one
    line naming the id and the cache."""
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=not allow_download,
        )
    except Exception as err:  # huggingface_hub's errors differ between its versions
        if not type(err).__module__.startswith("huggingface_hub"):
            raise
        path = None if revision or allow_download else _newest_snapshot(repo_id, repo_type)
        at = f" at revision {revision!r}" if revision else ""
        if path is None and allow_download:
            raise FileNotFoundError(
                f"{what} {repo_id!r}{at}: cannot fetch it from the Hugging Face Hub ({err})"
            ) from None
        if path is None:
            raise FileNotFoundError(
                f"{what} {repo_id!r}{at} is neither a local path nor in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); pass allow_download=True to fetch it from the Hub"
            ) from None
    return Snapshot(repo_id, repo_type, os.path.basename(os.path.normpath(path)), os.fspath(path))


def snapshot_of(path: str | os.PathLike) -> Snapshot | None:
    """The repository and commit of a path inside the Hugging Face cache (``None`` for other paths), so
    an adapter trained on a cached model records the Hub id, not this machine's folder."""
    text = os.fspath(path).replace(os.sep, "/")
    match = _SNAPSHOT.search(text)
    if match is None:
        return None
    kind, name, commit = match.group(1), match.group(2), match.group(3)
    return Snapshot(name.replace("--", "/"), kind[:-1], commit, text[: match.end(3)])
