"""The unlearning losses on per-sequence scalars, and RMU's on hidden states (plain PyTorch).

Per sequence ``x`` of a batch, ``S_θ(x) = Σ_t log π_θ(y_t | y_<t)`` over its target tokens and ``n(x)``
their count (:func:`fastunlearn.sequence_logprobs`); ``S_ref`` is the reference model's (the model
before unlearning). With ``σ`` the logistic function and means over the sequences of the batch:

- NPO (Zhang et al. 2024, arXiv 2404.05868): ``−(2/β)·mean log σ(−β·(S_θ − S_ref))``, which is
  ``(2/β)·log(1 + (π_θ/π_ref)^β)``; β = 0.1.
- SimNPO (Fan et al. 2024, arXiv 2410.07163), no reference: ``−(2/β)·mean log σ(β·(N̄_θ − δ))`` with the
  length-normalised NLL ``N̄_θ = −S_θ/n``; β = 4.5, δ = 0.
- DPO (Rafailov et al. 2023, arXiv 2305.18290) with a refusal as the preferred answer and the true
  answer as the dispreferred one: ``−(2/β)·mean log σ(β·Δ)``,
  ``Δ = (S_θ(chosen) − S_ref(chosen)) − (S_θ(rejected) − S_ref(rejected))``; β = 0.1.
- RMU (Li et al. 2024, arXiv 2403.03218): ``mean_x [Σ_{t target} mean_d (h_t − g_t)² / n(x)]`` between a
  layer's activations ``h`` and a target ``g``: a fixed scaled random direction on the forget set, the
  reference model's activations on the retain set.

All in fp32 (fp64 for fp64 inputs) with ``logsigmoid`` (no ``log(1 + exp)`` overflow); the reference
quantities are constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastunlearn.ops._backend import compute_dtype


def _compute(t: Tensor) -> Tensor:
    return t.to(compute_dtype(t))


def _check_sequences(name: str, args: dict[str, Tensor], beta: float, counts: tuple[str, ...] = ()) -> None:
    """One-line errors unless every argument is a 1-D tensor of one shape (floats, or for the names in
    ``counts`` integer or float counts) and ``beta`` is positive."""
    for arg, t in args.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(
                f"{name}: {arg} must be 1-D (one value per sequence), got shape {tuple(t.shape)}"
            )
        integer = arg in counts and not t.is_complex() and t.dtype != torch.bool
        if not (t.is_floating_point() or integer):
            raise TypeError(f"{name}: {arg} must be a floating-point tensor, got {t.dtype}")
    shapes = {arg: tuple(t.shape) for arg, t in args.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{name}: the per-sequence tensors must have one shape, got {shapes}")
    if not beta > 0:
        raise ValueError(f"{name}: beta must be positive, got {beta}")


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float = 0.1) -> Tensor:
    """NPO: ``−(2/β)·mean log σ(−β·(logp − ref_logp))`` of ``[B]`` per-sequence log-probabilities
    ``S_θ``, ``S_ref`` (a constant). Returns an fp32 scalar (fp64 for fp64 ``logp``)."""
    _check_sequences("npo_loss", {"logp": logp, "ref_logp": ref_logp}, beta)
    ratio = _compute(logp) - _compute(ref_logp.detach())
    return -(2 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo_loss(logp: Tensor, n_tokens: Tensor, beta: float = 4.5, delta: float = 0.0) -> Tensor:
    """SimNPO: ``−(2/β)·mean log σ(β·(N̄ − δ))``, ``N̄ = −logp/n_tokens`` the NLL per target token, of
    ``[B]`` log-probabilities and target counts (a sequence without targets counts one, so ``N̄ = 0``).
    Returns an fp32 scalar (fp64 for fp64 ``logp``)."""
    _check_sequences("simnpo_loss", {"logp": logp, "n_tokens": n_tokens}, beta, ("n_tokens",))
    logp = _compute(logp)
    mean_nll = -logp / n_tokens.to(logp.dtype).clamp_min(1)
    return -(2 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


def dpo_loss(
    chosen_logp: Tensor,
    ref_chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """DPO: ``−(2/β)·mean log σ(β·Δ)``, ``Δ = (chosen_logp − ref_chosen_logp) − (rejected_logp −
    ref_rejected_logp)``, all ``[B]`` per-sequence log-probabilities (the reference ones constants).
    Returns an fp32 scalar (fp64 for fp64 inputs)."""
    args = {
        "chosen_logp": chosen_logp, "ref_chosen_logp": ref_chosen_logp,
        "rejected_logp": rejected_logp, "ref_rejected_logp": ref_rejected_logp,
    }  # fmt: skip
    _check_sequences("dpo_loss", args, beta)
    chosen = _compute(chosen_logp) - _compute(ref_chosen_logp.detach())
    rejected = _compute(rejected_logp) - _compute(ref_rejected_logp.detach())
    return -(2 / beta) * F.logsigmoid(beta * (chosen - rejected)).mean()


def rmu_loss(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """RMU's activation loss ``mean_x [Σ_{t target} mean_d (h_t − g_t)² / n(x)]`` of ``hidden`` ``[b, L, d]``
    (a decoder layer's output) against ``target`` broadcasting to it (the forget term's scaled random
    ``[d]`` direction, or the reference's activations, a constant), over the ``[b, L]`` bool or 0/1
    ``mask`` of target positions (a sequence without any contributes 0). Returns an fp32 scalar (fp64
    for fp64 ``hidden``)."""
    if not isinstance(hidden, Tensor) or not isinstance(target, Tensor) or not isinstance(mask, Tensor):
        raise TypeError("rmu_loss expects tensors for `hidden`, `target` and `mask`")
    if hidden.dim() != 3 or not hidden.is_floating_point() or not target.is_floating_point():
        raise TypeError(f"rmu_loss: hidden must be a [b, L, d] float tensor and target float, got "
                        f"{tuple(hidden.shape)} {hidden.dtype} and {target.dtype}")  # fmt: skip
    broadcasts = target.dim() <= 3 and all(
        t in (1, h) for t, h in zip(reversed(target.shape), reversed(hidden.shape))
    )
    if not broadcasts:
        raise ValueError(
            f"rmu_loss: target {tuple(target.shape)} does not broadcast to hidden {tuple(hidden.shape)}"
        )
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"rmu_loss: mask must be [b, L] = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}"
        )
    keep, h = mask != 0, _compute(hidden)
    per_token = (h - target.detach().to(h.dtype)).square().mean(-1)
    per_sequence = torch.where(keep, per_token, 0.0).sum(-1) / keep.sum(-1).clamp_min(1)
    return per_sequence.mean()
