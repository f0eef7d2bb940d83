"""Per-token statistics of Min-K%++ (Zhang et al. 2024, arXiv:2404.02936) without a softmax.

For logits ``z`` of a token with target ``y`` and ``p = softmax(z)``:

    log p_y,      μ = Σ_v p_v log p_v = E_p[log p],      σ = sqrt(max(Var_p(log p), 1e-6)),

so that Min-K%++'s ``(log p_y − μ)/σ`` standardises the target's log-probability against the
model's own distribution at that position. ``Var_p(log p) = Var_p(z)`` (the two differ by the
constant ``lse``), which both paths compute relative to the row maximum, with ``−log p_y`` as a
softplus that stays accurate when ``p_y → 1`` (derivation in :mod:`fastunlearn.kernels.token_stats`).

- :func:`token_stats`: from ``[..., V]`` logits; the op ``fastunlearn::token_stats``
  (``torch.library.custom_op`` with a fake implementation, so ``torch.compile`` traces through it).
  ``backend="triton"`` is the one-pass kernel; ``"torch"`` the CPU path, a cache-sized block of rows
  at a time.
- :func:`linear_token_stats`: from last hidden states and the output head, a chunk of tokens' logits
  at a time (the chunking of :mod:`fastunlearn.ops.fused_linear`): never ``[N, V]`` logits.

Rows whose label is ``ignore_index`` get NaN in all three outputs (the statistics of a position with
no target are not defined here, and NaN cannot be summed by mistake). Statistics are computed in
fp32 whatever the logits' dtype (fp64 logits stay fp64 on the PyTorch path). No gradient: these are
metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops._ihl_torch import _accumulation_dtype, _row_blocks, valid_targets

__all__ = ["VARIANCE_FLOOR", "linear_token_stats", "token_stats"]

VARIANCE_FLOOR = 1e-6  # Min-K%++'s clamp of σ²: σ ≥ 1e-3 even where one token has all the mass


def _torch_token_stats(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The CPU path: ``[N, 3]`` ``(log p_y, μ, σ)`` of ``[N, V]`` logits, a cache-sized block of rows at
    a time; the kernel's sums and final formulas, each block's maximum taken at once. A logit of
    ``−inf`` has ``e = 0`` and ``e·d`` NaN: ``nansum`` leaves it out (NaN logits still give NaN, through
    the maximum)."""
    n, vocab = logits.shape
    acc = _accumulation_dtype(logits.dtype)
    valid = valid_targets(labels, vocab, ignore_index).unsqueeze(1)
    targets = torch.where(valid, labels.unsqueeze(1), 0)
    sums = torch.empty(n, 4, dtype=acc, device=logits.device)  # z_y − M, s (v ≠ y), a, b (every v)
    for r0, r1, block in _row_blocks(logits.unsqueeze(0)):
        d = block.to(acc)
        d = d - d.amax(dim=1, keepdim=True)
        e = d.exp()
        ed = e * d
        torch.gather(d, 1, targets[r0:r1], out=sums[r0:r1, 0:1])
        torch.nansum(ed, dim=1, keepdim=True, out=sums[r0:r1, 2:3])
        torch.nansum(ed * d, dim=1, keepdim=True, out=sums[r0:r1, 3:4])
        torch.sum(e.scatter_(1, targets[r0:r1], 0.0), dim=1, keepdim=True, out=sums[r0:r1, 1:2])
    d_y, s, a, b = sums.unbind(1)
    e_y = d_y.exp()
    gap = s.log() - d_y
    nll = gap.clamp_min(0) + torch.log1p(torch.exp(-gap.abs()))
    total = e_y + s
    log_total = torch.where(gap > 0, total.log(), d_y + nll)
    mean = a / total
    var = b / total - mean * mean
    out = torch.stack([-nll, mean - log_total, var.clamp_min(VARIANCE_FLOOR).sqrt()], dim=1)
    return torch.where(valid, out, float("nan"))


