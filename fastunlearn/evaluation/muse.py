"""MUSE (Shi et al. 2024, arXiv:2407.06460): the four criteria measured on the unlearned model, read
from a benchmark directory laid out like the published subsets (News, Books; :data:`MUSE_FILES`), each
file ``NAME.jsonl``, ``NAME.json`` or ``NAME`` (exactly one), JSON Lines or a JSON array. Unlearning
trains on ``raw/forget`` and ``raw/retain1``.

C1 VerbMem: ROUGE-L F1 of the greedy continuation (128 tokens) of each ``verbmem/forget`` prompt. C2 /
C4 KnowMem: the greedy answer (32 tokens, cut at its first blank line) to each question after the
in-context examples, ROUGE-L F1 (``*_recall``: recall) against the answer. C3 PrivLeak: the Min-K%
AUC of ``privleak/forget`` against ``privleak/holdout`` relative to a retrained model's. ROUGE is
``rouge-score`` unstemmed, as MUSE scores.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastunlearn.data.records import read_records
from fastunlearn.evaluation.decoding import greedy_texts
from fastunlearn.evaluation.metrics import rouge_l
from fastunlearn.evaluation.mia import ATTACKS, evaluate_mia

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

CRITERIA = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")
CRITERION_FILES = {
    "verbmem_forget": ("verbmem/forget",),
    "knowmem_forget": ("knowmem/forget_qa", "knowmem/forget_qa_icl"),
    "knowmem_retain": ("knowmem/retain_qa", "knowmem/retain_qa_icl"),
    "privleak": ("privleak/forget", "privleak/holdout"),
}
VERBMEM_NEW_TOKENS = 128
KNOWMEM_NEW_TOKENS = 32
_EXAMPLES = 3  # generations kept in the results, per criterion, to read what the model says


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
    return read_records(muse_file(muse_dir, name), MUSE_FILES[name])[:max_items]


def knowmem_prompt(examples: Sequence[Mapping[str, str]], question: str) -> str:
    """MUSE's KnowMem prompt: each in-context ``{"question", "answer"}`` as ``"Question: q\\nAnswer:
    a\\n\\n"``, then ``"Question: q\\nAnswer: "``."""
    shots = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
    return f"{shots}Question: {question}\nAnswer: "


def _scored(
    name: str, prompts: list[str], predictions: list[str], references: list[str], results: dict[str, Any]
) -> list[float]:
    """Record ``name``'s mean ROUGE-L F1, its per-item scores and a few examples; returns the recalls."""
    scores = rouge_l(predictions, references, stem=False)
    f1, recall = [s.fmeasure for s in scores], [s.recall for s in scores]
    results[name] = sum(f1) / len(f1)
    results["num_items"][name] = len(f1)
    results["per_item"][name] = f1
    results["examples"][name] = [
        {"prompt": p[-300:], "reference": r, "generated": g}
        for p, r, g in list(zip(prompts, references, predictions))[:_EXAMPLES]
    ]
    return recall


def evaluate_muse(
    model: torch.nn.Module,
    tokenizer: Any,
    muse_dir: str | os.PathLike,
    *,
    criteria: Sequence[str] = CRITERIA,
    retrain_auc: float | None = None,
    retrain_model: torch.nn.Module | None = None,
    k: float = 0.4,
    batch_size: int = 8,
    max_items: int | None = None,
    max_length: int = 2048,
    verbmem_max_new_tokens: int = VERBMEM_NEW_TOKENS,
    knowmem_max_new_tokens: int = KNOWMEM_NEW_TOKENS,
) -> dict[str, Any]:
    """MUSE's ``criteria`` of ``model`` on the benchmark directory ``muse_dir``: a JSON-serialisable dict
    with ``num_items``, ``per_item`` F1 and a few ``examples``. ``max_items`` caps each scored set;
    PrivLeak needs ``retrain_auc`` or ``retrain_model``. Every file is checked before the model runs.
    """
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown or not criteria:
        raise ValueError(f"unknown MUSE criteria {unknown}; expected some of {list(CRITERIA)}")
    data = {
        name: read_muse(muse_dir, name, None if name.endswith("_icl") else max_items)
        for criterion in criteria
        for name in CRITERION_FILES[criterion]
    }
    results: dict[str, Any] = {"protocol": "muse", "dir": os.fspath(muse_dir), "criteria": list(criteria)}
    results.update(num_items={}, per_item={}, examples={})
    generate = functools.partial(greedy_texts, model, tokenizer, batch_size=batch_size)
    if "verbmem_forget" in criteria:
        items = data["verbmem/forget"]
        prompts = [r["prompt"] for r in items]
        outputs = generate(prompts, max_new_tokens=verbmem_max_new_tokens)
        _scored("verbmem_forget", prompts, [o.strip() for o in outputs], [r["gt"] for r in items], results)
    for split in ("forget", "retain"):
        if f"knowmem_{split}" in criteria:
            qa, icl = data[f"knowmem/{split}_qa"], data[f"knowmem/{split}_qa_icl"]
            prompts = [knowmem_prompt(icl, r["question"]) for r in qa]
            outputs = generate(prompts, max_new_tokens=knowmem_max_new_tokens)
            answers = [o.split("\n\n", 1)[0].strip() for o in outputs]  # cut at the first blank line
            recall = _scored(f"knowmem_{split}", prompts, answers, [r["answer"] for r in qa], results)
            results[f"knowmem_{split}_recall"] = sum(recall) / len(recall)
    if "privleak" in criteria:
        mia = evaluate_mia(
            model, tokenizer, data["privleak/forget"], data["privleak/holdout"],
            k=k, retrain_auc=retrain_auc, retrain_model=retrain_model, batch_size=batch_size,
            max_length=max_length,
        )  # fmt: skip
        results["privleak_auc"] = mia["min_k"]["auc"]
        results["privleak_aucs"] = {attack: mia[attack]["auc"] for attack in ATTACKS}
        results["num_items"].update(privleak_forget=mia["num_forget"], privleak_holdout=mia["num_holdout"])
        if "privleak" in mia:
            results["privleak"] = mia["privleak"]
            results["privleak_retrain_auc"] = mia["retrain_auc"]
            results["privleak_convention"] = mia["privleak_convention"]
    return results
