"""FILA: Fisher-initialised LoRA (Cha et al. 2025, arXiv 2408.06621, §3.2).

From diagonal Fisher estimates ``F_f`` (forget) and ``F_r`` (retain), each LoRA layer ``W ∈ R^{out×in}``
of rank ``r`` and scaling ``s`` is initialised in fp32, one layer at a time::

    d_i  = sqrt(Σ_j F_f,ij / (F_r,ij + ε))      row weights
    U S Vᵀ = rank-r truncated SVD of diag(d)·W
    A₀   = (V·sqrt(S/s))ᵀ,    B₀ = diag(1/(d + ε))·U·sqrt(S/s),    W_res = W − s·B₀A₀

``M* = D⁻¹[DW]_r`` minimises ``‖diag(d)(W − M)‖_F`` over rank-``r`` ``M`` (Eckart–Young on ``N = DM``)
and ``s·B₀A₀`` is ``M*`` up to ``d/(d+ε)``: the adapters start on the part of ``W`` that matters most to
the forget set relative to the retain set, and ``W_res + s·B₀A₀ = W`` keeps the model's function. Rows
with ``d_i = 0`` get exact zeros in ``B₀``. A quantised base is not rewritten: ``−s·B₀A₀`` becomes a
frozen adapter (:func:`attach_residual`). ``A₀``, ``B₀``, ``s`` are recorded on each layer
for the export; the result is deterministic (seeded solvers), so a run resumes by calling
:func:`fila_init` again on the original base and loading its trained factors over them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.engines import distributed
from fastunlearn.engines.distributed import gathered, linear_shape
from fastunlearn.fisher.estimate import layer_table
from fastunlearn.fisher.row_weights import check_eps, row_weight
from fastunlearn.fisher.solver import truncated_svd
from fastunlearn.models.loading import dequantized_weight, is_quantized
from fastunlearn.models.naming import canonical_name

Solver = Literal["truncated", "svd", "randomized"]
SOLVERS = ("truncated", "svd", "randomized")
_RECORD_ATTR = "_fastunlearn_fila"
_A, _B = "fila_residual_A", "fila_residual_B"


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


def _check_layer(
    name: str, layer: nn.Module, adapter_name: str, tables: Mapping[str, Mapping[str, Tensor]]
) -> None:
    """Errors for a LoRA layer FILA cannot initialise, or whose Fisher values (``tables``: what → name →
    estimate or row weights) do not fit it; run on every layer before any is modified."""
    base = layer.get_base_layer()
    variant, bias, done = (getattr(layer, a, {}) for a in ("lora_variant", "lora_bias", _RECORD_ATTR))
    unsupported = {
        f"wraps a {type(base).__name__}; FILA handles nn.Linear layers only": not isinstance(base, nn.Linear),
        "uses fan_in_fan_out (Conv1D weights); FILA does not handle it": getattr(layer, "fan_in_fan_out", 0),
        "uses a LoRA variant (e.g. DoRA); FILA needs plain LoRA": adapter_name in variant,
        "has a LoRA bias (lora_bias=True), which FILA does not handle": bias.get(adapter_name, False),
        f"is already FILA-initialised for adapter {adapter_name!r}": adapter_name in done,
    }
    for problem, bad in unsupported.items():
        if bad:
            raise ValueError(f"LoRA layer {name!r} {problem}")
    weight_shape = linear_shape(base)  # not weight.shape: empty under ZeRO-3
    rank = layer.r[adapter_name]
    if rank > min(weight_shape):
        raise ValueError(
            f"LoRA rank {rank} of layer {name!r} exceeds min(out, in) = {min(weight_shape)} of its weight "
            f"{weight_shape}"
        )
    for what, table in tables.items():
        value = table[name]
        shape = (weight_shape[0],) if what == "row weights" else weight_shape
        if tuple(value.shape) != shape:
            raise ValueError(
                f"the {what} of layer {name!r} has shape {tuple(value.shape)}, expected {shape} for its "
                f"weight {weight_shape}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the {what} of layer {name!r} has non-finite values (inf or nan)")
        if bool((value < 0).any()):
            raise ValueError(f"the {what} of layer {name!r} has negative values")


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
    solver: Solver = "truncated",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """FILA's initial factors ``(A₀ [r, in], B₀ [out, r])`` for one weight from its two Fisher estimates
    (module docstring), in fp32; ``solver`` and ``seed`` as in :func:`fila_init`."""
    if weight.dim() != 2 or forget.shape != weight.shape or retain.shape != weight.shape:
        raise ValueError(
            f"Fisher shapes {tuple(forget.shape)} (forget) and {tuple(retain.shape)} (retain) must match the "
            f"2-D weight {tuple(weight.shape)}"
        )
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"LoRA rank {rank} must lie in [1, min(out, in) = {min(weight.shape)}]")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    d = row_weight(forget.to(weight.device), retain.to(weight.device), eps)
    return _factors(weight, d, rank, scaling, eps, solver, seed)


def _factors(
    weight: Tensor, row_weights: Tensor, rank: int, scaling: float, eps: float, solver: str, seed: int
) -> tuple[Tensor, Tensor]:
    """:func:`fila_factors` from the row weights ``d`` ``[out]`` of ``weight`` ``[out, in]`` (the
    callers check the shapes, rank and solver)."""
    W = weight.detach().float()
    d = row_weights.to(W.device, torch.float32)
    weighted = d[:, None] * W
    if solver == "truncated":
        U, S, V = truncated_svd(weighted, rank, seed=seed)
    elif solver == "svd":
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
    forget: Mapping[str, Tensor] | None = None,
    retain: Mapping[str, Tensor] | None = None,
    *,
    row_weights: Mapping[str, Tensor] | None = None,
    eps: float | None = None,
    solver: Solver = "truncated",
    adapter_name: str = "default",
    seed: int = 0,
) -> nn.Module:
    """Initialise every LoRA layer of a ``peft`` model with FILA (module docstring), in place; returns it.

    ``forget``/``retain``: Fisher estimates (or name → tensor mappings) covering every LoRA layer, or
    instead ``row_weights`` (:class:`~fastunlearn.fisher.FilaRowWeights` or name → ``[out]`` tensors).
    ``eps``: the ``ε`` of ``F_f/(F_r + ε)`` and ``1/(d + ε)``, by default the row weights' own (another is
    refused), else 1e-5. ``solver``: ``"truncated"`` (exact truncated SVD, :mod:`~.solver`), ``"svd"``
    (``torch.linalg.svd``, the oracle) or ``"randomized"`` (``torch.svd_lowrank`` with ``q = r``, the
    paper's), seeded by ``seed``. Every layer is checked before any is modified; ``W_res`` is formed with
    the factors as stored in the adapter dtype, so the function changes only by the rounding of ``W_res``.
    """
    if row_weights is None and (forget is None or retain is None):
        raise ValueError("fila_init needs the forget and retain Fisher estimates, or row_weights=")
    if row_weights is not None and (forget is not None or retain is not None):
        raise ValueError("pass either the forget and retain Fisher estimates or row_weights=, not both")
    own_eps = getattr(row_weights, "eps", None)
    eps = check_eps(eps if eps is not None else own_eps if own_eps is not None else 1e-5)
    if own_eps is not None and eps != own_eps:
        raise ValueError(f"the row weights were computed with eps={own_eps}; fila_init got eps={eps}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    layers = _require_lora_model(model, adapter_name)
    if row_weights is not None:
        tables = {"row weights": layer_table(row_weights, "row_weights", 1)}
    else:
        tables = {
            "forget Fisher": layer_table(forget, "forget", 2),
            "retain Fisher": layer_table(retain, "retain", 2),
        }
    for what, table in tables.items():
        missing = sorted(set(layers) - set(table))
        if missing:
            raise ValueError(
                f"the {what} has no entry for {len(missing)} LoRA layer(s): {missing[:8]}; "
                f"it covers {sorted(table)[:8]}{' ...' if len(table) > 8 else ''}"
            )
    for name, (_, layer) in layers.items():
        _check_layer(name, layer, adapter_name, tables)
    for name, (_, layer) in layers.items():
        weights = [
            layer.get_base_layer().weight,
            layer.lora_A[adapter_name].weight,
            layer.lora_B[adapter_name].weight,
        ]
        # Under ZeRO-3 the three are whole only inside the gather, one layer at a time; rank 0's writes
        # are what DeepSpeed partitions back. A no-op otherwise.
        with torch.no_grad(), gathered(weights, modifier_rank=0):
            values = [table[name].to(weights[0].device) for table in tables.values()]
            d = values[0] if row_weights is not None else row_weight(*values, eps)
            _init_layer(name, layer, d, eps, solver, seed, adapter_name)
    return model


def _init_layer(
    name: str, layer: nn.Module, d: Tensor, eps: float, solver: str, seed: int, adapter: str
) -> None:
    base = layer.get_base_layer()
    scaling = float(layer.scaling[adapter])
    quantised = is_quantized(base)
    W = dequantized_weight(base) if quantised else base.weight.float()
    A, B = _factors(W, d, layer.r[adapter], scaling, eps, solver, seed)
    # Every rank computes the same factors from the same W and d; rank 0's are sent to all anyway, so the
    # records (and any adapter exported from any rank) are the same bits everywhere, whatever the
    # solver's reduction order on each device.
    distributed.broadcast(A)
    distributed.broadcast(B)
    if not bool(A.abs().sum() > 0):
        warnings.warn(
            f"layer {name!r}: the relative Fisher is zero in every row, so FILA initialises its adapter to "
            "zero (A = B = 0), which receives no gradient",
            stacklevel=3,
        )
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    A0, B0 = A.to(lora_A.dtype).float(), B.to(lora_B.dtype).float()  # as stored: W_res + s·B₀A₀ = W
    residual = W - scaling * (B0 @ A0)
    if not bool(torch.isfinite(residual).all()):
        raise ValueError(f"layer {name!r}: FILA produced non-finite values (check the weights and Fisher)")
    lora_A.copy_(A0)
    lora_B.copy_(B0)
    if quantised:  # the base stays W_q; −s·B₀A₀ rides along, frozen (attach_residual)
        attach_residual(layer, lora_A.detach(), lora_B.detach(), scaling)
    else:
        base.weight.copy_(residual)
    # Copies, not views: training updates the adapter parameters in place.
    layer.__dict__.setdefault(_RECORD_ATTR, {})[adapter] = FilaInit(
        A0=A0.to("cpu", copy=True), B0=B0.to("cpu", copy=True), scaling=scaling
    )


def _subtract(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    A, B = getattr(module, _A), getattr(module, _B)
    x = args[0].to(A.dtype)
    return output - (F.linear(F.linear(x, A), B) * module._fila_residual_scaling).to(output.dtype)


def attach_residual(layer: nn.Module, A0: Tensor, B0: Tensor, scaling: float) -> None:
    """Make ``layer`` (a LoRA layer on a quantised base) compute ``W_q x + s·B A x − s·B₀ A₀ x``: a
    quantised weight cannot take ``W_res`` without being quantised again, and this is ``W_q x`` at
    initialisation and the same ``ΔW`` (and export) as on a full-precision base after training. The
    frozen term is a forward hook over two non-persistent buffers (a resumed run recomputes them),
    ``A0`` / ``B0`` as they are (the adapter's dtype) on its device, computed as ``peft`` computes the
    trained one."""
    if isinstance(getattr(layer, _A, None), torch.Tensor):
        raise ValueError("this layer already carries a FILA residual")
    device = layer.lora_A[next(iter(layer.lora_A))].weight.device
    layer.register_buffer(_A, A0.detach().to(device, copy=True), persistent=False)
    layer.register_buffer(_B, B0.detach().to(device, copy=True), persistent=False)
    layer._fila_residual_scaling = float(scaling)
    layer.register_forward_hook(_subtract)


def fila_record(layer: nn.Module, adapter_name: str = "default") -> FilaInit | None:
    """The :class:`FilaInit` stored on a LoRA layer by :func:`fila_init`, or ``None``."""
    return getattr(layer, _RECORD_ATTR, {}).get(adapter_name)
