"""IHL straight from the last hidden states: the logits never exist in full (SPEC §2, "fused linear").

For ``z = h Wᵀ (+ b)`` and the IHL gradient ``G = ∂ℓ/∂z`` of a block of tokens,

    ∂ℓ/∂h = G W,        ∂ℓ/∂W = Gᵀ h,        ∂ℓ/∂b = Σ_rows G.

Tokens are processed in chunks: a chunk's logits are computed, the IHL kernels (the same ones
:func:`fastunlearn.ihl_loss` uses) produce its loss and write its gradient over the chunk's logits in
place, and the gradient is folded into ``∂h`` and ``∂W`` before the next chunk. Peak memory is one
chunk of logits instead of ``[N, V]``: for Llama-3's 128k vocabulary and 16k tokens that is ~8 GB of
fp32 logits (and as much again for their gradient) replaced by a 256 MB chunk.

Gradients are computed during the forward, as Liger-Kernel's fused linear cross-entropy does, so the
reduction must be a scalar (``"mean"`` or ``"sum"``); the backward only scales them by
``grad_output``. ``∂W`` is accumulated in fp32 across chunks and returned in the weight's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops._ihl_torch import valid_targets
from fastunlearn.ops.ihl import _check_labels, _check_reduction, _implementation

# Elements of logits per chunk: 64M (256 MB in fp32) keeps each chunk's matmuls large enough to run
# at full rate on a GPU while bounding the memory.
CHUNK_ELEMENTS = 1 << 26

__all__ = ["fused_linear_ihl_loss"]


class _FusedLinearIHL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, backend, chunk_rows):
        impl = _implementation(backend)
        H, V = hidden.shape[-1], weight.shape[0]
        h = hidden.reshape(-1, H)
        y = labels.reshape(-1).long()
        n = h.shape[0]
        # Only the gradients some input needs are formed: none under no_grad, no ∂W for a frozen head.
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # ∂W and ∂b accumulate over chunks in fp32.
        fp32 = {"dtype": torch.float32, "device": weight.device}
        grad_w = torch.zeros(weight.shape, **fp32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(V, **fp32) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        one = torch.ones((), dtype=torch.float32, device=hidden.device)
        for r0 in range(0, n, chunk_rows):
            h_chunk = h[r0 : r0 + chunk_rows]
            logits = h_chunk @ weight.t() if bias is None else torch.addmm(bias, h_chunk, weight.t())
            rows = logits.unsqueeze(0)
            chunk_labels = y[r0 : r0 + chunk_rows]
            row_loss, stats, argmax = impl.ihl_forward(rows, chunk_labels, ignore_index)
            total += row_loss.sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            impl.ihl_backward(rows, chunk_labels, stats, argmax, one, rows, ignore_index)  # in place
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[r0 : r0 + chunk_rows])
            if grad_w is not None:
                grad_w.addmm_(logits.t().float(), h_chunk.float())
            if grad_b is not None:
                grad_b += logits.float().sum(0)
        count = valid_targets(y, V, ignore_index).sum().clamp_min(1)
        scale = 1.0 / count if reduction == "mean" else one
        ctx.save_for_backward(grad_h, grad_w, grad_b, scale)
        ctx.shapes = (hidden.shape, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b, scale = ctx.saved_tensors
        hidden_shape, weight_dtype = ctx.shapes
        factor = grad_out * scale
        dh = (grad_h * factor.to(grad_h.dtype)).view(hidden_shape) if grad_h is not None else None
        dw = (grad_w * factor).to(weight_dtype) if grad_w is not None else None
        db = (grad_b * factor).to(weight_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None, None, None


@torch._disable_dynamo  # a graph break under torch.compile, like ihl_loss
def fused_linear_ihl_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum"] = "mean",
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> Tensor:
    """IHL of the logits ``hidden @ weight.T (+ bias)`` without materialising them.

    Args:
        hidden: ``[..., H]`` last hidden states (already aligned with ``labels``: shift them yourself).
        weight: ``[V, H]`` output embedding (``model.get_output_embeddings().weight``); it may be
            frozen (LoRA), in which case no ``∂W`` is computed at all.
        labels: integer ids of shape ``hidden.shape[:-1]``; ``ignore_index`` carries no loss.
        reduction: ``"mean"`` over non-ignored tokens or ``"sum"``.
        backend: as in :func:`fastunlearn.ihl_loss`; ``"reference"`` is not offered (use
            ``ihl_loss(hidden @ weight.T, labels, backend="reference")``).
        chunk_rows: tokens per chunk; default keeps a chunk's logits near 64M elements.

    Returns the loss in fp32.
    """
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fused_linear_ihl_loss expects tensors for `hidden` and `weight`")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1]: got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a floating dtype")
    _check_reduction(reduction, ("mean", "sum"))
    _check_labels(labels, hidden.shape[:-1], weight.shape[0], hidden.device, ignore_index, validate)
    resolved = resolve_backend(backend, hidden.device, has_reference=False)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return _FusedLinearIHL.apply(hidden, weight, bias, labels, ignore_index, reduction, resolved, chunk_rows)
