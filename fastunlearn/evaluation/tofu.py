"""Evaluation protocols of the paper (SPEC §4): TOFU and extraction, plus per-epoch trainer callbacks.

- :func:`evaluate_tofu` scores a model on TOFU-format JSON Lines files: per set, the length-normalised
  answer probability, ROUGE-L recall of the greedy answer and the truth ratio; then forget quality (KS
  test against the retain-only model's forget-set truth ratios, saved once with
  :func:`save_reference_truth_ratios` and reused) and model utility (harmonic mean of the nine
  retain / real-authors / world-facts numbers).
- :func:`evaluate_extraction` scores memorised sequences (``{"text"}`` JSON Lines): MA and EL_n.
- :func:`evaluate` runs either or both and returns JSON-serialisable results; :func:`format_table`
  renders them for a terminal.
- :class:`EpochEvaluationCallback` and :class:`ExtractionStoppingCallback` plug into any
  ``transformers.Trainer`` (the unlearning loop included, which this module does not import).

Data reading and prompt formatting are :mod:`fastunlearn.data`'s, so an evaluated prompt is byte for
byte the prompt the model was trained on.
"""

from __future__ import annotations

import glob
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from fastunlearn import data as fdata
from fastunlearn import metrics as M
from fastunlearn._io import write_json

TOFU_SETS = ("forget", "retain", "real_authors", "world_facts")
# Sets whose probability/ROUGE/truth-ratio numbers make up model utility (SPEC §4).
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rougeL_recall", "truth_ratio")
NUM_UTILITY_COMPONENTS = len(UTILITY_SETS) * len(UTILITY_METRICS)  # TOFU's nine numbers
MODES = ("full", "legacy")
LEGACY_MAX_ITEMS = 300
LEGACY_MAX_LENGTH = 200  # tokens, prompt included: the paper's generation budget
LEGACY_TEMPLATES = ("llama2", "phi")

__all__ = [
    "MODES",
    "TOFU_SETS",
    "EpochEvaluationCallback",
    "ExtractionStoppingCallback",
    "TofuItem",
    "cached_reference_truth_ratios",
    "evaluate",
    "evaluate_extraction",
    "evaluate_tofu",
    "find_tofu_files",
    "format_table",
    "load_local_model",
    "load_reference_truth_ratios",
    "read_tofu_file",
    "save_reference_truth_ratios",
    "summarize_tofu",
    "tokenize_texts",
]


# ---------------------------------------------------------------------------------------------------
# TOFU files
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TofuItem:
    """One TOFU question with its answers.

    ``paraphrased_answer`` exists in the forget/retain ``*_perturbed`` files; ``perturbed_answers`` (3 in
    real authors / world facts, 5 in forget/retain) in every ``*_perturbed`` file; plain split files
    (``forget10.json``) have neither.
    """

    question: str
    answer: str
    paraphrased_answer: str | None
    perturbed_answers: tuple[str, ...] | None
    source: str


def read_tofu_file(path: str | os.PathLike) -> list[TofuItem]:
    """Parse a TOFU-format JSON Lines file; errors name the file and line.

    Every item of a file must have the same fields and the same number of perturbed answers (the
    truth ratio is computed on an ``[N, K]`` table).
    """
    items = []
    for record in fdata.read_jsonl(path):
        where = record["_source"]
        for field in ("question", "answer"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{where}: field {field!r} must be present and a string")
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


def find_tofu_files(data_dir: str | os.PathLike, *, forget_split: str | None = None) -> dict[str, str]:
    """Locate TOFU evaluation files in a directory by TOFU's names.

    forget: ``{forget_split}_perturbed.json`` (e.g. ``forget10``), or the only ``forget*_perturbed.json``,
    else the plain ``{forget_split}.json`` / only ``forget*.json``; retain: ``retain_perturbed.json``
    (else ``retain*.json`` when only one exists); real authors / world facts:
    ``real_authors_perturbed.json`` / ``world_facts_perturbed.json``. Absent sets are left out;
    ambiguity (several forget splits and no ``forget_split``) raises ``ValueError``.
    """
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
                    f"several {kind} files in {data_dir}: {names}; choose one (forget_split=... / "
                    "--forget-split for the forget set, or pass the set's file explicitly)"
                )
        return None

    split = forget_split or "forget*"
    files = {
        "forget": pick("forget", [f"{split}_perturbed.json", f"{split}.json"]),
        "retain": pick("retain", ["retain_perturbed.json", "retain*.json"]),
        "real_authors": pick("real authors", ["real_authors_perturbed.json", "real_authors.json"]),
        "world_facts": pick("world facts", ["world_facts_perturbed.json", "world_facts.json"]),
    }
    files = {k: v for k, v in files.items() if v is not None}
    if not files:
        raise ValueError(f"no TOFU files (forget*, retain*, real_authors*, world_facts*) in {data_dir}")
    return files


