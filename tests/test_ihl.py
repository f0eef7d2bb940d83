"""IHL loss and gradient against an fp64 oracle written from SPEC §2, for every backend: what is
particular to IHL (the runner-up, ties, confident rows, the paper's formulation). The checks both row
losses share (the dtype × vocabulary sweep, strided logits, ignored rows) are in test_row_losses.py.

Tolerances, per element, ``|got − want| ≤ rtol·|want| + atol`` against the fp64 oracle evaluated on the
*same* (dtype-rounded) logits:
- fp32: rtol 1e-5. The fused paths form every quantity as a ratio of positive sums; the only error is
  fp32 rounding (~1e-7 per operation, amplified by |z − lse| ≲ 30 inside ``exp``).
- bf16 / fp16 gradients: the stored value is the fp32 result rounded to the logits' dtype, so the
  error is bounded by half a unit in the last place, 2⁻⁸ (bf16, 8 significant bits) / 2⁻¹¹ (fp16)
  relative — the error
  PyTorch makes when it rounds its own fp32 result — plus the fp32 error; fp16 adds half its smallest
  subnormal (2⁻²⁵) for entries that underflow. The loss itself is returned in fp32: rtol 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import oracles
from helpers.oracles import assert_close, random_problem
from references.formulations import ihl_paper_formulation, ihl_reference
from references.ihl import ihl_oracle_rows

from fastunlearn import IHLLoss, ihl_loss

FUSED = ["torch", "triton"]
run = functools.partial(oracles.run, ihl_loss)
expected = functools.partial(oracles.expected, ihl_oracle_rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_backend_keeps_fp64(reduction):
    """fp64 logits stay fp64 on the PyTorch path: the oracle to fp64 rounding (the same cancellation-free
    formulas, each a few fp64 operations: 1e-12 relative leaves three orders of magnitude of margin)."""
    logits, labels = random_problem(17, 501, torch.float64, seed=3)
    loss, grad, grad_out = run(logits, labels, "torch", reduction)
    want_loss, want_grad = expected(logits, labels, reduction, grad_out)
    assert loss.dtype == grad.dtype == torch.float64
    assert_close(loss, want_loss, 1e-12)
    assert_close(grad, want_grad, 1e-10, 1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_benchmark_baselines_agree(dtype):
    """The two eager formulations the benchmarks time (the formula written plainly and the paper's
    code) compute the same loss and gradient, so a speed-up over either compares like with like."""
    logits, labels = random_problem(40, 1003, dtype, seed=5)
    paper_in = logits.float().clone().requires_grad_()
    ref_in = logits.float().clone().requires_grad_()
    paper = ihl_paper_formulation(paper_in, labels)
    ref = ihl_reference(ref_in, labels)
    paper.backward()
    ref.backward()
    assert_close(ref, paper.detach(), 1e-6)
    assert_close(ref_in.grad, paper_in.grad, 1e-5, 1e-9)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("margin", [20.0, 40.0])
def test_confident_rows_keep_target_gradient(backend, margin):
    """z_y ≥ max + 20: 1 − p_y ≈ V·e^-20 is below fp32's resolution next to 1; the target gradient
    p_y·(1 − p_y + p_m) must still be accurate (the naive fp32 formula gets it wrong)."""
    logits, labels = random_problem(6, 997, torch.float32, seed=11, ignore_frac=0)
    rows = torch.arange(6)
    logits[rows, labels] = logits.max(-1).values + margin
    loss, grad, grad_out = run(logits, labels, backend, "sum", grad_out=torch.tensor(1.0))
    want_loss, want_grad = expected(logits, labels, "sum", grad_out)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)
    assert (want_grad[rows, labels] > 0).all()
    # The same check on the plain fp32 formula fails: this test can tell the difference.
    naive = logits.clone().requires_grad_()
    ihl_reference(naive, labels, reduction="sum").backward()
    naive_err = (naive.grad[rows, labels].double() - want_grad[rows, labels]).abs() / want_grad[rows, labels]
    assert naive_err.max() > 1e-2


@pytest.mark.parametrize("backend", FUSED)
def test_close_target_and_runner_up(backend):
    """p_m − p_y when z_m ≈ z_y: formed through expm1, so it keeps its relative accuracy."""
    logits, labels = random_problem(8, 300, torch.float32, seed=12, ignore_frac=0)
    rows = torch.arange(8)
    top = logits.max(-1).values + 5
    logits[rows, labels] = top
    logits[rows, (labels + 1) % 300] = top + torch.tensor([0, 1e-6, -1e-6, 1e-4, -1e-3, 1e-2, 0.3, -0.7])
    loss, grad, grad_out = run(logits, labels, backend, "none")
    want_loss, want_grad = expected(logits, labels, "none", grad_out)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_ties_pick_first_index(backend):
    gen = torch.Generator().manual_seed(13)
    logits = torch.randint(-3, 3, (24, 40), generator=gen).float()  # many exact ties
    labels = torch.randint(0, 40, (24,), generator=gen)
    loss, grad, grad_out = run(logits, labels, backend, "none")
    want_loss, want_grad = expected(logits, labels, "none", grad_out)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)


def cross_block_ties(vocab: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Rows whose best non-target logit is tied across vocabulary blocks of width ``block``, and the
    index SPEC §2 asks for in each (the first). The kernel keeps a running best over blocks; a later
    block's equal maximum must not replace it."""
    gen = torch.Generator().manual_seed(seed)
    # Background logits below 3 (|N(0, 0.25)| < 3 is 6σ), ties at 4: no entry dominates the row, so
    # the softmax sums stay well conditioned and any error is the tie's (m gets −p_m·ℓ, another
    # tied j gets (p_m − p_y)·p_j, of the opposite sign).
    logits = (torch.randn(7, vocab, generator=gen) * 0.5).clamp(-3, 3)
    labels = torch.randint(0, 8, (7,), generator=gen) + 20  # away from every tie below
    top, last = 4.0, vocab - 1
    ties = [
        [block - 1, block],  # the last entry of block 0 and the first of block 1
        [3, block + 30],
        [block + 5, block + 9, last],  # later blocks only; the target (below) holds the same value
        [block + 2, last],  # the second tie in the last, partial block
        [0, block, last],  # one in each of the first, second and last block
        [block + 1, block + 3],  # block 1 beats block 0's maximum (below), then an in-block tie
        [1, block + 1],  # the target holds a larger value
    ]
    for row, positions in enumerate(ties):
        logits[row, positions] = top
    labels[2] = 3
    logits[2, 3] = top
    logits[5, 10] = top - 0.5
    logits[6, labels[6]] = top + 2
    return logits, labels, [positions[0] for positions in ties]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("blocks", [2, 3])
