"""FILA initialisation (SPEC §3.2) and the adapter export, on random matrices and a tiny Llama.

Tolerances:
- identities in fp32 (``W_res + s·B₀A₀ = W``, logits at init): the only error is the rounding of
  ``W_res`` and of the products, a few fp32 ulps of the weights' scale: rtol/atol 1e-5 (1e-4 for the
  logits, whose magnitudes sum ~100 such products).
- optimality, against fp64 SVDs of ``D·W`` (``D = diag(d)``): the fp32 solver is accurate in the
  *weighted* space, to a multiple of ``u·σ₁`` (``u = 2⁻²⁴``, ``σ₁ = ‖D·W‖₂``); see
  :func:`weighted_error_bound`. Unweighted, that error is divided by ``d_i``, row by row: a fixed
  tolerance there passes or fails with the BLAS code path (MKL's AVX2 vs AVX-512 kernels) on rows with
  small ``d_i``, so every comparison is made in the weighted space.
- export after training (fp32): the reloaded model computes ``W + s·(BA − B₀A₀)`` where the trained
  one computes ``W_res + s·BA``; they differ by the rounding of ``W_res``: atol 1e-5 on the logits.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers.fisher import fisher_llama, make_batch

from fastunlearn.fisher import (
    estimate_fisher,
    fila_factors,
    fila_init,
    fila_record,
    lora_layers,
    save_adapter,
    save_merged,
)


def random_problem(out=40, n_in=24, seed=0, zero_rows=()):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n_in, generator=gen)
    # Row importances spread over four orders of magnitude, so row weighting matters.
    forget = torch.rand(out, n_in, generator=gen) * torch.logspace(-2, 2, out)[:, None]
    retain = torch.rand(out, n_in, generator=gen)
    for row in zero_rows:
        forget[row] = 0
    return W, forget, retain


EPS = 1e-5  # fila_factors' default ε
U32 = 2.0**-24  # fp32 unit roundoff


def row_weights(forget, retain, eps=EPS):
    return (forget.double() / (retain.double() + eps)).sum(1).sqrt()


def weighted_error_bound(sigma: torch.Tensor, rank: int, shape: tuple[int, int]) -> float:
    """Bound on ``‖D·s·B₀A₀ − D·M*‖₂`` for the fp32 solver, ``M* = diag(1/(d+ε))·[D·W]_r`` (SPEC §3.2).

    ``sigma`` holds the singular values of ``D·W``, ``shape = (m, n)``. First-order error sources:

    - the weights ``d`` in fp32 (``n`` non-negative terms summed, a division and a square root): a
      relative error ``≤ (n/2 + 2)·u`` per row, i.e. ``D̃ = (I + Δ)·D``, ``‖Δ·D·W‖₂ ≤ (n/2 + 2)·u·σ₁``;
    - the product ``d_i·W_ij`` rounded element-wise: ``≤ u·‖D·W‖_F ≤ u·√min(m, n)·σ₁``;
    - LAPACK's SVD (backward stable, LAPACK Users' Guide §4.9): the computed factors are within
      ``p·u`` of orthonormal singular vectors of ``D·W + E`` with ``‖E‖₂ ≤ p·u·σ₁``, ``p = p(m, n)`` a
      modest function of the dimensions, taken as ``max(m, n)``.

    These perturb ``D·W`` by ``ε_A``; the rank-``r`` truncation ``P·A`` (``P`` the projector on the top
    ``r`` left singular vectors) then moves by ``‖P̃Ã − PA‖₂ ≤ ε_A·(1 + σ₁/(σ_r − σ_{r+1} − ε_A))``
    (Wedin's sin θ theorem bounds ``‖P̃ − P‖₂``); at full rank ``P̃Ã = Ã`` moves by ``ε_A`` alone.
    After the truncation: the singular vectors' departure from orthonormality (``p·u·σ₁``), the
    fp32 ``d`` once more (``B₀`` divides by it, the check multiplies by the fp64 one), and the factors'
    own rounding (``sqrt(S/s)``, ``1/(d+ε)`` and the products: ``≤ 4u`` relative per element of
    ``U`` and of ``V``, so ``≤ 8u·‖U‖_F·σ₁ = 8u·√r·σ₁``). Nothing here depends on ``1/d_i``.
    """
    m, n = shape
    s1 = float(sigma[0])
    weights = (n / 2 + 2) * U32 * s1
    svd = max(m, n) * U32 * s1
    perturbation = weights + math.sqrt(min(m, n)) * U32 * s1 + svd
    if rank < min(m, n):
        gap = float(sigma[rank - 1] - sigma[rank]) - perturbation
        assert gap > 0, "no gap between σ_r and σ_r+1: the rank-r problem is ill-posed"
        perturbation *= 1 + s1 / gap
    return perturbation + svd + weights + 8 * math.sqrt(rank) * U32 * s1


def assert_solves_weighted_problem(W, forget, retain, A, B, rank, s):
    """``s·B₀A₀`` against SPEC §3.2 in fp64, in the weighted space: the factors are the closed form
    ``diag(1/(d+ε))·[D·W]_r`` to within :func:`weighted_error_bound`, and so attain Eckart–Young's
    optimum ``Σ_{k>r} σ_k²`` of ``‖D·(W − M)‖_F²`` up to that error (and the ``d/(d+ε)`` factor)."""
    d = row_weights(forget, retain)
    DW = d[:, None] * W.double()
    U, S, Vh = torch.linalg.svd(DW, full_matrices=False)
    truncated = (U[:, :rank] * S[:rank]) @ Vh[:rank]  # [D·W]_r
    want = (d / (d + EPS))[:, None] * truncated  # D·M*
    got = d[:, None] * (s * B.double() @ A.double())
    bound = weighted_error_bound(S, rank, tuple(W.shape))
    err = torch.linalg.matrix_norm(got - want, 2).item()
    assert err <= bound, f"weighted error {err:.3g} above the fp32 bound {bound:.3g} (rank {rank})"
    # |‖R + Δ‖² − ‖R‖²| ≤ 2‖R‖‖Δ‖ + ‖Δ‖², with R = D·W − [D·W]_r and Δ = got − [D·W]_r of rank ≤ 2r.
    optimum = S[rank:].square().sum().item()
    error = (DW - got).square().sum().item()
    delta = math.sqrt(2 * rank) * (bound + torch.linalg.matrix_norm(want - truncated, 2).item())
    assert abs(error - optimum) <= 2 * math.sqrt(optimum) * delta + delta**2, (error, optimum)
    return d, error


@pytest.mark.parametrize("rank", [1, 5, 24])
def test_factors_solve_the_row_weighted_problem(rank):
    W, forget, retain = random_problem()
    s = 2.0
    A, B = fila_factors(W, forget, retain, rank, s)
    assert A.shape == (rank, 24) and B.shape == (40, rank) and A.dtype == B.dtype == torch.float32
    d, error = assert_solves_weighted_problem(W, forget, retain, A, B, rank, s)
    if rank < 24:
        # The plain truncated SVD of W is worse in the weighted norm.
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        plain = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        plain_error = (d[:, None] * (W.double() - plain)).square().sum()
        assert plain_error > 1.05 * error


@pytest.mark.parametrize("solver", ["truncated", "svd"])
def test_krylov_and_oracle_solvers_solve_the_row_weighted_problem(solver):
    # 300 x 200 at rank 4: large enough that "truncated" (the default) runs its block Krylov phase
    # rather than its small-matrix dense path; "svd" is the full-SVD oracle. Both must meet the same
    # fp32 bound against the fp64 closed form.
    W, forget, retain = random_problem(300, 200, seed=3)
    A, B = fila_factors(W, forget, retain, 4, 2.0, solver=solver)
    assert_solves_weighted_problem(W, forget, retain, A, B, 4, 2.0)
    again = fila_factors(W, forget, retain, 4, 2.0, solver=solver)
    assert torch.equal(again[0], A) and torch.equal(again[1], B)  # deterministic: resume reproduces it


def test_factor_shapes_follow_sqrt_s_split():
    # A = (V·sqrt(S/s))ᵀ and B = D⁻¹·U·sqrt(S/s): both factors carry sqrt(S/s), so ‖A_k‖ = ‖d∘B_k‖.
    # fp32: unit columns of U and V to p·u each (p = max(m, n) = 40, see weighted_error_bound), d to
    # (n/2 + 2)·u = 14u, a few roundings more: ≈ 100u; rtol 1e-5 ≈ 170u.
    W, forget, retain = random_problem(seed=1)
    A, B = fila_factors(W, forget, retain, 4, 0.5)
    d = row_weights(forget, retain).float()
    torch.testing.assert_close(A.norm(dim=1), ((d + EPS)[:, None] * B).norm(dim=0), rtol=1e-5, atol=0)


def test_zero_fisher_rows():
    W, forget, retain = random_problem(seed=2, zero_rows=(0, 7, 39))
    A, B = fila_factors(W, forget, retain, 6, 2.0)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert torch.equal(B[[0, 7, 39]], torch.zeros(3, 6))  # no weight on those rows: nothing to fit
    assert_solves_weighted_problem(W, forget, retain, A, B, 6, 2.0)
    # Zero retain Fisher with a non-zero forget Fisher: huge but finite row weights.
    A, B = fila_factors(W, forget, torch.zeros_like(retain), 6, 2.0)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_randomized_solver_is_seeded_and_leaves_rng_alone():
    W, forget, retain = random_problem(seed=3)
    torch.manual_seed(123)
    A1, B1 = fila_factors(W, forget, retain, 4, 2.0, solver="randomized")
    after = torch.rand(3)
    torch.manual_seed(123)
    A2, B2 = fila_factors(W, forget, retain, 4, 2.0, solver="randomized")
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert torch.equal(torch.rand(3), after)
    # On a rank-4 D·W the randomised range finder is exact up to rounding: the same fp32 bound holds
    # (its products and QR factorisations are backward stable like the SVD's).
    gen = torch.Generator().manual_seed(4)
    low = torch.randn(40, 4, generator=gen) @ torch.randn(4, 24, generator=gen)
    A, B = fila_factors(low, forget, retain, 4, 2.0, solver="randomized")
    assert_solves_weighted_problem(low, forget, retain, A, B, 4, 2.0)


# ---------------------------------------------------------------------------------------------------
# On a model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    """A tiny fp32 Llama, its Fisher estimates on a forget and a retain batch, and probe inputs."""
    base = fisher_llama(torch.float32, seed=3)
    forget = [make_batch(4, 10, seed=11), make_batch(4, 10, seed=12)]
    retain = [make_batch(4, 10, seed=13)]
    return {
        "base": base,
        "forget": estimate_fisher(base, forget, progress=False),
        "retain": estimate_fisher(base, retain, progress=False),
        "probe": make_batch(3, 10, seed=14, pad_rows=[(2, 7)]),
        "train": forget + retain,
    }


def wrap(base, **lora):
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}
    return get_peft_model(copy.deepcopy(base), LoraConfig(**options))


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train_a_few_steps(model, batches, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for step in range(steps):
        batch = batches[step % len(batches)]
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def test_init_preserves_function_and_weights(setup):
    model = wrap(setup["base"])
    originals = {
        n: layer.get_base_layer().weight.detach().clone() for n, (_, layer) in lora_layers(model).items()
    }
    assert len(originals) == 14  # every linear but lm_head
    fila_init(model, setup["forget"], setup["retain"])
    for name, (_, layer) in lora_layers(model).items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        assert s == 2.0 and B.abs().sum() > 0
        rebuilt = layer.get_base_layer().weight + s * B @ A
        torch.testing.assert_close(rebuilt, originals[name], rtol=1e-5, atol=1e-5, msg=name)
        record = fila_record(layer)
        assert (
            torch.equal(record.A0, A.detach()) and torch.equal(record.B0, B.detach()) and record.scaling == s
        )
        A_want, B_want = fila_factors(originals[name], setup["forget"][name], setup["retain"][name], 4, s)
        assert torch.equal(A.detach(), A_want) and torch.equal(B.detach(), B_want)
    torch.testing.assert_close(
        logits(model, setup["probe"]), logits(setup["base"], setup["probe"]), rtol=1e-4, atol=1e-5
    )


def test_init_is_reproducible_for_resume(setup):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    first, second = wrap(setup["base"]), wrap(setup["base"])
    fila_init(first, setup["forget"], setup["retain"])
    fila_init(second, setup["forget"], setup["retain"])
    for (k1, v1), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    # The documented resume: re-run fila_init on a fresh wrap, then load the trained rank-r adapter.
    train_a_few_steps(first, setup["train"], steps=2)
    checkpoint = {k: v.clone() for k, v in get_peft_model_state_dict(first).items()}
    set_peft_model_state_dict(second, checkpoint)
    assert torch.equal(logits(second, setup["probe"]), logits(first, setup["probe"]))


def test_estimates_from_the_wrapped_model_match(setup):
    model = wrap(setup["base"], target_modules=["q_proj", "down_proj"])
    forget = estimate_fisher(model, setup["train"][:2], progress=False)  # names taken on the peft model
    assert "model.layers.0.self_attn.q_proj" in forget
    plain = {k: v for k, v in setup["forget"].items()}  # plain mapping with peft-style names
    peft_named = {f"base_model.model.{k}.base_layer.weight": v for k, v in setup["retain"].items()}
    fila_init(model, plain, peft_named)
    torch.testing.assert_close(
        logits(model, setup["probe"]), logits(setup["base"], setup["probe"]), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "lora", [{}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}}, {"use_rslora": True}]
)
def test_exported_adapter_reproduces_trained_model(tmp_path, setup, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = wrap(setup["base"], **lora)
    fila_init(model, setup["forget"], setup["retain"])
    train_a_few_steps(model, setup["train"])
    trained = logits(model, setup["probe"])
    assert (trained - logits(setup["base"], setup["probe"])).abs().max() > 1e-2  # training did something

    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    reloaded = PeftModel.from_pretrained(copy.deepcopy(setup["base"]), tmp_path / "adapter")
    for name, (_, layer) in lora_layers(reloaded).items():
        original = dict(lora_layers(model))[name][1]
        assert layer.r["default"] == 2 * original.r["default"]
        assert layer.scaling["default"] == pytest.approx(original.scaling["default"], rel=1e-12)
    torch.testing.assert_close(logits(reloaded, setup["probe"]), trained, rtol=1e-4, atol=1e-5)

    save_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, setup["probe"]), trained, rtol=1e-4, atol=1e-5)


def test_plain_lora_export(tmp_path, setup):
    from peft import PeftModel

    model = wrap(setup["base"], init_lora_weights="gaussian")  # non-zero B after training, no FILA
    train_a_few_steps(model, setup["train"], steps=2)
    save_adapter(model, tmp_path / "plain")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(setup["base"]), tmp_path / "plain")
    assert all(layer.r["default"] == 4 for _, layer in lora_layers(reloaded).values())
    torch.testing.assert_close(
        logits(reloaded, setup["probe"]), logits(model, setup["probe"]), rtol=1e-5, atol=1e-6
    )


def test_export_refuses_to_overwrite(tmp_path, setup):
    model = wrap(setup["base"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_merged(model, tmp_path / "out")
    save_adapter(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


def test_bad_input(setup):
    forget, retain = setup["forget"], setup["retain"]
    with pytest.raises(ValueError, match="no LoRA layers"):
        fila_init(copy.deepcopy(setup["base"]), forget, retain)
    with pytest.raises(ValueError, match="no LoRA layers"):
        fila_init(wrap(setup["base"]), forget, retain, adapter_name="other")
    partial = {k: v for k, v in forget.items() if "down_proj" not in k}
    with pytest.raises(ValueError, match=r"forget Fisher has no entry for 2 LoRA layer.*down_proj"):
        fila_init(wrap(setup["base"]), partial, retain)
    reshaped = dict(retain.items())
    reshaped["model.layers.1.mlp.up_proj"] = reshaped["model.layers.1.mlp.up_proj"].t()
    with pytest.raises(ValueError, match=r"retain Fisher of layer 'model.layers.1.mlp.up_proj' has shape"):
        fila_init(wrap(setup["base"]), forget, reshaped)
    with pytest.raises(ValueError, match="exceeds min"):
        fila_init(wrap(setup["base"], r=40), forget, retain)
    for bad in (float("nan"), float("inf"), -1.0):
        corrupt = dict(forget.items())
        corrupt["model.layers.0.self_attn.k_proj"] = corrupt["model.layers.0.self_attn.k_proj"].clone()
        corrupt["model.layers.0.self_attn.k_proj"][1, 2] = bad
        with pytest.raises(ValueError, match=r"non-finite|negative"):
            fila_init(wrap(setup["base"]), corrupt, retain)
    with pytest.raises(ValueError, match="unknown solver"):
        fila_init(wrap(setup["base"]), forget, retain, solver="qr")
    with pytest.raises(ValueError, match="eps"):
        fila_init(wrap(setup["base"]), forget, retain, eps=0.0)
    model = fila_init(wrap(setup["base"]), forget, retain)
    with pytest.raises(ValueError, match="already FILA-initialised"):
        fila_init(model, forget, retain)
    with pytest.raises(TypeError, match="PeftModel"):
        save_adapter(setup["base"], "unused")
