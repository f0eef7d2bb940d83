"""TOFU-format evaluation files (Maini et al. 2024): ``question``, ``answer`` and, in the ``*_perturbed``
files, ``paraphrased_answer`` and ``perturbed_answer``; read by the training data's reader, and found
in a directory by TOFU's names."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from fastunlearn.data.records import read_records

TOFU_SETS = ("forget", "retain", "real_authors", "world_facts")


@dataclass(frozen=True)
class TofuItem:
    """One TOFU question with its answers; plain split files (``forget10.json``) have no paraphrased
    and perturbed answers (3 perturbed in real authors / world facts, 5 in forget / retain)."""

    question: str
    answer: str
    paraphrased_answer: str | None
    perturbed_answers: tuple[str, ...] | None
    source: str


def read_tofu_file(path: str | os.PathLike) -> list[TofuItem]:
    """The items of a TOFU-format file; errors name the file and line. Every item must have the same
    fields and number of perturbed answers (the truth ratio is computed on an ``[N, K]`` table)."""
    items = []
    for record in read_records(path, ("question", "answer")):
        where = record["_source"]
        para = record.get("paraphrased_answer")
        if para is not None and not isinstance(para, str):
            raise ValueError(f"{where}: 'paraphrased_answer' must be a string")
        pert = record.get("perturbed_answer")
        if pert is not None:
            if isinstance(pert, str):
                pert = [pert]
            if not isinstance(pert, list) or not pert or not all(isinstance(p, str) for p in pert):
                raise ValueError(f"{where}: 'perturbed_answer' must be a non-empty list of strings")
            pert = tuple(pert)
        items.append(TofuItem(record["question"], record["answer"], para, pert, where))
    first = items[0]
    for item in items[1:]:
        if (item.paraphrased_answer is None) != (first.paraphrased_answer is None):
            raise ValueError(f"{item.source}: 'paraphrased_answer' is present on some lines and not others")
        k0 = None if first.perturbed_answers is None else len(first.perturbed_answers)
        k = None if item.perturbed_answers is None else len(item.perturbed_answers)
        if k != k0:
            raise ValueError(
                f"{item.source}: {k} perturbed answers where {first.source} has {k0}; "
                "every line of a file needs the same number"
            )
    return items


def missing_truth_ratio_reason(items: list[TofuItem], source: str | os.PathLike | None) -> str | None:
    """Why a set read from ``source`` has no truth ratio (no ``perturbed_answer``), or ``None``; TOFU
    keeps them in ``NAME_perturbed.json`` beside ``NAME.json``, which the reason names."""
    if not items or items[0].perturbed_answers is not None:
        return None
    if source is None:
        return "its items have no perturbed_answer"
    path = os.fspath(source)
    stem, ext = os.path.splitext(path)
    sibling = f"{stem}_perturbed{ext or '.json'}"
    if stem.endswith("_perturbed"):
        return f"{path} has no perturbed_answer field"
    state = "use it instead" if os.path.isfile(sibling) else "not found"
    return f"{path} has no perturbed_answer field (TOFU keeps them in {os.path.basename(sibling)}: {state})"


def find_tofu_files(data_dir: str | os.PathLike, *, forget_split: str | None = None) -> dict[str, str]:
    """TOFU's files in a directory by TOFU's names, the ``*_perturbed.json`` first: forget
    (``{forget_split}``, or the only ``forget*``), retain, real authors, world facts; absent sets are
    left out. ``ValueError`` for several candidates or a ``forget_split`` with no file."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"TOFU data directory not found: {data_dir}")

    def pick(kind: str, patterns: list[str]) -> str | None:
        for pattern in patterns:
            found = sorted(glob.glob(os.path.join(data_dir, pattern)))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                names = [os.path.basename(f) for f in found]
                raise ValueError(
                    f"several {kind} files in {data_dir}: {names}; choose one (forget_split=... for the "
                    "forget set, or pass the set's file explicitly)"
                )
        return None

    split = forget_split or "forget*"
    forget_patterns = [f"{split}_perturbed.json", f"{split}.json"]
    present = [p for p in forget_patterns if os.path.isfile(os.path.join(data_dir, p))]
    if forget_split is not None and not present:
        found = sorted(
            {
                os.path.basename(f)[: -len(".json")].removesuffix("_perturbed")
                for f in glob.glob(os.path.join(data_dir, "forget*.json"))
            }
        )
        raise ValueError(
            f"no forget split {forget_split!r} in {data_dir} (neither {' nor '.join(forget_patterns)}); "
            f"splits found: {found or 'none'}"
        )
    files = {
        "forget": pick("forget", forget_patterns),
        "retain": pick("retain", ["retain_perturbed.json", "retain*.json"]),
        "real_authors": pick("real authors", ["real_authors_perturbed.json", "real_authors.json"]),
        "world_facts": pick("world facts", ["world_facts_perturbed.json", "world_facts.json"]),
    }
    files = {k: v for k, v in files.items() if v is not None}
    if not files:
        raise ValueError(f"no TOFU files (forget*, retain*, real_authors*, world_facts*) in {data_dir}")
    return files
