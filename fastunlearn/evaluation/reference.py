"""Reference truth ratios for forget quality (Maini et al. 2024): the retain-only model's, saved once
with the protocol they were computed under, so that a run under another protocol is refused rather
than compared with numbers of a different distribution."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

from fastunlearn._io import write_json


def save_reference_truth_ratios(
    path: str | os.PathLike, results: Mapping[str, Any], *, overwrite: bool = False
) -> str:
    """Save the forget-set truth ratios of a TOFU evaluation of the retain-only model with the mode,
    template and forget file they were computed with; an existing file is kept unless ``overwrite``."""
    path = os.fspath(path)
    tofu = results.get("tofu", results)
    ratios = tofu.get("forget_truth_ratios")
    if not ratios:
        raise ValueError(
            "these results have no forget-set truth ratios (the forget file needs "
            "paraphrased_answer and perturbed_answer fields)"
        )
    _check_new_file(path, overwrite)
    write_json(
        path,
        {
            "kind": "fastunlearn.tofu_reference_truth_ratios",
            "truth_ratios": ratios,
            "num_items": len(ratios),
            "mode": tofu.get("mode"),
            "template": tofu.get("template"),
            "forget_file": tofu.get("files", {}).get("forget"),
        },
    )
    return path


def _check_new_file(path: str | os.PathLike, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{os.fspath(path)} exists; pass overwrite=True (--overwrite) to replace it")


def load_reference_truth_ratios(
    path: str | os.PathLike,
    *,
    mode: str | None = None,
    template: str | None = None,
    forget_file: str | os.PathLike | None = None,
) -> list[float]:
    """Reference truth ratios saved by :func:`save_reference_truth_ratios`: ``ValueError`` when they
    record another ``mode`` or ``template`` (a KS test against them would measure that change, not
    unlearning); another forget file's name only warns. A bare JSON list is taken as is."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"reference truth ratios not found: {path}. Forget quality compares against the retain-only "
            "model: evaluate it once with `fastunlearn eval RETAIN_MODEL --tofu DATA "
            f"--save-reference {path}` (or evaluate_tofu(..., save_reference=...)), then pass that file."
        )
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    ratios = obj.get("truth_ratios") if isinstance(obj, dict) else obj
    if not isinstance(ratios, list) or not ratios or not all(isinstance(r, (int, float)) for r in ratios):
        raise ValueError(f"{path}: expected {{'truth_ratios': [numbers...]}} with at least one number")
    if isinstance(obj, dict):
        for field, current in (("mode", mode), ("template", template)):
            saved = obj.get(field)
            if current is not None and saved is not None and saved != current:
                raise ValueError(
                    f"{path}: the reference truth ratios were computed with {field} {saved!r}, but this "
                    f"evaluation uses {field} {current!r}; truth ratios of different protocols are not "
                    f"comparable: evaluate the retain-only model again with {field} {current!r}"
                )
        saved_file = obj.get("forget_file")
        if (
            forget_file is not None
            and saved_file
            and os.path.basename(saved_file) != os.path.basename(os.fspath(forget_file))
        ):
            warnings.warn(
                f"{path} was computed on forget file {saved_file}, this evaluation uses "
                f"{os.fspath(forget_file)}",
                stacklevel=2,
            )
    return [float(r) for r in ratios]
