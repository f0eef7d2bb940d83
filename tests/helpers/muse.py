"""A small MUSE benchmark directory (Shi et al. 2024's layout) over the stopping tests' records, for the
memorised tiny model: JSON arrays and JSON Lines, with ``.json``, ``.jsonl`` and no extension."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import stopping as H


def write(path: Path, records, *, array: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(records, indent=2) if array else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)


def qa(ids):
    return [H.qa_record(i) for i in ids]


def write_muse_dir(root: Path) -> Path:
    """``verbmem/forget`` (the first 6 words of each memorised text, the rest as ``gt``), ``knowmem``
    forget and retain questions with in-context examples, ``privleak`` forget (memorised texts) and
    holdout (the others), and ``raw/forget`` / ``raw/retain1`` (training text); returns ``root``."""
    words = [t.split() for t in H.TEXTS[:4]]
    verbmem = [{"prompt": " ".join(w[:6]), "gt": " ".join(w[6:])} for w in words]
    write(root / "verbmem" / "forget.json", verbmem, array=True)
    write(root / "knowmem" / "forget_qa.jsonl", qa([0, 1, 2, 3, 4]), array=False)
    write(root / "knowmem" / "forget_qa_icl.json", qa([10, 11]), array=False)
    write(root / "knowmem" / "retain_qa", qa([5, 6, 7]), array=True)
    write(root / "knowmem" / "retain_qa_icl.jsonl", qa([12]), array=False)
    write(root / "privleak" / "forget.json", H.TEXTS[:4], array=True)
    write(root / "privleak" / "holdout.jsonl", [{"text": t} for t in H.TEXTS[4:]], array=False)
    answers = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in qa(range(20))]
    write(root / "raw" / "forget.json", answers[:5] + H.TEXTS[:2], array=True)
    write(root / "raw" / "retain1.jsonl", [{"text": t} for t in answers[5:10]], array=False)
    return root
