"""What every operator shares: the ``backend=`` argument, the dtypes its results take, its scratch memory.

``"auto"`` sends CUDA tensors to Triton and everything else to the chunked PyTorch path. ``"triton"`` on
CPU tensors runs the kernels under the Triton interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before ``triton`` is first imported.

A tracker that is a ``TorchDispatchMode`` (PyTorch's ``MemTracker``, a memory plan under
``FakeTensorMode``) sees an operator's inputs and outputs, never what it allocates and frees inside.
So an operator takes all its scratch memory as one byte buffer carved into typed views
(:class:`Workspace`) and returns a zero-element view of it as its last output, alive until the caller
drops it: the tracker sees the operator's peak, the fake implementation building the same layout.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def _triton_installed() -> bool:
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for a user's ``backend``; ``ValueError`` for an unknown name, or for
    ``"triton"`` where Triton cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if backend == "triton":
        if not _triton_installed():
            raise ValueError("backend='triton' needs the `triton` package, which is not installed")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (or use backend='torch', the CPU path)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support {device.type} tensors")
    return backend


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any tensor is fp64 (the references), else fp32: what every operation accumulates in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def result_dtype(tensor: torch.Tensor, backend: str) -> torch.dtype:
    """The dtype of per-row results: fp32, or fp64 for fp64 inputs on the PyTorch path."""
    return compute_dtype(tensor) if backend == "torch" else torch.float32


ALIGN = 256  # bytes: every view starts at a multiple (element alignment, aligned vector loads)

Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class Workspace:
    """One ``uint8`` buffer holding a named, typed, contiguous view per entry of ``layout``
    (``name -> (shape, dtype)``); ``ws[name]`` is the view, ``None`` for a name not in the layout."""

    def __init__(self, layout: Layout, device: torch.device) -> None:
        offsets, total = {}, 0
        for name, (shape, dtype) in layout.items():
            offsets[name] = total
            total += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        self.buffer = torch.empty(total, dtype=torch.uint8, device=device)
        self._views = {
            name: self.buffer[offsets[name] :].view(dtype)[: math.prod(shape)].view(shape)
            for name, (shape, dtype) in layout.items()
        }

    def __getitem__(self, name: str) -> Tensor | None:
        return self._views.get(name)

    def handle(self) -> Tensor:
        """The zero-element view an operator returns as its last output."""
        return self.buffer[:0]
