"""fused_linear_ihl_loss and fused_linear_nll_loss against the closed-form gradient through the
materialised logits, in fp64.

Tolerance: the fused path computes the logits in the inputs' dtype with the same matmul, then the
same row statistics as ``ihl_loss`` / ``nll_loss``; the only difference from the fp64 oracle is fp32
rounding of the matmuls and the loss (rtol 1e-5 per element, atol 1e-7 of the largest entry for
elements formed by cancellation; bf16 rounds each chunk's gradient to bf16 before the ``G·W``
product, as autograd through bf16 logits does, so it is judged at bf16's 2⁻⁸).
"""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import assert_close
from references.ihl import ihl_oracle_rows, nll_oracle_rows

from fastunlearn import ihl_loss, nll_loss
from fastunlearn.ops.fused_linear import fused_linear_ihl_loss, fused_linear_nll_loss

FUSED = {"ihl": fused_linear_ihl_loss, "nll": fused_linear_nll_loss}
ORACLE_ROWS = {"ihl": ihl_oracle_rows, "nll": nll_oracle_rows}


def oracle(hidden, weight, bias, labels, reduction, loss="ihl", grad_out=None):
    """Loss and gradients in fp64 through explicit logits and the closed-form row gradient, for the
    upstream gradient ``grad_out`` (1 by default; per token for ``reduction="none"``)."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    z = h @ w.t() + (bias.double() if bias is not None else 0)
    loss_rows, grad_z, valid = ORACLE_ROWS[loss](z, labels.reshape(-1))
    if reduction == "none":
        value = loss_rows.view(labels.shape)
        scale = (torch.ones(labels.shape) if grad_out is None else grad_out).double().reshape(-1, 1)
    else:
        count = max(int(valid.sum()), 1) if reduction == "mean" else 1
        value = loss_rows.sum() / count
        scale = (1.0 if grad_out is None else float(grad_out)) / count
    grad_z = grad_z * scale
    return value, (grad_z @ w).view(hidden.shape), grad_z.t() @ h, grad_z.sum(0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["ihl", "nll"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_materialised_logits(backend, loss, reduction, with_bias):
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(2, 13, 24, generator=gen)
    weight = torch.randn(1001, 24, generator=gen) * 0.3
    bias = torch.randn(1001, generator=gen) if with_bias else None
    labels = torch.randint(0, 1001, (2, 13), generator=gen)
    labels[0, :4] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    grad_out = torch.rand(2, 13, generator=gen) + 0.5 if reduction == "none" else torch.tensor(0.7)
    value = FUSED[loss](h, w, labels, bias=b, reduction=reduction, backend=backend, chunk_rows=5)
    value.backward(grad_out)
    want_loss, want_h, want_w, want_b = oracle(hidden, weight, bias, labels, reduction, loss, grad_out)
    assert value.shape == want_loss.shape
    assert_close(value, want_loss, 1e-5)
    assert_close(h.grad, want_h, 1e-5, 1e-7 * want_h.abs().max())
    assert_close(w.grad, want_w, 1e-5, 1e-7 * want_w.abs().max())
    if with_bias:
        assert_close(b.grad, want_b, 1e-5, 1e-7 * want_b.abs().max())


@pytest.mark.parametrize("loss", ["ihl", "nll"])
def test_frozen_weight_gets_no_gradient_and_bf16_matches_autograd(loss):
    gen = torch.Generator().manual_seed(22)
    hidden = torch.randn(37, 32, generator=gen).bfloat16()
    weight = (torch.randn(515, 32, generator=gen) * 0.2).bfloat16()  # frozen, as in LoRA
    labels = torch.randint(0, 515, (37,), generator=gen)
    h = hidden.clone().requires_grad_()
    value = FUSED[loss](h, weight, labels, backend="torch", chunk_rows=8)
    value.backward()
    assert weight.grad is None and h.grad.dtype == torch.bfloat16
    want_loss, want_h, _, _ = oracle(hidden, weight, None, labels, "mean", loss)
    # bf16 logits, then fp32 statistics: the loss carries the logits' bf16 rounding (2^-8 relative
    # per logit, a few 1e-3 on the loss).
    assert_close(value, want_loss, 2e-2)
    assert_close(h.grad, want_h, 2.0**-6, 2.0**-8 * want_h.abs().max())


@pytest.mark.parametrize(
    ("hidden", "weight", "labels", "kwargs", "error", "match"),
    [
        (torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long), {}, ValueError, "H ="),
        (torch.randn(4, 8), torch.randn(10, 8).double(), torch.zeros(4, dtype=torch.long), {}, TypeError,
         "dtype"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long), {}, ValueError, "shape"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), 10), {}, ValueError, "outside"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), {"reduction": "avg"},
         ValueError, "reduction"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), {"bias": torch.zeros(3)},
         ValueError, "bias"),
    ],
)  # fmt: skip
def test_bad_input(hidden, weight, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_linear_ihl_loss(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("loss", ["ihl", "nll"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_with_fp32_weights_matches_the_autocast_logits(loss, reduction):
    """Under bf16 autocast with fp32 hidden states and weight (a mixed-precision model), the fused loss
    runs (no ``out=`` dtype clash) and equals the loss of the logits ``F.linear`` gives under the same
    autocast: the same bf16 inputs, each logit a bf16-rounded product; the rest is fp32 statistics
    (rtol 1e-5 on the loss) and the gradients go through bf16 as autograd's do (2⁻⁸ relative to the
    largest entry, one bf16 rounding of the chunk gradient and one of its product)."""
    gen = torch.Generator().manual_seed(24)
    hidden = torch.randn(3, 7, 40, generator=gen)
    weight = torch.randn(333, 40, generator=gen) * 0.2
    labels = torch.randint(0, 333, (3, 7), generator=gen)
    labels[1, :2] = -100
    grad_out = torch.rand(3, 7, generator=gen) + 0.5 if reduction == "none" else torch.tensor(0.6)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                value = FUSED[loss](h, w, labels, reduction=reduction, backend="torch", chunk_rows=4)
            else:
                logits = torch.nn.functional.linear(h, w)
                assert logits.dtype == torch.bfloat16
                row_loss = ihl_loss if loss == "ihl" else nll_loss
                value = row_loss(logits, labels, reduction=reduction, backend="torch")
        value.backward(grad_out)
        assert h.grad.dtype == w.grad.dtype == torch.float32
        results.append((value.detach(), h.grad, w.grad))
    (got, got_h, got_w), (want, want_h, want_w) = results
    assert_close(got, want, 1e-5)
    assert_close(got_h, want_h, 2.0**-7, 2.0**-8 * want_h.abs().max())
    assert_close(got_w, want_w, 2.0**-7, 2.0**-8 * want_w.abs().max())


def test_empty_batch_gives_zero():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = fused_linear_nll_loss(h, w, torch.zeros(0, dtype=torch.long), backend="torch")
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))


def test_no_grad_gives_the_same_loss():
    gen = torch.Generator().manual_seed(23)
    hidden, weight = torch.randn(11, 16, generator=gen), torch.randn(301, 16, generator=gen)
    labels = torch.randint(0, 301, (11,), generator=gen)
    with torch.no_grad():
        loss = fused_linear_ihl_loss(hidden, weight, labels, backend="torch", chunk_rows=4)
    want_loss, _, _, _ = oracle(hidden, weight, None, labels, "mean")
    assert_close(loss, want_loss, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_are_folded_once_where_they_are_used(monkeypatch, reduction):
    """``"mean"`` forms the gradients in the forward and the backward only scales them; ``"none"``
    forms them in the backward, where the per-token weights are known, and none in the forward (they
    would be thrown away)."""
    from fastunlearn.ops._linear_chunks import ChunkScratch

    folds = []
    fold = ChunkScratch.fold
    monkeypatch.setattr(ChunkScratch, "fold", lambda self, *args: folds.append(1) or fold(self, *args))
    gen = torch.Generator().manual_seed(29)
    hidden = torch.randn(9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(301, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 301, (9,), generator=gen)
    loss = fused_linear_nll_loss(hidden, weight, labels, reduction=reduction, backend="torch", chunk_rows=4)
    assert len(folds) == (3 if reduction == "mean" else 0)
    loss.sum().backward()
    assert len(folds) == 3
