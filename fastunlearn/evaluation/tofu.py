"""The TOFU protocol (Maini et al. 2024, arXiv:2401.06121): per-set scores, forget quality and model utility.

``mode="legacy"`` is the paper's pipeline token for token (``tofu-*`` templates, cut at 200 tokens,
generation in batches of 30); ``mode="full"`` scores with the template the model was trained with. The
retain-only model's reference truth ratios are saved with their mode and template, so a run under
another protocol is refused rather than compared with numbers of a different distribution.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastunlearn import data as fdata
from fastunlearn._io import write_json
from fastunlearn.data.tofu_format import (
    TOFU_FAMILIES,
    TOFU_SETS,
    TofuItem,
    find_tofu_files,
    missing_truth_ratio_reason,
    read_tofu_file,
)
from fastunlearn.engines import distributed
from fastunlearn.evaluation import metrics as M
from fastunlearn.evaluation.tofu_scoring import LEGACY_MAX_LENGTH, score_set
from fastunlearn.models.loading import load_model_and_tokenizer

# Sets whose probability/ROUGE/truth-ratio numbers make up TOFU's model utility.
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rougeL_recall", "truth_ratio")
TOFU_MODES = ("full", "legacy")
LEGACY_MAX_ITEMS = 300
LEGACY_TEMPLATES = tuple(TOFU_FAMILIES)


def _resolve_template(mode: str, template: str | None) -> str:
    """The template of a TOFU evaluation: for ``mode="legacy"`` one of the paper's model families
    (``tofu-llama2`` by default), else the given one (default ``plain``)."""
    if mode not in TOFU_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(TOFU_MODES)}")
    template = template or ("tofu-llama2" if mode == "legacy" else "plain")
    if mode == "legacy" and template not in LEGACY_TEMPLATES:
        raise ValueError(
            f"legacy mode is the paper's TOFU pipeline, defined for the model families "
            f"{list(LEGACY_TEMPLATES)}; got template {template!r}"
        )
    if template not in fdata.TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(fdata.TEMPLATE_NAMES)}")
    return template


def _utility_components(sets: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The model-utility numbers present in ``sets``, named ``set/metric``; the real-authors /
    world-facts probability counts only when normalised over the options (the file has perturbed
    answers), as without them it is another quantity."""
    components = {}
    for name in UTILITY_SETS:
        scores = sets.get(name, {})
        for metric in UTILITY_METRICS:
            normalised = metric != "prob" or name == "retain" or "truth_ratio" in scores
            if metric in scores and normalised:
                components[f"{name}/{metric}"] = scores[metric]
    return components


def read_sets(
    data: Any, forget_split: str | None = None, max_items: int | None = None
) -> tuple[dict[str, list[TofuItem]], dict[str, str]]:
    """Every set of ``data`` read and checked (in :data:`TOFU_SETS` order, at most ``max_items`` items
    each) and the files they came from."""
    if isinstance(data, (str, os.PathLike)):
        sources: Mapping[str, Any] = find_tofu_files(data, forget_split=forget_split)
    elif isinstance(data, Mapping):
        sources = data
    else:
        raise TypeError(
            f"data must be a directory or a mapping of set name to file, got {type(data).__name__}"
        )
    unknown = sorted(set(sources) - set(TOFU_SETS))
    if unknown:
        raise ValueError(f"unknown TOFU set(s) {unknown}; expected names from {list(TOFU_SETS)}")
    files = {k: os.fspath(v) for k, v in sources.items() if isinstance(v, (str, os.PathLike))}
    item_sets: dict[str, list[TofuItem]] = {}
    for name in (n for n in TOFU_SETS if n in sources):
        items = read_tofu_file(files[name]) if name in files else list(sources[name])
        if not items:
            raise ValueError(f"the {name} set is empty")
        item_sets[name] = items[:max_items]
    return item_sets, files


def _checked_reference(
    item_sets: Mapping[str, list[TofuItem]],
    files: Mapping[str, str],
    reference_truth_ratios: Any,
    save_reference: Any,
    overwrite: bool,
    *,
    mode: str,
    template: str,
) -> list[float] | None:
    """The reference truth ratios (read and matched to the forget set) and the reference file to save
    checked, before any model work."""
    forget_items = item_sets.get("forget")
    if forget_items is None or forget_items[0].perturbed_answers is None:
        for what, given in (("forget quality", reference_truth_ratios), ("save_reference", save_reference)):
            if given is not None:
                raise ValueError(f"{what} needs a forget file with paraphrased_answer and perturbed_answer")
    if save_reference is not None:
        _check_new_file(save_reference, overwrite)
    if reference_truth_ratios is None:
        return None
    if isinstance(reference_truth_ratios, (str, os.PathLike)):
        reference = load_reference_truth_ratios(
            reference_truth_ratios, mode=mode, template=template, forget_file=files.get("forget")
        )
    else:
        reference = [float(r) for r in reference_truth_ratios]
    if len(reference) != len(forget_items):
        raise ValueError(
            f"the reference has {len(reference)} truth ratios but the forget set has "
            f"{len(forget_items)} items: was it made on the same forget split and mode?"
        )
    return reference


