"""Atomic writes: nothing fastunlearn saves is ever left half-written.

Everything is written under a temporary name in the destination's directory and renamed into place
once complete (on error the temporary is removed). ``tempfile`` makes owner-only files and a rename
keeps the mode, so before the rename everything gets the modes ``open``/``mkdir`` would give under the
user's umask: a serving container or a shared group can read the outputs where the umask allows.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def umask() -> int:
    """The process's umask, read once: from ``/proc/self/status`` where it is listed (no change to the
    process state, so no race with other threads), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(current: int) -> int:
    return (0o777 if current & stat.S_IXUSR else 0o666) & ~umask()


def _apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the modes of the user's umask."""
    if path.is_dir() and not path.is_symlink():
        for root, _, files in os.walk(path):  # every directory under it but symlinks, itself first
            os.chmod(root, 0o777 & ~umask())
            for name in files:
                target = os.path.join(root, name)
                if not os.path.islink(target):
                    os.chmod(target, _file_mode(os.stat(target).st_mode))
    elif path.is_file() and not path.is_symlink():
        os.chmod(path, _file_mode(path.stat().st_mode))


def atomic_file(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """Let ``write(tmp_path)`` create a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of a file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _apply_umask(Path(tmp))
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
    """Yield a temporary directory next to ``path`` that replaces it when the block succeeds (a non-empty
    ``path`` only with ``overwrite``; the old one is moved aside first and deleted after)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _apply_umask(tmp)
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
