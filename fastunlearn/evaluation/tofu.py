"""The TOFU protocol (SPEC §4; Maini et al. 2024): per-set scores, forget quality and model utility.

:func:`evaluate_tofu` scores a model on TOFU-format files (:mod:`fastunlearn.data.tofu_files`):
per set, the length-normalised answer probability, ROUGE-L recall of the greedy answer and the truth
ratio; then forget quality (KS test against the retain-only model's forget-set truth ratios, saved
once with :func:`fastunlearn.evaluation.reference.save_reference_truth_ratios` and reused) and model
utility (harmonic mean of the nine retain / real-authors / world-facts numbers).
:func:`summarize_tofu` flattens the headline numbers; :func:`cached_reference_truth_ratios` computes
the reference once and reuses it.

Prompts are tokenised by :mod:`fastunlearn.data.examples`, the training pipeline, so an evaluated
prompt is byte for byte the prompt the model was trained on. ``mode="legacy"`` is the paper's pipeline
token for token (SPEC §4.1): the ``tofu-*`` templates (:mod:`fastunlearn.data.tofu_format`),
question and answer tokenised as one string and cut at 200 tokens, generation from the decoded
question in batches of 30 to 200 tokens in total. ``mode="full"`` is fastunlearn's own protocol with
the template the model was trained with (any of them, ``tofu-*`` included).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastunlearn import data as fdata
from fastunlearn.data.tofu_files import (
    TOFU_SETS,
    TofuItem,
    find_tofu_files,
    missing_truth_ratio_reason,
    read_tofu_file,
)
from fastunlearn.data.tofu_format import (
    TOFU_FAMILIES,
    encode_tofu_example,
    tofu_generation_batch,
    tofu_generation_prompt,
    tofu_max_new_tokens,
)
from fastunlearn.engines import distributed
from fastunlearn.evaluation import metrics as M
from fastunlearn.evaluation.decoding import greedy_completions
from fastunlearn.evaluation.reference import (
    _check_new_file,
    load_reference_truth_ratios,
    save_reference_truth_ratios,
)
from fastunlearn.models.loading import load_model_and_tokenizer

# Sets whose probability/ROUGE/truth-ratio numbers make up model utility (SPEC §4).
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rougeL_recall", "truth_ratio")
NUM_UTILITY_COMPONENTS = len(UTILITY_SETS) * len(UTILITY_METRICS)  # TOFU's nine numbers
TOFU_MODES = ("full", "legacy")
LEGACY_MAX_ITEMS = 300
LEGACY_MAX_LENGTH = 200  # tokens, question included: the paper's scoring cut and generation budget
LEGACY_GENERATION_BATCH = 30  # the paper's generation batch, whose width sets every row's budget
LEGACY_TEMPLATES = tuple(TOFU_FAMILIES)

__all__ = [
    "TOFU_MODES",
    "cached_reference_truth_ratios",
    "evaluate_tofu",
    "summarize_tofu",
]


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
    the training pipeline's tokenisation: the answer tokens and the closing EOS are scored (with a
    ``tofu-*`` template every token after the question's, and no EOS when the cut reaches it)."""
    records = [
        {"question": q, "answer": a, "_source": f"item {i}"}
        for i, (q, a) in enumerate(zip(questions, answers))
    ]
    examples = fdata.tokenize_records(
        records, tokenizer, data_format="qa", template=template, max_length=max_length
    )
    stats = M.example_stats(model, examples, fdata.pad_id_of(tokenizer), batch_size)  # shared by the ranks
    return {key: value.cpu() for key, value in stats.items()}


