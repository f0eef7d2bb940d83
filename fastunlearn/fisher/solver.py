"""The top-``r`` singular triplets of a matrix, exactly, without a full SVD (FILA's solver; SPEC §3.2).

FILA needs ``[DW]_r``, the best rank-``r`` approximation of the row-weighted weight ``D·W`` (Eckart–Young),
for every adapted layer: 224 matrices of 4096×4096 to 11008×4096 for Llama-2-7B at ``r = 32``. A full
SVD costs ``O(m·n·min(m, n))`` and runs at a fraction of the machine's matrix-product rate; the top
``r ≪ min(m, n)`` triplets need only a few dozen products of ``A`` with thin blocks.

Method: randomised block Krylov (block Lanczos with full reorthogonalisation) on ``M = A·Aᵀ`` with a
Rayleigh–Ritz convergence check, and a final Rayleigh–Ritz step in fp64. With ``A`` wide (``m ≤ n``;
a tall matrix is transposed, which swaps ``U`` and ``V``) and block size ``b = r + p``:

1. ``Q₀ = orth(A·Ω)``, ``Ω`` an ``n × b`` Gaussian matrix drawn from ``seed``.
2. For ``j = 0, 1, …``: ``Y = A·(Aᵀ·Q_j)``; orthogonalise ``Y`` against ``Q₀…Q_j`` twice (classical
   Gram–Schmidt, repeated because one pass loses orthogonality in proportion to the condition
   number), keeping the coefficients ``H_j``; ``Q_{j+1} R_{j+1} = qr(Y)``, and once more after
   normalising (when the spectrum is captured, ``Y``'s remainder is at its rounding-noise level and
   the normalised block would otherwise lean on the basis: measured 4.5e-4 in fp32, enough to cost
   the Ritz vectors a relative 1e-5 of the optimum). The basis spans the block
   Krylov space ``span{AΩ, (AAᵀ)AΩ, …, (AAᵀ)^j AΩ}``, and by construction

       M·Q − Q·T = Q_{j+1} R_{j+1} E_jᵀ,    T = Qᵀ M Q  (assembled from the H's and R's),

   so Rayleigh–Ritz costs an eigendecomposition of the small ``T`` (fp64): Ritz values ``θ_i`` (which
   approximate ``σ_i²`` from below: ``θ_i ≤ σ_i²`` by Cauchy interlacing) and Ritz vectors ``Q·y_i``
   whose residuals are ``ρ_i = ‖M Q y_i − θ_i Q y_i‖ = ‖R_{j+1}·y_i[last block]‖`` — free.
3. Convergence, on the quantity FILA cares about. The projection error of the top-``r`` Ritz vectors
   exceeds the optimum by ``excess = ‖A − U_rU_rᵀA‖² − Σ_{i>r} σ_i² = Σ_{i≤r} (σ_i² − θ_i)``, a sum of
   non-negative terms, so it is at most the same sum to any ``k ≥ r``, which the trace form of the
   Kato–Temple bound limits by ``Σ_{i≤k} ρ_i² / (θ_k − λ_{k+1})``. ``λ_{k+1}`` is estimated from above
   by ``θ_{k+1} + ρ_{k+1}`` and the best ``k`` is taken, so a cluster of nearly equal singular values
   around ``σ_r`` (where single vectors converge slowly but the error does not care which vectors of the
   cluster are chosen) does not stall the check. The iteration stops when

       min_k Σ_{i≤k} ρ_i² / (θ_k − θ_{k+1} − ρ_{k+1})  ≤  2·tol·tail²,

   ``tail² ≥ Σ_{i>r} σ_i²`` estimated as ``max(‖A‖_F² − Σ_{i≤r} θ_i, Σ_{r<i≤K} θ_i)``: since
   ``err² − opt² ≈ 2·opt·(err − opt)``, this asks for ``err ≤ (1 + tol)·opt``. A new block that
   vanishes (an invariant subspace: the Ritz pairs are exact) gives ``ρ = 0`` and stops it at once.
   The check is an ``eigh`` of ``T``, ``O(K³)``: it runs every iteration while ``K ≤ 8b``, then every
   ``K/(8b)`` iterations, which keeps it near the cost of the products.
   The bound is an estimate (``λ_{k+1}`` is not known, and fp32 rounding floors the true residuals
   where the computed ones keep falling), not a proof: at the default ``tol = 1e-7`` the measured
   excess stayed below 2e-8 on power-law, exponential, clustered, flat (Gaussian) and row-weighted
   spectra over several seeds (tests/test_fila_solver.py checks 1e-6).
4. Final Rayleigh–Ritz in fp64 on the top ``b`` Ritz vectors (re-orthonormalised): ``B = U_bᵀ A``
   (``b × n``, computed in column chunks), ``B = Ũ S Vᵀ``, ``U = U_b Ũ``. The returned ``U`` and ``V``
   are orthonormal to fp64 rounding before they are cast, and ``U S Vᵀ = U_rU_rᵀA``, so the error is
   exactly what step 3 bounded.

Why fp32 for the Krylov phase is enough: the error ``‖A − USVᵀ‖_F`` is stationary at the optimum
(``(A − A_r)·V_r = 0`` and ``U_rᵀ(A − A_r) = 0``), so perturbations of the factors of size ``δ`` —
fp32 rounding of the basis or of the returned factors — raise it only by ``O(δ²)``.

Matrices whose smaller side is at most ``4·b`` gain nothing from a Krylov space: they get an fp64 full
SVD (exact). A run that has not converged after ``max_iters`` iterations, or whose space would outgrow
the matrix, falls back to the full SVD in the working dtype with a warning — never a silently worse answer.

Determinism: ``Ω`` comes from a ``torch.Generator`` seeded with ``seed`` on the matrix's device (the
global random state is untouched), and each singular-vector pair is given a fixed sign (largest entry
of ``u`` positive), so every rank of a distributed run computes the same factors on the same hardware.
The loop reads two scalars per iteration to the host (the convergence tests), a few dozen per layer.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TruncatedSVD", "solve_truncated_svd", "truncated_svd"]

# fp64 elements per column chunk of the final B = U_bᵀA: bounds the fp64 copy of A to 64 MB.
_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class TruncatedSVD:
    """Top-``r`` triplets ``A ≈ U·diag(S)·Vᵀ`` and how they were found.

    ``method``: ``"krylov"``, ``"dense"`` (small matrix: fp64 full SVD) or ``"fallback"`` (not converged
    in ``max_iters`` iterations: full SVD in the working dtype). ``iterations``: products with
    ``M = AAᵀ``; ``krylov_dim``: basis size at the end; ``bound``: the final estimate of
    ``(err − opt)/opt`` (``0.0`` for the full SVDs).
    """

    U: Tensor  # [m, r]
    S: Tensor  # [r], descending
    V: Tensor  # [n, r]
    method: str
    iterations: int
    krylov_dim: int
    bound: float


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(matrix: Tensor, rank: int, oversample: int | None, max_iters: int, tol: float, dtype) -> None:
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a 2-D tensor, got {got}")
    if not matrix.is_floating_point():
        raise TypeError(f"matrix must be a real floating-point tensor, got {matrix.dtype}")
    if not _is_int(rank) or not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must be an integer in [1, min(m, n) = {min(matrix.shape)}], got {rank!r}")
    if oversample is not None and not (_is_int(oversample) and oversample >= 0):
        raise ValueError(f"oversample must be a non-negative integer or None, got {oversample!r}")
    if not _is_int(max_iters) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    if not (isinstance(tol, float | int) and 0 < tol < 1):
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def truncated_svd(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    max_iters: int = 40,
    tol: float = 1e-7,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` singular triplets ``(U [m, r], S [r], V [n, r])`` of ``matrix``, on its device.

    ``‖A − U·diag(S)·Vᵀ‖_F`` is within a relative ``tol`` of the Eckart–Young optimum
    ``sqrt(Σ_{i>r} σ_i²)`` (up to the rounding of the working ``dtype``; module docstring), as a full
    SVD truncated to ``r`` would give, at the cost of a few dozen products with thin blocks.

    Args:
        matrix: any real floating tensor (bf16/fp16/fp32/fp64); computed in ``dtype``.
        rank: ``r`` in ``[1, min(m, n)]``.
        oversample: ``p``, extra columns per Krylov block (``b = r + p``); default ``min(max(r, 8), 64)``.
        max_iters: Krylov iterations (products with ``AAᵀ``) before falling back to a full SVD, with a
            warning; the basis holds at most ``max_iters·b`` columns.
        tol: target relative excess of the error over the optimum.
        seed: seed of the Gaussian starting block (deterministic factors).
        dtype: working dtype of the Krylov phase and of the results, fp32 or fp64. The final
            Rayleigh–Ritz step and small matrices are computed in fp64 either way.

    Returns ``U``, ``S`` (descending), ``V`` in ``dtype``, like ``torch.svd_lowrank``.
    """
    result = solve_truncated_svd(
        matrix, rank, oversample=oversample, max_iters=max_iters, tol=tol, seed=seed, dtype=dtype
    )
    return result.U, result.S, result.V


