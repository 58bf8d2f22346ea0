"""Covariance-estimation diagnostics: Shampoo's and KL-Shampoo's Kronecker estimates
seen as estimates of the gradient second moment ``E[g g^T]``.

Conventions (every function of this module):

* A block gradient ``G`` is ``m x n`` and ``g = G.reshape(-1)`` is its
  row-major flattening, so ``G[i, j]`` is ``g[i * n + j]``.
* A Kronecker covariance of ``g`` is ``torch.kron(S_a, S_b)`` with ``S_a``
  (m x m) the row side ``a`` and ``S_b`` (n x n) the column side ``b``
  (SPEC's notation). A matrix-normal ``G = A^{1/2} Z B^{1/2}`` (``Z`` with
  independent standard normal entries) has ``E[g g^T] = kron(A, B)``,
  ``E[G G^T] = tr(B) A`` and ``E[G^T G] = tr(A) B``.
* A dense second moment ``C = E[g g^T]`` (mn x mn) is read as the 4-way
  tensor ``C.reshape(m, n, m, n)[i, j, i', j'] = E[G_ij G_i'j']``, which gives
  every expectation the papers use without forming a Kronecker product:
  ``E[G P G^T] = einsum("ajbk,jk->ab", C4, P)`` and
  ``E[G^T P G] = einsum("ajbk,ab->jk", C4, P)``.
* ``KL(C, S)`` is KL(N(0, C) || N(0, S))
  ``= 0.5 (tr(S^-1 C) - d + logdet S - logdet C)`` with ``d = mn``: the
  direction of the KL-Shampoo paper's Eq. (2), whose minimiser over a
  one-sided ``S = (S_a / n) kron I`` is ``S_a = E[G G^T]`` (Claim 1).
* "moments" arguments accept either a dense ``C`` (mn x mn, with ``m`` and
  ``n`` given) or a stack of samples ``G`` (k, m, n), whose expectations are
  the sample means (``C = second_moment_of_samples(G)``).
* Scale: ``kron(S_a, S_b) = kron(c S_a, S_b / c)``. Every solver here returns
  ``tr(S_a) = m`` (the row factor has mean eigenvalue 1) and puts the whole
  scale into ``S_b``.

What is here:

* :func:`kl_objective` / :func:`kl_objective_modes`: SPEC's per-block KL
  objective from the rotated gradient and the eigenvalue estimates; pure
  tensor ops, batched, meant to be tracked every step.
* :func:`kl_divergence`, :func:`kl_divergence_eig`, :func:`best_scale_kl`:
  exact KL between a dense second moment and a Kronecker estimate.
* :func:`kl_optimal_kronecker`: the KL-optimal Kronecker estimate, the fixed
  point of the paper's Eq. (3) (Claim 2), by flip-flop iteration;
  :func:`kl_optimal_eigenvalues`: the fixed point of Eq. (6) (Claim 3) in a
  fixed eigenbasis.
* :func:`frobenius_optimal_kronecker`: ``min ||C - A kron B||_F`` by power
  iteration on the Van Loan rearrangement (Morwani et al., Eq. (4)).
* :func:`shampoo_kronecker_estimate`: Shampoo's estimate
  ``E[G G^T]^{2p} kron E[G^T G]^{2p}`` with its KL-optimal scale.

The solvers run to convergence with host-side checks; only
:func:`kl_objective` and :func:`kl_objective_modes` are meant for the
optimizer's step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .tools._analysis_core import (
    _Moments,
    _spd_inverse_and_logdet,
    _square_size,
    best_scale_kl,
    kl_divergence,
    kl_divergence_eig,
    kl_eigenvalue_targets,
    kl_factor_targets,
    kl_objective,
    kl_objective_modes,
    rearrange,
    rotated_second_moment,
    second_moment_of_samples,
    weighted_grams,
)

__all__ = [
    "kl_objective",
    "kl_objective_modes",
    "kl_divergence",
    "kl_divergence_eig",
    "best_scale_kl",
    "second_moment_of_samples",
    "rearrange",
    "weighted_grams",
    "rotated_second_moment",
    "kl_factor_targets",
    "kl_eigenvalue_targets",
    "kl_optimal_kronecker",
    "kl_optimal_eigenvalues",
    "frobenius_optimal_kronecker",
    "shampoo_kronecker_estimate",
    "KroneckerFit",
    "EigenvalueFit",
    "FrobeniusFit",
]


# --------------------------------------------------------------------------
# solvers


class KroneckerFit(NamedTuple):
    """A Kronecker estimate ``kron(S_a, S_b)`` with ``tr(S_a) = m`` and solver information."""

    S_a: torch.Tensor
    S_b: torch.Tensor
    iterations: int
    converged: bool
    residual: float  # last relative change of (S_a, S_b) after normalisation


class EigenvalueFit(NamedTuple):
    """Eigenvalues ``(lam_a, lam_b)`` in a fixed basis with ``mean(lam_a) = 1``, and solver information."""

    lam_a: torch.Tensor
    lam_b: torch.Tensor
    iterations: int
    converged: bool
    residual: float


class FrobeniusFit(NamedTuple):
    """``A kron B`` with ``tr(A) = m`` (when positive) and the Frobenius-optimal scale in B.

    ``errors[t]`` is the relative error ``||C - A_t kron B_t||_F / ||C||_F`` after
    t iterations (``errors[0]``: the optimally scaled initial pair).
    """

    A: torch.Tensor
    B: torch.Tensor
    iterations: int
    errors: torch.Tensor


def _normalise(S_a: torch.Tensor, S_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the scale so that tr(S_a) = m (a non-positive trace is left alone)."""
    c = torch.diagonal(S_a).sum() / S_a.shape[0]
    if not bool(c > 0):
        return S_a, S_b
    return S_a / c, S_b * c


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(new - old) / torch.linalg.matrix_norm(new).clamp_min(1e-300))


