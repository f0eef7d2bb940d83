"""nll_loss (the IHL kernels in NLL mode) against an fp64 oracle: what is particular to the NLL (it is
cross-entropy, confident rows, the shifted form). The checks both row losses share are in
test_row_losses.py.

Tolerances as in test_ihl.py, per element against the oracle on the same dtype-rounded logits: the
loss is fp32 statistics of positive sums (rtol 1e-5, amplified fp32 rounding); gradients are that
fp32 result rounded to the logits' dtype (half an ulp: 2⁻⁸ bf16, 2⁻¹¹ fp16, plus fp16's smallest
subnormal for entries that underflow).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import oracles
from helpers.oracles import GRAD_TOL, assert_close, random_problem
from references.ihl import nll_oracle_rows

from fastunlearn import nll_loss

FUSED = ["torch", "triton"]
run = functools.partial(oracles.run, nll_loss)
expected = functools.partial(oracles.expected, nll_oracle_rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp64_is_cross_entropy(reduction):
    """fp64 logits stay fp64 on the PyTorch path: the oracle and ``F.cross_entropy`` to fp64 rounding."""
    logits, labels = random_problem(17, 501, torch.float64, seed=3)
    loss, grad, grad_out = run(logits, labels, "torch", reduction)
    want_loss, want_grad = expected(logits, labels, reduction, grad_out)
    assert_close(loss, want_loss, 1e-12)
    assert_close(grad, want_grad, 1e-10, 1e-300)
    x = logits.clone().requires_grad_()
    F.cross_entropy(x, labels, reduction=reduction).backward(grad_out)
    assert_close(loss, F.cross_entropy(logits, labels, reduction=reduction), 1e-12)
    assert_close(grad, x.grad, 1e-10, 1e-300)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("margin", [20.0, 40.0])
def test_confident_rows_keep_relative_accuracy(backend, margin):
    """z_y ≥ max + 20: the loss ≈ Σ_{v≠y} e^{z_v − z_y} ≈ 1e-6 … 1e-15 and the target gradient is its
    negative. ``lse − z_y`` in fp32 (what log-softmax computes) has no correct digit left; the
    softplus form keeps the relative accuracy of both."""
    logits, labels = random_problem(6, 997, torch.float32, seed=11, ignore_frac=0)
    rows = torch.arange(6)
    logits[rows, labels] = logits.max(-1).values + margin
    loss, grad, grad_out = run(logits, labels, backend, "none", grad_out=torch.ones(6))
    want_loss, want_grad = expected(logits, labels, "none", grad_out)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)
    naive = F.cross_entropy(logits, labels, reduction="none").double()
    assert ((naive - want_loss).abs() / want_loss).max() > 1e-2  # the check can tell the difference


def test_shifted_nll_shifts_labels_and_reads_bf16_logits_without_an_fp32_copy(monkeypatch):
    """``shifted_nll``: the label at ``t + 1`` scores the logits at ``t``; bf16 logits reach the kernel
    as they are (no fp32 tensor of the logits' size is made, forward or backward) and the statistics
    accumulate in fp32 (rtol 1e-5 against the fp64 oracle of the same bf16 values)."""
    from helpers.allocations import RecordOutputs

    from fastunlearn.ops import _ihl_torch
    from fastunlearn.ops.nll import shifted_nll

    monkeypatch.setattr(_ihl_torch, "CPU_BLOCK_ELEMENTS", 4096)  # several blocks at this size
    B, T, V = 3, 9, 1031
    logits, flat = random_problem(B * T, V, torch.bfloat16, seed=21)
    logits = logits.view(B, T, V).requires_grad_()
    labels = flat.view(B, T)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    want_rows, want_grad, valid = nll_oracle_rows(logits.detach().reshape(-1, V), targets.reshape(-1), -100)
    with RecordOutputs() as rec:
        loss = shifted_nll(logits, labels)
        loss.backward()
    assert 0 < rec.largest(torch.float32) <= 4096  # the PyTorch path's blocks, never [B, T, V]
    assert loss.dtype == torch.float32
    count = int(valid.sum())
    assert_close(loss, want_rows.sum() / count, 1e-5)
    assert_close(logits.grad, (want_grad / count).view(B, T, V), *GRAD_TOL[torch.bfloat16])
    rows = shifted_nll(logits.detach(), labels, "none")
    assert rows.shape == (B * T,) and torch.equal(rows.view(B, T)[:, -1], torch.zeros(B))
    assert_close(rows, want_rows, 1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        shifted_nll(logits, labels.clamp_min(0) + V)


def test_shifted_nll_checks_cpu_labels_on_the_host_before_they_move():
    """Labels on the CPU with logits elsewhere are range-checked on the host, before anything runs on the
    logits' device (no synchronisation of it per call). Logits on the ``meta`` device stand for an
    accelerator: nothing can be computed or read there, so the clear error must come from the host."""
    from fastunlearn.ops.nll import shifted_nll

    logits = torch.empty(2, 5, 7, device="meta")
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 6, 7, 0]])  # 7 is outside [0, 7)
    with pytest.raises(ValueError, match="label 7 is outside the vocabulary"):
        shifted_nll(logits, labels)
    with pytest.raises(ValueError, match="label -3 is outside the vocabulary"):
        shifted_nll(
            logits, labels.clamp_max(6).index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(-3))
        )
