"""``KL(P_ref ‖ P_θ)`` of next-token distributions, from logits or straight from the last hidden states:
the KL retain term of TOFU (Maini et al. 2024, arXiv 2401.06121) and open-unlearning.

With ``P_θ = softmax(z)`` the model's and ``P_ref = softmax(r)`` the reference model's distribution at a
position, the loss is the mean over positions of ``Σ_v P_ref(v)·(log P_ref(v) − log P_θ(v))`` —
``F.kl_div(log_softmax(z), log_softmax(r), reduction="batchmean", log_target=True)`` on the flattened
rows, every position counted (padding too) unless a ``mask`` picks the positions to average over. Its
gradient in the logits is ``(softmax(z) − softmax(r))·weight``; the reference is a constant.

Neither function materialises an ``[N, V]`` softmax or log-softmax: :func:`kl_loss` runs one pass over
both rows forward (an online log-sum-exp of each and the running ``Σ q·(r − z)``; see
:mod:`fastunlearn.kernels.kl`) and one read of both and one write backward, in fp32 whatever the input
dtype. :func:`fused_linear_kl_loss` computes both models' logits a chunk of rows at a time from their
hidden states and the shared output head, like :mod:`fastunlearn.ops.fused_linear`, folding each
chunk's gradient into ``∂h``, ``∂W``, ``∂b`` before the next: two chunks of logits instead of two
``[N, V]`` tensors and their log-softmaxes.

Both run inside custom operators (``fastunlearn::kl_rows`` and its backward, ``fastunlearn::fused_linear_kl``)
with fake implementations, so ``torch.compile`` traces them as nodes and ``FakeTensorMode`` runs them;
the fused operator reports its two chunk buffers as its workspace (:mod:`fastunlearn.ops._workspace`).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastunlearn.ops import _kl_torch
from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops._linear_chunks import HeadGrads, autocast_inputs, check_head, chunk_logits, head_layout
from fastunlearn.ops._workspace import Layout, Workspace
from fastunlearn.ops.fused_linear import input_needs, resolve_chunk_rows

__all__ = ["fused_linear_kl_loss", "kl_loss"]


def _implementation(backend: str) -> ModuleType:
    if backend == "triton":
        from fastunlearn.kernels import kl as triton_kl  # imports triton: only when asked for

        return triton_kl
    return _kl_torch


def _loss_dtype(logits: Tensor, backend: str) -> torch.dtype:
    return torch.float64 if backend == "torch" and logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastunlearn::kl_rows", mutates_args=())
def kl_rows(
    logits: Tensor, ref_logits: Tensor, weights: Tensor | None, backend: str
) -> tuple[Tensor, Tensor]:
    """Per-row ``KL(softmax(ref_logits) ‖ softmax(logits))`` of ``[N, V]`` rows and ``(lse(z), lse(r))``
    per row; rows whose ``weights`` entry is 0 are skipped (0). Differentiable in ``logits``."""
    return _implementation(backend).kl_forward(logits, ref_logits, weights)


@kl_rows.register_fake
def _(logits, ref_logits, weights, backend):
    n, dtype = logits.shape[0], _loss_dtype(logits, backend)
    return logits.new_empty(n, dtype=dtype), logits.new_empty(n, 2, dtype=dtype)


@torch.library.custom_op("fastunlearn::kl_rows_backward", mutates_args=())
def kl_rows_backward(
    logits: Tensor, ref_logits: Tensor, lse: Tensor, grad_rows: Tensor, backend: str
) -> Tensor:
    """``grad_rows[r]·(softmax(z_r) − softmax(r_r))`` into a new tensor shaped like ``logits``."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _implementation(backend).kl_backward(logits, ref_logits, lse, grad_rows, grad)


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


