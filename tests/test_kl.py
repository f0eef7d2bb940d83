"""kl_loss and fused_linear_kl_loss against fp64 log-softmaxes (``references.kl``), on both backends.

Tolerances, against the oracle evaluated on the *same* (dtype-rounded) inputs:
- the loss: each row's KL is formed in fp32 as ``T/S_r + (M_z − M_r) + log(S_z/S_r)`` (see
  ``fastunlearn.kernels.kl``), whose terms are at most ``max_v |r_v − z_v|`` (the first two) and a log
  of a ratio of sums of positive terms; their rounding, a few dozen fp32 operations deep
  (``30·2⁻²⁴ ≈ 2e-6``), stays below ``2e-6·(2·max_v |r_v − z_v| + 1)`` per row, and the loss is a
  weighted mean of rows;
- the gradient ``w·(p_j − q_j)``: ``p_j = exp(z_j − lse)`` with ``|z_j − lse| ≲ 40`` and ``lse``
  accurate to a few ulps carries a relative error below ``1e-5``, so each element is within
  ``1e-5·w·(p_j + q_j)``, plus, for bf16 and fp16 logits, the rounding of the stored gradient to their
  dtype (half an ulp: ``2⁻⁸``, ``2⁻¹¹`` relative, fp16's subnormals ``2⁻²⁵``; ``helpers.oracles.GRAD_TOL``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import GRAD_TOL
from references.kl import kl_oracle, row_weights

from fastunlearn import fused_linear_kl_loss, kl_loss

BACKENDS = ["torch", "triton"]
SHAPES = [(3, 5, 7), (2, 3, 32003), (1, 2, 70001)]  # odd vocabulary, Llama-2-ish, above 65536
GRAD_OUT = 0.37


def problem(shape, dtype, seed, *, masked=True):
    """θ and reference logits of standard deviation 3 (the reference a perturbation of θ, as after a
    few training steps), and a mask with one sequence entirely masked."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(shape, generator=gen) * 3
    logits = (ref + torch.randn(shape, generator=gen)).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(shape[:-1], generator=gen) > 0.3
        mask[0] = False
        mask[-1, 0] = True
    return logits, ref.to(dtype), mask


def assert_loss(got, logits, ref, mask, want):
    vocab = logits.shape[-1]
    spread = (ref.double() - logits.double()).abs().reshape(-1, vocab).amax(-1)
    bound = 2e-6 * ((2 * spread + 1) * row_weights(mask, spread.shape[0]).abs()).sum()
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) <= bound, (got.item(), want.item())