def _symmetrise(X: torch.Tensor) -> torch.Tensor:
    return 0.5 * (X + X.transpose(-2, -1))


def kl_optimal_kronecker(
    moments: torch.Tensor,
    m: int | None = None,
    n: int | None = None,
    *,
    iters: int = 1000,
    tol: float = 1e-12,
) -> KroneckerFit:
    """The KL-optimal Kronecker estimate ``argmin KL(C, kron(S_a, S_b))`` (Claim 2).

    Flip-flop iteration of Eq. (3) from ``S_b = I``:
    ``S_a <- E[G S_b^-1 G^T] / n``, then ``S_b <- E[G^T S_a^-1 G] / m`` (the new
    S_a). Each half-step is the exact minimiser over one factor given the
    other, so the KL never increases; the fixed point satisfies Eq. (3).
    Stops when the relative change of both normalised factors is below
    ``tol`` or after ``iters`` sweeps.

    Args:
        moments: dense second moment C (mn x mn, SPD) with ``m`` and ``n``, or
            samples G (k, m, n) (expectations are sample means; the estimate
            exists when the sample second moment is SPD, e.g. k >= m n).
        m, n: block shape (required with a dense C, checked with samples).
        iters: maximum number of sweeps (default 1000).
        tol: relative-change stopping threshold (default 1e-12).

    Returns:
        :class:`KroneckerFit` with ``tr(S_a) = m``; the product
        ``kron(S_a, S_b)`` is the optimum (its split is the normalisation).
    """
    if iters < 1:
        raise ValueError(f"kl_optimal_kronecker: iters must be >= 1, got {iters}")
    mo = _Moments(moments, m, n, "kl_optimal_kronecker")
    S_a = torch.eye(mo.m, dtype=moments.dtype, device=moments.device)
    S_b = torch.eye(mo.n, dtype=moments.dtype, device=moments.device)
    residual, converged, sweeps = math.inf, False, 0
    for sweeps in range(1, iters + 1):
        P_b, _ = _spd_inverse_and_logdet(S_b, "S_b")
        new_a = _symmetrise(mo.left(P_b)) / mo.n
        P_a, _ = _spd_inverse_and_logdet(new_a, "S_a")
        new_b = _symmetrise(mo.right(P_a)) / mo.m
        new_a, new_b = _normalise(new_a, new_b)
        residual = max(_relative_change(new_a, S_a), _relative_change(new_b, S_b))
        S_a, S_b = new_a, new_b
        if residual < tol:
            converged = True
            break
    return KroneckerFit(S_a, S_b, sweeps, converged, residual)


