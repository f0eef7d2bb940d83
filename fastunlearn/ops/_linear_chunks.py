"""What every fused-linear loss shares: the logits ``z = h Wᵀ (+ b)`` a chunk of rows at a time, and the
folding of each chunk's logit gradient ``G`` into ``∂h = G W``, ``∂W = Gᵀ h`` and ``∂b = Σ_rows G``.

``∂W`` and ``∂b`` are accumulated in fp32 (fp64 for an fp64 head); with a bf16/fp16 head each chunk's
``Gᵀ h`` is a full-rate product in the head's dtype into a workspace buffer, added to the fp32 sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from fastunlearn.ops._backend import Workspace, compute_dtype


def chunk_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, chunk_rows: int, buffer: Tensor
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(first_row, hidden_chunk, logits_chunk)`` over the rows of ``h`` (``[N, H]``), each chunk's
    logits written into the first rows of ``buffer`` (``[≥ chunk_rows, V]``, or ``[N, V]`` when
    ``N < chunk_rows``); one empty chunk when ``N = 0``, so the results still have their shapes."""
    for r0 in range(0, max(h.shape[0], 1), chunk_rows):
        h_chunk = h[r0 : r0 + chunk_rows]
        logits = buffer[: h_chunk.shape[0]]
        if bias is None:
            torch.mm(h_chunk, weight.t(), out=logits)
        else:
            torch.addmm(bias, h_chunk, weight.t(), out=logits)
        yield r0, h_chunk, logits


def map_chunks(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_rows: int,
    fn: Callable[[int, Tensor], tuple[Tensor, ...]],
) -> tuple[Tensor, ...]:
    """Without gradients, ``fn(first_row, logits_chunk)`` over the chunks of ``h``'s logits (one buffer
    reused: ``fn`` must return new tensors), its outputs concatenated over the chunks."""
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        buffer = h.new_empty(min(chunk_rows, h.shape[0]), weight.shape[0])
        results = [fn(r0, logits) for r0, _, logits in chunk_logits(h, weight, bias, chunk_rows, buffer)]
    return tuple(torch.cat(parts) for parts in zip(*results))


class ChunkScratch:
    """An operator's scratch memory and head gradients: one workspace holding a ``[chunk, V]`` buffer per
    name of ``buffers`` and what :meth:`fold` needs (a ``[V, H]`` product in the head's dtype when it is
    narrower than the accumulator, a ``[V]`` row sum for ``∂b``); ``∂h`` (the hidden states' dtype) and
    zeroed ``∂W``, ``∂b`` accumulators for the inputs in ``needs`` (none under ``no_grad``, no ``∂W``
    for a frozen head), filled chunk by chunk."""

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        chunk_rows: int,
        needs: Sequence[bool],
        buffers: tuple[str, ...] = ("logits",),
    ) -> None:
        acc = {"dtype": compute_dtype(weight), "device": weight.device}
        layout = dict.fromkeys(buffers, ((min(chunk_rows, hidden.shape[0]), weight.shape[0]), hidden.dtype))
        if needs[1] and weight.dtype != acc["dtype"]:
            layout["weight_product"] = (tuple(weight.shape), weight.dtype)
        if needs[2]:
            layout["bias_sum"] = ((weight.shape[0],), acc["dtype"])
        self.workspace = Workspace(layout, hidden.device)
        self.hidden, self.weight, self.bias, self.chunk_rows = hidden, weight, bias, chunk_rows
        self.h = torch.empty_like(hidden) if needs[0] else None
        self.w = torch.zeros(weight.shape, **acc) if needs[1] else None
        self.b = torch.zeros(weight.shape[0], **acc) if bias is not None and needs[2] else None

    def chunks(self, h: Tensor, buffer: str = "logits") -> Iterator[tuple[int, Tensor, Tensor]]:
        """:func:`chunk_logits` of ``h`` (``hidden`` or rows like it) into the workspace's ``buffer``."""
        return chunk_logits(h, self.weight, self.bias, self.chunk_rows, self.workspace[buffer])

    def fold(self, r0: int, h_chunk: Tensor, grad_logits: Tensor) -> None:
        """Add the contribution of one chunk's logit gradient ``[rows, V]``."""
        if self.h is not None:
            torch.mm(grad_logits, self.weight, out=self.h[r0 : r0 + h_chunk.shape[0]])
        if self.w is not None:
            if self.workspace["weight_product"] is None:
                self.w.addmm_(grad_logits.t(), h_chunk)
            else:
                self.w += torch.mm(grad_logits.t(), h_chunk, out=self.workspace["weight_product"])
        if self.b is not None:
            self.b += torch.sum(grad_logits, 0, dtype=self.b.dtype, out=self.workspace["bias_sum"])

    def outputs(self) -> tuple[Tensor, ...]:
        """``(∂h, ∂W, ∂b)`` as operator outputs (an empty tensor for each one not computed), then the
        workspace's handle."""
        grads = (self.hidden.new_empty(0) if g is None else g for g in (self.h, self.w, self.b))
        return *grads, self.workspace.handle()


def input_grads(
    grads: tuple[Tensor, ...], needs: tuple[bool, ...], weight_dtype: torch.dtype, scale: Tensor | None = None
) -> tuple[Tensor | None, ...]:
    """The ``(∂h, ∂W, ∂b)`` an operator's backward returns: ``None`` where not needed, times ``scale``
    (for gradients formed in the forward), ``∂W`` and ``∂b`` in the weight's dtype."""
    out = [(g if scale is None else g * scale.to(g.dtype)) if n else None for g, n in zip(grads, needs)]
    return out[0], *(None if g is None else g.to(weight_dtype) for g in out[1:])


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors as ``F.linear`` would see them under the current autocast: floating tensors other
    than fp64 cast to the autocast dtype (no-op without autocast)."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def check_head(
    name: str, hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden, weight, bias)`` as ``F.linear`` would see them under autocast, after checking that
    they fit together (a one-line error for each misfit)."""
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{name} expects tensors for `hidden` and `weight`")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1]: got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a floating dtype")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias ({bias.dtype}) must have the weight's dtype ({weight.dtype})")
    return hidden, weight, bias
