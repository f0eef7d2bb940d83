"""IHL and NLL straight from the last hidden states, the logits never whole (the "fused linear" loss of
Liger-Kernel and Cut Cross-Entropy, here also for the Inverted Hinge Loss of Cha et al. 2025).

A chunk of tokens' logits is computed, the row kernels give its loss and write its gradient over it,
and the gradient is folded into ``∂h``, ``∂W``, ``∂b`` before the next chunk. For ``"mean"``/``"sum"``
the gradients are formed in the forward (as Liger-Kernel does) and the backward scales them by
``grad_output``; for ``"none"`` (per-token weights known only in the backward) the backward recomputes
each chunk's logits (as Cut Cross-Entropy does). Logits stay in the inputs' dtype, statistics and
``∂W``, ``∂b`` accumulate in fp32; under autocast the inputs are cast as ``F.linear`` casts them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops._fused_ops import fused_linear_row_loss
from fastunlearn.ops._linear_chunks import check_head, map_chunks
from fastunlearn.ops._row_ops import row_loss
from fastunlearn.ops.ihl import _check_labels, _check_reduction

# Logits per chunk: on a GPU 64M (256 MB in fp32) keeps the chunk's matmuls at full rate; on CPU a few
# hundred rows already are, so 8M.
CHUNK_ELEMENTS = 1 << 26
CPU_CHUNK_ELEMENTS = 1 << 23


def resolve_chunk_rows(chunk_rows: int | None, device: torch.device, vocab: int) -> int:
    """Rows per chunk: ``chunk_rows`` (checked), or about ``(CPU_)CHUNK_ELEMENTS`` logits."""
    if chunk_rows is None:
        budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
        return max(1, budget // vocab)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return chunk_rows


def input_needs(*tensors: Tensor | None) -> list[bool]:
    """Which of the tensors an operator must return a gradient for (none under ``no_grad``)."""
    enabled = torch.is_grad_enabled()
    return [enabled and t is not None and t.requires_grad for t in tensors]


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
    """``(hidden, weight, bias)`` as ``F.linear`` sees them under autocast, the resolved backend and the
    rows per chunk, after checking every argument."""
    hidden, weight, bias = check_head(name, hidden, weight, bias)
    _check_labels(labels, hidden.shape[:-1], weight.shape[0], hidden.device, ignore_index, validate)
    resolved = resolve_backend(backend, hidden.device)
    return hidden, weight, bias, resolved, resolve_chunk_rows(chunk_rows, hidden.device, weight.shape[0])


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
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    needs = input_needs(h, weight, bias)
    value = fused_linear_row_loss(
        h, weight, bias, y, loss, ignore_index, reduction, resolved, chunk_rows, needs
    )[0]
    return value.view(labels.shape) if reduction == "none" else value


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

    ``hidden``: ``[..., H]`` last hidden states aligned with ``labels`` (shift the labels, not the
    hidden states, which would copy them); ``weight``: ``[V, H]`` head, no ``∂W`` when frozen.
    ``reduction="none"`` recomputes the logits in the backward. ``chunk_rows``: tokens per chunk (by
    default about 64M logits on a GPU, 8M on CPU). Other arguments and the result as
    :func:`fastunlearn.ihl_loss`.
    """
    return _fused_linear_loss(
        "ihl", hidden, weight, labels, bias, ignore_index, reduction, backend, chunk_rows, validate
    )


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
    """Token NLL (cross-entropy) of the logits ``hidden @ weight.T (+ bias)`` without materialising them:
    :func:`fastunlearn.nll_loss` on the chunks. Arguments as in :func:`fused_linear_ihl_loss`."""
    return _fused_linear_loss(
        "nll", hidden, weight, labels, bias, ignore_index, reduction, backend, chunk_rows, validate
    )


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
    """Per token ``−log p(y)`` and whether ``argmax_v z_v = y`` (first index, as ``torch.argmax``) for the
    logits ``z = hidden @ weight.T (+ bias)``, a chunk at a time and without gradients. Arguments as in
    :func:`fused_linear_nll_loss`. Returns ``(nll, hit)`` shaped like ``labels``, 0/False where ignored.
    """
    hidden, weight, bias, resolved, chunk_rows = _checked_inputs(
        "fused_linear_token_stats", hidden, weight, labels, bias, ignore_index, backend, chunk_rows, validate
    )
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()

    def stats(r0: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        chunk_labels = y[r0 : r0 + logits.shape[0]]
        nll = row_loss(logits.unsqueeze(0), chunk_labels, "nll", ignore_index, resolved, False)[0]
        return nll, logits.argmax(dim=-1) == chunk_labels

    nll, hit = map_chunks(h, weight, bias, chunk_rows, stats)
    return nll.view(labels.shape), hit.view(labels.shape)