def kl_optimal_eigenvalues(
    moments: torch.Tensor,
    Q_a: torch.Tensor,
    Q_b: torch.Tensor,
    *,
    iters: int = 1000,
    tol: float = 1e-12,
) -> EigenvalueFit:
    """``argmin_{lam_a, lam_b} KL(C, kron(Q_a diag(lam_a) Q_a^T, Q_b diag(lam_b) Q_b^T))`` (Claim 3).

    Flip-flop iteration of Eq. (6) in the fixed orthogonal bases Q_a, Q_b,
    from ``lam_b = 1``: ``lam_a <- mean_j D_ij / lam_b_j``, then
    ``lam_b <- mean_i D_ij / lam_a_i`` with ``D = E[Gr o Gr]``,
    ``Gr = Q_a^T G Q_b``. Normalised to ``mean(lam_a) = 1``. Stops at relative
    change ``< tol`` or after ``iters`` sweeps. ``moments``: dense C or samples.
    """
    if iters < 1:
        raise ValueError(f"kl_optimal_eigenvalues: iters must be >= 1, got {iters}")
    m, n = _square_size(Q_a, "Q_a"), _square_size(Q_b, "Q_b")
    D = _Moments(moments, m, n, "kl_optimal_eigenvalues").rotated_diagonal(Q_a, Q_b)
    lam_a = D.new_ones(m)
    lam_b = D.new_ones(n)
    residual, converged, sweeps = math.inf, False, 0
    for sweeps in range(1, iters + 1):
        new_a = (D / lam_b).mean(-1)
        new_b = (D / new_a.unsqueeze(-1)).mean(-2)
        c = new_a.mean()
        new_a, new_b = new_a / c, new_b * c
        residual = float(
            torch.maximum(
                torch.linalg.vector_norm(new_a - lam_a) / torch.linalg.vector_norm(new_a),
                torch.linalg.vector_norm(new_b - lam_b) / torch.linalg.vector_norm(new_b),
            )
        )
        lam_a, lam_b = new_a, new_b
        if residual < tol:
            converged = True
            break
    return EigenvalueFit(lam_a, lam_b, sweeps, converged, residual)