def _generation_prompts(
    tokenizer, items: Sequence[TofuItem], template: str, max_length: int
) -> tuple[list[torch.Tensor], list[str]]:
    """Each item's generation prompt (token ids) and the reference its greedy answer is scored against.

    ``tofu-*`` templates (SPEC §4.1): the example encoded at ``max_length`` is decoded and split at the
    family's marker (:func:`~fastunlearn.data.tofu_format.tofu_generation_prompt`), the prompt
    re-tokenised with special tokens; the reference is the decoded answer, cut where its scored tokens
    are. Other templates: the labelled example's unlabelled head — exactly what training conditioned
    on — and the file's answer.
    """
    if template in TOFU_FAMILIES:
        texts, references = [], []
        for it in items:
            ex = encode_tofu_example(tokenizer, it.question, it.answer, template, max_length, where=it.source)
            try:
                prompt, reference = tofu_generation_prompt(tokenizer, ex.input_ids, template)
            except ValueError as e:
                raise ValueError(f"{it.source}: {e}") from None
            texts.append(prompt)
            references.append(reference)
        ids, mask = tofu_generation_batch(tokenizer, texts)
        return [ids[r][mask[r].bool()] for r in range(len(texts))], references
    records = [{"question": it.question, "answer": it.answer, "_source": it.source} for it in items]
    examples = fdata.tokenize_records(
        records, tokenizer, data_format="qa", template=template, max_length=10**9
    )
    heads = []
    for ex in examples:
        n = next(i for i, label in enumerate(ex.labels) if label != fdata.IGNORE_INDEX)
        heads.append(torch.tensor(ex.input_ids[:n], dtype=torch.long))
    return heads, [it.answer for it in items]