def _fused_layout(hidden: Tensor, weight: Tensor, chunk_rows: int, needs: tuple[bool, ...]) -> Layout:
    chunk = ((min(chunk_rows, hidden.shape[0]), weight.shape[0]), hidden.dtype)
    return {"logits": chunk, "ref_logits": chunk, **head_layout(weight, needs)}


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
    """``Σ_rows weights·KL`` of the logits ``hidden @ weight.T (+ bias)`` against
    ``ref_hidden @ weight.T (+ bias)``, and the gradients named by ``needs`` (``∂h``, ``∂W``, ``∂b``;
    empty where not needed), formed chunk by chunk during the forward; then the workspace's handle."""
    impl, wanted = _implementation(backend), (needs[0], needs[1], needs[2])
    with torch.autocast(hidden.device.type, enabled=False):
        workspace = Workspace(_fused_layout(hidden, weight, chunk_rows, wanted), hidden.device)
        grads = HeadGrads(wanted, hidden, weight, bias, workspace)
        kls = []
        chunks = zip(
            chunk_logits(hidden, weight, bias, chunk_rows, workspace["logits"]),
            chunk_logits(ref_hidden, weight, bias, chunk_rows, workspace["ref_logits"]),
        )
        for (r0, h_chunk, logits), (_, _, ref_logits) in chunks:
            row_weights = weights[r0 : r0 + h_chunk.shape[0]]
            kl, lse = impl.kl_forward(logits, ref_logits, row_weights)
            kls.append(kl)
            if grads.any:
                impl.kl_backward(logits, ref_logits, lse, row_weights, logits)  # in place
                grads.fold(r0, h_chunk, logits)
        loss = (torch.cat(kls) * weights).sum()
    return loss, *grads.outputs(hidden), workspace.handle()


@fused_linear_kl.register_fake
def _(hidden, ref_hidden, weight, bias, weights, backend, chunk_rows, needs):
    wanted = (needs[0], needs[1], needs[2])
    workspace = Workspace(_fused_layout(hidden, weight, chunk_rows, wanted), hidden.device)
    grads = HeadGrads(wanted, hidden, weight, bias, workspace)
    loss = hidden.new_empty((), dtype=torch.promote_types(_loss_dtype(hidden, backend), weights.dtype))
    return loss, *grads.outputs(hidden), workspace.handle()


def _fused_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:4])
    ctx.weight_dtype = inputs[2].dtype


def _fused_backward(ctx, grad_loss: Tensor, *_unused):
    needs = ctx.needs_input_grad
    dh, dw, db = (
        g * grad_loss.to(g.dtype) if need else None
        for g, need in zip(ctx.saved_tensors, (needs[0], *needs[2:4]))
    )
    dw = dw.to(ctx.weight_dtype) if dw is not None else None
    db = db.to(ctx.weight_dtype) if db is not None else None
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
    leading, device = like.shape[:-1], like.device
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
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
    """Mean over positions of ``KL(softmax(ref_logits) ‖ softmax(logits))`` (module docstring).

    Args:
        logits: ``[..., V]`` logits of the model being trained, any float dtype and strides.
        ref_logits: the reference model's logits, same shape; a constant (no gradient).
        mask: optional bool or 0/1 tensor of shape ``logits.shape[:-1]``: average over the positions it
            selects (0 and a zero gradient when it selects none). Without it every position counts, as
            ``F.kl_div(..., reduction="batchmean")`` on the flattened rows.
        backend: ``"auto"`` (Triton for CUDA tensors, the chunked PyTorch path otherwise), ``"triton"``
            (also CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"``.

    Returns the loss in fp32 (fp64 for fp64 logits on the PyTorch path); the gradient of ``logits`` has
    their dtype.
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
    """:func:`kl_loss` of the logits ``hidden @ weight.T (+ bias)`` against ``ref_hidden @ weight.T
    (+ bias)`` without materialising either.

    Args:
        hidden: ``[..., H]`` last hidden states of the model being trained.
        ref_hidden: the reference model's last hidden states, same shape (a constant: computed under
            ``torch.no_grad()``, no gradient flows to it).
        weight: ``[V, H]`` output head shared by both models (frozen under LoRA; when trained, ``∂W``
            comes through the trained model's logits only: the reference logits are a constant).
        mask, backend: as in :func:`kl_loss`.
        bias: optional ``[V]`` bias of the head.
        chunk_rows: rows per chunk (default: about 64M logits per chunk on a GPU, 8M on CPU; two
            chunks, one per model, are alive at a time).

    Returns the loss in fp32 (fp64 for fp64 inputs on the PyTorch path). Under ``torch.autocast`` the
    inputs are cast as ``F.linear`` casts them.
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
    return fused_linear_kl(h, ref, weight, bias, weights, resolved, chunk_rows, input_needs(h, weight, bias))[
        0
    ]