def test_ties_across_kernel_blocks_pick_first_index(backend, blocks):
    from fastunlearn.kernels.ihl import MAX_BLOCK_V, _launch_config

    vocab = (blocks - 1) * MAX_BLOCK_V + 37  # just past whole blocks of the launcher's real width
    block, _ = _launch_config(vocab)
    assert block == MAX_BLOCK_V and -(-vocab // block) == blocks
    logits, labels, first = cross_block_ties(vocab, block, seed=20 + blocks)
    masked = logits.scatter(1, labels[:, None], float("-inf"))
    assert masked.argmax(-1).tolist() == first  # the construction: torch.argmax returns the first too
    loss, grad, grad_out = run(logits, labels, backend, "none")
    want_loss, want_grad = expected(logits, labels, "none", grad_out)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)


def test_module_wrapper_and_torch_compile():
    logits, labels = random_problem(10, 101, torch.float32, seed=18)
    module = IHLLoss(reduction="sum", backend="torch")
    eager = module(logits, labels)

    def step(z, y):
        return module(z * 2.0, y) + 1.0

    compiled = torch.compile(step, backend="aot_eager")
    x = logits.clone().requires_grad_()
    out = compiled(x, labels)
    out.backward()
    want_loss, want_grad = expected(logits * 2, labels, "sum", torch.tensor(2.0))
    assert_close(out - 1.0, want_loss, 1e-5)
    assert_close(x.grad, want_grad, 1e-5)
    assert_close(eager, expected(logits, labels, "sum", torch.tensor(1.0))[0], 1e-5)
    assert "reduction='sum'" in repr(module)


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "error", "match"),
    [
        (torch.randn(4, 10), torch.zeros(5, dtype=torch.long), {}, ValueError, "shape"),
        (torch.randn(4, 10), torch.zeros(4), {}, TypeError, "integer"),
        (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long), {}, TypeError, "floating"),
        (torch.randn(4, 10), torch.tensor([0, 1, 10, 2]), {}, ValueError, "label 10 is outside"),
        (torch.randn(4, 10), torch.tensor([0, -1, 3, 2]), {}, ValueError, "label -1 is outside"),
        (torch.randn(4, 10), torch.zeros(4, dtype=torch.long), {"reduction": "avg"}, ValueError, "reduction"),
        (torch.randn(4, 10), torch.zeros(4, dtype=torch.long), {"backend": "cuda"}, ValueError, "backend"),
        (torch.randn(4, 1), torch.zeros(4, dtype=torch.long), {}, ValueError, "at least 2"),
    ],
)
def test_bad_input_errors(logits, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        ihl_loss(logits, labels, **kwargs)


def test_out_of_range_labels_without_validation_count_as_ignored():
    logits, labels = random_problem(6, 30, torch.float32, seed=19, ignore_frac=0)
    bad = labels.clone()
    bad[2] = 99
    loss = ihl_loss(logits, bad, validate=False, backend="torch", reduction="none")
    masked = labels.clone()
    masked[2] = -100
    assert_close(loss, expected(logits, masked, "none", torch.ones(6))[0], 1e-5)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ihl_loss(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="triton")