def frobenius_optimal_kronecker(
    moments: torch.Tensor,
    m: int | None = None,
    n: int | None = None,
    *,
    iters: int = 100,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    schedule: str = "simultaneous",
) -> FrobeniusFit:
    """``min ||C - kron(A, B)||_F`` by power iteration on the rearrangement R(C).

    ``schedule="simultaneous"`` (default) is Morwani et al.'s Eq. (4):
    ``A_t = E[G B_{t-1} G^T]``, ``B_t = E[G^T A_{t-1} G]`` (i.e.
    ``vec(A_t) = R(C) vec(B_{t-1})``, ``vec(B_t) = R(C)^T vec(A_{t-1})``), both
    from the previous pair; from the identity, one iteration gives
    ``A_1 = E[G G^T]``, ``B_1 = E[G^T G]`` (their Proposition 1: the square of
    Shampoo's ``E[GG^T]^{1/2} kron E[G^TG]^{1/2}``, up to scale).
    ``schedule="alternating"`` updates B from the new A (alternating least
    squares): each half-step is the exact least-squares minimiser given the
    other factor, so ``errors`` never increases. Both converge to the top
    singular pair of R(C) (Van Loan and Pitsianis) when the start is not
    orthogonal to it; the identity start has positive overlap for a
    covariance (the top singular matrices are PSD).

    Args:
        moments: dense C (mn x mn) with m, n, or samples (k, m, n).
        iters: number of iterations (default 100; ``iters=0`` only rescales ``init``).
        init: starting ``(A_0, B_0)``; default the identities ``(I_m, I_n)``.
        schedule: "simultaneous" (paper's Eq. (4)) or "alternating".

    Returns:
        :class:`FrobeniusFit`: ``kron(A, B)`` is the Frobenius-optimally
        scaled product of the last iterate, with ``tr(A) = m`` where the trace
        is positive; ``errors`` (iters + 1,) the relative errors along the way.
    """
    if schedule not in ("simultaneous", "alternating"):
        raise ValueError(
            f"frobenius_optimal_kronecker: schedule must be 'simultaneous' or 'alternating', got {schedule!r}"
        )
    if iters < 0:
        raise ValueError(f"frobenius_optimal_kronecker: iters must be >= 0, got {iters}")
    mo = _Moments(moments, m, n, "frobenius_optimal_kronecker")
    C = mo.dense()
    norm_C = torch.linalg.matrix_norm(C)
    if init is None:
        A = torch.eye(mo.m, dtype=moments.dtype, device=moments.device)
        B = torch.eye(mo.n, dtype=moments.dtype, device=moments.device)
    else:
        A, B = init
        if A.shape != (mo.m, mo.m):
            raise ValueError(
                f"frobenius_optimal_kronecker: init[0] must have shape ({mo.m}, {mo.m}), got {tuple(A.shape)}"
            )
        if B.shape != (mo.n, mo.n):
            raise ValueError(
                f"frobenius_optimal_kronecker: init[1] must have shape ({mo.n}, {mo.n}), got {tuple(B.shape)}"
            )

    def scaled(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # best s for s kron(A, B): <C, kron(A, B)> / (||A||^2 ||B||^2), <C, kron(A, B)> = <A, E[G B G^T]>
        s = torch.sum(A * mo.left(B)) / (torch.sum(A * A) * torch.sum(B * B))
        A_n, B_n = _normalise(A, s * B)
        return A_n, B_n, torch.linalg.matrix_norm(C - torch.kron(A_n, B_n)) / norm_C

    A, B, err = scaled(A, B)
    errors = [err]
    for _ in range(iters):
        if schedule == "simultaneous":
            A, B = mo.left(B), mo.right(A)
        else:
            A = mo.left(B)
            B = mo.right(A)
        # power iteration only needs the direction; keep the pair O(1)
        A = A / torch.linalg.matrix_norm(A)
        B = B / torch.linalg.matrix_norm(B)
        A, B, err = scaled(A, B)
        errors.append(err)
    return FrobeniusFit(A, B, iters, torch.stack(errors))


def shampoo_kronecker_estimate(
    moments: torch.Tensor,
    m: int | None = None,
    n: int | None = None,
    exponent: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shampoo's Kronecker estimate of ``E[g g^T]`` with its KL-optimal scale.

    In the KL-Shampoo paper's Eq. (1), Shampoo with per-side exponent p
    (SPEC's ``exponent``; the update ``L^-p G R^-p`` is ``S^-1/2 g``) estimates
    the covariance by ``S = L^{2p} kron R^{2p}`` with ``L = E[G G^T]``,
    ``R = E[G^T G]``: p = 1/2 gives ``L kron R`` (Claim 1's one-sided optima,
    Morwani et al.'s "square of Shampoo"), p = 1/4 gives the original
    ``L^{1/2} kron R^{1/2}``. Returned as ``(S_a, S_b)`` with ``tr(S_a) = m``
    and ``S_b`` carrying ``c = argmin_c KL(C, c kron(L^{2p}, R^{2p}))``.
    ``moments``: dense C with m, n, or samples (k, m, n); L and R must be
    positive definite.
    """
    if not exponent > 0:
        raise ValueError(f"shampoo_kronecker_estimate: exponent must be > 0, got {exponent}")
    mo = _Moments(moments, m, n, "shampoo_kronecker_estimate")
    L, R = mo.left(None), mo.right(None)
    S_a, S_b = _spd_power(L, 2 * exponent, "E[G G^T]"), _spd_power(R, 2 * exponent, "E[G^T G]")
    S_b = S_b * best_scale_kl(mo.tensor, S_a, S_b)
    return _normalise(S_a, S_b)


def _spd_power(S: torch.Tensor, power: float, name: str) -> torch.Tensor:
    evals, vecs = torch.linalg.eigh(_symmetrise(S))
    if not bool((evals > 0).all()):
        raise ValueError(f"shampoo_kronecker_estimate: {name} must be positive definite")
    return (vecs * evals**power) @ vecs.transpose(-2, -1)
