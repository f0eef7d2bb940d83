"""FILA: Fisher-initialised LoRA (Cha et al., ICLR 2025, §3.2; SPEC §3.2).

Given diagonal Fisher estimates ``F_f`` on the forget set and ``F_r`` on the retain set (each already
normalised by its own count), every LoRA-wrapped linear layer ``W ∈ R^{out×in}`` of rank ``r`` and
scaling ``s`` is initialised as follows (all in fp32, one layer at a time)::

    R    = F_f / (F_r + ε)                  relative importance of each weight for the forget set
    d_i  = sqrt(Σ_j R_ij)                   one weight per output row
    U S Vᵀ = rank-r truncated SVD of diag(d)·W
    A₀   = (V·sqrt(S/s))ᵀ                   r × in
    B₀   = diag(1/(d + ε))·U·sqrt(S/s)      out × r
    W_res = W − s·B₀A₀                      replaces the base weight

Why: the row-weighted approximation problem ``min_{rank M ≤ r} ‖diag(d)(W − M)‖_F`` is solved exactly by
``M* = D⁻¹[DW]_r`` (substitute ``N = DM``: Eckart–Young on ``DW``), and ``s·B₀A₀ = D_ε⁻¹ U_r S_r V_rᵀ``
is that optimum (up to ``d/(d+ε)``). The adapters start on the part of ``W`` that matters most to the
forget set relative to the retain set, while ``W_res + s·B₀A₀ = W`` keeps the model's function
unchanged at initialisation. Rows with ``d_i = 0`` carry no weight in the problem; their rows of
``U`` vanish in exact arithmetic, and ``B₀`` gets exact zeros there (rounding noise divided by ``ε``
would otherwise become large junk entries).

The trained model is exported by :mod:`fastunlearn.fisher.export`, as an adapter for the *original* base
model (rank ``2r``: ``[B, −B₀]·[A; A₀]``) or as a merged checkpoint.

Recording and resuming. :func:`fila_init` stores ``A₀``, ``B₀`` (fp32, on the CPU, exactly the values
written into the adapters) and ``s`` on each LoRA layer, outside the ``state_dict``. The
initialisation is a deterministic function of the base weights, the Fisher estimates and the
arguments: the exact SVD's ``U_r S_r V_rᵀ`` is unique (whenever ``σ_r > σ_{r+1}``), so ``W_res`` is
reproduced to rounding even where LAPACK/cuSOLVER choose other singular-vector signs, and the
randomised solver draws its test matrix from a fixed seed. A trainer resumes by loading the original
base, wrapping it with the same LoRA config, calling :func:`fila_init` with the saved estimates and
arguments, then loading its own rank-``r`` checkpoint of ``lora_A``/``lora_B`` (e.g. with
``peft.set_peft_model_state_dict``) over ``A₀``, ``B₀`` — not the rank-``2r`` export, which is for the
original base model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fastunlearn.modeling import canonical_name

Solver = Literal["svd", "randomized"]
SOLVERS = ("svd", "randomized")
_RECORD_ATTR = "_fastunlearn_fila"

__all__ = ["SOLVERS", "FilaInit", "Solver", "fila_factors", "fila_init", "fila_record", "lora_layers"]


@dataclass(frozen=True)
class FilaInit:
    """What :func:`fila_init` wrote into one LoRA layer: the initial factors and the scaling."""

    A0: Tensor  # [r, in], fp32, CPU
    B0: Tensor  # [out, r], fp32, CPU
    scaling: float


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[str, nn.Module]]:
    """LoRA layers of a ``peft`` model holding ``adapter_name``: canonical name → (full name, layer)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for full_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            found[canonical_name(full_name)] = (full_name, module)
    return found


def _require_lora_model(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, nn.Module]]:
    layers = lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers with adapter {adapter_name!r}: wrap the model with "
            "peft.get_peft_model(model, LoraConfig(...)) first"
        )
    return layers


