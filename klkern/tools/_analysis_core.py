"""The objectives, second moments, divergences and fixed-point targets that klkern.analysis's
solvers are built on; every name is public through :mod:`klkern.analysis`, whose docstring
states the conventions (row-major ``g``, ``kron(S_a, S_b)``, the 4-way reading of ``C``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

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
