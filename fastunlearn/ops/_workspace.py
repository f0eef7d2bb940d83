"""Scratch memory of the custom operators, made visible to memory trackers.

A tracker that is a ``TorchDispatchMode`` (PyTorch's ``MemTracker``, a memory plan under
``FakeTensorMode``) sees an operator's inputs and outputs, never what it allocates and frees inside.
So an operator takes all its scratch memory as one byte buffer carved into typed views
(:class:`Workspace`) and returns a zero-element view of it as its last output: the buffer stays alive
until the caller drops that view, so the tracker sees the operator's peak. The fake implementation
builds the same layout, so real and fake report the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

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
            name: self.buffer[offsets[name] : offsets[name] + math.prod(shape) * dtype.itemsize]
            .view(dtype)
            .view(shape)
            for name, (shape, dtype) in layout.items()
        }

    def __getitem__(self, name: str) -> Tensor | None:
        return self._views.get(name)

    def handle(self) -> Tensor:
        """The zero-element view an operator returns as its last output."""
        return self.buffer[:0]
