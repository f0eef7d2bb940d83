"""Scratch memory of the custom operators, made visible to memory trackers.

A tracker of live tensors that is a ``TorchDispatchMode`` (PyTorch's ``MemTracker``, or a memory plan
run under ``FakeTensorMode``) sees a custom operator's inputs and outputs, never what its kernel
allocates and frees inside: a fake implementation's own allocations included, since the tracker's
mode is set aside while the operator runs beneath it. So an operator that needs scratch memory takes
all of it as one byte buffer carved into typed views (:class:`Workspace`) and returns a zero-element
view of that buffer as its last output. The view keeps the buffer's storage alive until the caller
drops it, so a tracker that counts storages sees the operator's peak (inputs, outputs and scratch
together) when it returns. The fake implementation builds a :class:`Workspace` of the same layout
and returns the same kind of view: real and fake report the same bytes by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

# Bytes: every view starts at a multiple, which is element alignment for every dtype and keeps the
# kernels' vector loads aligned.
ALIGN = 256

Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def _offsets(layout: Layout) -> tuple[dict[str, int], int]:
    offsets, total = {}, 0
    for name, (shape, dtype) in layout.items():
        offsets[name] = total
        nbytes = math.prod(shape) * dtype.itemsize
        total += -(-nbytes // ALIGN) * ALIGN
    return offsets, total


class Workspace:
    """One ``uint8`` buffer holding a named, typed, contiguous view per entry of ``layout``
    (``name -> (shape, dtype)``); ``ws[name]`` is the view, ``None`` for a name not in the layout."""

    def __init__(self, layout: Layout, device: torch.device) -> None:
        offsets, total = _offsets(layout)
        self.buffer = torch.empty(total, dtype=torch.uint8, device=device)
        self._views = {
            name: self.buffer[offsets[name] : offsets[name] + math.prod(shape) * dtype.itemsize]
            .view(dtype)
            .view(shape)
            for name, (shape, dtype) in layout.items()
        }

    def __getitem__(self, name: str) -> Tensor | None:
        return self._views.get(name)

    def handle(self) -> Tensor:
        """The zero-element view an operator returns as its last output (module docstring)."""
        return self.buffer[:0]


def workspace_bytes(layout: Layout) -> int:
    """Bytes of the buffer a :class:`Workspace` of ``layout`` allocates."""
    return _offsets(layout)[1]
