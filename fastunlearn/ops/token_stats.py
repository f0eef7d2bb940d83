"""Per-token statistics of Min-K%++ (Zhang et al. 2024, arXiv 2404.02936) without a softmax: for logits
``z`` with target ``y`` and ``p = softmax(z)``, ``log p_y``, ``μ = E_p[log p]`` and
``σ = sqrt(max(Var_p(log p), 1e-6))``, so that ``(log p_y − μ)/σ`` standardises the target's
log-probability against the model's own distribution. The sums are taken relative to the row maximum
and ``−log p_y`` as a softplus that stays accurate as ``p_y → 1`` (``fastunlearn.kernels.token_stats``).
Rows whose label is ``ignore_index`` get NaN (undefined there, and NaN cannot be summed by mistake).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, resolve_backend, result_dtype
from fastunlearn.ops._ihl_torch import implementation
from fastunlearn.ops._linear_chunks import map_chunks
from fastunlearn.ops.fused_linear import _checked_inputs
from fastunlearn.ops.ihl import _check_labels

VARIANCE_FLOOR = 1e-6  # Min-K%++'s clamp of σ²: σ ≥ 1e-3 even where one token has all the mass


@torch.library.custom_op("fastunlearn::token_stats", mutates_args=())
def _token_stats_op(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> Tensor:
    """``[N, 3]`` ``(log p_y, μ, σ)`` of ``[N, V]`` logits against ``[N]`` labels; NaN where ignored."""
    impl = implementation(backend, "token_stats")
    return impl.token_stats(logits, labels.contiguous(), ignore_index, VARIANCE_FLOOR)


@_token_stats_op.register_fake
def _(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> Tensor:
    return logits.new_empty((logits.shape[0], 3), dtype=result_dtype(logits, backend))


def token_stats(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    backend: Backend = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p_y, μ, σ)`` of each row of ``logits`` (module docstring), each shaped like ``labels``, fp32
    (fp64 for fp64 logits on the PyTorch path), no gradient; NaN where ``labels`` is ``ignore_index``.
    Arguments as :func:`fastunlearn.ihl_loss`.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError("token_stats expects floating-point logits with a vocabulary dimension [..., V]")
    _check_labels(labels, logits.shape[:-1], logits.shape[-1], logits.device, ignore_index, validate)
    rows = logits.reshape(-1, logits.shape[-1])
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
    """:func:`token_stats` of the logits ``hidden @ weight.T (+ bias)`` a chunk of tokens at a time, never
    ``[N, V]``; arguments as in :func:`fastunlearn.ops.fused_linear.fused_linear_nll_loss`."""
    h, y, weight, bias, resolved, chunk_rows = _checked_inputs(
        "linear_token_stats", hidden, weight, labels, bias, ignore_index, backend, chunk_rows, validate
    )

    def stats(r0: int, logits: Tensor) -> tuple[Tensor]:
        return (_token_stats_op(logits, y[r0 : r0 + logits.shape[0]], ignore_index, resolved),)

    (out,) = map_chunks(h, weight, bias, chunk_rows, stats)
    return tuple(col.view(labels.shape) for col in out.unbind(1))  # type: ignore[return-value]
