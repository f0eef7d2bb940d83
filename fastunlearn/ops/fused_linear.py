"""IHL and NLL straight from the last hidden states: the logits never exist in full (the "fused
linear" loss of Liger-Kernel and Cut Cross-Entropy, here for the Inverted Hinge Loss of Cha et al. 2025).

Tokens are processed in chunks (:mod:`fastunlearn.ops._linear_chunks`): a chunk's logits are computed,
the row kernels (the ones :func:`fastunlearn.ihl_loss` and :func:`fastunlearn.nll_loss` use, in IHL or
NLL mode) produce its loss and write its gradient over the chunk's logits in place, and the gradient
is folded into ``∂h``, ``∂W`` and ``∂b`` before the next chunk. Peak memory is one chunk of logits
instead of ``[N, V]``: for Llama-3's 128k vocabulary and 16k tokens that is ~8 GB of fp32 logits (and
as much again for their gradient) replaced by a 256 MB chunk.

One chunk loop serves two strategies:

- ``reduction="mean"`` or ``"sum"``: the gradients are formed during the forward, as Liger-Kernel's
  fused linear cross-entropy does (the scale ``1/count`` of the mean is known then); the backward
  only multiplies them by ``grad_output``. Three matmuls, as for materialised logits. In bf16 that
  product is one more rounding of ``∂h`` than autograd makes, unless ``grad_output`` is a power of two
  (1 in a plain ``loss.backward()``).
- ``reduction="none"`` (per-token losses, e.g. NPO's per-sequence log-probabilities, whose weights
  are only known in the backward): the forward keeps five numbers per token (the row statistics),
  and the backward recomputes each chunk's logits — one more matmul, as in Cut Cross-Entropy.

Both run inside the custom operators of :mod:`fastunlearn.ops._fused_ops` (one opaque node under
``torch.compile``; fake implementations that report the chunk buffer under ``FakeTensorMode``).

Precision: the logits and the gradient chunks are in the inputs' dtype (bf16 stays bf16: no fp32
copy of hidden states, weight or logits), the row statistics in fp32, and ``∂W`` and ``∂b`` are
accumulated over chunks in fp32 and returned in the weight's dtype. Under ``torch.autocast`` the
inputs are cast to the autocast dtype first, exactly as ``F.linear`` would cast them, and the
computation itself runs with autocast off, so the result matches autocast logits.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops._fused_ops import fused_linear_row_loss
from fastunlearn.ops._linear_chunks import check_head, chunk_logits
from fastunlearn.ops._row_ops import row_loss
from fastunlearn.ops.ihl import _check_labels, _check_reduction

# Elements of logits per chunk. On a GPU 64M (256 MB in fp32) keeps each chunk's matmuls large
# enough to run at full rate while bounding the memory; on CPU a matmul of a few hundred rows is
# already at full rate, so chunks are 8M elements (32 MB).
CHUNK_ELEMENTS = 1 << 26
CPU_CHUNK_ELEMENTS = 1 << 23

__all__ = ["fused_linear_ihl_loss", "fused_linear_nll_loss", "fused_linear_token_stats"]


def resolve_chunk_rows(chunk_rows: int | None, device: torch.device, vocab: int) -> int:
    """Rows per chunk: ``chunk_rows`` (checked), or about ``CHUNK_ELEMENTS`` logits on a GPU and
    ``CPU_CHUNK_ELEMENTS`` on CPU."""
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
    """``(hidden, weight, bias)`` as ``F.linear`` would see them under autocast, the resolved backend
    and the rows per chunk, after checking every argument (a clear error for each bad one)."""
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
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    nll, hits = [], []
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        buffer = h.new_empty(min(chunk_rows, h.shape[0]), weight.shape[0])
        for r0, h_chunk, logits in chunk_logits(h, weight, bias, chunk_rows, buffer):
            chunk_labels = y[r0 : r0 + h_chunk.shape[0]]
            rows = row_loss(logits.unsqueeze(0), chunk_labels, "nll", ignore_index, resolved, False)[0]
            nll.append(rows)
            hits.append(logits.argmax(dim=-1) == chunk_labels)
    return torch.cat(nll).view(labels.shape), torch.cat(hits).view(labels.shape)
