"""Likelihood metrics of answers on any causal LM (TOFU, Maini et al. 2024), batched: per example the
``nll_sum`` and ``correct`` predictions over its ``num_tokens`` labelled tokens from one teacher-forced
pass; from them the length-normalised probability ``exp(−nll_sum / num_tokens)``, TOFU's
multiple-choice normalisation and the truth ratio."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from fastunlearn import data as fdata
from fastunlearn.engines import distributed
from fastunlearn.models.devices import eval_mode, model_device
from fastunlearn.models.naming import unwrap_model
from fastunlearn.models.patching import head_computes, takes_fused_path
from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.fused_linear import fused_linear_token_stats
from fastunlearn.ops.ihl import check_label_range
from fastunlearn.ops.nll import labelled_rows, shift_labels, shifted_nll


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted per-token NLL (0 where the label is ``-100``), the label mask and the teacher-forced
    hits, each ``[B, T-1]``. The labels are shifted, not the logits: bf16/fp16 logits are read as they
    are with fp32 accumulation (:func:`fastunlearn.ops.nll.shifted_nll`), and CPU labels are
    range-checked on the host, with no device synchronisation."""
    nll = shifted_nll(logits, labels, "none").view(labels.shape)
    targets = shift_labels(labels.to(logits.device))
    mask = targets != IGNORE_INDEX
    hits = (logits.argmax(dim=-1) == targets) & mask
    return nll[:, :-1], mask[:, :-1], hits[:, :-1]


