"""nll_loss (the IHL kernels in NLL mode) against an fp64 oracle, for every backend.

Tolerances as in test_ihl.py, per element against the oracle on the same dtype-rounded logits: the
loss is fp32 statistics of positive sums (rtol 1e-5, amplified fp32 rounding); gradients are that
fp32 result rounded to the logits' dtype (half an ulp: 2⁻⁸ bf16, 2⁻¹¹ fp16, plus fp16's smallest
subnormal for entries that underflow).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import GRAD_TOL, assert_close, random_problem

from fastunlearn import nll_loss
from fastunlearn.ops.oracle import nll_oracle_rows

FUSED = ["torch", "triton"]


def expected(logits, labels, reduction, grad_out, ignore_index=-100):
    loss_rows, grad_rows, valid = nll_oracle_rows(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index
    )
    if reduction == "none":
        return loss_rows.view(labels.shape), grad_rows * grad_out.double().reshape(-1, 1)
    count = max(int(valid.sum()), 1) if reduction == "mean" else 1
    return loss_rows.sum() / count, grad_rows * float(grad_out) / count


def run(logits, labels, backend, reduction="mean", grad_out=None, **kwargs):
    x = logits.clone().requires_grad_()
    loss = nll_loss(x, labels, backend=backend, reduction=reduction, **kwargs)
    if grad_out is None:
        grad_out = torch.tensor(0.37) if reduction != "none" else torch.rand(labels.shape) + 0.5
    loss.backward(grad_out)
    return loss, x.grad, grad_out


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "vocab"), [(13, 7), (9, 32003), (3, 70001)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_fp64_oracle(backend, dtype, n, vocab, reduction):
    seed = zlib.crc32(f"nll-{n}-{vocab}-{dtype}-{reduction}-{backend}".encode())
    logits, labels = random_problem(n, vocab, dtype, seed=seed)
    loss, grad, grad_out = run(logits, labels, backend, reduction)
    want_loss, want_grad = expected(logits, labels, reduction, grad_out)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, *GRAD_TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_backend_is_cross_entropy(reduction):
    logits, labels = random_problem(17, 501, torch.float64, seed=3)
    loss, grad, grad_out = run(logits, labels, "reference", reduction)
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


@pytest.mark.parametrize("backend", FUSED)
def test_shifted_slice_and_column_major_logits(backend):
    gen = torch.Generator().manual_seed(14)
    full = torch.randn(3, 9, 333, generator=gen) * 2
    labels = torch.randint(0, 333, (3, 8), generator=gen)
    labels[0, :3] = -100
    shifted = full[:, :-1]
    loss, grad, grad_out = run(shifted, labels, backend, "mean")
    want_loss, want_grad = expected(shifted, labels, "mean", grad_out)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)
    columns = torch.randn(333, 10, generator=gen).t()
    col_labels = torch.randint(0, 333, (10,), generator=gen)
    loss, grad, grad_out = run(columns, col_labels, backend, "sum")
    want_loss, want_grad = expected(columns, col_labels, "sum", grad_out)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)


@pytest.mark.parametrize("backend", [*FUSED, "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(backend, reduction):
    logits = torch.randn(5, 2, 50)
    labels = torch.full((5, 2), -100)
    loss, grad, _ = run(logits, labels, backend, reduction)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_backward_and_custom_ignore_index(backend):
    logits, labels = random_problem(12, 1001, torch.bfloat16, seed=16, ignore_frac=0)
    labels[::3] = 7
    _, want_grad, _ = run(logits, labels, backend, "mean", ignore_index=7)
    x = logits.clone().requires_grad_()
    scores = x * 1
    nll_loss(scores, labels.int(), backend=backend, inplace_backward=True, ignore_index=7).backward(
        torch.tensor(0.37)
    )
    assert torch.equal(scores.detach(), want_grad)
    assert_close(
        want_grad, expected(logits, labels, "mean", torch.tensor(0.37), 7)[1], *GRAD_TOL[torch.bfloat16]
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", FUSED)
def test_non_finite_logits_propagate(backend):
    logits, labels = random_problem(4, 64, torch.float32, seed=17, ignore_frac=0)
    logits[1, 3] = float("nan")
    logits[2, :] = float("inf")
    loss, _, _ = run(logits, labels, backend, "none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 3]]).all()


def test_bad_input_names_the_function():
    with pytest.raises(TypeError, match="nll_loss expects a tensor"):
        nll_loss([1.0, 2.0], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="label 10 is outside"):
        nll_loss(torch.randn(4, 10), torch.tensor([0, 1, 10, 2]))


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
