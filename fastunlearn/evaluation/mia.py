"""Membership inference against an unlearned model: per-sequence scores, their AUC, and PrivLeak.

Each attack scores a sequence, **higher = looks less like training data**, from one teacher-forced
pass over its ``n`` target tokens, with ``N̄ = −(1/n) Σ_t log p(x_t | x_<t)``, ``k_n = max(1, ⌊k·n⌋)``:
``loss`` (Yeom et al. 2018) ``N̄``; ``zlib`` (Carlini et al. 2021) ``N̄`` over the zlib-compressed
length of the text; ``min_k`` (Min-K%, Shi et al. 2024) minus the mean of the ``k_n`` smallest token
log-probabilities; ``min_k_plus_plus`` (Min-K%++, Zhang et al. 2024) the same over
``(log p_y − μ_t)/σ_t``, the target standardised against the model's own distribution at ``t``;
``reference`` (Carlini et al. 2021) ``N̄_θ − N̄_ref`` under a reference model (same tokenizer).

An attack's AUC is ``P(holdout score > forget score)``, ties counting ½: near 1 for a model trained on
the forget set, 0.5 for one that never saw it. PrivLeak (MUSE, Shi et al. 2024) compares the Min-K%
AUC with a retrained model's (:data:`PRIVLEAK_CONVENTION`). The token statistics ``(log p_y, μ_t, σ_t)``
come from one forward per right-padded batch, at the output head where the architecture allows.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from fastunlearn.data.examples import Example, collate, pad_id_of
from fastunlearn.data.records import text_field
from fastunlearn.engines import distributed
from fastunlearn.evaluation.likelihood import backend_for, eval_mode, model_inputs, stats_at_head
from fastunlearn.models.devices import model_device
from fastunlearn.models.patching import takes_fused_path
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.ihl import check_label_range
from fastunlearn.ops.nll import shift_labels
from fastunlearn.ops.token_stats import linear_token_stats, token_stats

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
AUC_CONVENTION = (
    "AUC = P(holdout score > forget score) + P(tie)/2 (roc_auc_score with forget labelled 0, holdout 1); "
    "scores are higher for sequences that look less like training data"
)
PRIVLEAK_CONVENTION = (
    "privleak = (AUC_unlearned - AUC_retrained) / AUC_retrained * 100 with the Min-K% (k=0.4) AUC above: "
    "near 0 is right, positive = the forget set still looks more like training data than under the "
    "retrained model (leaks), strongly negative = over-unlearned; MUSE's published tables (Shi et al. "
    "2024) use the opposite sign"
)

MembershipData = str | os.PathLike | Sequence[str] | Sequence[dict[str, Any]]


def _token_ids(tokenizer: Any, texts: Sequence[str], *, max_length: int, name: str) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, cut at ``max_length``. A text of fewer
    than two tokens has nothing to score: ``ValueError`` naming it (``name`` labels the set)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) < 2:
            raise ValueError(f"{name} item {i} has {len(row)} token(s): no target token to score")
    return [list(row) for row in ids]


def batch_token_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T, 3]`` ``(log p_y, μ, σ)`` of one right-padded CPU batch: position ``t`` holds the label at
    ``t + 1``'s, NaN where there is none. Right padding needs no attention mask in a causal model (a
    real token attends only to real ones before it), so the mask is passed only for other padding."""
    mask = batch["attention_mask"]
    right_padded = not bool((mask[:, 1:] > mask[:, :-1]).any())  # a host check: the batch is on the CPU
    inputs = model_inputs(model, batch["input_ids"], None if right_padded else mask)
    host_targets = shift_labels(batch["labels"])  # range-checked here, with no device synchronisation
    targets = host_targets.to(model_device(model))

    def row_stats(h: torch.Tensor, y: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
        check_label_range(host_targets, head.weight.shape[0], IGNORE_INDEX)
        stats = linear_token_stats(h, head.weight, y, bias=head.bias, backend=backend_for(h), validate=False)
        return torch.stack(stats, dim=-1)

    with torch.no_grad():
        if takes_fused_path(model):
            return stats_at_head(model, inputs, targets, host_targets, row_stats, float("nan"))
        logits = model(**inputs).logits
        check_label_range(host_targets, logits.shape[-1], IGNORE_INDEX)
        return torch.stack(token_stats(logits, targets, backend=backend_for(logits), validate=False), dim=-1)


def auc(
    member_scores: Sequence[float] | torch.Tensor, nonmember_scores: Sequence[float] | torch.Tensor
) -> float:
    """``P(nonmember score > member score) + ½ P(tie)`` over all pairs, exactly (Mann–Whitney: the
    non-members' rank sum among all scores, ties sharing the average rank, less its minimum)."""
    from scipy.stats import rankdata

    member = torch.as_tensor(member_scores, dtype=torch.float64).flatten()
    nonmember = torch.as_tensor(nonmember_scores, dtype=torch.float64).flatten()
    for name, scores in (("forget (member)", member), ("holdout (non-member)", nonmember)):
        if scores.numel() == 0:
            raise ValueError(f"the {name} set is empty: the AUC needs scores on both sets")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"the {name} scores are not all finite")
    ranks = rankdata(torch.cat([member, nonmember]).numpy())  # average ranks: exact halves
    m, n = member.numel(), nonmember.numel()
    return float((ranks[m:].sum() - n * (n + 1) / 2) / (m * n))


def privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """``(AUC_unlearned − AUC_retrained) / AUC_retrained × 100`` (:data:`PRIVLEAK_CONVENTION`)."""
    if not 0.0 < auc_retrained <= 1.0 or not 0.0 <= auc_unlearned <= 1.0:
        raise ValueError(
            f"AUCs must lie in [0, 1] (the retrained one above 0): got {auc_unlearned} and {auc_retrained}"
        )
    return (auc_unlearned - auc_retrained) / auc_retrained * 100.0


