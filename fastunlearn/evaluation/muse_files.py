"""The files of a MUSE benchmark directory (Shi et al. 2024, arXiv:2407.06460), laid out like its
published subsets (News, Books), with their fields (:data:`MUSE_FILES`); unlearning trains on
``raw/forget`` and ``raw/retain1``. Each is ``NAME.jsonl``, ``NAME.json`` or ``NAME``, exactly one of
them, JSON Lines or a JSON array whatever the extension.
"""

from __future__ import annotations

import os
from typing import Any

from fastunlearn.data.records import read_records

_TEXT = ("text",)
_QA = ("question", "answer")
MUSE_FILES: dict[str, tuple[str, ...]] = {
    "raw/forget": _TEXT,
    "raw/retain1": _TEXT,
    "raw/retain2": _TEXT,
    "raw/holdout": _TEXT,
    "verbmem/forget": ("prompt", "gt"),
    "knowmem/forget_qa": _QA,
    "knowmem/forget_qa_icl": _QA,
    "knowmem/retain_qa": _QA,
    "knowmem/retain_qa_icl": _QA,
    "privleak/forget": _TEXT,
    "privleak/holdout": _TEXT,
    "privleak/retain": _TEXT,
}
EXTENSIONS = (".jsonl", ".json", "")


def muse_file(muse_dir: str | os.PathLike, name: str) -> str:
    """The path of MUSE file ``name`` (a key of :data:`MUSE_FILES`) in ``muse_dir``; ``ValueError`` when
    several of its forms exist."""
    if name not in MUSE_FILES:
        raise ValueError(f"unknown MUSE file {name!r}; expected one of {list(MUSE_FILES)}")
    stem = os.path.join(os.fspath(muse_dir), *name.split("/"))
    found = [stem + ext for ext in EXTENSIONS if os.path.isfile(stem + ext)]
    if not found:
        raise FileNotFoundError(f"MUSE file not found: {stem}.jsonl (or {stem}.json, or {stem})")
    if len(found) > 1:
        raise ValueError(f"several MUSE files for {name} in {muse_dir}: {found}; keep one")
    return found[0]


def read_muse(muse_dir: str | os.PathLike, name: str, max_items: int | None = None) -> list[dict[str, Any]]:
    """The records of MUSE file ``name`` with its fields checked (the first ``max_items`` when given)."""
    records = read_records(muse_file(muse_dir, name), MUSE_FILES[name])
    return records if max_items is None else records[:max_items]
