"""``KL(P_ref ‖ P_θ)`` of next-token distributions, from logits or straight from the last hidden states: the
KL retain term of TOFU (Maini et al. 2024). The loss is the mean over positions (or those a ``mask``
picks) of ``Σ_v P_ref(v)·(log P_ref(v) − log P_θ(v))``, as ``F.kl_div(..., "batchmean",
log_target=True)``; its gradient in the logits is ``(softmax(z) − softmax(r))·weight``, the reference a
constant. No ``[N, V]`` softmax is formed (``fastunlearn.kernels.kl``); :func:`fused_linear_kl_loss`
computes both models' logits a chunk of rows at a time from their hidden states and the shared head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, compute_dtype, resolve_backend, result_dtype
from fastunlearn.ops._ihl_torch import implementation
from fastunlearn.ops._linear_chunks import ChunkScratch, autocast_inputs, check_head, input_grads
from fastunlearn.ops.fused_linear import input_needs, resolve_chunk_rows


@torch.library.custom_op("fastunlearn::kl_rows", mutates_args=())
def kl_rows(
    logits: Tensor, ref_logits: Tensor, weights: Tensor | None, backend: str
) -> tuple[Tensor, Tensor]:
    """Per-row ``KL(softmax(ref_logits) ‖ softmax(logits))`` of ``[N, V]`` rows and ``(lse(z), lse(r))``
    per row; rows whose ``weights`` entry is 0 are skipped (0). Differentiable in ``logits``."""
    return implementation(backend, "kl").kl_forward(logits, ref_logits, weights)


@kl_rows.register_fake
def _(logits, ref_logits, weights, backend):
    n, dtype = logits.shape[0], result_dtype(logits, backend)
    return logits.new_empty(n, dtype=dtype), logits.new_empty(n, 2, dtype=dtype)


@torch.library.custom_op("fastunlearn::kl_rows_backward", mutates_args=())
def kl_rows_backward(
    logits: Tensor, ref_logits: Tensor, lse: Tensor, grad_rows: Tensor, backend: str
) -> Tensor:
    """``grad_rows[r]·(softmax(z_r) − softmax(r_r))`` into a new tensor shaped like ``logits``."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return implementation(backend, "kl").kl_backward(logits, ref_logits, lse, grad_rows, grad)


@kl_rows_backward.register_fake
def _(logits, ref_logits, lse, grad_rows, backend):
    return logits.new_empty(logits.shape)


def _kl_rows_setup(ctx, inputs, output) -> None:
    logits, ref_logits, _, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, ref_logits, output[1])
    ctx.backend = backend


def _kl_rows_backward(ctx, grad_kl: Tensor, _grad_lse):
    logits, ref_logits, lse = ctx.saved_tensors
    return kl_rows_backward(logits, ref_logits, lse, grad_kl, ctx.backend), None, None, None


kl_rows.register_autograd(_kl_rows_backward, setup_context=_kl_rows_setup)


_BUFFERS = ("logits", "ref_logits")


@torch.library.custom_op("fastunlearn::fused_linear_kl", mutates_args=())
def fused_linear_kl(
    hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weights: Tensor,
    backend: str,
    chunk_rows: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``Σ_rows weights·KL`` of the logits ``hidden @ weight.T (+ bias)`` against ``ref_hidden``'s, the
    gradients ``needs`` names (``∂h``, ``∂W``, ``∂b``, formed in the forward) and the workspace's handle."""
    impl = implementation(backend, "kl")
    with torch.autocast(hidden.device.type, enabled=False):
        scratch = ChunkScratch(hidden, weight, bias, chunk_rows, needs, _BUFFERS)
        kls = []
        chunks = zip(scratch.chunks(hidden), scratch.chunks(ref_hidden, "ref_logits"))
        for (r0, h_chunk, logits), (_, _, ref_logits) in chunks:
            row_weights = weights[r0 : r0 + h_chunk.shape[0]]
            kl, lse = impl.kl_forward(logits, ref_logits, row_weights)
            kls.append(kl)
            if any(needs):
                impl.kl_backward(logits, ref_logits, lse, row_weights, logits)  # in place
                scratch.fold(r0, h_chunk, logits)
        loss = (torch.cat(kls) * weights).sum()
    return loss, *scratch.outputs()


@fused_linear_kl.register_fake
def _(hidden, ref_hidden, weight, bias, weights, backend, chunk_rows, needs):
    scratch = ChunkScratch(hidden, weight, bias, chunk_rows, needs, _BUFFERS)
    loss = hidden.new_empty((), dtype=torch.promote_types(result_dtype(hidden, backend), weights.dtype))
    return loss, *scratch.outputs()


def _fused_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:4])
    ctx.weight_dtype = inputs[2].dtype


