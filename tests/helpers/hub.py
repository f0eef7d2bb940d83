"""A Hugging Face cache folder built by hand, laid out as ``huggingface_hub`` lays it out, so that Hub
ids resolve offline (``HF_HUB_OFFLINE=1``) without any download.

``HF_HUB_CACHE/{models,datasets}--ORG--NAME/snapshots/COMMIT/<files>`` holds the files and
``refs/main`` the commit of the branch ``main`` (``datasets`` fetches by commit and leaves no ref:
``ref=False``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def commit_of(text: str) -> str:
    """A 40-hex-digit commit hash derived from ``text`` (each repository its own)."""
    return hashlib.sha1(text.encode()).hexdigest()


def cache_repo(
    cache: Path, repo_id: str, source: Path, *, repo_type: str = "model", ref: bool = True, tag: str = ""
) -> str:
    """Copy the files of the folder ``source`` into the cache as ``repo_id`` at a commit (returned)."""
    commit = commit_of(f"{repo_type}:{repo_id}:{tag}")
    storage = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    if ref:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(commit)
    return commit


def offline_cache(monkeypatch, cache: Path) -> None:
    """Point ``huggingface_hub`` at ``cache`` and forbid the network, in this process and the commands
    it starts."""
    import huggingface_hub.constants as constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.fspath(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # datasets keeps its lock files (and, when it downloads, Arrow files) in a cache of its own
    monkeypatch.setenv("HF_DATASETS_CACHE", os.fspath(cache / "datasets"))
    try:
        import datasets.config
    except ImportError:
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
