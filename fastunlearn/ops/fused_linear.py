"""IHL and NLL straight from the last hidden states: the logits never exist in full (SPEC §2, "fused
linear").

For ``z = h Wᵀ (+ b)`` and the loss gradient ``G = ∂ℓ/∂z`` of a block of tokens,

    ∂ℓ/∂h = G W,        ∂ℓ/∂W = Gᵀ h,        ∂ℓ/∂b = Σ_rows G.

Tokens are processed in chunks: a chunk's logits are computed, the row kernels (the ones
:func:`fastunlearn.ihl_loss` and :func:`fastunlearn.nll_loss` use, in IHL or NLL mode) produce its
loss and write its gradient over the chunk's logits in place, and the gradient is folded into ``∂h``
and ``∂W`` before the next chunk. Peak memory is one chunk of logits instead of ``[N, V]``: for
Llama-3's 128k vocabulary and 16k tokens that is ~8 GB of fp32 logits (and as much again for their
gradient) replaced by a 256 MB chunk.

One chunk loop serves two strategies:

- ``reduction="mean"`` or ``"sum"``: the gradients are formed during the forward, as Liger-Kernel's
  fused linear cross-entropy does (the scale ``1/count`` of the mean is known then); the backward
  only multiplies them by ``grad_output``. Three matmuls, as for materialised logits. In bf16 that
  product is one more rounding of ``∂h`` than autograd makes, unless ``grad_output`` is a power of two
  (1 in a plain ``loss.backward()``).
- ``reduction="none"`` (per-token losses, e.g. NPO's per-sequence log-probabilities, whose weights
  are only known in the backward): the forward keeps five numbers per token (the row statistics),
  and the backward recomputes each chunk's logits — one more matmul, as in Cut Cross-Entropy.

Precision: the logits and the gradient chunks are in the inputs' dtype (bf16 stays bf16: no fp32
copy of hidden states, weight or logits), the row statistics in fp32, and ``∂W`` and ``∂b`` are
accumulated over chunks in fp32 and returned in the weight's dtype. Under ``torch.autocast`` the
inputs are cast to the autocast dtype first, exactly as ``F.linear`` would cast them, and the
computation itself runs with autocast off, so the result matches autocast logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops._ihl_torch import valid_targets
from fastunlearn.ops.ihl import _check_labels, _check_reduction, _implementation

# Elements of logits per chunk. On a GPU 64M (256 MB in fp32) keeps each chunk's matmuls large
# enough to run at full rate while bounding the memory; on CPU a matmul of a few hundred rows is
# already at full rate, so chunks are 8M elements (32 MB).
CHUNK_ELEMENTS = 1 << 26
CPU_CHUNK_ELEMENTS = 1 << 23

__all__ = ["fused_linear_ihl_loss", "fused_linear_nll_loss", "fused_linear_token_stats"]

_Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


def _chunks(
    h: Tensor, weight: Tensor, bias: Tensor | None, chunk_rows: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(first_row, hidden_chunk, logits_chunk)`` over the rows of ``h`` (``[N, H]``); one empty
    chunk when ``N = 0``, so the results still have their shapes.

    The generator keeps no reference to a chunk's logits, so one chunk is alive at a time provided
    the caller drops its own (``del``) before asking for the next.
    """
    for r0 in range(0, max(h.shape[0], 1), chunk_rows):
        h_chunk = h[r0 : r0 + chunk_rows]
        yield r0, h_chunk, (h_chunk @ weight.t() if bias is None else torch.addmm(bias, h_chunk, weight.t()))


def _grad_buffers(needs: tuple[bool, ...], h: Tensor, weight: Tensor, bias: Tensor | None) -> _Grads:
    """``∂h`` (input dtype) and zeroed ``∂W``, ``∂b`` accumulators (at least fp32), for the inputs
    that need one: none under ``no_grad``, no ``∂W`` for a frozen head."""
    acc = {"dtype": torch.promote_types(weight.dtype, torch.float32), "device": weight.device}
    grad_h = torch.empty_like(h) if needs[0] else None
    grad_w = torch.zeros(weight.shape, **acc) if needs[1] else None
    grad_b = torch.zeros(weight.shape[0], **acc) if bias is not None and needs[2] else None
    return grad_h, grad_w, grad_b


