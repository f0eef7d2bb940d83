"""FILA on a quantised base (QLoRA): the residual as a frozen adapter.

A quantised weight cannot take ``W_res = W − s·B₀A₀`` without being quantised again, so the base stays
``W_q`` and each layer computes ``W_q x + s·B A x − s·B₀ A₀ x``: ``W_q x`` at initialisation and the same
``ΔW`` (and export) as on a full-precision base after training. The frozen term is a forward hook over
two non-persistent buffers (a resumed run recomputes them), computed as ``peft`` computes the trained one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_A, _B = "fila_residual_A", "fila_residual_B"


def _subtract(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    A, B = getattr(module, _A), getattr(module, _B)
    x = args[0].to(A.dtype)
    return output - (F.linear(F.linear(x, A), B) * module._fila_residual_scaling).to(output.dtype)


def attach_residual(layer: nn.Module, A0: Tensor, B0: Tensor, scaling: float) -> None:
    """Make ``layer`` (a LoRA layer on a quantised base) compute ``… − s·B₀A₀ x`` from now on
    (module docstring); ``A0`` / ``B0`` are stored as they are (the adapter's dtype) on its device."""
    if isinstance(getattr(layer, _A, None), torch.Tensor):
        raise ValueError("this layer already carries a FILA residual")
    device = layer.lora_A[next(iter(layer.lora_A))].weight.device
    layer.register_buffer(_A, A0.detach().to(device, copy=True), persistent=False)
    layer.register_buffer(_B, B0.detach().to(device, copy=True), persistent=False)
    layer._fila_residual_scaling = float(scaling)
    layer.register_forward_hook(_subtract)
