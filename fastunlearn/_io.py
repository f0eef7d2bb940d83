"""Atomic writes: nothing fastunlearn saves is ever left half-written.

Every file or directory is produced under a temporary name in the destination's own directory (so the
final ``os.replace`` is a rename within one file system) and renamed into place only once complete; on
any error the temporary is removed and the destination is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "atomic_file", "write_dir", "write_json", "write_text"]


def atomic_file(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """Let ``write(tmp_path)`` create a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically, synced to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_file(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``path`` that replaces ``path`` when the block succeeds.

    A non-empty ``path`` is refused unless ``overwrite``; the old directory is moved aside before the
    new one is renamed in, and deleted only after.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_dir(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Let ``write(tmp_dir)`` fill a temporary sibling directory, then move it to ``path`` (replacing it)."""
    with atomic_directory(path, overwrite=True) as tmp:
        write(str(tmp))
    return str(path)