@torch.library.custom_op("fastunlearn::token_stats", mutates_args=())
def _token_stats_op(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> Tensor:
    """``[N, 3]`` ``(log p_y, μ, σ)`` of ``[N, V]`` logits against ``[N]`` labels; NaN where ignored."""
    if backend == "triton":
        from fastunlearn.kernels import token_stats as kernel  # imports triton: only when asked for

        return kernel.token_stats(logits, labels.contiguous(), ignore_index, VARIANCE_FLOOR)
    return _torch_token_stats(logits, labels, ignore_index)


@_token_stats_op.register_fake
def _(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> Tensor:
    fp64 = logits.dtype == torch.float64 and backend != "triton"
    return logits.new_empty((logits.shape[0], 3), dtype=torch.float64 if fp64 else torch.float32)


def _checked_rows(logits: Tensor, labels: Tensor, ignore_index: int, validate: bool) -> Tensor:
    """``logits`` as ``[N, V]`` rows (a view where one exists) after checking both arguments."""
    from fastunlearn.ops.ihl import _check_labels

    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError("token_stats expects floating-point logits with a vocabulary dimension [..., V]")
    _check_labels(labels, logits.shape[:-1], logits.shape[-1], logits.device, ignore_index, validate)
    return logits.reshape(-1, logits.shape[-1])


def token_stats(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    backend: Backend = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p_y, μ, σ)`` of each row of ``logits`` (module docstring), each shaped like ``labels``.

    Args:
        logits: ``[..., V]`` scores (fp32, bf16, fp16 or fp64), any strides; aligned with ``labels``
            as in ``F.cross_entropy`` (shift the labels for causal language modelling).
        labels: integer ids of shape ``logits.shape[:-1]``; ``ignore_index`` rows give NaN.
        backend: ``"auto"`` (Triton on CUDA, the PyTorch path otherwise), ``"triton"`` (CPU tensors
            under ``TRITON_INTERPRET=1``) or ``"torch"``.
        validate: check that labels lie in ``[0, V)`` (one host synchronisation on an accelerator);
            with ``False`` out-of-range labels count as ignored.

    Returns fp32 tensors (fp64 for fp64 logits on the PyTorch path), no gradient.
    """
    rows = _checked_rows(logits, labels, ignore_index, validate)
    resolved = resolve_backend(backend, logits.device)
    with torch.no_grad():
        out = _token_stats_op(rows, labels.reshape(-1).long(), ignore_index, resolved)
    return tuple(col.view(labels.shape) for col in out.unbind(1))  # type: ignore[return-value]


def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`token_stats` of the logits ``hidden @ weight.T (+ bias)`` without materialising them: a
    chunk of ``chunk_rows`` tokens' logits at a time (by default about 64M elements on a GPU, 8M on
    CPU), as :func:`fastunlearn.ops.fused_linear.fused_linear_nll_loss` does. ``hidden`` is
    ``[..., H]``, ``weight`` ``[V, H]``, ``labels`` ``hidden.shape[:-1]``; under ``torch.autocast``
    the inputs are cast as ``F.linear`` casts them. Returns ``(log p_y, μ, σ)`` shaped like ``labels``.
    """
    from fastunlearn.ops._linear_chunks import chunk_logits
    from fastunlearn.ops.fused_linear import _checked_inputs

    hidden, weight, bias, resolved, chunk_rows = _checked_inputs(
        "linear_token_stats", hidden, weight, labels, bias, ignore_index, backend, chunk_rows, validate
    )
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    parts = []
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        buffer = h.new_empty(min(chunk_rows, h.shape[0]), weight.shape[0])
        for r0, h_chunk, logits in chunk_logits(h, weight, bias, chunk_rows, buffer):
            parts.append(_token_stats_op(logits, y[r0 : r0 + h_chunk.shape[0]], ignore_index, resolved))
    out = torch.cat(parts)
    return tuple(col.view(labels.shape) for col in out.unbind(1))  # type: ignore[return-value]