def _smallest_mean(values: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Per row, the mean of the ``max(1, ⌊k·n⌋)`` smallest of the ``n`` masked-in values: sorted with the
    others as ``+inf`` (last), the prefix sum at ``count − 1 < n`` holds only masked-in values."""
    n = mask.sum(dim=1)
    count = torch.floor(k * n.double()).long().clamp_min(1)
    cumulative = torch.where(mask, values, math.inf).sort(dim=1).values.cumsum(dim=1)
    return cumulative.gather(1, (count - 1).unsqueeze(1)).squeeze(1) / count


def sequence_scores(stats: torch.Tensor, k: float = 0.4) -> dict[str, torch.Tensor]:
    """Per-sequence ``loss``, ``min_k`` and ``min_k_plus_plus`` scores (module docstring) from a batch's
    ``[B, T, 3]`` ``(log p_y, μ, σ)`` token statistics, NaN where a position has no target."""
    log_p, mu, sigma = stats.unbind(-1)
    mask = ~torch.isnan(log_p)
    n = mask.sum(dim=1)
    return {
        "loss": -torch.where(mask, log_p, 0.0).sum(dim=1) / n,
        "min_k": -_smallest_mean(log_p, mask, k),
        "min_k_plus_plus": -_smallest_mean((log_p - mu) / sigma, mask, k),
    }


def membership_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    k: float = 0.4,
    batch_size: int = 16,
    max_length: int = 512,
    name: str = "data",
) -> dict[str, torch.Tensor]:
    """The :data:`ATTACKS`' scores of each text (fp64 ``[N]``, in order), shared by the ranks, from
    batches sorted by length; ``name`` labels the set in errors."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must lie in (0, 1], got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not texts:
        raise ValueError(f"the {name} set is empty")
    token_ids = _token_ids(tokenizer, texts, max_length=max_length, name=name)  # errors before sharding

    def scores(items: list[int]) -> dict[str, torch.Tensor]:
        items = sorted(items, key=lambda i: len(token_ids[i]))
        per_batch = []
        with eval_mode(model):
            for start in range(0, len(items), batch_size):
                rows = [token_ids[i] for i in items[start : start + batch_size]]
                labelled = [Example(tuple(r), tuple(r), "") for r in rows]  # every token a label
                stats = batch_token_stats(model, collate(labelled, pad_id_of(tokenizer)))
                per_batch.append(sequence_scores(stats, k))
        out = {key: torch.cat([part[key] for part in per_batch]).double().cpu() for key in per_batch[0]}
        sizes = [len(zlib.compress(texts[i].encode("utf-8"))) for i in items]
        out["zlib"] = out["loss"] / torch.tensor(sizes, dtype=torch.float64)
        unsort = torch.tensor(items).argsort()
        return {attack: out[attack][unsort] for attack in ATTACKS}

    return distributed.map_sharded(scores, range(len(texts)), model=model)


def evaluate_mia(
    model: torch.nn.Module,
    tokenizer: Any,
    forget: MembershipData,
    holdout: MembershipData,
    *,
    k: float = 0.4,
    reference_model: torch.nn.Module | None = None,
    retrain_auc: float | None = None,
    retrain_model: torch.nn.Module | None = None,
    batch_size: int = 16,
    max_length: int = 512,
) -> dict[str, Any]:
    """Membership inference of ``forget`` (members) against ``holdout`` (non-members): per attack
    ``{"auc", "forget": [scores], "holdout": [scores]}``, JSON-serialisable.

    The sets: ``{"text"}`` files, lists of strings or of ``{"text"}`` dicts, cut at ``max_length``
    tokens; ``k``: Min-K%'s fraction. ``reference_model`` adds the ``reference`` attack; the retrained
    model's Min-K% AUC (``retrain_auc``, or computed on ``retrain_model``) adds ``privleak``. The other
    models share ``tokenizer``.
    """
    if retrain_auc is not None and retrain_model is not None:
        raise ValueError("give the retrained model's AUC or the retrained model, not both")
    sets = {"forget": text_field(forget, "text", "forget"), "holdout": text_field(holdout, "text", "holdout")}
    opts = {"k": k, "batch_size": batch_size, "max_length": max_length}
    scores = {
        name: membership_scores(model, tokenizer, texts, name=name, **opts) for name, texts in sets.items()
    }
    if reference_model is not None:
        for name, texts in sets.items():
            ref = membership_scores(reference_model, tokenizer, texts, name=name, **opts)
            scores[name]["reference"] = scores[name]["loss"] - ref["loss"]
    results: dict[str, Any] = {
        "protocol": "mia",
        "num_forget": len(sets["forget"]),
        "num_holdout": len(sets["holdout"]),
        "k": k,
        "auc_convention": AUC_CONVENTION,
    }
    for attack, forget_scores in scores["forget"].items():
        holdout_scores = scores["holdout"][attack]
        results[attack] = {
            "auc": auc(forget_scores, holdout_scores),
            "forget": forget_scores.tolist(),
            "holdout": holdout_scores.tolist(),
        }
    if retrain_model is not None:
        retrained = [membership_scores(retrain_model, tokenizer, t, name=n, **opts) for n, t in sets.items()]
        retrain_auc = auc(retrained[0]["min_k"], retrained[1]["min_k"])
    if retrain_auc is not None:
        results["retrain_auc"] = float(retrain_auc)
        results["privleak"] = privleak(results["min_k"]["auc"], results["retrain_auc"])
        results["privleak_convention"] = PRIVLEAK_CONVENTION
    return results
