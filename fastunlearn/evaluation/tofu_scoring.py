"""TOFU's scores of one set (Maini et al. 2024): answer probabilities, truth ratios and the ROUGE-L of
greedy answers, tokenised as in training (the ``tofu-*`` templates as the paper does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastunlearn import data as fdata
from fastunlearn.data.tofu_format import (
    TOFU_FAMILIES,
    TofuItem,
    encode_tofu_example,
    tofu_generation_batch,
    tofu_generation_prompt,
    tofu_max_new_tokens,
)
from fastunlearn.engines import distributed
from fastunlearn.evaluation import metrics as M
from fastunlearn.evaluation.decoding import greedy_completions

LEGACY_MAX_LENGTH = 200  # tokens, question included: the paper's scoring cut and generation budget
LEGACY_GENERATION_BATCH = 30  # the paper's generation batch, whose width sets every row's budget


def _answer_stats(
    model, tokenizer, pairs: list[tuple[str, str]], *, template: str, max_length: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """Answer statistics of each (question, answer) pair, tokenised as in training, with ``avg_nll``:
    ``Σ NLL over targets / #targets`` (the paper's), in fp64."""
    records = [{"question": q, "answer": a, "_source": f"item {i}"} for i, (q, a) in enumerate(pairs)]
    examples = fdata.tokenize_records(
        records, tokenizer, data_format="qa", template=template, max_length=max_length
    )
    stats = M.example_stats(model, examples, fdata.pad_id_of(tokenizer), batch_size)  # shared by the ranks
    stats = {key: value.cpu() for key, value in stats.items()}
    return {**stats, "avg_nll": stats["nll_sum"].double() / stats["num_tokens"].double()}


def _generation_prompts(
    tokenizer, items: Sequence[TofuItem], template: str, max_length: int
) -> tuple[list[torch.Tensor], list[str]]:
    """Each item's generation prompt (token ids) and reference answer: with a ``tofu-*`` template the
    paper's (the encoded example decoded and split at the family's marker, the prompt re-tokenised),
    else the training example's unlabelled head and the file's answer."""
    if template in TOFU_FAMILIES:
        pairs = []  # (prompt text, reference answer)
        for it in items:
            ex = encode_tofu_example(tokenizer, it.question, it.answer, template, max_length, where=it.source)
            try:
                pairs.append(tofu_generation_prompt(tokenizer, ex.input_ids, template))
            except ValueError as e:
                raise ValueError(f"{it.source}: {e}") from None
        texts, references = zip(*pairs)
        ids, mask = tofu_generation_batch(tokenizer, texts)
        return [ids[r][mask[r].bool()] for r in range(len(texts))], list(references)
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
    model, tokenizer, prompts: Sequence[torch.Tensor], *, legacy: bool, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers to ``prompts`` in their order, each stopping at EOS, shared by the ranks.
    Legacy: the paper's batches of 30 in file order, each row of a batch ``W`` tokens wide getting
    ``200 − W`` new tokens (:func:`~fastunlearn.data.tofu_format.tofu_max_new_tokens`); otherwise
    ``max_new_tokens``."""
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


def score_set(
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
    """The scores of one set and its truth ratios (``None`` without perturbed answers)."""
    opts = dict(template=template, max_length=max_length, batch_size=batch_size)
    stats = _answer_stats(model, tokenizer, [(it.question, it.answer) for it in items], **opts)
    probs = M.answer_probability(stats)
    # Per item, as TOFU's eval logs record them (avg_gt_loss, avg_paraphrased_loss, ...).
    avg_nll: dict[str, Any] = {"answer": stats["avg_nll"].tolist()}
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
            pairs = [(it.question, it.paraphrased_answer) for it in items]
            para_stats = _answer_stats(model, tokenizer, pairs, **opts)
            avg_nll["paraphrased"] = para_stats["avg_nll"].tolist()
            true = M.answer_probability(para_stats)
        else:
            true = probs
        pairs = [(it.question, p) for it in items for p in it.perturbed_answers]
        pert_stats = _answer_stats(model, tokenizer, pairs, **opts)
        avg_nll["perturbed"] = pert_stats["avg_nll"].view(len(items), k).tolist()
        pert = M.answer_probability(pert_stats).view(len(items), k)
        r = M.truth_ratio(true, pert)
        ratios = r.tolist()
        out["truth_ratio"] = M.truth_ratio_score(r)  # mean max(0, 1 − R): the utility component
        out["truth_ratio_mean"] = r.mean().item()
        if name in ("real_authors", "world_facts"):
            # Multiple choice between the answer and its perturbations (Maini et al. 2024).
            out["prob"] = M.normalized_probability(probs, pert).mean().item()
    if generate:
        prompts, references = _generation_prompts(tokenizer, items, template, max_length)
        opts = dict(legacy=legacy, max_new_tokens=max_new_tokens, batch_size=batch_size)
        preds = _greedy_answers(model, tokenizer, prompts, **opts)
        out["rougeL_recall"] = sum(M.rouge_l_recall(preds, references)) / len(items)
        out["examples"] = [
            {"question": it.question, "answer": ref, "generated": pred}
            for it, ref, pred in list(zip(items, references, preds))[:3]
        ]
    return out, ratios