def solve_truncated_svd(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    max_iters: int = 40,
    tol: float = 1e-7,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TruncatedSVD:
    """:func:`truncated_svd` with the solver's record (:class:`TruncatedSVD`)."""
    _check(matrix, rank, oversample, max_iters, tol, dtype)
    A = matrix.to(dtype)
    # Elementwise passes on the caller's layout (on a transposed view they are strided and slow).
    if not bool(torch.isfinite(A).all()):
        raise ValueError("matrix has non-finite values (inf or nan)")
    norm_sq = torch.linalg.vector_norm(A, dtype=torch.float64).square()
    # The basis lives in the smaller dimension: a tall matrix is solved as Aᵀ, with U and V swapped.
    transposed = A.shape[0] > A.shape[1]
    if transposed:
        A = A.t()
    p = min(max(rank, 8), 64) if oversample is None else oversample
    block = rank + p
    if A.shape[0] <= 4 * block:
        result = _dense(A, rank)
    else:
        result = _block_krylov(A, norm_sq, rank, block, max_iters, tol, seed)
    if transposed:
        result = dataclasses.replace(result, U=result.V, V=result.U)
    return _finish(result, dtype)


def _dense(A: Tensor, rank: int) -> TruncatedSVD:
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return TruncatedSVD(U[:, :rank], S[:rank], Vh[:rank].t(), "dense", 0, 0, 0.0)


def _block_krylov(
    A: Tensor, norm_sq: Tensor, rank: int, block: int, max_iters: int, tol: float, seed: int
) -> TruncatedSVD:
    m, n = A.shape
    device, dtype = A.device, A.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    omega = torch.randn(n, block, generator=generator, device=device, dtype=dtype)
    capacity = min(m, max_iters * block)  # the basis after max_iters products with M
    basis = torch.empty(m, capacity, dtype=dtype, device=device)
    T = torch.zeros(capacity, capacity, dtype=torch.float64, device=device)
    basis[:, :block] = torch.linalg.qr(A @ omega).Q
    K, iterations, bound, unchecked = block, 0, math.inf, 0
    while True:
        Q = basis[:, :K]
        Y = A @ (A.t() @ Q[:, K - block :])  # M·Q_j
        before = torch.linalg.vector_norm(Y)
        H = Q.t() @ Y
        Y -= Q @ H
        H2 = Q.t() @ Y
        Y -= Q @ H2
        Qn, R = torch.linalg.qr(Y)
        # Once the spectrum has been captured, what is left of Y is near its rounding noise and the
        # normalised block can lean on the basis by ~u·‖Y‖/‖R‖: one more pass on the normalised block
        # (Y = Q·H + Qn·R and Qn = Q·C + Qn'·R' give Y = Q·(H + C·R) + Qn'·(R'·R)) keeps the basis
        # orthonormal to rounding, which the identities behind T and ρ assume.
        C = Q.t() @ Qn
        Qn, R2 = torch.linalg.qr(Qn - Q @ C)
        T[:K, K - block : K] = (H + H2 + C @ R).double()
        R = R2 @ R
        iterations += 1
        unchecked += 1
        last = K + block > capacity
        # The Rayleigh–Ritz check costs O(K³) (an eigh of T): once the basis is large it runs every
        # K/(8b) blocks, which keeps it below the cost of the products, and always when the new block
        # has (nearly) vanished into the basis (an invariant subspace) or the basis is full.
        vanished = bool(torch.linalg.vector_norm(R) <= 1e-3 * before)
        if last or vanished or unchecked >= max(1, K // (8 * block)):
            unchecked = 0
            theta, vectors = torch.linalg.eigh(0.5 * (T[:K, :K] + T[:K, :K].t()))
            theta, vectors = theta.flip(0), vectors.flip(1)
            rho = torch.linalg.vector_norm(R.double() @ vectors[K - block :], dim=0)
            converged, bound = _converged(theta, rho, norm_sq, rank, tol)
            if converged:
                return _rayleigh_ritz(A, Q, vectors[:, :block], rank, iterations, K, bound)
        if last:
            break
        basis[:, K : K + block] = Qn
        T[K : K + block, K - block : K] = R.double()
        K += block
    if capacity == m:  # the basis spans the whole space (a small or flat-spectrum matrix): solve densely
        return _dense(A, rank)
    warnings.warn(
        f"truncated_svd: no convergence in {iterations} Krylov iterations (blocks of {block}) for a "
        f"{m}×{n} matrix at rank {rank} (estimated relative excess {bound:.2e} > tol {tol:.0e}); "
        "using a full SVD",
        RuntimeWarning,
        stacklevel=3,
    )
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return TruncatedSVD(U[:, :rank], S[:rank], Vh[:rank].t(), "fallback", iterations, K, 0.0)


def _converged(theta: Tensor, rho: Tensor, norm_sq: Tensor, rank: int, tol: float) -> tuple[bool, float]:
    """Whether the top-``rank`` Ritz pairs meet ``tol`` (module docstring, step 3), and the bound on
    ``(err − opt)/opt`` it implies."""
    K = theta.numel()
    theta = theta.clamp_min(0)
    head = theta[:rank].sum()
    tail_sq = torch.maximum(norm_sq - head, theta[rank:].sum()).clamp_min(torch.finfo(torch.float64).tiny)
    ks = torch.arange(rank, K, device=theta.device)  # k = r … K−1 (top-k sums need θ_{k+1})
    if ks.numel() == 0:
        return False, math.inf
    residual_sq = rho.square().cumsum(0)[ks - 1]
    gap = theta[ks - 1] - theta[ks] - rho[ks]
    bounds = torch.where(gap > 0, residual_sq / gap.clamp_min(torch.finfo(torch.float64).tiny), math.inf)
    best = int(torch.argmin(bounds))
    relative = float(bounds[best] / (2 * tail_sq))
    return relative <= tol, relative


def _rayleigh_ritz(
    A: Tensor, Q: Tensor, ritz: Tensor, rank: int, iterations: int, K: int, bound: float
) -> TruncatedSVD:
    """SVD of ``B = U_bᵀA`` in fp64 on the orthonormalised Ritz vectors ``U_b = orth(Q·ritz)``."""
    Ub = torch.linalg.qr(Q.double() @ ritz).Q
    n = A.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // A.shape[0])
    B = torch.cat([Ub.t() @ A[:, c : c + chunk].double() for c in range(0, n, chunk)], dim=1)
    Ut, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return TruncatedSVD(Ub @ Ut[:, :rank], S[:rank], Vh[:rank].t(), "krylov", iterations, K, bound)


def _finish(result: TruncatedSVD, dtype: torch.dtype) -> TruncatedSVD:
    """Fix each pair's sign (largest ``|u|`` entry positive) and cast to ``dtype``."""
    U, S, V = result.U, result.S, result.V
    pivot = U.gather(0, U.abs().argmax(dim=0, keepdim=True))
    sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
    cast = {"dtype": dtype, "memory_format": torch.contiguous_format}
    return dataclasses.replace(result, U=(U * sign).to(**cast), S=S.to(**cast), V=(V * sign).to(**cast))