def _fused_backward(ctx, grad_loss: Tensor, *_unused):
    needs = ctx.needs_input_grad
    dh, dw, db = input_grads(ctx.saved_tensors, (needs[0], *needs[2:4]), ctx.weight_dtype, grad_loss)
    return dh, None, dw, db, None, None, None, None


fused_linear_kl.register_autograd(_fused_backward, setup_context=_fused_setup)


def _check_pair(name: str, first: str, a: Tensor, second: str, b: Tensor) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{name} expects tensors for `{first}` and `{second}`")
    for label, t in ((first, a), (second, b)):
        if not t.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got {t.dtype}")
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(
            f"{first} and {second} must have one shape [..., V]: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{first} is on {a.device} but {second} is on {b.device}")


def _row_weights(mask: Tensor | None, like: Tensor) -> Tensor:
    """``[N]`` weights of the mean over the rows of ``like`` (``[..., V]``): ``1/N`` each, or
    ``mask/Σ mask`` (0 everywhere when nothing is selected); fp32, fp64 for fp64 ``like``."""
    leading, device, dtype = like.shape[:-1], like.device, compute_dtype(like)
    n = leading.numel()
    if mask is None:
        return torch.full((n,), 1 / max(n, 1), dtype=dtype, device=device)
    if not isinstance(mask, Tensor) or mask.is_complex():
        raise TypeError("mask must be a boolean or 0/1 tensor of the positions to average over")
    if mask.shape != leading:
        raise ValueError(f"mask must have the leading shape {tuple(leading)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"the logits are on {device} but mask is on {mask.device}")
    keep = (mask.reshape(-1) != 0).to(dtype)
    return keep / keep.sum().clamp_min(1)


def kl_loss(
    logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None, *, backend: Backend = "auto"
) -> Tensor:
    """Mean over positions of ``KL(softmax(ref_logits) ‖ softmax(logits))``, ``ref_logits`` a constant of
    the same ``[..., V]`` shape. ``mask`` (bool or 0/1, ``logits.shape[:-1]``): average over the
    positions it selects (0 and a zero gradient when none). fp32 (fp64 for fp64 logits on PyTorch).
    """
    _check_pair("kl_loss", "logits", logits, "ref_logits", ref_logits)
    vocab = logits.shape[-1]
    weights = _row_weights(mask, logits)
    resolved = resolve_backend(backend, logits.device)
    rows = kl_rows(logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab), weights, resolved)[0]
    return (rows * weights).sum()


def fused_linear_kl_loss(
    hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    backend: Backend = "auto",
    chunk_rows: int | None = None,
) -> Tensor:
    """:func:`kl_loss` of the logits ``hidden @ weight.T (+ bias)`` against ``ref_hidden @ weight.T (+ bias)``
    without materialising either: ``ref_hidden`` (same shape) is a constant, ``weight`` ``[V, H]`` the
    head both share (``∂W`` comes through the trained logits only); ``mask``, ``backend`` as in
    :func:`kl_loss`, ``chunk_rows`` as in :func:`fastunlearn.fused_linear_ihl_loss` (two chunks alive).
    Returns the loss in fp32 (fp64 for fp64 inputs on the PyTorch path).
    """
    hidden, weight, bias = check_head("fused_linear_kl_loss", hidden, weight, bias)
    (ref_hidden,) = autocast_inputs(ref_hidden)
    _check_pair("fused_linear_kl_loss", "hidden", hidden, "ref_hidden", ref_hidden)
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden ({ref_hidden.dtype}) must have the dtype of hidden ({hidden.dtype})")
    weights = _row_weights(mask, hidden)
    resolved = resolve_backend(backend, hidden.device)
    chunk_rows = resolve_chunk_rows(chunk_rows, hidden.device, weight.shape[0])
    h = hidden.reshape(-1, hidden.shape[-1])
    ref = ref_hidden.detach().reshape(-1, hidden.shape[-1])
    needs = input_needs(h, weight, bias)
    return fused_linear_kl(h, ref, weight, bias, weights, resolved, chunk_rows, needs)[0]
