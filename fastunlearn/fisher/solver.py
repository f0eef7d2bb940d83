"""The top-``r`` singular triplets of a matrix, exactly, without a full SVD: FILA's solver.

FILA needs ``[DW]_r``, the best rank-``r`` approximation of the row-weighted weight ``D·W``
(Eckart–Young), for every adapted layer. A full SVD costs ``O(m·n·min(m, n))`` at a fraction of the
matrix-product rate; the top ``r ≪ min(m, n)`` triplets need a few dozen products of ``A`` with thin
blocks. With ``A`` wide (``m ≤ n``; a tall matrix is transposed) and block size ``b = r + p``:

1. ``Q₀ = orth(A·Ω)``, ``Ω`` an ``n × b`` Gaussian block drawn from ``seed``.
2. Block Lanczos on ``M = AAᵀ``: ``Y = A·(Aᵀ·Q_j)``, orthogonalised against the basis twice (classical
   Gram–Schmidt) with coefficients ``H_j``, ``Q_{j+1} R_{j+1} = qr(Y)``, and once more after
   normalising (a nearly vanished ``Y`` would otherwise lean on the basis). Then
   ``M·Q − Q·T = Q_{j+1} R_{j+1} E_jᵀ`` with ``T = QᵀMQ`` assembled from the ``H``'s and ``R``'s, so
   Rayleigh–Ritz is an ``eigh`` of the small ``T``: Ritz values ``θ_i ≤ σ_i²`` and residuals
   ``ρ_i = ‖R_{j+1}·y_i[last block]‖`` for free.
3. Convergence, on what FILA cares about: the projection error of the top-``r`` Ritz vectors exceeds the
   optimum by ``Σ_{i≤r} (σ_i² − θ_i)``, which the trace form of the Kato–Temple bound limits, for any
   ``k ≥ r``, by ``Σ_{i≤k} ρ_i² / (θ_k − θ_{k+1} − ρ_{k+1})`` (``λ_{k+1}`` estimated from above; the
   best ``k`` is taken, so a cluster around ``σ_r`` does not stall the check). The iteration stops when
   that is at most ``2·tol·tail²``, ``tail² ≈ Σ_{i>r} σ_i²``: since ``err² − opt² ≈ 2·opt·(err − opt)``,
   this asks for ``err ≤ (1 + tol)·opt``. The ``O(K³)`` check runs every iteration while ``K ≤ 8b``,
   then every ``K/(8b)``. The bound is an estimate (fp32 rounding floors the true residuals), not a proof.
4. A final Rayleigh–Ritz in fp64 on the top ``b`` Ritz vectors: ``B = U_bᵀA = Ũ S Vᵀ``, ``U = U_b Ũ``;
   ``U S Vᵀ = U_rU_rᵀA``, so the error is what step 3 bounded.

fp32 suffices for the Krylov phase: ``‖A − USVᵀ‖_F`` is stationary at the optimum, so perturbations of
size ``δ`` raise it by ``O(δ²)``. Matrices whose smaller side is at most ``4b`` get an fp64 full SVD; a
run that does not converge in ``max_iters`` iterations falls back to a full SVD with a warning. ``Ω``
comes from a seeded generator and each pair gets a fixed sign (largest entry of ``u`` positive), so
every rank computes the same factors on the same hardware.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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


def truncated_svd(matrix: Tensor, rank: int, **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` of :func:`solve_truncated_svd`, like ``torch.svd_lowrank``."""
    result = solve_truncated_svd(matrix, rank, **options)
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
    """The top-``rank`` singular triplets ``U [m, r]``, ``S [r]`` (descending), ``V [n, r]`` of ``matrix``,
    on its device, with the solver's record: ``‖A − U·diag(S)·Vᵀ‖_F`` within a relative ``tol`` of the
    Eckart–Young optimum (up to the rounding of ``dtype``; module docstring).

    ``matrix`` is computed in ``dtype`` (fp32 or fp64; the final Rayleigh–Ritz step and small matrices
    in fp64 either way). ``oversample``: extra columns per Krylov block (``b = r + p``; default
    ``min(max(r, 8), 64)``); ``max_iters``: Krylov iterations before a full SVD, with a warning;
    ``tol``: target relative excess of the error over the optimum; ``seed``: the starting block's.
    """
    _check(matrix, rank, oversample, max_iters, tol, dtype)
    A = matrix.to(dtype)
    # Elementwise passes on the caller's layout (strided and slow on a transposed view).
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
        # One more pass on the normalised block: Y = Q·H + Qn·R and Qn = Q·C + Qn'·R' give
        # Y = Q·(H + C·R) + Qn'·(R'·R), and the basis stays orthonormal to rounding.
        C = Q.t() @ Qn
        Qn, R2 = torch.linalg.qr(Qn - Q @ C)
        T[:K, K - block : K] = (H + H2 + C @ R).double()
        R = R2 @ R
        iterations += 1
        unchecked += 1
        last = K + block > capacity
        # The O(K³) check: every K/(8b) blocks, and always when the new block has (nearly) vanished
        # into the basis (an invariant subspace) or the basis is full.
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