def evaluate_tofu(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | Mapping[str, str | os.PathLike | Sequence[TofuItem]],
    *,
    mode: str = "full",
    template: str | None = None,
    reference_truth_ratios: str | os.PathLike | Sequence[float] | None = None,
    save_reference: str | os.PathLike | None = None,
    overwrite: bool = False,
    forget_split: str | None = None,
    max_items: int | None = None,
    max_new_tokens: int = 200,
    generate: bool = True,
    batch_size: int = 16,
    max_length: int = 512,
) -> dict[str, Any]:
    """TOFU evaluation of ``model``: JSON-serialisable scores per set, forget quality, model utility.

    ``data``: a directory (:func:`find_tofu_files`) or set name → path or list of :class:`TofuItem`.
    ``mode="legacy"``: at most 300 items per set, a ``tofu-*`` template (default ``tofu-llama2``) and the
    paper's lengths and batches (``max_length``, ``max_new_tokens``, ``batch_size`` do not apply).
    Model utility is ``None`` unless all nine numbers are present (``model_utility_partial`` is the mean
    of those that are). Forget quality needs ``reference_truth_ratios`` (a list or a file of the same
    mode and template); ``save_reference`` writes this run's. Every input is checked before the model runs.
    """
    template = _resolve_template(mode, template)
    legacy = mode == "legacy"
    if legacy:
        max_items = LEGACY_MAX_ITEMS if max_items is None else min(max_items, LEGACY_MAX_ITEMS)
        max_length = LEGACY_MAX_LENGTH

    item_sets, files = read_sets(data, forget_split, max_items)
    reference = _checked_reference(
        item_sets, files, reference_truth_ratios, save_reference, overwrite, mode=mode, template=template
    )

    results: dict[str, Any] = {"protocol": "tofu", "mode": mode, "template": template, "files": files}
    results.update(sets={}, forget_truth_ratios=None)
    opts = dict(template=template, legacy=legacy, generate=generate, max_length=max_length)
    opts.update(max_new_tokens=max_new_tokens, batch_size=batch_size)
    for name, items in item_sets.items():
        scores, ratios = score_set(model, tokenizer, name, items, **opts)
        reason = missing_truth_ratio_reason(items, files.get(name))
        if reason is not None:
            scores["missing"] = {"truth_ratio": reason}
        results["sets"][name] = scores
        if name == "forget":
            results["forget_truth_ratios"] = ratios

    forget_ratios = results["forget_truth_ratios"]
    results["forget_quality"] = None if reference is None else M.forget_quality(forget_ratios, reference)
    components = _utility_components(results["sets"])
    utility = M.model_utility(components) if components else None
    complete = len(components) == len(UTILITY_SETS) * len(UTILITY_METRICS)  # TOFU's nine numbers
    results.update(model_utility_components=components, model_utility=utility if complete else None)
    results["model_utility_partial"] = None if complete else utility
    if save_reference is not None:  # every rank holds the results; one writes them
        distributed.on_main(lambda: save_reference_truth_ratios(save_reference, results, overwrite=overwrite))
        results["reference_saved_to"] = os.fspath(save_reference)
    return results


def summarize_tofu(results: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The headline numbers of :func:`evaluate_tofu` as one flat dict (for ``metrics.json`` files)."""
    out = {key: results[key] for key in ("forget_quality", "model_utility", "model_utility_partial")}
    out["model_utility_num_components"] = len(results["model_utility_components"])
    for name, scores in results["sets"].items():
        for key in ("prob", "accuracy", "rougeL_recall", "truth_ratio", "truth_ratio_mean"):
            if key in scores:
                out[f"{name}_{key}"] = scores[key]
    return out


def cached_reference_truth_ratios(
    retain_model: torch.nn.Module | str | os.PathLike,
    data: str | os.PathLike | Mapping[str, Any],
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    **options: Any,
) -> list[float]:
    """The retain-only model's forget-set truth ratios: read from ``path`` when it exists (of the mode and
    template of ``options``), else computed by :func:`evaluate_tofu` without generation and saved there.
    ``retain_model``: a model (with ``tokenizer``) or a local directory."""
    if distributed.on_main(lambda: os.path.isfile(os.fspath(path))):  # every rank takes the same branch
        mode = options.get("mode", "full")
        template = _resolve_template(mode, options.get("template"))
        return load_reference_truth_ratios(path, mode=mode, template=template)
    if isinstance(retain_model, (str, os.PathLike)):
        retain_model, tokenizer = load_model_and_tokenizer(retain_model, tokenizer)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a model object")
    if isinstance(data, (str, os.PathLike)):
        data = find_tofu_files(data, forget_split=options.pop("forget_split", None))
    if "forget" not in data:
        raise ValueError("the reference truth ratios need a forget set (forget*_perturbed.json)")
    results = evaluate_tofu(retain_model, tokenizer, {"forget": data["forget"]}, generate=False, **options)
    distributed.on_main(lambda: save_reference_truth_ratios(path, results))
    return results["forget_truth_ratios"]


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
            and os.path.basename(saved_file) != os.path.basename(forget_file)
        ):
            warnings.warn(
                f"{path} was computed on forget file {saved_file}, this evaluation uses {forget_file}",
                stacklevel=2,
            )
    return [float(r) for r in ratios]