def _check_layer(name: str, layer: nn.Module, adapter_name: str) -> None:
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise ValueError(
            f"LoRA layer {name!r} wraps a {type(base).__name__}; FILA handles nn.Linear layers only"
        )
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(
            f"LoRA layer {name!r} uses fan_in_fan_out (Conv1D weights), which FILA does not handle"
        )
    if adapter_name in getattr(layer, "lora_variant", {}):
        raise ValueError(f"LoRA layer {name!r} uses a LoRA variant (e.g. DoRA); FILA needs plain LoRA")
    if getattr(layer, "lora_bias", {}).get(adapter_name, False):
        raise ValueError(f"LoRA layer {name!r} has a LoRA bias (lora_bias=True), which FILA does not handle")


def _fisher_table(estimate: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    if not isinstance(estimate, Mapping):
        raise TypeError(f"{what} must be a FisherEstimate or a mapping of layer name to tensor")
    table: dict[str, Tensor] = {}
    for name, tensor in estimate.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{what}[{name!r}] must be a floating-point tensor")
        key = canonical_name(name)
        if key in table:
            raise ValueError(f"{what} has two entries for layer {key!r}")
        table[key] = tensor
    return table


def _seeded_svd_lowrank(matrix: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.svd_lowrank(q=rank)`` (the paper's solver) with its random test matrix drawn from
    ``seed``, leaving the caller's random state untouched."""
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(matrix.device):
                torch.cuda.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=rank)


def fila_factors(
    weight: Tensor,
    forget: Tensor,
    retain: Tensor,
    rank: int,
    scaling: float,
    *,
    eps: float = 1e-5,
    solver: Solver = "svd",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """FILA's initial factors ``(A₀ [r, in], B₀ [out, r])`` for one weight (module docstring), in fp32.

    ``s·B₀A₀`` is the rank-``r`` minimiser of ``‖diag(d)(W − M)‖_F`` with ``d_i = sqrt(Σ_j R_ij)``,
    ``R = F_f/(F_r + ε)``, up to the factor ``d/(d+ε)`` per row.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got {tuple(weight.shape)}")
    if forget.shape != weight.shape or retain.shape != weight.shape:
        raise ValueError(
            f"Fisher shapes {tuple(forget.shape)} (forget) and {tuple(retain.shape)} (retain) must match the "
            f"weight {tuple(weight.shape)}"
        )
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"LoRA rank {rank} must lie in [1, min(out, in) = {min(weight.shape)}]")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    W = weight.detach().float()
    relative = forget.to(W.device, torch.float32) / (retain.to(W.device, torch.float32) + eps)
    d = relative.sum(dim=1).sqrt()
    weighted = d[:, None] * W
    if solver == "svd":
        U, S, Vh = torch.linalg.svd(weighted, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].t()
    else:
        U, S, V = _seeded_svd_lowrank(weighted, rank, seed)
    root = (S / scaling).sqrt()
    A = (V * root).t().contiguous()
    inv_d = torch.where(d > 0, 1.0 / (d + eps), torch.zeros_like(d))
    B = (inv_d[:, None] * (U * root)).contiguous()
    return A, B


def fila_init(
    model: nn.Module,
    forget: Mapping[str, Tensor],
    retain: Mapping[str, Tensor],
    *,
    eps: float = 1e-5,
    solver: Solver = "svd",
    adapter_name: str = "default",
    seed: int = 0,
) -> nn.Module:
    """Initialise every LoRA layer of a ``peft`` model with FILA (SPEC §3.2), in place; returns ``model``.

    Args:
        model: a ``peft`` model whose adapter ``adapter_name`` is plain LoRA on ``nn.Linear`` layers.
        forget, retain: Fisher estimates (:class:`~fastunlearn.fisher.FisherEstimate` or name → tensor
            mappings) on the forget and retain sets; names taken on the plain or on the wrapped model
            both match. Each must cover every LoRA layer with a tensor shaped like its weight.
        eps: ``ε`` of the relative Fisher ``F_f/(F_r + ε)`` and of ``1/(d + ε)`` (the reference's 1e-5).
        solver: ``"svd"`` (exact truncated SVD, ``torch.linalg.svd``) or ``"randomized"``
            (``torch.svd_lowrank`` with ``q = r``, the paper's, seeded by ``seed``).

    Each layer's base weight becomes ``W_res = W − s·B₀A₀``, computed with the adapter values as stored
    (after rounding to the adapter dtype), so the model computes the same function afterwards up to the
    rounding of ``W_res`` to the base dtype. One layer is processed at a time in fp32: the extra memory
    is one layer's fp32 weight and its SVD. ``A₀``, ``B₀`` and ``s`` are recorded for
    :func:`save_adapter` (see the module docstring for resuming).

    Raises:
        ValueError: no LoRA layers, Fisher estimates missing a layer or shaped differently, rank larger
            than ``min(out, in)``, non-finite or negative Fisher values, a layer already initialised.
    """
    if not (isinstance(eps, float | int) and eps > 0 and torch.isfinite(torch.tensor(float(eps)))):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    layers = _require_lora_model(model, adapter_name)
    tables = {"forget": _fisher_table(forget, "forget"), "retain": _fisher_table(retain, "retain")}
    for what, table in tables.items():
        missing = sorted(set(layers) - set(table))
        if missing:
            raise ValueError(
                f"the {what} Fisher estimate has no entry for {len(missing)} LoRA layer(s): {missing[:8]}; "
                f"it covers {sorted(table)[:8]}{' ...' if len(table) > 8 else ''}"
            )
    for name, (_, layer) in layers.items():
        _check_layer(name, layer, adapter_name)
        if adapter_name in getattr(layer, _RECORD_ATTR, {}):
            raise ValueError(f"LoRA layer {name!r} is already FILA-initialised for adapter {adapter_name!r}")
        weight = layer.get_base_layer().weight
        rank = layer.r[adapter_name]
        if rank > min(weight.shape):
            raise ValueError(
                f"LoRA rank {rank} of layer {name!r} exceeds min(out, in) = {min(weight.shape)} of its "
                f"weight {tuple(weight.shape)}"
            )
        for what, table in tables.items():
            fisher = table[name]
            if tuple(fisher.shape) != tuple(weight.shape):
                raise ValueError(
                    f"the {what} Fisher of layer {name!r} has shape {tuple(fisher.shape)}, the weight "
                    f"{tuple(weight.shape)}"
                )
            # Checked for every layer before any is modified, so a bad estimate leaves the model intact.
            if not bool(torch.isfinite(fisher).all()):
                raise ValueError(f"the {what} Fisher of layer {name!r} has non-finite values (inf or nan)")
            if bool((fisher < 0).any()):
                raise ValueError(f"the {what} Fisher of layer {name!r} has negative values")
    for name, (_, layer) in layers.items():
        with torch.no_grad():
            _init_layer(
                name, layer, tables["forget"][name], tables["retain"][name], eps, solver, seed, adapter_name
            )
    return model


def _init_layer(
    name: str,
    layer: nn.Module,
    forget: Tensor,
    retain: Tensor,
    eps: float,
    solver: str,
    seed: int,
    adapter: str,
) -> None:
    base = layer.get_base_layer()
    scaling = float(layer.scaling[adapter])
    W = base.weight.float()
    A, B = fila_factors(W, forget, retain, layer.r[adapter], scaling, eps=eps, solver=solver, seed=seed)
    if not bool(A.abs().sum() > 0):
        warnings.warn(
            f"layer {name!r}: the relative Fisher is zero in every row, so FILA initialises its adapter to "
            "zero (A = B = 0), which receives no gradient",
            stacklevel=3,
        )
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    # The residual uses the factors as they will be stored (rounded to the adapter dtype), so that
    # W_res + s·B₀A₀ = W holds for what the model computes.
    A0, B0 = A.to(lora_A.dtype).float(), B.to(lora_B.dtype).float()
    residual = W - scaling * (B0 @ A0)
    if not bool(torch.isfinite(residual).all()):
        raise ValueError(f"layer {name!r}: FILA produced non-finite values (check the weights and Fisher)")
    lora_A.copy_(A0)
    lora_B.copy_(B0)
    base.weight.copy_(residual)
    records = getattr(layer, _RECORD_ATTR, None)
    if records is None:
        records = {}
        setattr(layer, _RECORD_ATTR, records)
    # Copies, not views: training updates the adapter parameters in place.
    records[adapter] = FilaInit(A0=A0.to("cpu", copy=True), B0=B0.to("cpu", copy=True), scaling=scaling)


def fila_record(layer: nn.Module, adapter_name: str = "default") -> FilaInit | None:
    """The :class:`FilaInit` stored on a LoRA layer by :func:`fila_init`, or ``None``."""
    return getattr(layer, _RECORD_ATTR, {}).get(adapter_name)
