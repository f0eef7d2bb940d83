"""One evaluator for every caller (``fastunlearn eval``, a run's before/after metrics, the evaluations
during training): the registry :data:`EVALUATIONS`, :func:`check` and :func:`evaluate`. Each entry
checks its inputs before any model loads and names its headline numbers ``NAME.KEY``; under
``torchrun`` the ranks share each evaluation's items."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastunlearn import data as fdata
from fastunlearn.data.records import read_records, text_field
from fastunlearn.data.tofu_format import find_tofu_files, read_tofu_file
from fastunlearn.evaluation.dialogue import evaluate_dialogue
from fastunlearn.evaluation.extraction import evaluate_extraction
from fastunlearn.evaluation.harness import check_tasks, evaluate_lm_eval
from fastunlearn.evaluation.mia import ATTACKS, evaluate_mia
from fastunlearn.evaluation.muse import CRITERIA, CRITERION_FILES, evaluate_muse
from fastunlearn.evaluation.muse_files import read_muse
from fastunlearn.evaluation.report import is_lm_eval_score
from fastunlearn.evaluation.tofu import evaluate_tofu, summarize_tofu
from fastunlearn.models.devices import model_device
from fastunlearn.models.loading import load_model_and_tokenizer, model_source
from fastunlearn.models.precision import weights_dtype


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: ``run(model, tokenizer, **options)``; ``first``: the option a bare value stands
    for (``extraction="seqs.jsonl"``); ``check(options)``; ``headline(results)``; ``models``: its
    options that may name another model (a directory, loaded like the evaluated one)."""

    run: Callable[..., dict[str, Any]]
    first: str
    check: Callable[[Mapping[str, Any]], None]
    headline: Callable[[Mapping[str, Any]], dict[str, float]]
    models: tuple[str, ...] = ()


def _check_tofu(options: Mapping[str, Any]) -> None:
    data = options["data"]
    files = find_tofu_files(data, forget_split=options.get("forget_split")) if _is_path(data) else data
    for source in files.values():
        if _is_path(source):
            read_tofu_file(source)


def _check_retrained(options: Mapping[str, Any]) -> None:
    """PrivLeak's retrained reference: a model or its AUC, not both; a model path must exist."""
    auc = options.get("retrain_auc")
    if auc is not None and options.get("retrain_model") is not None:
        raise ValueError("give the retrained model or its AUC (--retrain-model or --retrain-auc), not both")
    if auc is not None and not 0.0 < auc <= 1.0:
        raise ValueError(f"the retrained model's AUC must lie in (0, 1], got {auc}")
    for key in ("retrain_model", "reference_model"):
        if _is_path(options.get(key)):
            model_source(options[key])
    k = options.get("k", 0.4)
    if not 0.0 < k <= 1.0:
        raise ValueError(f"Min-K%'s k must lie in (0, 1], got {k}")


def _check_mia(options: Mapping[str, Any]) -> None:
    for name in ("forget", "holdout"):
        if options.get(name) is None:
            raise ValueError(f"membership inference needs a {name} set (--mia-{name} FILE)")
        text_field(options[name], "text", name)
    _check_retrained(options)


def _check_muse(options: Mapping[str, Any]) -> None:
    for criterion in options.get("criteria", CRITERIA):
        for name in CRITERION_FILES.get(criterion, ()):
            read_muse(options["muse_dir"], name)
    _check_retrained(options)


def _numbers(results: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: results[k] for k in keys if isinstance(results.get(k), (int, float))}


def _mia_headline(results: Mapping[str, Any]) -> dict[str, float]:
    aucs = {f"{a}.auc": results[a]["auc"] for a in (*ATTACKS, "reference") if a in results}
    return {**aucs, **_numbers(results, ("privleak",))}


def _lm_eval_headline(results: Mapping[str, Any]) -> dict[str, float]:
    """``TASK.METRIC`` of every number the harness reports (``acc,none`` → ``acc``), standard errors aside."""
    return {
        f"{task}.{metric.removesuffix(',none')}": value
        for task, metrics in results.get("results", {}).items()
        for metric, value in metrics.items()
        if is_lm_eval_score(metric, value)
    }