# ---------------------------------------------------------------------------------------------------
# TOFU scoring
# ---------------------------------------------------------------------------------------------------


def _answer_stats(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: str,
    max_length: int,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Answer statistics (:func:`fastunlearn.metrics.answer_stats`) of each (question, answer) pair, with
    the training pipeline's tokenisation: the answer tokens and the closing EOS are scored."""
    records = [
        {"question": q, "answer": a, "_source": f"item {i}"}
        for i, (q, a) in enumerate(zip(questions, answers))
    ]
    examples = fdata.tokenize_records(
        records, tokenizer, data_format="qa", template=template, max_length=max_length
    )
    stats = M.collect_answer_stats(model, fdata.batches(examples, fdata.pad_id_of(tokenizer), batch_size))
    return {key: value.cpu() for key, value in stats.items()}


def _prompt_ids(tokenizer, items: Sequence[TofuItem], template: str) -> list[torch.Tensor]:
    # The prompt is the labelled example's unlabelled head: exactly what training conditioned on.
    records = [{"question": it.question, "answer": it.answer, "_source": it.source} for it in items]
    examples = fdata.tokenize_records(
        records, tokenizer, data_format="qa", template=template, max_length=10**9
    )
    heads = []
    for ex in examples:
        n = next(i for i, label in enumerate(ex.labels) if label != fdata.IGNORE_INDEX)
        heads.append(torch.tensor(ex.input_ids[:n], dtype=torch.long))
    return heads


def _greedy_answers(
    model,
    tokenizer,
    items: Sequence[TofuItem],
    *,
    template: str,
    max_new_tokens: int,
    max_total_tokens: int | None,
    batch_size: int,
) -> list[str]:
    """Greedy answers, stopping at EOS; ``max_total_tokens`` caps prompt + answer (legacy protocol)."""
    prompts = _prompt_ids(tokenizer, items, template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, less padding
    answers: list[str] = [""] * len(prompts)
    eos, pad = tokenizer.eos_token_id, fdata.pad_id_of(tokenizer)
    with M.eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            budgets = [
                max_new_tokens
                if max_total_tokens is None
                else min(max_new_tokens, max_total_tokens - len(prompts[i]))
                for i in chunk
            ]
            if max(budgets) < 1:
                continue  # prompts already at the length cap: empty answers
            gen = M.greedy_decode(
                model, [prompts[i] for i in chunk], max(budgets), eos_token_id=eos, pad_token_id=pad
            )
            for r, i in enumerate(chunk):
                tokens = gen[r, : max(budgets[r], 0)].tolist()
                if eos is not None and eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return answers


def _score_set(
    model,
    tokenizer,
    name: str,
    items: Sequence[TofuItem],
    *,
    template: str,
    generate: bool,
    max_new_tokens: int,
    max_total_tokens: int | None,
    max_length: int,
    batch_size: int,
) -> tuple[dict[str, Any], list[float] | None]:
    qs = [it.question for it in items]
    opts = dict(template=template, max_length=max_length, batch_size=batch_size)
    stats = _answer_stats(model, tokenizer, qs, [it.answer for it in items], **opts)
    probs = M.answer_probability(stats)
    out: dict[str, Any] = {
        "num_items": len(items),
        "prob": probs.mean().item(),
        # Teacher-forced next-token accuracy on the answers: the QA analogue of MA.
        "accuracy": (stats["correct"].sum().double() / stats["num_tokens"].sum()).item(),
    }
    ratios = None
    if items[0].perturbed_answers is not None:
        k = len(items[0].perturbed_answers)
        # "True" is the paraphrased answer where the file has one (forget/retain), else the answer.
        if items[0].paraphrased_answer is not None:
            true = M.answer_probability(
                _answer_stats(model, tokenizer, qs, [it.paraphrased_answer for it in items], **opts)
            )
        else:
            true = probs
        pert_stats = _answer_stats(
            model,
            tokenizer,
            [q for q in qs for _ in range(k)],
            [p for it in items for p in it.perturbed_answers],
            **opts,
        )
        pert = M.answer_probability(pert_stats).view(len(items), k)
        r = M.truth_ratio(true, pert)
        ratios = r.tolist()
        out["truth_ratio"] = M.truth_ratio_score(r)  # mean max(0, 1 − R): the utility component
        out["truth_ratio_mean"] = r.mean().item()
        if name in ("real_authors", "world_facts"):
            # Multiple choice between the answer and its perturbations (SPEC §4).
            out["prob"] = M.normalized_probability(probs, pert).mean().item()
    if generate:
        preds = _greedy_answers(
            model,
            tokenizer,
            items,
            template=template,
            max_new_tokens=max_new_tokens,
            max_total_tokens=max_total_tokens,
            batch_size=batch_size,
        )
        out["rougeL_recall"] = sum(M.rouge_l_recall(preds, [it.answer for it in items])) / len(items)
        out["examples"] = [
            {"question": it.question, "answer": it.answer, "generated": p}
            for it, p in list(zip(items, preds))[:3]
        ]
    return out, ratios


def save_reference_truth_ratios(
    path: str | os.PathLike, results: Mapping[str, Any], *, overwrite: bool = False
) -> str:
    """Save the forget-set truth ratios of a TOFU evaluation (of the retain-only model) as the reference
    for forget quality, with the mode, template and forget file they were computed with (checked when
    the file is loaded). Written atomically; an existing file is kept unless ``overwrite=True``."""
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
    """Load reference truth ratios saved by :func:`save_reference_truth_ratios`, checked against the run.

    Truth ratios under other prompts (``template``) or another protocol (``mode``: item cap, prompts)
    are another distribution, and a KS test against them would measure that change, not unlearning:
    when ``mode`` / ``template`` are given (:func:`evaluate_tofu` passes its own) and the file records
    different ones, ``ValueError``. A forget file of another name than the recorded one only warns
    (files get moved and renamed; the item count is checked by the caller). A bare JSON list of
    numbers records nothing and is taken as is.
    """
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


def _resolve_template(mode: str, template: str | None) -> str:
    """The prompt template of a TOFU evaluation: the paper's for ``mode="legacy"`` (``llama2`` by
    default, or ``phi``), else the given one (default ``plain``)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if mode == "legacy":
        template = template or "llama2"
        if template not in LEGACY_TEMPLATES:
            raise ValueError(
                f"legacy mode uses the paper's prompts: template must be one of "
                f"{list(LEGACY_TEMPLATES)}, got {template!r}"
            )
    template = template or "plain"
    if template not in fdata.TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(fdata.TEMPLATE_NAMES)}")
    return template


def _utility_components(sets: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The model-utility numbers present in ``sets``, named ``set/metric`` (SPEC §4).

    All nine need the retain, real-authors and world-facts sets, each with perturbed answers, and
    generation (ROUGE-L). The real-authors / world-facts probability counts only when normalised over
    the options, i.e. when the file has perturbed answers: without them it is the plain ``P̄``, another
    quantity.
    """
    components = {}
    for name in UTILITY_SETS:
        scores = sets.get(name, {})
        for metric in UTILITY_METRICS:
            normalised = metric != "prob" or name == "retain" or "truth_ratio" in scores
            if metric in scores and normalised:
                components[f"{name}/{metric}"] = scores[metric]
    return components


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
    """TOFU evaluation (SPEC §4) of ``model`` on TOFU-format files.

    ``data``: a directory (files found by :func:`find_tofu_files`) or a mapping from set name
    (``forget``, ``retain``, ``real_authors``, ``world_facts``) to a path or a list of
    :class:`TofuItem`. Absent sets are skipped.

    Model utility is TOFU's harmonic mean of nine numbers; ``model_utility`` is ``None`` unless all nine
    are present (every utility set with perturbed answers, and ``generate=True``). The harmonic mean
    of the numbers present is then ``model_utility_partial`` (``None`` when all nine are there), and
    ``model_utility_components`` maps each present number's ``set/metric`` name to its value.

    ``mode="legacy"``: the paper's protocol — at most 300 items per set, prompt ``[INST] q [/INST]``
    (``template="llama2"``, default) or ``Question: q\\nAnswer: `` (``"phi"``), greedy generation to 200
    tokens in total. ``mode="full"``: every item, ``template`` as trained (default ``"plain"``), greedy up
    to ``max_new_tokens`` new tokens; ``max_items`` caps either.

    Forget quality needs ``reference_truth_ratios`` (a list or a JSON file from
    :func:`save_reference_truth_ratios`, whose recorded mode and template must be this run's); a
    missing file raises ``FileNotFoundError`` saying how to make it, and without the argument forget
    quality is ``None``. ``save_reference`` writes this run's forget truth ratios for use as a reference
    (evaluate the retain-only model with it). Files, reference and output path are all checked before
    the model runs. Returns a JSON-serialisable dict.
    """
    template = _resolve_template(mode, template)
    max_total: int | None = None
    if mode == "legacy":
        max_items = LEGACY_MAX_ITEMS if max_items is None else min(max_items, LEGACY_MAX_ITEMS)
        max_total = max_new_tokens = LEGACY_MAX_LENGTH

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

    # Everything is read and checked before any model work: a bad file, a reference of another
    # protocol or an existing output fails at once, not after the whole evaluation.
    item_sets: dict[str, list[TofuItem]] = {}
    for name in TOFU_SETS:
        if name in sources:
            src = sources[name]
            items = read_tofu_file(src) if isinstance(src, (str, os.PathLike)) else list(src)
            if not items:
                raise ValueError(f"the {name} set is empty")
            item_sets[name] = items if max_items is None else items[:max_items]
    forget_items = item_sets.get("forget")
    no_ratios = forget_items is None or forget_items[0].perturbed_answers is None
    reference = None
    if reference_truth_ratios is not None:
        if isinstance(reference_truth_ratios, (str, os.PathLike)):
            reference = load_reference_truth_ratios(
                reference_truth_ratios, mode=mode, template=template, forget_file=files.get("forget")
            )
        else:
            reference = [float(r) for r in reference_truth_ratios]
        if no_ratios:
            raise ValueError(
                "forget quality needs a forget file with paraphrased_answer and perturbed_answer"
            )
        if len(reference) != len(forget_items):
            raise ValueError(
                f"the reference has {len(reference)} truth ratios but the forget set has "
                f"{len(forget_items)} items: was it made on the same forget split and mode?"
            )
    if save_reference is not None:
        if no_ratios:
            raise ValueError(
                "save_reference needs a forget file with paraphrased_answer and perturbed_answer"
            )
        _check_new_file(save_reference, overwrite)

    results: dict[str, Any] = {
        "protocol": "tofu",
        "mode": mode,
        "template": template,
        "files": files,
        "sets": {},
    }
    forget_ratios = None
    for name, items in item_sets.items():
        scores, ratios = _score_set(
            model,
            tokenizer,
            name,
            items,
            template=template,
            generate=generate,
            max_new_tokens=max_new_tokens,
            max_total_tokens=max_total,
            max_length=max_length,
            batch_size=batch_size,
        )
        results["sets"][name] = scores
        if name == "forget":
            forget_ratios = ratios

    results["forget_truth_ratios"] = forget_ratios
    results["forget_quality"] = None if reference is None else M.forget_quality(forget_ratios, reference)
    components = _utility_components(results["sets"])
    utility = M.model_utility(components) if components else None
    complete = len(components) == NUM_UTILITY_COMPONENTS
    results["model_utility_components"] = components
    results["model_utility"] = utility if complete else None
    results["model_utility_partial"] = None if complete else utility
    if save_reference is not None:
        save_reference_truth_ratios(save_reference, results, overwrite=overwrite)
        results["reference_saved_to"] = os.fspath(save_reference)
    return results


def summarize_tofu(results: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The headline numbers of :func:`evaluate_tofu` as one flat dict (for ``metrics.json`` files).

    ``model_utility`` is ``None`` unless all nine numbers were measured; ``model_utility_partial`` is
    then the harmonic mean of the ``model_utility_num_components`` numbers that were.
    """
    out: dict[str, float | int | None] = {
        "forget_quality": results["forget_quality"],
        "model_utility": results["model_utility"],
        "model_utility_partial": results["model_utility_partial"],
        "model_utility_num_components": len(results["model_utility_components"]),
    }
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
    """The retain-only model's forget-set truth ratios: read from ``path`` when it exists (its recorded
    mode and template must be those of ``options``), else computed with :func:`evaluate_tofu`
    (``options`` as there; generation is skipped, truth ratios do not need it) and saved there.
    ``retain_model`` is a model (with ``tokenizer``) or a local directory."""
    if os.path.isfile(os.fspath(path)):
        mode = options.get("mode", "full")
        template = _resolve_template(mode, options.get("template"))
        return load_reference_truth_ratios(path, mode=mode, template=template)
    if isinstance(retain_model, (str, os.PathLike)):
        retain_model, tokenizer = load_local_model(retain_model, tokenizer)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a model object")
    if isinstance(data, (str, os.PathLike)):
        data = find_tofu_files(data, forget_split=options.pop("forget_split", None))
    if "forget" not in data:
        raise ValueError("the reference truth ratios need a forget set (forget*_perturbed.json)")
    results = evaluate_tofu(retain_model, tokenizer, {"forget": data["forget"]}, generate=False, **options)
    save_reference_truth_ratios(path, results)
    return results["forget_truth_ratios"]


# ---------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], *, max_length: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of raw texts cut to ``max_length`` tokens (the extraction sets use 200), right padded:
    ``(input_ids, attention_mask)``."""
    records = [{"text": t, "_source": f"text {i}"} for i, t in enumerate(texts)]
    with warnings.catch_warnings():  # cutting to max_length is the protocol here, not an accident
        warnings.simplefilter("ignore", UserWarning)
        examples = fdata.tokenize_records(records, tokenizer, data_format="text", max_length=max_length)
    batch = fdata.collate(examples, fdata.pad_id_of(tokenizer))
    return batch["input_ids"], batch["attention_mask"]


def evaluate_extraction(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | Sequence[str],
    *,
    n: int = 10,
    max_length: int = 200,
    batch_size: int = 64,
    method: str = "batched",
) -> dict[str, Any]:
    """Extraction protocol (SPEC §4): mean memorisation accuracy and extraction likelihood ``EL_n`` over
    a set of sequences (``{"text"}`` JSON Lines path or a list of strings), each cut to ``max_length``
    tokens."""
    if isinstance(data, (str, os.PathLike)):
        records, _ = fdata.load_records(data, data_format="text")
        texts = [r["text"] for r in records]
    else:
        texts = list(data)
        if not texts:
            raise ValueError("no sequences to evaluate")
    ids, mask = tokenize_texts(tokenizer, texts, max_length=max_length)
    ma, el = M.extraction_metrics(model, ids, n=n, attention_mask=mask, method=method, batch_size=batch_size)
    return {
        "protocol": "extraction",
        "num_sequences": len(texts),
        "n": n,
        "ma": ma.mean().item(),
        f"el_{n}": el.mean().item(),
        "per_sequence": {"ma": ma.tolist(), f"el_{n}": el.tolist()},
    }


# ---------------------------------------------------------------------------------------------------
# One entry point and a table
# ---------------------------------------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    tofu: str | os.PathLike | Mapping[str, Any] | None = None,
    extraction: str | os.PathLike | Sequence[str] | None = None,
    tofu_options: Mapping[str, Any] | None = None,
    extraction_options: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` with the TOFU and/or extraction protocols; JSON-serialisable results.

    ``model`` may be a loaded causal LM (with its ``tokenizer``) or a local directory (loaded with
    ``transformers`` from local files only). Options go to :func:`evaluate_tofu` /
    :func:`evaluate_extraction`.
    """
    if tofu is None and extraction is None:
        raise ValueError(
            "nothing to evaluate: give tofu=DATA (TOFU files) and/or extraction=FILE ({'text'} lines)"
        )
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_local_model(model, tokenizer, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a model object")
    results: dict[str, Any] = {}
    if tofu is not None:
        results["tofu"] = evaluate_tofu(model, tokenizer, tofu, **dict(tofu_options or {}))
    if extraction is not None:
        results["extraction"] = evaluate_extraction(
            model, tokenizer, extraction, **dict(extraction_options or {})
        )
    return results


def load_local_model(path: str | os.PathLike, tokenizer: Any = None, *, trust_remote_code: bool = False):
    """A causal LM and its tokenizer from a local directory (never downloads). A directory holding a
    ``peft`` adapter is loaded on its base model."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path} (only local models are loaded)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kw)
        base = model.peft_config["default"].base_model_name_or_path
        tok_path = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        tok_path = path
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **kw)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer), **kw)
    return model, tokenizer


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or not math.isfinite(value)):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`evaluate` results."""
    lines = []
    tofu = results.get("tofu")
    if tofu:
        cols = ("num_items", "prob", "accuracy", "rougeL_recall", "truth_ratio", "truth_ratio_mean")
        lines.append(f"TOFU ({tofu['mode']} mode, template {tofu['template']!r})")
        lines.append(f"{'set':<14}" + "".join(f"{c:>18}" for c in cols))
        for name, scores in tofu["sets"].items():
            lines.append(f"{name:<14}" + "".join(f"{_fmt(scores.get(c)):>18}" for c in cols))
        k = len(tofu["model_utility_components"])
        if tofu["model_utility"] is not None:
            lines.append(f"model utility   {_fmt(tofu['model_utility'])}  (harmonic mean of all 9 numbers)")
        elif k:
            lines.append(
                f"model utility (partial, {k} of 9)  {_fmt(tofu['model_utility_partial'])}  "
                "(not TOFU's model utility, which needs all 9 numbers)"
            )
        else:
            lines.append("model utility   —  (no retain / real authors / world facts numbers)")
        fq = tofu.get("forget_quality")
        lines.append(
            f"forget quality  {_fmt(fq)}" + ("" if fq is not None else "  (no reference truth ratios)")
        )
    ext = results.get("extraction")
    if ext:
        if lines:
            lines.append("")
        n = ext["n"]
        lines.append(f"Extraction ({ext['num_sequences']} sequences)")
        lines.append(f"MA     {_fmt(ext['ma'])}")
        lines.append(f"EL_{n:<3} {_fmt(ext[f'el_{n}'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Trainer callbacks
# ---------------------------------------------------------------------------------------------------


class EpochEvaluationCallback(TrainerCallback):
    """Evaluate after every epoch (and before training), keep the history, and keep the best epoch.

    ``evaluate_fn(model) -> dict[str, float]`` computes the metrics. With ``metric`` set, the best
    epoch (``mode="min"`` or ``"max"`` of that metric) is tracked; with ``restore_best=True`` its
    trainable parameters are also copied to CPU, and restored into the model when training ends, so
    whatever the trainer saves afterwards is the best checkpoint. ``history`` holds one dict per
    evaluation with ``epoch`` and ``step``; ``best`` the best one.
    """

    def __init__(
        self,
        evaluate_fn: Callable[[torch.nn.Module], Mapping[str, float]],
        *,
        metric: str | None = None,
        mode: str = "max",
        restore_best: bool = True,
        evaluate_at_start: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.evaluate_fn, self.metric, self.mode = evaluate_fn, metric, mode
        self.restore_best, self.evaluate_at_start = restore_best, evaluate_at_start
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def _run(self, model, state) -> dict[str, Any]:
        record = {
            "epoch": float(state.epoch or 0.0),
            "step": int(state.global_step),
            **dict(self.evaluate_fn(model)),
        }
        self.history.append(record)
        if self.metric is not None:
            if self.metric not in record:
                raise ValueError(f"evaluate_fn returned no {self.metric!r}; it returned {sorted(record)}")
            value = record[self.metric]
            better = self.best is None or (
                value < self.best[self.metric] if self.mode == "min" else value > self.best[self.metric]
            )
            if better:
                self.best = record
            if better and self.restore_best:  # the copy costs a model's worth of host memory
                self._best_state = {
                    k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters() if p.requires_grad
                }
        return record

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.evaluate_at_start and model is not None and not self.history:
            self._run(model, state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.on_evaluated(self._run(model, state), control)

    def on_evaluated(self, record: Mapping[str, Any], control) -> None:
        """Hook for subclasses (stopping rules)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.restore_best and self._best_state is not None and model is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in self._best_state.items():
                    params[k].copy_(v.to(params[k].device))


class ExtractionStoppingCallback(EpochEvaluationCallback):
    """The extraction stopping rule (SPEC §4; Jang et al. 2023): after each epoch, measure mean MA and
    mean EL_n on the forget sequences, and stop once **both** are below the thresholds.

    Thresholds are given (``ma_threshold``, ``el_threshold``; the published GPT-Neo-125M values are
    0.2994 and 0.0499) or measured on held-out sequences the model never saw (``held_out_ids``) with
    the model before training.
    """

    def __init__(
        self,
        forget_ids: torch.Tensor,
        forget_mask: torch.Tensor | None = None,
        *,
        ma_threshold: float | None = None,
        el_threshold: float | None = None,
        held_out_ids: torch.Tensor | None = None,
        held_out_mask: torch.Tensor | None = None,
        n: int = 10,
        batch_size: int = 64,
        restore_best: bool = False,
    ) -> None:
        given = (ma_threshold is not None, el_threshold is not None)
        if given[0] != given[1]:
            raise ValueError("give both ma_threshold and el_threshold, or neither (and held_out_ids)")
        if not given[0] and held_out_ids is None:
            raise ValueError(
                "the stopping rule needs thresholds: ma_threshold and el_threshold, "
                "or held_out_ids to measure them on unseen text"
            )
        self.forget = (forget_ids, forget_mask)
        self.held_out = (held_out_ids, held_out_mask)
        self.ma_threshold, self.el_threshold = ma_threshold, el_threshold
        self.n, self.batch_size = n, batch_size
        self.stopped_at: dict[str, Any] | None = None
        super().__init__(self._measure, metric=f"el_{n}", mode="min", restore_best=restore_best)

    def _stats(self, model, ids, mask) -> dict[str, float]:
        ma, el = M.extraction_metrics(model, ids, n=self.n, attention_mask=mask, batch_size=self.batch_size)
        return {"ma": ma.mean().item(), f"el_{self.n}": el.mean().item()}

    def _measure(self, model) -> dict[str, float]:
        return self._stats(model, *self.forget)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.ma_threshold is None and model is not None:
            ref = self._stats(model, *self.held_out)
            self.ma_threshold, self.el_threshold = ref["ma"], ref[f"el_{self.n}"]
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_evaluated(self, record, control) -> None:
        if record["ma"] < self.ma_threshold and record[f"el_{self.n}"] < self.el_threshold:
            self.stopped_at = dict(record)
            control.should_training_stop = True
