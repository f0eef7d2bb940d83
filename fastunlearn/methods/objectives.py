"""Unlearning objectives on a paired forget/retain batch (SPEC §2).

With ``NLL(D)`` the token-mean negative log-likelihood of the supervised (non ``-100``) shifted target
tokens of batch ``D`` (logits at ``t`` predict the token at ``t + 1``):

- ``ihl``: ``IHL(forget) + NLL(retain)`` — the paper's objective (Cha et al. 2025, Eq. 4), both
  weights 1, no KL term; ``IHL`` is the token mean of ``1 + p_y − max_{v≠y} p_v`` over the batch.
- ``ga``:  ``−NLL(forget)`` — gradient ascent (Jang et al. 2023).
- ``gd``:  ``−NLL(forget) + NLL(retain)`` — gradient difference.
- ``npo``: ``(2/β)·mean_i softplus(β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i))) + NLL(retain)`` — NPO
  (Zhang et al. 2024): ``softplus(β·Δ) = log(1 + (π_θ/π_ref)^β)``, with ``log π(y|x)`` the summed
  log-probability of the supervised tokens of sequence ``i``.

Every term is computed by the model itself, patched with :func:`fastunlearn.patch`:
``model(input_ids=..., attention_mask=..., labels=..., loss_type=t).loss`` for ``t`` in ``"ihl"``,
``"nll"``, ``"seq_logprob"``. The patched forward computes the loss from the last hidden states and
the output head without the ``[B, T, V]`` logits where the architecture allows it (the fused path),
and from the model's real logits otherwise or with ``patch(model, fused=False)`` (the logits path, the
tested oracle); either way inside the model's own call, so wrappers' hooks and autocast apply.

The NPO reference is the model *before unlearning*. Its sequence log-probabilities do not change
during training, so they are computed once, before the first step (:func:`sequence_logprobs`), and
travel with the batch as ``forget["ref_logp"]``. That needs no second copy of the model, and it is the
right reference for every initialisation: for FILA the base with adapters disabled is the *residual*
``W − s·B₀A₀``, not the model before unlearning, so ``disable_adapter()`` would be the wrong reference.
The reference is computed by the same patched call as the policy term (in eval mode, without
gradients), so at the first step the log-ratio is exactly the change the adapters have made — zero for
LoRA and FILA, whose initial adapters leave the function unchanged — rather than the rounding
difference between two ways of computing the same number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.models.devices import eval_mode, model_device
from fastunlearn.models.patching import LossType, is_patched
from fastunlearn.ops.nll import shifted_nll

METHODS = ("ihl", "ga", "gd", "npo")
NEEDS_RETAIN = frozenset({"ihl", "gd", "npo"})

__all__ = ["METHODS", "NEEDS_RETAIN", "method_loss", "nll_mean", "npo_loss", "sequence_logprobs"]


def _require_patched(model: nn.Module) -> None:
    if not is_patched(model):
        raise ValueError(
            "the unlearning losses are computed by the patched model: call fastunlearn.patch(model) first "
            "(fused=False for the logits path)"
        )


def _loss(model: nn.Module, part: Mapping[str, Tensor], loss_type: LossType) -> Tensor:
    """The ``loss_type`` term of one batch, computed by the patched model's own forward."""
    return model(
        input_ids=part["input_ids"],
        attention_mask=part["attention_mask"],
        labels=part["labels"],
        loss_type=loss_type,
    ).loss


def nll_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean NLL of the shifted, non-ignored targets of a batch, from logits (fp32 at least; SPEC
    §2): the retain term's value for code that holds logits (the demo's pre-training)."""
    return shifted_nll(logits, labels, "mean")


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """``(2/β)·mean softplus(β·(logp − ref_logp))`` (NPO, Zhang et al. 2024, Eq. 3)."""
    return (2.0 / beta) * F.softplus(beta * (logp - ref_logp)).mean()


def sequence_logprobs(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> Tensor:
    """``log π(y_i|x_i) = Σ_t log p(y_{i,t+1} | y_{i,≤t})`` of every example of ``batches`` (fp32, on
    CPU), from the patched model's ``"seq_logprob"`` term in eval mode without gradients: NPO's
    reference, computed exactly as :func:`method_loss` computes the policy term."""
    _require_patched(model)
    device = model_device(model)
    parts = []
    with eval_mode(model):
        for batch in batches:
            part = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
            parts.append(_loss(model, part, "seq_logprob").float())
    if not parts:
        raise ValueError("no batches to compute the reference log-probabilities of: the data set is empty")
    return torch.cat(parts).cpu()


def method_loss(
    model: nn.Module,
    batch: Mapping[str, Mapping[str, Tensor]],
    method: str,
    *,
    npo_beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective of ``method`` on ``{"forget": ..., "retain": ...}`` and its detached parts.

    ``model`` is patched (:func:`fastunlearn.patch`; wrappers such as ``Trainer``'s are fine). Each part
    is a batch of ``input_ids``, ``attention_mask``, ``labels``; NPO's forget part also carries
    ``ref_logp`` ``[B]``. Returns ``(loss, {"forget_loss": ..., "retain_loss": ...})``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if method in NEEDS_RETAIN and "retain" not in batch:
        raise ValueError(f"method {method!r} needs a retain set")
    forget = batch["forget"]
    if method == "npo" and "ref_logp" not in forget:
        raise ValueError("method 'npo' needs the reference log-probabilities forget['ref_logp']")
    _require_patched(model)
    if method == "ihl":
        forget_loss = _loss(model, forget, "ihl")
    elif method == "npo":
        forget_loss = npo_loss(_loss(model, forget, "seq_logprob"), forget["ref_logp"], npo_beta)
    else:
        forget_loss = -_loss(model, forget, "nll")
    parts = {"forget_loss": forget_loss.detach()}
    loss = forget_loss
    if method in NEEDS_RETAIN:
        retain_loss = _loss(model, batch["retain"], "nll")
        parts["retain_loss"] = retain_loss.detach()
        loss = loss + retain_loss
    return loss, parts