def assert_grad(got, logits, ref, mask, want, scale):
    """Every element within the bound of the module docstring."""
    vocab = logits.shape[-1]
    weights = row_weights(mask, logits.reshape(-1, vocab).shape[0]).view(*logits.shape[:-1], 1)
    p_plus_q = logits.double().softmax(-1) + ref.double().softmax(-1)
    rtol, atol = GRAD_TOL[logits.dtype]
    bound = 1e-5 * p_plus_q * (weights * scale).abs() + (rtol - 1e-5) * want.abs() + atol
    err = (got.double() - want).abs()
    assert got.dtype == logits.dtype and torch.isfinite(got).all()
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} elements off; worst {(err / bound).max():.3g}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True])
def test_matches_fp64_oracle(backend, dtype, shape, masked):
    logits, ref, mask = problem(shape, dtype, seed=sum(shape), masked=masked)
    x = logits.clone().requires_grad_()
    loss = kl_loss(x, ref, mask, backend=backend)
    loss.backward(torch.tensor(GRAD_OUT))
    want_loss, want_grad = kl_oracle(logits, ref, mask, GRAD_OUT)
    assert_loss(loss, logits, ref, mask, want_loss)
    assert_grad(x.grad, logits, ref, mask, want_grad, GRAD_OUT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_and_masked_rows_are_not_read(backend):
    logits, ref, _ = problem((2, 4, 33), torch.float32, seed=1, masked=False)
    logits[1, 2] = float("nan")  # a masked position's logits are never read
    x = logits.clone().requires_grad_()
    kl_loss(x, ref, torch.zeros(2, 4, dtype=torch.bool), backend=backend).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    mask = torch.ones(2, 4)  # 0/1 floats select like booleans
    mask[1, 2] = 0
    x.grad = None
    loss = kl_loss(x, ref, mask, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(x.grad[1, 2], torch.zeros(33))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_distributions_give_exactly_zero(backend):
    """``z = r``: every term of ``T/S_r + (M_z − M_r) + log(S_z/S_r)`` is exactly 0, however large the
    logits (no ``lse(z) − lse(r)`` of two large numbers), and so is ``p − q``."""
    logits, _, _ = problem((3, 4, 1001), torch.float32, seed=2, masked=False)
    x = (logits * 40).requires_grad_()
    loss = kl_loss(x, x.detach(), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_is_kl_div_batchmean_in_fp64():
    """fp64 logits stay fp64 on the PyTorch path: ``F.kl_div(log_softmax(z), log_softmax(r),
    reduction="batchmean", log_target=True)`` over the flattened rows to fp64 rounding."""
    logits, ref, _ = problem((3, 5, 301), torch.float64, seed=3, masked=False)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = kl_loss(x, ref, backend="torch")
    want = F.kl_div(y.log_softmax(-1).view(-1, 301), ref.log_softmax(-1).view(-1, 301), reduction="batchmean",
                    log_target=True)  # fmt: skip
    loss.backward()
    want.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-16)


def test_reference_gets_no_gradient():
    logits, ref, mask = problem((2, 3, 50), torch.float32, seed=4)
    x, r = logits.clone().requires_grad_(), ref.clone().requires_grad_()
    kl_loss(x, r, mask, backend="torch").backward()
    assert r.grad is None and x.grad is not None


def head_problem(n, hidden, vocab, dtype, seed, bias):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, hidden, generator=gen, dtype=torch.float64)
    ref_h = h + 0.3 * torch.randn(*n, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * (2 / hidden**0.5)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    mask = torch.rand(n, generator=gen) > 0.3
    return h.to(dtype), ref_h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), mask


def head_oracle(h, ref_h, w, b, mask, grad_out):
    """fp64 loss and ``(∂h, ∂W, ∂b)`` through explicit logits (``G = ∂loss/∂z``, ``∂h = G W``,
    ``∂W = Gᵀ h``, ``∂b = Σ G``; the reference logits a constant), and a bound on the fp32 error of each.

    Bound: each fp32 logit is a dot product of ``H`` terms, off by at most ``δ = γ_H·Σ_k |h_k w_vk|``
    (``γ_n = n·u/(1 − n·u)``, ``u = 2⁻²⁴``), which moves ``p_j`` by at most ``2δ·p_j`` (and ``q_j``
    likewise); with the kernels' own ``1e-5·(p_j + q_j)`` (module docstring) each element of ``G`` is
    within ``E_j = w·grad_out·((p_j + q_j)·1e-5 + 2δ_z·p_j + 2δ_r·q_j)``. The products add their own
    rounding: ``∂h`` within ``E·|W| + γ_V·|G|·|W|``, ``∂W`` within ``Eᵀ|h| + γ_N·|G|ᵀ|h|``, ``∂b``
    within ``Σ E + γ_N·Σ|G|``. The loss moves by at most ``2δ_z + 2·spread·δ_r`` per row on top of its
    own ``2e-6·(2·spread + 1)``. A factor 2 of safety on all.
    """
    u = 2.0**-24
    gamma = lambda n: n * u / (1 - n * u)
    hidden = h.shape[-1]
    h64, r64, w64 = h.double().reshape(-1, hidden), ref_h.double().reshape(-1, hidden), w.double()
    bias = 0 if b is None else b.double()
    z, r = h64 @ w64.t() + bias, r64 @ w64.t() + bias
    loss, grad_z = kl_oracle(z, r, mask, grad_out)
    bias_abs = 0 if b is None else b.double().abs()
    delta_z = gamma(hidden + 1) * (h64.abs() @ w64.abs().t() + bias_abs).amax(-1, keepdim=True)
    delta_r = gamma(hidden + 1) * (r64.abs() @ w64.abs().t() + bias_abs).amax(-1, keepdim=True)
    weights = row_weights(mask, z.shape[0])[:, None]
    p, q = z.softmax(-1), r.softmax(-1)
    err_g = (weights * grad_out).abs() * ((p + q) * 1e-5 + 2 * delta_z * p + 2 * delta_r * q)
    spread = (r - z).abs().amax(-1, keepdim=True)
    n, vocab = z.shape
    want = {
        "loss": (loss, (weights * (2e-6 * (2 * spread + 1) + 2 * delta_z + 2 * spread * delta_r)).sum()),
        "h": (grad_z @ w64, err_g @ w64.abs() + gamma(vocab) * grad_z.abs() @ w64.abs()),
        "w": (grad_z.t() @ h64, err_g.t() @ h64.abs() + gamma(n) * grad_z.abs().t() @ h64.abs()),
        "b": (grad_z.sum(0), err_g.sum(0) + gamma(n) * grad_z.abs().sum(0)),
    }
    return {key: (value, 2 * bound) for key, (value, bound) in want.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_matches_the_logits(backend, masked, with_bias):
    h, ref_h, w, b, mask = head_problem((2, 13), 24, 1001, torch.float32, seed=5, bias=with_bias)
    mask = mask if masked else None
    x, wt = h.clone().requires_grad_(), w.clone().requires_grad_()
    bt = b.clone().requires_grad_() if with_bias else None
    loss = fused_linear_kl_loss(x, ref_h, wt, mask, bt, backend=backend, chunk_rows=5)
    loss.backward(torch.tensor(GRAD_OUT))
    want = head_oracle(h, ref_h, w, b, mask, GRAD_OUT)
    got = {"loss": loss, "h": x.grad.view(-1, 24), "w": wt.grad, "b": bt.grad if with_bias else None}
    for key, value in got.items():
        if value is not None:
            expected, bound = want[key]
            err = (value.double() - expected).abs()
            assert bool((err <= bound).all()), f"{key}: worst {(err / bound).max():.3g} of the bound"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_bf16_frozen_head_equals_kl_loss_of_its_logits(backend):
    """A frozen bf16 head (LoRA): no ``∂W``, and the value and ``∂h`` of ``kl_loss`` on the bf16 logits
    of the same products. The chunk's logits are those products, each rounded once to bf16 as the
    full matmul's are (equal, or one bf16 ulp apart where the two matmuls round an fp32 sum
    differently): the loss within 2⁻⁸ relative, ``∂h`` (one bf16 rounding of the chunk gradient and
    one of its product with ``W`` in each path) within 2⁻⁷ plus 2⁻⁸ of its largest entry."""
    h, ref_h, w, _, mask = head_problem((3, 7), 32, 515, torch.bfloat16, seed=6, bias=False)
    x, y = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss = fused_linear_kl_loss(x, ref_h, w, mask, backend=backend, chunk_rows=4)
    want = kl_loss(y @ w.t(), ref_h @ w.t(), mask, backend=backend)
    loss.backward()
    want.backward()
    assert w.grad is None and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, rtol=2.0**-8, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=2.0**-7, atol=2.0**-8 * float(y.grad.abs().max()))


def test_fused_under_autocast_casts_like_f_linear():
    """Under bf16 autocast with fp32 inputs the fused loss sees bf16 hidden states, reference and head,
    as ``F.linear`` would: it equals the fused loss of the bf16 inputs themselves, exactly."""
    h, ref_h, w, _, mask = head_problem((2, 5), 16, 77, torch.float32, seed=7, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_kl_loss(h, ref_h, w, mask, backend="torch", chunk_rows=3)
    want = fused_linear_kl_loss(
        h.bfloat16(), ref_h.bfloat16(), w.bfloat16(), mask, backend="torch", chunk_rows=3
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.randn(2, 5), torch.randn(2, 6)), ValueError, "one shape"),
        ((torch.randn(2, 5), torch.randint(0, 3, (2, 5))), TypeError, "ref_logits must be a floating"),
        (
            (torch.randn(2, 5), torch.randn(2, 5), torch.ones(3, dtype=torch.bool)),
            ValueError,
            "leading shape",
        ),
        ((torch.randn(2, 5), [1.0]), TypeError, "expects tensors"),
    ],
)
def test_kl_loss_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        kl_loss(*args)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.randn(4, 8), torch.randn(3, 8), torch.randn(10, 8)), ValueError, "one shape"),
        ((torch.randn(4, 8), torch.randn(4, 8).double(), torch.randn(10, 8)), TypeError, "ref_hidden"),
        ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 9)), ValueError, "H ="),
        (
            (torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8), torch.ones(5)),
            ValueError,
            "leading shape",
        ),
    ],
)
def test_fused_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fused_linear_kl_loss(*args)
