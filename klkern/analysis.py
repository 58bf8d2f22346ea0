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
from typing import NamedTuple, Sequence

import torch

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
# the per-step objective


def kl_objective(Gr: torch.Tensor, lam_a: torch.Tensor | None, lam_b: torch.Tensor | None) -> torch.Tensor:
    """SPEC's per-block KL objective for a 2-D block, batched over leading dims.

    ``0.5 * (n sum(log lam_a) + m sum(log lam_b) + ||Gr * (lam_a lam_b^T)^-1/2||_F^2)``

    Args:
        Gr: rotated gradient ``Q_a^T G Q_b``, shape (..., m, n).
        lam_a: eigenvalue estimates of ``S_a``, shape (..., m); ``None`` means 1.
        lam_b: eigenvalue estimates of ``S_b``, shape (..., n); ``None`` means 1.

    Returns:
        Tensor of shape ``Gr.shape[:-2]`` (leading dims broadcast with the lams').

    With ``S = kron(Q_a diag(lam_a) Q_a^T, Q_b diag(lam_b) Q_b^T)`` and
    ``g = G.reshape(-1)`` this is exactly ``0.5 (logdet S + g^T S^-1 g)``, the
    Gaussian negative log-likelihood of ``g`` under N(0, S) without its
    ``0.5 mn log(2 pi)``; so for ``E[g g^T] = C``,
    ``E[kl_objective] = KL(C, S) + 0.5 (mn + logdet C)`` (see
    :func:`kl_divergence_eig`): lower is a better fit. Tensor ops only (no
    host synchronisation), differentiable.
    """
    if Gr.dim() < 2:
        raise ValueError(f"kl_objective: Gr must have shape (..., m, n), got {tuple(Gr.shape)}")
    return kl_objective_modes(Gr, [lam_a, lam_b])


