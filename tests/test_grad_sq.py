"""``per_example_grad_sq`` against an fp64 oracle built from explicit per-example gradients.

Oracle: ``g_n = G_nᵀ X_n`` for every example by ``einsum`` in fp64 on the *same* (dtype-rounded)
inputs, then ``Σ_n g_n²``. Tolerance, per element: the fp32 paths compute each ``g_n`` entry as a
T-term dot product, whose rounding error is at most ``T·u·b`` with ``u = 2⁻²⁴`` and
``b = Σ_t |G_n[t, o]|·|X_n[t, i]|``; squaring doubles the relative error and the sum over examples
adds them, so ``|got − want| ≤ 2·T·u·Σ_n b_n² + u·|want|`` (the last term: the final fp32 rounding).
bf16/fp16 inputs are exact in fp32 products, so the same bound applies to them. The bound is
checked for every element with a safety factor of 2 — tight where ``g_n`` is large, and honest where
cancellation makes it small.
"""

from __future__ import annotations

import pytest
import torch
from references.formulations import per_example_grad_sq_reference

from fastunlearn.ops.grad_sq import _grad_sq_torch, per_example_grad_sq

U32 = 2.0**-24
BACKENDS = ["torch", "triton"]
# (B, T, in, out): odd sizes, several output tiles (32×32 under the interpreter), T above and below the
# token block (16), B = 1, T = 1 (the outer-product shortcut).
# (B, T, in, out); out = 200 is 7 tiles of 32: two GROUP_O groups, the second one partial.
SHAPES = [(3, 19, 45, 37), (1, 7, 33, 20), (4, 1, 24, 18), (2, 40, 70, 17), (2, 16, 32, 32), (2, 17, 40, 200)]


def oracle(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``Σ_n (G_nᵀ X_n)²`` and the per-element error scale ``Σ_n (|G_n|ᵀ|X_n|)²``."""
    x, g = x.double(), g.double()
    if x.dim() == 2:
        x, g = x.unsqueeze(1), g.unsqueeze(1)
    want = torch.einsum("bto,bti->boi", g, x).square().sum(0)
    scale = torch.einsum("bto,bti->boi", g.abs(), x.abs()).square().sum(0)
    return want, scale


def assert_matches(
    got: torch.Tensor, x: torch.Tensor, g: torch.Tensor, base: torch.Tensor | None = None
) -> None:
    want, scale = oracle(x, g)
    if base is not None:
        want = want + base.double()
        scale = scale + base.double().abs()
    T = x.shape[1] if x.dim() == 3 else 1
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got.double() - want).abs()
    bound = 2 * (2 * T * U32 * scale + U32 * want.abs()) + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}× the fp32 bound"


def inputs(B, T, n_in, n_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, n_in, generator=gen).to(dtype)
    g = torch.randn(B, T, n_out, generator=gen).to(dtype)
    return x, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_oracle(backend, shape, dtype):
    x, g = inputs(*shape, dtype)
    got = per_example_grad_sq(x, g, backend=backend)
    assert_matches(got, x, g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_and_mixed_dtypes(backend):
    x, g = inputs(3, 21, 40, 35, torch.float16, seed=1)
    assert_matches(per_example_grad_sq(x, g, backend=backend), x, g)
    x32 = x.float()  # fp32 inputs with bf16 gradients: promoted to fp32
    g16 = g.to(torch.bfloat16)
    assert_matches(per_example_grad_sq(x32, g16, backend=backend), x32, g16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_inputs(backend):
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(13, 29, generator=gen), torch.randn(13, 11, generator=gen)
    got = per_example_grad_sq(x, g, backend=backend)
    assert_matches(got, x, g)
    # (G⊙G)ᵀ(X⊙X): each example's gradient is an outer product, squared elementwise.
    torch.testing.assert_close(got, per_example_grad_sq(x.unsqueeze(1), g.unsqueeze(1), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulates_into_strided_out(backend):
    x, g = inputs(3, 18, 36, 34, torch.float32, seed=3)
    storage = torch.rand(36, 34)
    out = storage.t()  # a non-contiguous [out, in] view
    before = out.clone()
    result = per_example_grad_sq(x, g, out, backend=backend)
    assert result is out
    assert_matches(storage.t(), x, g, base=before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 50, generator=gen)[:, ::2, 3:41]  # token stride 2, offset features
    g = torch.randn(3, 20, 25, generator=gen).permute(0, 2, 1)[:, 2:22]  # feature stride 25
    assert not x.is_contiguous() and not g.is_contiguous()
    assert_matches(per_example_grad_sq(x, g, backend=backend), x, g)


@pytest.mark.parametrize("buffer_examples", [1, 2, 3])
def test_torch_chunks(buffer_examples):
    x, g = inputs(5, 9, 12, 10, torch.float32, seed=5)
    out = torch.zeros(10, 12)
    _grad_sq_torch(x, g, out, buffer_bytes=buffer_examples * 10 * 12 * 4)
    assert_matches(out, x, g)


def test_fp64_inputs_round_once():
    # fp64 operands are reduced in fp64 and rounded once into the fp32 result: ≤ u·|want|, plus the fp64
    # reductions of the path and of the oracle (the module docstring's bound with u₆₄ = 2⁻⁵³, each).
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 15, 21, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 15, 19, generator=gen, dtype=torch.float64)
    want, scale = oracle(x, g)
    got = per_example_grad_sq(x, g, backend="torch")
    assert got.dtype == torch.float32
    bound = 2 * (U32 * want.abs() + 2 * (2 * 15 * 2.0**-53 * scale + 2.0**-53 * want.abs()))
    assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    x, g = torch.zeros(0, 5, 7), torch.zeros(0, 5, 3)
    assert torch.equal(per_example_grad_sq(x, g, backend=backend), torch.zeros(3, 7))
    out = torch.ones(3, 7)
    assert torch.equal(
        per_example_grad_sq(torch.zeros(2, 0, 7), torch.zeros(2, 0, 3), out, backend=backend), out
    )


def test_benchmark_baseline_is_the_explicit_materialisation():
    """The benchmarks' baseline (every per-example gradient at once) computes the same quantity."""
    x, g = inputs(2, 5, 6, 4, torch.float32, seed=7)
    assert_matches(per_example_grad_sq_reference(x, g), x, g)


@pytest.mark.parametrize(
    ("x", "g", "out", "error", "match"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 4, 5), None, ValueError, "every dimension but the last"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 5), None, ValueError, r"\[B, T, features\]"),
        (torch.zeros(2, 3, 4, 1), torch.zeros(2, 3, 4, 1), None, ValueError, r"\[B, T, features\]"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), None, TypeError, "floating-point"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(4, 5), ValueError, r"\[out, in\]"),
        (
            torch.zeros(2, 3, 4),
            torch.zeros(2, 3, 5),
            torch.zeros(5, 4, dtype=torch.float64),
            TypeError,
            "float32",
        ),
    ],
)
def test_bad_input(x, g, out, error, match):
    with pytest.raises(error, match=match):
        per_example_grad_sq(x, g, out)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        per_example_grad_sq(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), backend="cuda")
