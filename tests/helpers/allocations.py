"""Which tensors an operation creates: every op's outputs, recorded at the dispatcher.

Used to check that a path never forms an fp32 copy of bf16 logits or hidden states, or a ``[B, T, V]``
logits tensor: the recorder sees each ATen op's outputs (dtype and element count), whatever code
path (eager, autograd, peft, transformers) issued it, so "no such tensor was made" is checked
directly rather than inferred from the code.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class RecordOutputs(TorchDispatchMode):
    """Within the block, ``self.outputs`` lists ``(op name, dtype, numel)`` of every tensor produced."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel()))
        return out

    def largest(self, dtype: torch.dtype) -> int:
        """Elements of the largest ``dtype`` tensor produced (0 if none)."""
        return max((n for _, d, n in self.outputs if d == dtype), default=0)