def answer_stats(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example ``nll_sum`` (fp32), ``num_tokens`` and ``correct`` (int64), each ``[B]``, from one
    teacher-forced pass without gradient over ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]``.
    Where the architecture allows they are computed at the output head a chunk of tokens at a time
    (:func:`~fastunlearn.ops.fused_linear.fused_linear_token_stats`), so the ``[B, T, V]`` logits never
    exist; otherwise by :func:`token_nll`."""
    keys = ("input_ids", "attention_mask", "labels")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; expected keys {list(keys)}")
    shapes = {k: tuple(batch[k].shape) for k in keys}
    if len(shapes["input_ids"]) != 2 or len(set(shapes.values())) > 1:
        raise ValueError(f"the batch's tensors must be 2-D [batch, seq] of one shape, got shapes {shapes}")
    inputs = model_inputs(model, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"].to(model_device(model))
    with torch.no_grad():
        if takes_fused_path(model):
            nll, mask, hits = _fused_token_stats(model, inputs, labels, batch["labels"])
        else:  # CPU labels as they are: token_nll range-checks them on the host, without a device sync
            nll, mask, hits = token_nll(model(**inputs).logits, batch["labels"])
    return {"nll_sum": nll.sum(dim=1), "num_tokens": mask.sum(dim=1), "correct": hits.sum(dim=1)}


def model_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> dict:
    """The forward's arguments on the model's device, without a KV cache (it would outlive the forward)."""
    device = model_device(model)
    inputs: dict[str, Any] = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(device)
    if getattr(getattr(unwrap_model(model), "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    return inputs


def backend_for(x: torch.Tensor) -> str:
    return "torch" if x.dtype == torch.float64 else "auto"  # fp64 stays fp64 on the PyTorch path


def stats_at_head(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    targets: torch.Tensor,
    host_targets: torch.Tensor | None,
    row_stats: Callable[[torch.Tensor, torch.Tensor, torch.nn.Linear], torch.Tensor],
    fill: float,
) -> torch.Tensor:
    """``[B, T, k]`` statistics of each target computed at the output head from the last hidden states,
    so the ``[B, T, V]`` logits never exist: ``row_stats(hidden rows, targets, head)`` → ``[n, k]``.
    With ``host_targets`` (the targets on the CPU) only the rows with a target reach the head (the
    prompt and padding are half of a question/answer batch), found without a device synchronisation;
    the others hold ``fill``."""
    rows = None if host_targets is None else labelled_rows(host_targets).to(targets.device, non_blocking=True)

    def compute(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
        h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if rows is not None:
            h, y = h.index_select(0, rows), y.index_select(0, rows)
        stats = row_stats(h, y, head)
        if rows is not None:
            stats = stats.new_full((targets.numel(), stats.shape[-1]), fill).index_copy_(0, rows, stats)
        return stats.view(*targets.shape, -1)

    return head_computes(model, targets, compute, lambda: model(**inputs)).logits


def _fused_token_stats(
    model: torch.nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor, given: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_nll`'s three ``[B, T-1]`` tensors computed at the output head; ``given``: the labels
    as the batch holds them (CPU labels are range-checked there, with no device synchronisation)."""
    targets, given_targets = shift_labels(labels), shift_labels(given)
    on_host = given.device.type == "cpu" and labels.device.type != "cpu"

    def row_stats(h: torch.Tensor, y: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
        if on_host:
            check_label_range(given_targets, head.weight.shape[0], IGNORE_INDEX)
        w, b = head.weight, head.bias
        nll, hit = fused_linear_token_stats(h, w, y, bias=b, backend=backend_for(h), validate=not on_host)
        return torch.stack([nll, hit.to(nll.dtype)], dim=-1)  # the hits travel as 0/1 beside the NLL

    host = given_targets if given.device.type == "cpu" else None
    stats = stats_at_head(model, inputs, targets, host, row_stats, 0.0)
    mask = targets != IGNORE_INDEX
    return stats[:, :-1, 0], mask[:, :-1], stats[:, :-1, 1].bool()


def collect_answer_stats(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """:func:`answer_stats` over many batches, concatenated per example, in eval mode; ``ValueError``
    for no examples or an example without an answer token (its probability would be undefined)."""
    with eval_mode(model):
        per_batch = [answer_stats(model, batch) for batch in batches]
    if not per_batch:
        raise ValueError("no batches to evaluate: the data set is empty")
    stats = {key: torch.cat([part[key] for part in per_batch]) for key in per_batch[0]}
    empty = (stats["num_tokens"] == 0).nonzero().flatten()
    if empty.numel():  # one sync per evaluation, not per batch
        raise ValueError(
            f"{empty.numel()} example(s) have no answer tokens (every label is -100), e.g. example "
            f"{int(empty[0])}; their answer probability is undefined"
        )
    return stats


def example_stats(
    model: torch.nn.Module, examples: Sequence[fdata.Example], pad_id: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """:func:`collect_answer_stats` of tokenised ``examples`` in batches of ``batch_size``, in their
    order; under several processes the ranks share the examples and every rank gets all of them."""

    def stats(part: list[fdata.Example]) -> dict[str, torch.Tensor]:
        return collect_answer_stats(model, fdata.batches(part, pad_id, batch_size))

    return distributed.map_sharded(stats, examples, model=model)


def basic_metrics(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Mean length-normalised answer probability ``prob``, teacher-forced token ``accuracy`` (pooled
    over the answer tokens) and mean per-token ``nll`` (Maini et al. 2024), in eval mode."""
    return answer_metrics(collect_answer_stats(model, batches))


def answer_metrics(stats: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """:func:`basic_metrics`' numbers from per-example :func:`collect_answer_stats` output."""
    mean_nll = stats["nll_sum"] / stats["num_tokens"]
    return {
        "prob": torch.exp(-mean_nll).mean().item(),
        "accuracy": (stats["correct"].sum() / stats["num_tokens"].sum()).item(),
        "nll": mean_nll.mean().item(),
    }


def answer_probability(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Length-normalised probability ``P̄(a|q) = exp(−nll_sum / num_tokens)`` per example, in fp64."""
    return torch.exp(-stats["nll_sum"].double() / stats["num_tokens"].double())


def normalized_probability(true_prob: torch.Tensor, perturbed_prob: torch.Tensor) -> torch.Tensor:
    """``P̄_true / (P̄_true + Σ_k P̄_pert,k)``: TOFU's multiple-choice probability of the real-authors and
    world-facts sets; ``true_prob`` ``[N]``, ``perturbed_prob`` ``[N, K]``."""
    _check_option_shapes(true_prob, perturbed_prob)
    return true_prob / (true_prob + perturbed_prob.sum(dim=1))


def truth_ratio(true_prob: torch.Tensor, perturbed_prob: torch.Tensor) -> torch.Tensor:
    """Truth ratio ``R = P̄_pert / P̄_true`` per example, ``P̄_pert`` the geometric mean of the K
    perturbed answers' probabilities, in log space: ``R = exp(mean_k log P̄_pert,k − log P̄_true)``.
    ``true_prob`` ``[N]`` (the paraphrased answer on forget / retain), ``perturbed_prob`` ``[N, K]``."""
    _check_option_shapes(true_prob, perturbed_prob)
    return torch.exp(perturbed_prob.log().mean(dim=1) - true_prob.log())


def _check_option_shapes(true_prob: torch.Tensor, perturbed_prob: torch.Tensor) -> None:
    if true_prob.dim() != 1 or perturbed_prob.dim() != 2 or perturbed_prob.shape[0] != true_prob.shape[0]:
        raise ValueError(
            f"expected true [N] and perturbed [N, K] probabilities, got {tuple(true_prob.shape)} "
            f"and {tuple(perturbed_prob.shape)}"
        )
    if perturbed_prob.shape[1] == 0:
        raise ValueError("perturbed probabilities need at least one perturbed answer per item (K ≥ 1)")


def truth_ratio_score(ratios: torch.Tensor) -> float:
    """TOFU's utility component from truth ratios: ``mean max(0, 1 − R)`` (Maini et al. 2024)."""
    return torch.clamp(1 - ratios.double(), min=0).mean().item()
