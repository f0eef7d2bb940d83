"""fused_linear_ihl_loss against autograd through the materialised logits, in fp64.

Tolerance: the fused path computes the logits in the inputs' dtype with the same matmul, then the
same IHL statistics as ``ihl_loss``; the only difference from the fp64 oracle is fp32 rounding of the
matmuls and the loss (rtol 1e-5 on a norm basis per output; bf16 rounds each chunk's gradient to bf16
before the ``G·W`` product, as autograd through bf16 logits does, so it is judged at bf16's 2⁻⁸).
"""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import assert_close

from fastunlearn.ops.fused_linear import fused_linear_ihl_loss
from fastunlearn.ops.oracle import ihl_oracle_rows


def oracle(hidden, weight, bias, labels, reduction):
    """Loss and gradients in fp64 through explicit logits and the closed-form IHL gradient."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    z = h @ w.t() + (bias.double() if bias is not None else 0)
    loss_rows, grad_z, valid = ihl_oracle_rows(z, labels.reshape(-1))
    scale = 1.0 / max(int(valid.sum()), 1) if reduction == "mean" else 1.0
    grad_z = grad_z * scale
    return loss_rows.sum() * scale, (grad_z @ w).view(hidden.shape), grad_z.t() @ h, grad_z.sum(0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_materialised_logits(backend, reduction, with_bias):
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(2, 13, 24, generator=gen)
    weight = torch.randn(1001, 24, generator=gen) * 0.3
    bias = torch.randn(1001, generator=gen) if with_bias else None
    labels = torch.randint(0, 1001, (2, 13), generator=gen)
    labels[0, :4] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    loss = fused_linear_ihl_loss(h, w, labels, bias=b, reduction=reduction, backend=backend, chunk_rows=5)
    loss.backward(torch.tensor(0.7))
    want_loss, want_h, want_w, want_b = oracle(hidden, weight, bias, labels, reduction)
    assert_close(loss, want_loss, 1e-5)
    assert_close(h.grad, want_h * 0.7, 1e-5, 1e-7 * want_h.abs().max())
    assert_close(w.grad, want_w * 0.7, 1e-5, 1e-7 * want_w.abs().max())
    if with_bias:
        assert_close(b.grad, want_b * 0.7, 1e-5, 1e-7 * want_b.abs().max())


def test_frozen_weight_gets_no_gradient_and_bf16_matches_autograd():
    gen = torch.Generator().manual_seed(22)
    hidden = torch.randn(37, 32, generator=gen).bfloat16()
    weight = (torch.randn(515, 32, generator=gen) * 0.2).bfloat16()  # frozen, as in LoRA
    labels = torch.randint(0, 515, (37,), generator=gen)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_ihl_loss(h, weight, labels, backend="torch", chunk_rows=8)
    loss.backward()
    assert weight.grad is None and h.grad.dtype == torch.bfloat16
    want_loss, want_h, _, _ = oracle(hidden, weight, None, labels, "mean")
    # bf16 logits, then fp32 statistics: the loss carries the logits' bf16 rounding (2^-8 relative
    # per logit, a few 1e-3 on the loss).
    assert_close(loss, want_loss, 2e-2)
    assert_close(h.grad, want_h, 2.0**-6, 2.0**-8 * want_h.abs().max())


@pytest.mark.parametrize(
    ("hidden", "weight", "labels", "kwargs", "error", "match"),
    [
        (torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long), {}, ValueError, "H ="),
        (torch.randn(4, 8), torch.randn(10, 8).double(), torch.zeros(4, dtype=torch.long), {}, TypeError,
         "dtype"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long), {}, ValueError, "shape"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), 10), {}, ValueError, "outside"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), {"reduction": "none"},
         ValueError, "reduction"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), {"bias": torch.zeros(3)},
         ValueError, "bias"),
    ],
)  # fmt: skip
def test_bad_input(hidden, weight, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_linear_ihl_loss(hidden, weight, labels, **kwargs)


def test_no_grad_gives_the_same_loss():
    gen = torch.Generator().manual_seed(23)
    hidden, weight = torch.randn(11, 16, generator=gen), torch.randn(301, 16, generator=gen)
    labels = torch.randint(0, 301, (11,), generator=gen)
    with torch.no_grad():
        loss = fused_linear_ihl_loss(hidden, weight, labels, backend="torch", chunk_rows=4)
    want_loss, _, _, _ = oracle(hidden, weight, None, labels, "mean")
    assert_close(loss, want_loss, 1e-5)
