"""FILA on a quantised base (4-bit NF4 or 8-bit weights, QLoRA): the residual as a frozen adapter.

FILA replaces each base weight by ``W_res = W − s·B₀A₀`` (:mod:`fastunlearn.fisher.fila`). A quantised
weight cannot take that write without being quantised again (an error of its own, and a rewrite of
storage ``bitsandbytes`` owns). So the base stays as it is, ``W_q``, and ``−s·B₀A₀`` is carried next
to the trained adapter as a frozen one: each layer computes

    y = W_q x + s·B A x − s·B₀ A₀ x

which at initialisation (``B = B₀``, ``A = A₀``) is ``W_q x`` up to the rounding of the two adapter
terms' sum — the model is unchanged — and after training is ``W_q + s·(BA − B₀A₀)``: the same
``ΔW`` as on a full-precision base, so the export is the usual rank-``2r`` adapter
``[B, −B₀]·[A; A₀]`` for the original full-precision model. ``A₀``, ``B₀`` are the factors FILA computed
from the dequantised weight (one layer at a time, :func:`fastunlearn.models.quantization.dequantized_weight`).

The frozen term is a forward hook on the LoRA layer over two non-persistent buffers: it is in no
``state_dict`` and no checkpoint (a resumed run recomputes it, as it recomputes ``W_res``), it moves
with the module, and it is computed exactly as ``peft`` computes the trained term (input cast to the
adapter dtype, ``B(A x)·s``, cast to the output dtype), so the two cancel at initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attach_residual", "has_residual"]

_A, _B = "fila_residual_A", "fila_residual_B"


def _subtract(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    A, B = getattr(module, _A), getattr(module, _B)
    x = args[0].to(A.dtype)
    return output - (F.linear(F.linear(x, A), B) * module._fila_residual_scaling).to(output.dtype)


def attach_residual(layer: nn.Module, A0: Tensor, B0: Tensor, scaling: float) -> None:
    """Make ``layer`` (a LoRA layer on a quantised base) compute ``… − s·B₀A₀ x`` from now on
    (module docstring); ``A0`` / ``B0`` are stored as they are (the adapter's dtype) on its device."""
    if has_residual(layer):
        raise ValueError("this layer already carries a FILA residual")
    device = layer.lora_A[next(iter(layer.lora_A))].weight.device
    layer.register_buffer(_A, A0.detach().to(device, copy=True), persistent=False)
    layer.register_buffer(_B, B0.detach().to(device, copy=True), persistent=False)
    layer._fila_residual_scaling = float(scaling)
    layer.register_forward_hook(_subtract)


def has_residual(layer: nn.Module) -> bool:
    """Whether :func:`attach_residual` has been applied to ``layer``."""
    return isinstance(getattr(layer, _A, None), torch.Tensor)