def kl_objective_modes(Gr: torch.Tensor, lams: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """SPEC's per-block KL objective for a block with ``len(lams)`` modes, batched.

    The last ``len(lams)`` dims of ``Gr`` are the block's modes ``d_1 .. d_K``
    (``N = prod d_k`` elements); any dims before them are a batch. ``lams[k]``
    has shape (..., d_k) or is ``None`` (mode not preconditioned, lam = 1):

    ``0.5 * (sum_k (N / d_k) sum(log lam_k) + ||Gr / sqrt(lam_1 o ... o lam_K)||_F^2)``

    i.e. ``0.5 (logdet S + g^T S^-1 g)`` for
    ``S = kron_k Q_k diag(lam_k) Q_k^T``. Returns a tensor of the batch shape.
    """
    num_modes = len(lams)
    if num_modes == 0:
        raise ValueError("kl_objective_modes: lams must name at least one mode")
    if Gr.dim() < num_modes:
        raise ValueError(
            f"kl_objective_modes: Gr must have at least len(lams) = {num_modes} dims, got shape {tuple(Gr.shape)}"
        )
    mode_sizes = Gr.shape[Gr.dim() - num_modes :]
    N = math.prod(mode_sizes)
    mode_dims = tuple(range(-num_modes, 0))
    fit = Gr * Gr
    logdet = Gr.new_zeros(())
    for k, lam in enumerate(lams):
        if lam is None:
            continue
        if lam.dim() < 1 or lam.shape[-1] != mode_sizes[k]:
            raise ValueError(
                f"kl_objective: lams[{k}] must have shape (..., {mode_sizes[k]}) for mode {k}, got {tuple(lam.shape)}"
            )
        # lam (..., d_k) -> (..., 1, .., d_k, .., 1) against the block's modes
        fit = fit / lam.reshape(lam.shape[:-1] + (1,) * k + (mode_sizes[k],) + (1,) * (num_modes - 1 - k))
        logdet = logdet + (N // mode_sizes[k]) * torch.log(lam).sum(-1)
    return 0.5 * (logdet + fit.sum(dim=mode_dims))


# --------------------------------------------------------------------------
# second moments


def second_moment_of_samples(G: torch.Tensor) -> torch.Tensor:
    """Sample second moment ``mean_k g_k g_k^T`` (mn x mn) of samples G (..., k, m, n)."""
    if G.dim() < 3:
        raise ValueError(f"second_moment_of_samples: G must have shape (..., k, m, n), got {tuple(G.shape)}")
    k = G.shape[-3]
    g = G.reshape(G.shape[:-3] + (k, -1))
    return g.transpose(-2, -1) @ g / k


def rearrange(C: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Van Loan rearrangement ``R(C)`` (..., m^2, n^2): ``R(C)[(i, i'), (j, j')] = C4[i, j, i', j']``.

    ``R(kron(A, B)) = vec(A) vec(B)^T`` (row-major vec) and
    ``||C - kron(A, B)||_F = ||R(C) - vec(A) vec(B)^T||_F``;
    ``R(C) vec(B) = vec(E[G B G^T])``, ``R(C)^T vec(A) = vec(E[G^T A G])``.
    """
    C4 = _as_four_way(C, m, n, "C")
    return C4.permute(*range(C4.dim() - 4), -4, -2, -3, -1).reshape(C.shape[:-2] + (m * m, n * n))


def _as_four_way(C: torch.Tensor, m: int, n: int, name: str) -> torch.Tensor:
    if C.dim() < 2 or C.shape[-2:] != (m * n, m * n):
        raise ValueError(f"{name} must have shape (..., m*n, m*n) = (..., {m * n}, {m * n}), got {tuple(C.shape)}")
    return C.reshape(C.shape[:-2] + (m, n, m, n))


class _Moments:
    """Expectations over G from a dense second moment or from a stack of samples."""

    samples: torch.Tensor | None  # (k, m, n) sampled gradients, or None with a dense C4
    C4: torch.Tensor  # (m, n, m, n) dense second moment; not used (None) with samples

    def __init__(self, moments: torch.Tensor, m: int | None, n: int | None, caller: str):
        if moments.dim() == 3:
            k, sm, sn = moments.shape
            if (m is not None and m != sm) or (n is not None and n != sn):
                raise ValueError(f"{caller}: samples have blocks {sm} x {sn} but m={m}, n={n} were given")
            if k == 0:
                raise ValueError(f"{caller}: moments holds no samples")
            self.samples, self.C4, self.m, self.n = moments, None, sm, sn  # type: ignore[assignment]
        elif moments.dim() == 2:
            if m is None or n is None:
                raise ValueError(f"{caller}: m and n are required with a dense second moment")
            self.samples, self.C4, self.m, self.n = None, _as_four_way(moments, m, n, "moments"), m, n
        else:
            raise ValueError(
                f"{caller}: moments must be a dense second moment (m*n, m*n) or samples (k, m, n), "
                f"got shape {tuple(moments.shape)}"
            )
        self.tensor = moments

    def dense(self) -> torch.Tensor:
        if self.samples is not None:
            return second_moment_of_samples(self.samples)
        return self.C4.reshape(self.m * self.n, self.m * self.n)

    def left(self, P_b: torch.Tensor | None) -> torch.Tensor:
        """E[G P_b G^T] (m x m); ``None`` is the identity."""
        if self.samples is not None:
            G = self.samples
            H = G if P_b is None else G @ P_b
            return torch.einsum("kij,klj->il", H, G) / G.shape[0]
        if P_b is None:
            return self.C4.diagonal(dim1=1, dim2=3).sum(-1)
        return torch.einsum("ajbk,jk->ab", self.C4, P_b)

    def right(self, P_a: torch.Tensor | None) -> torch.Tensor:
        """E[G^T P_a G] (n x n); ``None`` is the identity."""
        if self.samples is not None:
            G = self.samples
            H = G if P_a is None else P_a @ G
            return torch.einsum("kij,kil->jl", G, H) / G.shape[0]
        if P_a is None:
            return self.C4.diagonal(dim1=0, dim2=2).sum(-1)
        return torch.einsum("ajbk,ab->jk", self.C4, P_a)

    def rotated_diagonal(self, Q_a: torch.Tensor, Q_b: torch.Tensor) -> torch.Tensor:
        """E[Gr o Gr] (m x n) with Gr = Q_a^T G Q_b."""
        if self.samples is not None:
            Gr = Q_a.T @ self.samples @ Q_b
            return (Gr * Gr).mean(0)
        return torch.einsum("ajbk,ai,jl,bi,kl->il", self.C4, Q_a, Q_b, Q_a, Q_b)


def weighted_grams(
    moments: torch.Tensor,
    m: int | None = None,
    n: int | None = None,
    P_a: torch.Tensor | None = None,
    P_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[G P_b G^T], E[G^T P_a G])``; a ``None`` weight is the identity.

    With both weights ``None`` these are Shampoo's ``L = E[G G^T]`` and
    ``R = E[G^T G]``. ``moments``: dense C (mn x mn, with m, n) or samples (k, m, n).
    """
    mo = _Moments(moments, m, n, "weighted_grams")
    return mo.left(P_b), mo.right(P_a)


def rotated_second_moment(moments: torch.Tensor, Q_a: torch.Tensor, Q_b: torch.Tensor) -> torch.Tensor:
    """``E[Gr o Gr]`` (m x n) for ``Gr = Q_a^T G Q_b``: the diagonal of the second
    moment in the basis ``Q_a kron Q_b``, all that a diagonal-in-basis estimate sees."""
    m, n = Q_a.shape[-1], Q_b.shape[-1]
    return _Moments(moments, m, n, "rotated_second_moment").rotated_diagonal(Q_a, Q_b)


# --------------------------------------------------------------------------
# exact KL


def _spd_inverse_and_logdet(S: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):
        raise ValueError(f"{name} must be symmetric positive definite (Cholesky failed)")
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return torch.cholesky_inverse(L), logdet


def kl_divergence(C: torch.Tensor, S_a: torch.Tensor, S_b: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(N(0, C) || N(0, kron(S_a, S_b)))``, batched over leading dims.

    ``0.5 (tr(S^-1 C) - mn + n logdet S_a + m logdet S_b - logdet C)`` with
    ``tr(S^-1 C) = sum C4[i, j, i', j'] (S_a^-1)[i', i] (S_b^-1)[j', j]``; only
    the factors and C are Cholesky-factorised, the Kronecker product is never
    formed. C (..., mn, mn), S_a (..., m, m), S_b (..., n, n), all SPD.
    """
    m, n = _square_size(S_a, "S_a"), _square_size(S_b, "S_b")
    C4 = _as_four_way(C, m, n, "C")
    P_a, logdet_a = _spd_inverse_and_logdet(S_a, "S_a")
    P_b, logdet_b = _spd_inverse_and_logdet(S_b, "S_b")
    _, logdet_C = _spd_inverse_and_logdet(C, "C")
    trace = torch.einsum("...ajbk,...ba,...kj->...", C4, P_a, P_b)
    return 0.5 * (trace - m * n + n * logdet_a + m * logdet_b - logdet_C)


def kl_divergence_eig(
    C: torch.Tensor, Q_a: torch.Tensor, lam_a: torch.Tensor, Q_b: torch.Tensor, lam_b: torch.Tensor
) -> torch.Tensor:
    """Exact KL from C to the eigen-parametrised ``kron(Q_a diag(lam_a) Q_a^T, Q_b diag(lam_b) Q_b^T)``.

    Q_k orthogonal (..., d_k, d_k), lam_k > 0 (..., d_k); batched. Equals
    ``E[kl_objective(Q_a^T G Q_b, lam_a, lam_b)] - 0.5 (mn + logdet C)``
    for ``E[g g^T] = C``.
    """
    m, n = _square_size(Q_a, "Q_a"), _square_size(Q_b, "Q_b")
    if lam_a.shape[-1:] != (m,):
        raise ValueError(f"kl_divergence_eig: lam_a must have shape (..., {m}), got {tuple(lam_a.shape)}")
    if lam_b.shape[-1:] != (n,):
        raise ValueError(f"kl_divergence_eig: lam_b must have shape (..., {n}), got {tuple(lam_b.shape)}")
    C4 = _as_four_way(C, m, n, "C")
    _, logdet_C = _spd_inverse_and_logdet(C, "C")
    rotated = torch.einsum("...ajbk,...ai,...jl,...bi,...kl->...il", C4, Q_a, Q_b, Q_a, Q_b)
    trace = (rotated / (lam_a.unsqueeze(-1) * lam_b.unsqueeze(-2))).sum((-2, -1))
    logdet_S = n * torch.log(lam_a).sum(-1) + m * torch.log(lam_b).sum(-1)
    return 0.5 * (trace - m * n + logdet_S - logdet_C)


def best_scale_kl(moments: torch.Tensor, S_a: torch.Tensor, S_b: torch.Tensor) -> torch.Tensor:
    """The scalar c minimising ``KL(C, c kron(S_a, S_b))``: ``c = tr(kron(S_a, S_b)^-1 C) / (mn)``.

    ``moments``: dense C or samples (k, m, n). Returns a 0-dim tensor.
    """
    m, n = _square_size(S_a, "S_a"), _square_size(S_b, "S_b")
    mo = _Moments(moments, m, n, "best_scale_kl")
    P_a, _ = _spd_inverse_and_logdet(S_a, "S_a")
    P_b, _ = _spd_inverse_and_logdet(S_b, "S_b")
    return torch.sum(P_a * mo.left(P_b)) / (m * n)


def _square_size(X: torch.Tensor, name: str) -> int:
    if X.dim() < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"{name} must be square (..., d, d), got shape {tuple(X.shape)}")
    return X.shape[-1]


# --------------------------------------------------------------------------
# fixed-point maps of Claims 2 and 3


def kl_factor_targets(
    moments: torch.Tensor, S_a: torch.Tensor, S_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-hand sides of Eq. (3): ``(E[G S_b^-1 G^T] / n, E[G^T S_a^-1 G] / m)``.

    Both from the given (S_a, S_b); the KL-optimal Kronecker estimate is the
    pair that these reproduce (Claim 2). ``moments``: dense C or samples.
    """
    m, n = _square_size(S_a, "S_a"), _square_size(S_b, "S_b")
    mo = _Moments(moments, m, n, "kl_factor_targets")
    P_a, _ = _spd_inverse_and_logdet(S_a, "S_a")
    P_b, _ = _spd_inverse_and_logdet(S_b, "S_b")
    return mo.left(P_b) / n, mo.right(P_a) / m


def kl_eigenvalue_targets(
    moments: torch.Tensor, Q_a: torch.Tensor, lam_a: torch.Tensor, Q_b: torch.Tensor, lam_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-hand sides of Eq. (6) at the given eigenvalues:

    ``(diag(Q_a^T E[G P_b G^T] Q_a) / n, diag(Q_b^T E[G^T P_a G] Q_b) / m)`` with
    ``P_k = Q_k diag(1 / lam_k) Q_k^T``; equivalently, with ``D = E[Gr o Gr]``,
    ``(mean_j D_ij / lam_b_j, mean_i D_ij / lam_a_i)``: the expectation of SPEC
    step 5's projection. ``moments``: dense C or samples.
    """
    m, n = _square_size(Q_a, "Q_a"), _square_size(Q_b, "Q_b")
    D = _Moments(moments, m, n, "kl_eigenvalue_targets").rotated_diagonal(Q_a, Q_b)
    return (D / lam_b).mean(-1), (D / lam_a.unsqueeze(-1)).mean(-2)


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