def _backprop_chunk(impl, r0, h_chunk, logits, weight, labels, stats, argmax, grad_rows, grads, ignore_index):
    """Overwrite a chunk's logits with ``grad_rows · ∂ℓ/∂z`` and fold them into ``grads``."""
    grad_h, grad_w, grad_b = grads
    rows = logits.unsqueeze(0)
    impl.ihl_backward(rows, labels, stats, argmax, grad_rows, rows, ignore_index)  # in place
    if grad_h is not None:
        torch.mm(logits, weight, out=grad_h[r0 : r0 + h_chunk.shape[0]])
    if grad_w is not None:
        if logits.dtype == grad_w.dtype:
            grad_w.addmm_(logits.t(), h_chunk)
        else:  # a bf16/fp16 product per chunk (full-rate matmul), summed in fp32 across chunks
            grad_w += logits.t() @ h_chunk
    if grad_b is not None:
        grad_b += logits.sum(0, dtype=grad_b.dtype)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, loss, ignore_index, reduction, backend, chunk_rows):
        impl = _implementation(backend)
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
        per_token = reduction == "none"
        ctx.options = (per_token, ignore_index, backend, chunk_rows, hidden.shape, weight.dtype)
        with torch.autocast(h.device.type, enabled=False):
            # 1/count for the mean, in the losses' dtype; a device tensor, no host sync.
            dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
            count = valid_targets(y, weight.shape[0], ignore_index).sum().clamp_min(1).to(dtype)
            scale = count.reciprocal() if reduction == "mean" else torch.ones_like(count)
            grads = (None,) * 3 if per_token else _grad_buffers(ctx.needs_input_grad, h, weight, bias)
            eager = any(g is not None for g in grads)
            outs = []
            for r0, h_chunk, logits in _chunks(h, weight, bias, chunk_rows):
                chunk_labels = y[r0 : r0 + h_chunk.shape[0]]
                out = impl.ihl_forward(logits.unsqueeze(0), chunk_labels, ignore_index, loss=loss)
                outs.append(out)
                if eager:
                    _backprop_chunk(impl, r0, h_chunk, logits, weight, chunk_labels, *out[1:], scale, grads,
                                    ignore_index)  # fmt: skip
                del logits
            losses, stats, argmax = (torch.cat(parts) for parts in zip(*outs))
        if per_token:
            ctx.save_for_backward(hidden, weight, bias, y, stats, argmax)
            return losses.view(labels.shape)
        ctx.save_for_backward(*grads)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        per_token, ignore_index, backend, chunk_rows, hidden_shape, weight_dtype = ctx.options
        if per_token:
            grad_h, grad_w, grad_b = _recompute_grads(ctx, grad_out, ignore_index, backend, chunk_rows)
        else:
            grad_h, grad_w, grad_b = (
                None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors
            )
        dh = grad_h.view(hidden_shape) if grad_h is not None else None
        dw = grad_w.to(weight_dtype) if grad_w is not None else None
        db = grad_b.to(weight_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None, None, None, None


def _recompute_grads(ctx, grad_out: Tensor, ignore_index: int, backend: str, chunk_rows: int) -> _Grads:
    """Backward of the per-token reduction: each chunk's logits again, their gradient scaled row by
    row by ``grad_out``, folded into the input gradients."""
    hidden, weight, bias, y, stats, argmax = ctx.saved_tensors
    impl = _implementation(backend)
    h = hidden.reshape(-1, hidden.shape[-1])
    grad_rows = grad_out.reshape(-1).to(stats.dtype).contiguous()
    with torch.autocast(h.device.type, enabled=False):
        grads = _grad_buffers(ctx.needs_input_grad, h, weight, bias)
        for r0, h_chunk, logits in _chunks(h, weight, bias, chunk_rows):
            r1 = r0 + h_chunk.shape[0]
            _backprop_chunk(impl, r0, h_chunk, logits, weight, y[r0:r1], stats[r0:r1], argmax[r0:r1],
                            grad_rows[r0:r1], grads, ignore_index)  # fmt: skip
            del logits
    return grads


def _autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
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


def _checked_inputs(
    name: str,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    backend: str,
    chunk_rows: int | None,
    validate: bool,
) -> tuple[Tensor, Tensor, Tensor | None, str, int]:
    """``(hidden, weight, bias)`` as ``F.linear`` would see them under autocast, the resolved backend
    and the rows per chunk, after checking every argument (a clear error for each bad one)."""
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{name} expects tensors for `hidden` and `weight`")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1]: got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a floating dtype")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias ({bias.dtype}) must have the weight's dtype ({weight.dtype})")
    _check_labels(labels, hidden.shape[:-1], weight.shape[0], hidden.device, ignore_index, validate)
    resolved = resolve_backend(backend, hidden.device)
    if chunk_rows is None:
        budget = CPU_CHUNK_ELEMENTS if hidden.device.type == "cpu" else CHUNK_ELEMENTS
        chunk_rows = max(1, budget // weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return hidden, weight, bias, resolved, chunk_rows


def _fused_linear_loss(
    loss: str,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    backend: str,
    chunk_rows: int | None,
    validate: bool,
) -> Tensor:
    _check_reduction(reduction)
    hidden, weight, bias, resolved, chunk_rows = _checked_inputs(
        f"fused_linear_{loss}_loss", hidden, weight, labels, bias, ignore_index, backend, chunk_rows, validate
    )
    return _FusedLinearLoss.apply(
        hidden, weight, bias, labels, loss, ignore_index, reduction, resolved, chunk_rows
    )


@torch._disable_dynamo  # a graph break under torch.compile, like ihl_loss
def fused_linear_ihl_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> Tensor:
    """IHL of the logits ``hidden @ weight.T (+ bias)`` without materialising them.

    Args:
        hidden: ``[..., H]`` last hidden states, aligned with ``labels`` (for causal language
            modelling shift the *labels*, ``labels[:, 1:]`` padded with ``ignore_index``, rather than
            slicing the hidden states, which would copy them).
        weight: ``[V, H]`` output embedding (``model.get_output_embeddings().weight``); it may be
            frozen (LoRA), in which case no ``∂W`` is computed at all.
        labels: integer ids of shape ``hidden.shape[:-1]``; ``ignore_index`` carries no loss.
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"`` (per token, shape of
            ``labels``; its backward recomputes the logits, one more matmul).
        backend: as in :func:`fastunlearn.ihl_loss`.
        chunk_rows: tokens per chunk; the default keeps a chunk's logits near 64M elements on a GPU
            and 8M on CPU.
        validate: check that labels lie in ``[0, V)`` (one host synchronisation).

    Returns the loss in fp32 (fp64 for fp64 inputs on the PyTorch path). Under ``torch.autocast``
    the inputs are cast as ``F.linear`` casts them.
    """
    return _fused_linear_loss(
        "ihl", hidden, weight, labels, bias, ignore_index, reduction, backend, chunk_rows, validate
    )


@torch._disable_dynamo
def fused_linear_nll_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> Tensor:
    """Token NLL (cross-entropy) of the logits ``hidden @ weight.T (+ bias)`` without materialising
    them: :func:`fastunlearn.nll_loss` on the chunks. Arguments as in :func:`fused_linear_ihl_loss`;
    ``reduction="none"`` gives ``−log p(y_t)`` per token, so a sequence's log-probability is
    ``−loss.sum(-1)``.
    """
    return _fused_linear_loss(
        "nll", hidden, weight, labels, bias, ignore_index, reduction, backend, chunk_rows, validate
    )


@torch._disable_dynamo
def fused_linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Teacher-forced metrics of the logits ``z = hidden @ weight.T (+ bias)`` without materialising
    them: per token ``−log p(y)`` (:func:`fastunlearn.nll_loss`'s row kernels in NLL mode) and whether
    ``argmax_v z_v = y`` (the first index of the maximum, as ``torch.argmax``), a chunk of rows at a
    time — the memory of one chunk of logits instead of ``[N, V]``.

    Arguments as in :func:`fused_linear_nll_loss`. Returns ``(nll, hit)``, both shaped like ``labels``:
    ``nll`` in fp32 (fp64 for fp64 inputs on the PyTorch path), ``hit`` boolean; both are 0/False where
    the label is ``ignore_index``. A metric, not a loss: computed without gradients.
    """
    hidden, weight, bias, resolved, chunk_rows = _checked_inputs(
        "fused_linear_token_stats", hidden, weight, labels, bias, ignore_index, backend, chunk_rows, validate
    )
    impl = _implementation(resolved)
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    nll, hits = [], []
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        for r0, h_chunk, logits in _chunks(h, weight, bias, chunk_rows):
            chunk_labels = y[r0 : r0 + h_chunk.shape[0]]
            nll.append(impl.ihl_forward(logits.unsqueeze(0), chunk_labels, ignore_index, loss="nll")[0])
            hits.append(logits.argmax(dim=-1) == chunk_labels)
            del logits
    return torch.cat(nll).view(labels.shape), torch.cat(hits).view(labels.shape)