_MUSE_NUMBERS = (
    "verbmem_forget", "knowmem_forget", "knowmem_forget_recall", "knowmem_retain", "knowmem_retain_recall",
    "privleak_auc", "privleak",
)  # fmt: skip
EVALUATIONS: dict[str, Evaluation] = {
    "tofu": Evaluation(evaluate_tofu, "data", _check_tofu, summarize_tofu),
    "extraction": Evaluation(
        evaluate_extraction,
        "data",
        lambda o: fdata.load_records(o["data"], data_format="text") if _is_path(o["data"]) else None,
        lambda r: {"ma": r["ma"], f"el_{r['n']}": r[f"el_{r['n']}"]},
    ),
    "mia": Evaluation(
        evaluate_mia, "forget", _check_mia, _mia_headline, ("retrain_model", "reference_model")
    ),
    "muse": Evaluation(
        evaluate_muse, "muse_dir", _check_muse, lambda r: _numbers(r, _MUSE_NUMBERS), ("retrain_model",)
    ),
    "dialogue": Evaluation(
        evaluate_dialogue,
        "data",
        lambda o: read_records(o["data"], ("context", "response")) if _is_path(o["data"]) else None,
        lambda r: {"f1": r["f1"]},
    ),
    "lm_eval": Evaluation(
        evaluate_lm_eval,
        "tasks",
        lambda o: check_tasks(
            o["tasks"], **{k: o[k] for k in ("include_path", "include_defaults") if k in o}
        ),
        _lm_eval_headline,
    ),
    "sets": Evaluation(
        lambda model, tokenizer, evaluator, **options: evaluator.results(model, **options),
        "evaluator",
        lambda o: None,
        lambda r: {f"{s}.{k}": v for s, values in r.items() for k, v in values.items()},
    ),
}


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _requests(requests: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each request as its options (a bare value is the evaluation's ``first`` option), in the
    registry's order; ``ValueError`` for an unknown name or nothing to evaluate."""
    unknown = sorted(set(requests) - set(EVALUATIONS))
    if unknown:
        raise ValueError(f"unknown evaluation(s) {unknown}; expected some of {list(EVALUATIONS)}")
    if not any(r is not None for r in requests.values()):
        raise ValueError(f"nothing to evaluate: give one of {list(EVALUATIONS)}")
    out = {}
    for name, entry in EVALUATIONS.items():
        request = requests.get(name)
        if request is not None:
            out[name] = dict(request) if isinstance(request, Mapping) else {entry.first: request}
    return out


def check(**requests: Any) -> None:
    """Read and check the inputs of every request (as :func:`evaluate` takes them) before any model
    loads: a missing file, a bad line, an empty set, an unknown task is one error naming it."""
    for name, options in _requests(requests).items():
        EVALUATIONS[name].check(options)


def load_like(
    source: torch.nn.Module | str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
) -> torch.nn.Module:
    """Another model (retrained, retain-only, a membership-inference reference) in ``model``'s dtype on
    its device. It must share the vocabulary: both are scored on the same tokenised data."""
    other, _ = load_model_and_tokenizer(
        source,
        tokenizer,
        trust_remote_code=trust_remote_code,
        allow_download=allow_download,
        dtype=weights_dtype(model),
    )
    if model_device(other) != model_device(model) and getattr(other, "hf_device_map", None) is None:
        other.to(model_device(model))
    vocab = model.get_input_embeddings().num_embeddings
    if other.get_input_embeddings().num_embeddings != vocab:
        raise ValueError(
            f"the reference model's vocabulary ({other.get_input_embeddings().num_embeddings}) differs "
            f"from the model's ({vocab}): both are scored on the same tokenised data, so they must share "
            "the tokenizer"
        )
    return other


def evaluate(
    model: torch.nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    **requests: Any,
) -> dict[str, Any]:
    """The evaluations ``requests`` of ``model``: ``{name: results}`` in the registry's order, each
    JSON-serialisable. ``requests``: ``name=options`` (``mia={"forget": F, "holdout": H}``) or a bare
    value for its first option (``muse="MUSE/news"``, ``lm_eval="wmdp_bio,mmlu"``). ``model``: a loaded
    causal LM with its ``tokenizer``, or a local directory, loaded after every input is checked; other
    models given as directories are loaded once, like ``model``."""
    requests = _requests(requests)
    access = dict(trust_remote_code=trust_remote_code, allow_download=allow_download)
    if _is_path(model):
        check(**requests)
        model, tokenizer = load_model_and_tokenizer(model, tokenizer, **access)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a model object")
    loaded: dict[str, torch.nn.Module] = {}
    results = {}
    for name, options in requests.items():
        for key in EVALUATIONS[name].models:
            if _is_path(options.get(key)):
                path = os.fspath(options[key])
                if path not in loaded:
                    loaded[path] = load_like(path, model, tokenizer, **access)
                options[key] = loaded[path]
        results[name] = EVALUATIONS[name].run(model, tokenizer, **options)
    return results


def headline(results: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of :func:`evaluate`'s results as one flat dict of ``NAME.KEY`` (``NAME``
    the evaluation; the ``sets`` evaluation's are ``forget.prob`` ...)."""
    out = {}
    for name, result in results.items():
        prefix = "" if name == "sets" else f"{name}."
        out.update({prefix + key: value for key, value in EVALUATIONS[name].headline(result).items()})
    return out