def _greedy_answers(
    model,
    tokenizer,
    prompts: Sequence[torch.Tensor],
    *,
    legacy: bool,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to ``prompts``, each stopping at EOS, in the prompts' order.

    Legacy (SPEC §4.1, the paper's ``generate(max_length=200)``): batches of 30 in file order, and every
    row of a batch ``W`` tokens wide gets ``200 − W`` new tokens — the budget depends on the batch, so
    the batches are the paper's (each decoded as one batch). Otherwise ``max_new_tokens`` per row.
    Left padding is masked, so the pad id changes nothing. Under several processes the ranks share the
    prompts (legacy: the batches of 30, whose budgets they set; :func:`fastunlearn.engines.distributed.map_sharded`).
    """
    if not legacy:
        return distributed.map_sharded(
            lambda part: greedy_completions(
                model, tokenizer, part, [max_new_tokens] * len(part), batch_size=batch_size
            ),
            prompts,
            model=model,
        )

    def legacy_batches(chunks: list[Sequence[torch.Tensor]]) -> list[list[str]]:
        answers = []
        for chunk in chunks:
            steps = tofu_max_new_tokens(max(len(p) for p in chunk), max_length=LEGACY_MAX_LENGTH)
            answers.append(
                greedy_completions(model, tokenizer, chunk, [steps] * len(chunk), batch_size=len(chunk))
            )
        return answers

    step = LEGACY_GENERATION_BATCH
    chunks = [prompts[start : start + step] for start in range(0, len(prompts), step)]
    batches = distributed.map_sharded(legacy_batches, chunks, model=model)
    return [answer for batch in batches for answer in batch]


def _avg_nll(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-item average NLL ``Σ NLL over targets / #targets`` (SPEC §4.1), in fp64."""
    return stats["nll_sum"].double() / stats["num_tokens"].double()


def _score_set(
    model,
    tokenizer,
    name: str,
    items: Sequence[TofuItem],
    *,
    template: str,
    legacy: bool,
    generate: bool,
    max_new_tokens: int,
    max_length: int,
    batch_size: int,
) -> tuple[dict[str, Any], list[float] | None]:
    qs = [it.question for it in items]
    opts = dict(template=template, max_length=max_length, batch_size=batch_size)
    stats = _answer_stats(model, tokenizer, qs, [it.answer for it in items], **opts)
    probs = M.answer_probability(stats)
    # Per item, as TOFU's eval logs record them (avg_gt_loss, avg_paraphrased_loss, ...).
    avg_nll: dict[str, Any] = {"answer": _avg_nll(stats).tolist()}
    out: dict[str, Any] = {
        "num_items": len(items),
        "prob": probs.mean().item(),
        # Teacher-forced next-token accuracy on the answers: the QA analogue of MA.
        "accuracy": (stats["correct"].sum().double() / stats["num_tokens"].sum()).item(),
        "avg_nll": avg_nll,
    }
    ratios = None
    if items[0].perturbed_answers is not None:
        k = len(items[0].perturbed_answers)
        # "True" is the paraphrased answer where the file has one (forget/retain), else the answer.
        if items[0].paraphrased_answer is not None:
            para_stats = _answer_stats(model, tokenizer, qs, [it.paraphrased_answer for it in items], **opts)
            avg_nll["paraphrased"] = _avg_nll(para_stats).tolist()
            true = M.answer_probability(para_stats)
        else:
            true = probs
        pert_stats = _answer_stats(
            model,
            tokenizer,
            [q for q in qs for _ in range(k)],
            [p for it in items for p in it.perturbed_answers],
            **opts,
        )
        avg_nll["perturbed"] = _avg_nll(pert_stats).view(len(items), k).tolist()
        pert = M.answer_probability(pert_stats).view(len(items), k)
        r = M.truth_ratio(true, pert)
        ratios = r.tolist()
        out["truth_ratio"] = M.truth_ratio_score(r)  # mean max(0, 1 − R): the utility component
        out["truth_ratio_mean"] = r.mean().item()
        if name in ("real_authors", "world_facts"):
            # Multiple choice between the answer and its perturbations (SPEC §4).
            out["prob"] = M.normalized_probability(probs, pert).mean().item()
    if generate:
        prompts, references = _generation_prompts(tokenizer, items, template, max_length)
        preds = _greedy_answers(
            model,
            tokenizer,
            prompts,
            legacy=legacy,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        out["rougeL_recall"] = sum(M.rouge_l_recall(preds, references)) / len(items)
        out["examples"] = [
            {"question": it.question, "answer": ref, "generated": pred}
            for it, ref, pred in list(zip(items, references, preds))[:3]
        ]
    return out, ratios


def _resolve_template(mode: str, template: str | None) -> str:
    """The template of a TOFU evaluation: for ``mode="legacy"`` one of SPEC §4.1's families
    (``tofu-llama2`` by default), else the given one (default ``plain``)."""
    if mode not in TOFU_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(TOFU_MODES)}")
    if mode == "legacy":
        template = template or "tofu-llama2"
        if template not in LEGACY_TEMPLATES:
            raise ValueError(
                f"legacy mode is the paper's TOFU pipeline (SPEC §4.1), defined for the model families "
                f"{list(LEGACY_TEMPLATES)}; got template {template!r}"
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

    ``mode="legacy"``: the paper's pipeline token for token (SPEC §4.1) — at most 300 items per set;
    ``template`` one of ``tofu-llama2`` (default), ``tofu-llama3``, ``tofu-phi``
    (:mod:`fastunlearn.data.tofu_format`): question and answer tokenised as one string and cut at
    200 tokens (``max_length`` is not used), the greedy answer generated from the decoded question in
    batches of 30 (file order) to 200 tokens in total per batch (``max_new_tokens`` and
    ``batch_size`` do not apply to generation) and scored against the decoded answer.
    ``mode="full"``: fastunlearn's own protocol — every item, ``template`` as trained (default
    ``"plain"``; a ``tofu-*`` one gives TOFU's tokenisation at ``max_length``), greedy answers of up
    to ``max_new_tokens`` new tokens; ``max_items`` caps either. Each set's ``avg_nll`` holds the
    per-item average NLLs (``answer``, ``paraphrased``, ``perturbed``) the numbers derive from.

    Forget quality needs ``reference_truth_ratios`` (a list or a JSON file from
    :func:`save_reference_truth_ratios`, whose recorded mode and template must be this run's); a
    missing file raises ``FileNotFoundError`` saying how to make it, and without the argument forget
    quality is ``None``. ``save_reference`` writes this run's forget truth ratios for use as a reference
    (evaluate the retain-only model with it). Files, reference and output path are all checked before
    the model runs. A set without perturbed answers (a plain ``forget10.json`` read where
    ``forget10_perturbed.json`` is missing) has no truth ratio; its scores then say why under
    ``missing`` (``{"truth_ratio": reason}``). Returns a JSON-serialisable dict.
    """
    template = _resolve_template(mode, template)
    legacy = mode == "legacy"
    if legacy:
        max_items = LEGACY_MAX_ITEMS if max_items is None else min(max_items, LEGACY_MAX_ITEMS)
        max_length = LEGACY_MAX_LENGTH

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
            legacy=legacy,
            generate=generate,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            batch_size=batch_size,
        )
        reason = missing_truth_ratio_reason(items, files.get(name))
        if reason is not None:
            scores["missing"] = {"truth_ratio": reason}
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
    if save_reference is not None:  # every rank holds the results; one writes them
        distributed.on_main(lambda: save_reference_truth_ratios(save_reference, results, overwrite=overwrite))
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
