"""The steps of docs/spec.md, one small function per step: :mod:`klkern.reference` (whose
docstring states their conventions) transcribes the specification with these and applies them
in its ``Reference*`` optimizers; every name is public there.
"""

from __future__ import annotations

import math

import torch

from .algorithms._functional import REORTHOGONALIZE_EVERY, SPIKE_CLIP, SPIKE_GROWTH
from .linalg import EighFailure, batched_qr, eigh_descending, null_rtol

# --------------------------------------------------------------------------
# tensor helpers


def unfold(T: torch.Tensor, k: int) -> torch.Tensor:
    """Mode-k unfolding G_(k): a (d_k, N / d_k) matrix."""
    return T.movedim(k, 0).reshape(T.shape[k], -1)


def mode_product(T: torch.Tensor, A: torch.Tensor, k: int) -> torch.Tensor:
    """T x_k A: mode k of T multiplied by the matrix A (A @ T_(k))."""
    return torch.tensordot(A, T, dims=([1], [k])).movedim(0, k)


def rotate(G: torch.Tensor, Qs: list) -> torch.Tensor:
    """G rotated into the eigenbasis: G x_1 Q_1^T x_2 Q_2^T ... (Q_a^T G Q_b in 2-D)."""
    for k, Q in enumerate(Qs):
        if Q is not None:
            G = mode_product(G, Q.T, k)
    return G


def rotate_back(X: torch.Tensor, Qs: list) -> torch.Tensor:
    """Inverse of :func:`rotate`: X x_1 Q_1 x_2 Q_2 ... (Q_a X Q_b^T in 2-D)."""
    for k, Q in enumerate(Qs):
        if Q is not None:
            X = mode_product(X, Q, k)
    return X


def broadcast_along(vec: torch.Tensor, k: int, ndim: int) -> torch.Tensor:
    """``vec`` (d_k) shaped to broadcast along mode k of an ndim-mode tensor."""
    shape = [1] * ndim
    shape[k] = vec.shape[0]
    return vec.reshape(shape)


def update_seen(seen: list, G: torch.Tensor) -> list:
    """mask_unseen (klkern's, not the SPEC's): per preconditioned mode k (``seen[k]`` (d_k,), None
    for a mode without a factor), the largest |entry| of every gradient so far in each slice
    G_(k)[i, :]; 0 while that slice has been exactly zero at every step."""
    return [torch.maximum(s, unfold(G, k).abs().amax(1)) if s is not None else None for k, s in enumerate(seen)]


def mask_unseen(U: torch.Tensor, seen: list) -> torch.Tensor:
    """U with every slice along a preconditioned mode that never saw a gradient set to 0: such a
    direction gets no update, as under AdamW, instead of the preconditioner's amplified rounding."""
    for k, s in enumerate(seen):
        if s is not None:
            U = U * broadcast_along((s > 0).to(U.dtype), k, U.dim())
    return U


def lam_product(lams: list, ndim: int, skip: int | None = None) -> torch.Tensor | float:
    """prod_j lam_j as a broadcastable tensor (modes without lam count as 1)."""
    out: torch.Tensor | float = 1.0
    for j, lam in enumerate(lams):
        if lam is not None and j != skip:
            out = out * broadcast_along(lam, j, ndim)
    return out


def matrix_from_eig(Q: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
    """Q diag(evals) Q^T."""
    return Q @ torch.diag(evals) @ Q.T


# --------------------------------------------------------------------------
# shared steps


def carries_scale(G: torch.Tensor) -> bool:
    """Whether a gradient block can start an estimate: its sum of squares in float32 is nonzero."""
    return bool(G.float().pow(2).sum() > 0)


def momentum_update(M: torch.Tensor, G: torch.Tensor, beta1: float) -> torch.Tensor:
    """M <- beta1 M + (1 - beta1) G (no bias correction)."""
    return beta1 * M + (1 - beta1) * G


def adam_moments(m, v, G, beta1: float, beta2: float):
    """m <- beta1 m + (1-beta1) G;  v <- beta2 v + (1-beta2) G^2."""
    return beta1 * m + (1 - beta1) * G, beta2 * v + (1 - beta2) * G * G


def adam_bias_scale(t: int, beta1: float, beta2: float) -> float:
    """sqrt(1 - beta2^t) / (1 - beta1^t): SOAP's bias-corrected step-size factor."""
    return math.sqrt(1 - beta2**t) / (1 - beta1**t)


def adam_direction(m, v, eps: float) -> torch.Tensor:
    """m / (sqrt(v) + eps)."""
    return m / (torch.sqrt(v) + eps)


def normalize_update(U: torch.Tensor) -> torch.Tensor:
    """Step 7 (normalize_grads): U / (1e-30 + sqrt(mean(U^2)))."""
    return U / (1e-30 + torch.sqrt(torch.mean(U**2)))


def apply_update(W: torch.Tensor, U: torch.Tensor, step_size: float, lr: float, weight_decay: float):
    """Step 8: W <- W - step_size U; then decoupled decay W <- W - lr wd W."""
    W = W - step_size * U
    return W - lr * weight_decay * W


def canonical_null(evals: torch.Tensor, Q: torch.Tensor, rtol: float, candidates: torch.Tensor | None = None):
    """klkern's convention for the directions without energy of a descending eigendecomposition
    (docs/conventions.md): those whose eigenvalue is at most rtol times the largest (0 where that
    is not positive) get eigenvalue 0 and, as vectors, the candidates (the columns of
    ``candidates``, default the identity's) that the other eigenvectors U cover least
    (||U^T c||^2 ascending, ties by index), in index order, each orthonormalised against U and
    the ones before it (Gram-Schmidt, twice). Returns (evals, Q)."""
    d = evals.shape[0]
    r = int((evals > rtol * max(float(evals[0]), 0.0)).sum()) if d else 0
    if r == d:
        return evals, Q
    C = torch.eye(d, dtype=Q.dtype, device=Q.device) if candidates is None else candidates.to(Q.dtype)
    U = Q[:, :r]
    cover = [float((U.T @ C[:, i]).pow(2).sum()) for i in range(d)]
    chosen = sorted(sorted(range(d), key=lambda i: cover[i])[: d - r])  # Python's sort is stable
    basis = [U[:, j] for j in range(r)]
    for i in chosen:
        v = C[:, i].clone()
        for _ in range(2):
            for b in basis:
                v = v - (b @ v) * b
        basis.append(v / v.norm())
    evals = evals.clone()
    evals[r:] = 0.0
    return evals, torch.stack(basis, 1)


def init_eigenbasis(S: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a first gradient's Gram S, formed in float64 (``kl_init_factors`` or
    ``factor_ema`` of ``G.double()``), columns in descending eigenvalue order, the directions
    without energy canonical (:func:`canonical_null` at the data's resolution,
    ``null_rtol(d, gram=True)``); float32."""
    try:
        evals, Q = eigh_descending(S)
    except EighFailure:  # pragma: no cover - documented fallback
        return torch.eye(S.shape[0], device=S.device)
    return canonical_null(evals, Q, null_rtol(S.shape[0], gram=True))[1].float()


def idle_directions(S: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """(d,) bool: the columns q_j of Q whose energy q_j^T S q_j is at most null_rtol(d) of the
    largest (0 where that is not positive): SOAP's sort puts them last, in their order."""
    energy = torch.diagonal(Q.T @ S @ Q)
    return energy <= null_rtol(S.shape[0]) * max(float(energy.max()), 0.0)


def canonical_qr(Y: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """qr(Y) (diag(R) >= 0), klkern's convention for the columns it cannot determine
    (docs/conventions.md): a column whose |R_jj| is at most null_rtol(d) of the largest (it adds
    nothing but rounding to the columns before it) is replaced by ``own``'s column j (its old
    basis vector) and the QR taken again."""
    Q = batched_qr(Y)
    T = torch.diagonal(Q.T @ Y).abs()
    missing = T <= null_rtol(Y.shape[1]) * max(float(T.max()), 0.0)
    if not bool(missing.any()):
        return Q
    Y = Y.clone()
    Y[:, missing] = own[:, missing]
    return batched_qr(Y)


def refresh_eigenbasis(S: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Step 6: one power-iteration step, Q <- qr(S Q) (diag(R) >= 0; :func:`canonical_qr`)."""
    return canonical_qr(S @ Q, Q)


def refresh_wanted(S: torch.Tensor, Q: torch.Tensor, group: dict, t: int) -> bool:
    """Whether step 6 refreshes this mode's basis at step t (a refresh step): always, or with
    ``staleness_threshold`` set when Q^T S Q's off-diagonal energy over its diagonal's,
    ||offdiag||_F^2 / ||diag||^2, exceeds it, and at every REORTHOGONALIZE_EVERY-th refresh."""
    threshold = group.get("staleness_threshold")
    if threshold is None or (t // group["precondition_frequency"]) % REORTHOGONALIZE_EVERY == 0:
        return True
    R = Q.T @ S @ Q
    off = R - torch.diag(torch.diagonal(R))
    return bool((off * off).sum() / (torch.diagonal(R) ** 2).sum().clamp(min=1e-30) > threshold)


def carry_rotated(X: torch.Tensor, Qs_old: list, Qs_new: list) -> torch.Tensor:
    """Express a rotated-basis tensor in the new basis: X x_k (Q_new^T Q_old) per mode."""
    for k, (Q_old, Q_new) in enumerate(zip(Qs_old, Qs_new)):
        if Q_old is not None:
            X = mode_product(X, Q_new.T @ Q_old, k)
    return X


# --------------------------------------------------------------------------
# KL-Shampoo and KL-SOAP


def kl_init_factors(G: torch.Tensor, mask, beta2: float) -> list:
    """First step: S_k = (1 - beta2) (d_k / N) G_(k) G_(k)^T (S_a = (1-beta2) G G^T / n)."""
    N = G.numel()
    out = []
    for k, on in enumerate(mask):
        Gk = unfold(G, k)
        out.append((1 - beta2) * (G.shape[k] / N) * (Gk @ Gk.T) if on else None)
    return out


def floor_anchor(G: torch.Tensor, mask, eigval_floor: str) -> float:
    """``eigval_floor`` (klkern's, not the SPEC's): the scale s of a block's eigenvalue floor
    s / c_k^2, from the gradient that initialises it (its first nonzero one: the block waits for
    a gradient that carries scale). "relative": mean(G^2)^(1/K) (K preconditioned modes), the
    value the scale-free initialisations start lam at; "absolute": 1, the SPEC's 1 / c_k^2."""
    return gradient_scale(G, mask) if eigval_floor == "relative" else 1.0


def gradient_scale(G: torch.Tensor, mask) -> float:
    """mean(G^2)^(1/K), K the number of preconditioned modes."""
    return float(torch.mean(G.double() ** 2)) ** (1.0 / sum(1 for on in mask if on))


def floor_scale(anchor: float) -> float:
    """The scale of the floor s / c_k^2 from a block's anchor (:func:`floor_anchor`): the anchor,
    or 1 should it be 0."""
    return anchor if anchor > 0 else 1.0


def init_eigenvalues(G: torch.Tensor, mask, init_factor, eigval_clamp: float, scale: float = 1.0) -> list:
    """First step: the eigenvalue estimates of every preconditioned mode.

    * ``init_factor`` a number (SPEC, the prototype): lam_k = init_factor in every entry;
    * "rms" or "debiased": scale-free, from the first gradient: every entry of every
      preconditioned mode's lam_k is mean(G^2) ** (1 / K) (K = number of preconditioned
      modes), so that prod_k lam_k = mean(G^2) matches the gradient's second moment,
      floored like step 5 (``scale``: the floor's, :func:`floor_scale`).
    """
    if isinstance(init_factor, str):
        value = gradient_scale(G, mask)
        return [eigval_floor(torch.full((d,), value, dtype=G.dtype, device=G.device), eigval_clamp, scale)
                if on else None for d, on in zip(G.shape, mask)]
    return [torch.full((d,), float(init_factor), dtype=G.dtype, device=G.device) if on else None
            for d, on in zip(G.shape, mask)]


def eigenvalue_weight(beta2: float, t: int, init_factor) -> float:
    """The weight of the new projection in step 5: 1 - beta2, or for init_factor="debiased" the
    bias-corrected (1 - beta2) / (1 - beta2^t): lam is then the weighted mean of the projections
    seen so far (the initial value only weights the first projection, then has no weight)."""
    if init_factor == "debiased":
        return (1 - beta2) / (1 - beta2**t)
    return 1 - beta2


def kl_scaling(lams: list, ndim: int, eps: float) -> torch.Tensor:
    """Step 2: D = 1 / (sqrt(prod_k lam_k) + eps) (D_ij = 1/(sqrt(lam_a_i lam_b_j) + eps))."""
    return 1.0 / (torch.as_tensor(lam_product(lams, ndim)).sqrt() + eps)


def rotated_precondition(M: torch.Tensor, Qs: list, D: torch.Tensor) -> torch.Tensor:
    """Step 3: U = Q_a [(Q_a^T M Q_b) * D] Q_b^T."""
    return rotate_back(rotate(M, Qs) * D, Qs)


def kl_factor_update(Ss: list, G: torch.Tensor, Qs: list, lams: list, beta2: float) -> list:
    """Step 4: S_k <- beta2 S_k + (1-beta2) (d_k/N) G_(k) [kron_{j!=k} Q_j diag(1/lam_j) Q_j^T] G_(k)^T.

    In 2-D: S_a <- beta2 S_a + (1-beta2)/n G Q_b diag(1/lam_b) Q_b^T G^T. All
    modes use the old Q and lam.
    """
    N = G.numel()
    out: list[torch.Tensor | None] = []
    for k, S in enumerate(Ss):
        if S is None:
            out.append(None)
            continue
        H = G
        for j, (Q, lam) in enumerate(zip(Qs, lams)):
            if j != k and Q is not None:
                H = mode_product(H, matrix_from_eig(Q, 1.0 / lam), j)
        delta = unfold(G, k) @ unfold(H, k).T
        out.append(beta2 * S + (1 - beta2) * (G.shape[k] / N) * delta)
    return out


def eigenvalue_projection(lams: list, G: torch.Tensor, Qs: list) -> list:
    """Step 5's projections from ``lams``: with Gr = rotate(G), for each mode k,
    proj_k = mean over the other modes of Gr^2 / prod_{j!=k} lam_j (None where lam_k is None)."""
    Gr = rotate(G, Qs)
    out: list[torch.Tensor | None] = []
    for k, lam in enumerate(lams):
        if lam is None:
            out.append(None)
            continue
        others = [j for j in range(G.dim()) if j != k]
        weighted = Gr**2 / lam_product(lams, G.dim(), skip=k)
        out.append(weighted.mean(dim=others) if others else weighted)
    return out


def eigenvalue_update(lams: list, G: torch.Tensor, Qs: list, beta2: float, weight: float | None = None) -> list:
    """Step 5 (Claim 3), before the floor: lam_k <- beta2 lam_k + (1-beta2) proj_k with
    :func:`eigenvalue_projection` (``weight`` replaces 1 - beta2 and beta2 by 1 - weight: see
    :func:`eigenvalue_weight`).
    """
    weight = 1 - beta2 if weight is None else weight
    return [None if lam is None else (1 - weight) * lam + weight * proj
            for lam, proj in zip(lams, eigenvalue_projection(lams, G, Qs))]


def spike_scale(lams: list, G: torch.Tensor, Qs: list, threshold, t: int) -> float:
    """``spike_threshold`` (klkern's, not the SPEC's): the factor an outlier gradient is scaled
    by at step t before steps 1-5 see it; never at t = 1, whose projection sets the scale of
    estimates that start from a constant (init_factor=0.1). With r_k = proj_k / lam_k
    (:func:`eigenvalue_projection`, the estimates before this step) and the whitened energy per
    entry e = mean(Gr^2 / prod_k lam_k) (= mean_i r_k_i for any k): when e exceeds
    ``threshold`` the factor is
    sqrt(min(1, max(SPIKE_CLIP / max_k max_i r_k_i, SPIKE_GROWTH / e))), so no direction holds
    more than SPIKE_CLIP times its estimate unless that would leave the whole gradient below
    SPIKE_GROWTH; otherwise 1. None: always 1."""
    if threshold is None or t == 1:
        return 1.0
    energy = float(torch.as_tensor(lam_product(lams, G.dim())).reciprocal().mul(rotate(G, Qs) ** 2).mean())
    if not energy > threshold:
        return 1.0
    worst = max(float((proj / lam).max()) for proj, lam in zip(eigenvalue_projection(lams, G, Qs), lams)
                if lam is not None)
    return math.sqrt(min(1.0, max(SPIKE_CLIP / worst, SPIKE_GROWTH / energy)))


def eigval_floor(lam: torch.Tensor, eigval_clamp: float, scale: float = 1.0) -> torch.Tensor:
    """Step 5 floor: lam <- max(lam, s/c^2), c = max(10, min(d, eigval_clamp)); s = 1 is the
    SPEC's, ``eigval_floor="relative"`` the block's :func:`floor_scale`."""
    c = max(10.0, min(float(lam.shape[0]), float(eigval_clamp)))
    return torch.clamp(lam, min=scale / (c * c))


def exact_eigen(S: torch.Tensor, eigval_clamp: float, scale: float = 1.0, previous: torch.Tensor | None = None):
    """Idealized mode: exact (lam, Q) of S, descending, with the eigenvalue floor; the directions
    without energy canonical (:func:`canonical_null`): for a first gradient's float64 Gram at the
    data's resolution from the identity, for the factor (float32) at its own from the
    ``previous`` basis."""
    evals, Q = eigh_descending(S)
    gram = S.dtype == torch.float64
    evals, Q = canonical_null(evals, Q, null_rtol(S.shape[0], gram), None if gram else previous)
    return eigval_floor(evals.float(), eigval_clamp, scale), Q.float()


def kl_objective(Gr: torch.Tensor, lams: list) -> torch.Tensor:
    """Per-block KL objective up to a constant (SPEC "Idealized and diagnostic modes").

    0.5 * (sum_k (N/d_k) sum(log lam_k) + ||Gr / sqrt(prod lam)||_F^2); in 2-D
    0.5 * (n sum log lam_a + m sum log lam_b + ||Gr * (lam_a lam_b^T)^-1/2||^2).
    """
    N = Gr.numel()
    logdet = sum((N / lam.shape[0]) * torch.log(lam).sum() for lam in lams if lam is not None)
    fit = (Gr**2 / lam_product(lams, Gr.dim())).sum()
    return 0.5 * (logdet + fit)


# --------------------------------------------------------------------------
# SOAP


def factor_ema(Fs: list, G: torch.Tensor, beta2: float) -> list:
    """F_k <- beta2 F_k + (1 - beta2) G_(k) G_(k)^T (SOAP's GG, Shampoo's L and R)."""
    out: list[torch.Tensor | None] = []
    for k, F in enumerate(Fs):
        if F is None:
            out.append(None)
        else:
            Gk = unfold(G, k)
            out.append(beta2 * F + (1 - beta2) * (Gk @ Gk.T))
    return out


def soap_refresh(GGs: list, Qs: list, v: torch.Tensor, wanted=lambda k: True):
    """SOAP refresh: per mode (where ``wanted(k)``), sort by est = diag(Q^T GG Q) descending
    (stable; directions without energy, :func:`idle_directions`, last), permute Q's columns and v
    along that mode, then Q <- qr(GG Q) (:func:`canonical_qr`).
    Returns (Qs, v)."""
    new_Qs = []
    for k, (GG, Q) in enumerate(zip(GGs, Qs)):
        if Q is None or not wanted(k):
            new_Qs.append(Q)
            continue
        est = torch.diag(Q.T @ GG @ Q)
        idle = idle_directions(GG, Q)  # last, in their order
        order = torch.argsort(est.masked_fill(idle, -math.inf), descending=True, stable=True)
        v = v.index_select(k, order)
        new_Qs.append(canonical_qr(GG @ Q[:, order], Q[:, order]))
    return new_Qs, v


# --------------------------------------------------------------------------
# Shampoo


def inverse_root(L: torch.Tensor, eps: float, exponent: float) -> torch.Tensor:
    """(L + eps I)^(-p) by symmetric eigendecomposition, the eigenvalues floored first at L's
    float32 resolution, null_rtol(d) of the largest (klkern's convention, docs/conventions.md;
    the SPEC floors at 0)."""
    evals, Q = eigh_descending(L)
    floor = null_rtol(L.shape[0]) * max(float(evals[0]), 0.0)
    return matrix_from_eig(Q, (evals.clamp(min=floor) + eps) ** (-exponent))


def shampoo_precondition(M: torch.Tensor, roots: list) -> torch.Tensor:
    """P = L_root M R_root (every mode multiplied by its root)."""
    for k, root in enumerate(roots):
        if root is not None:
            M = mode_product(M, root, k)
    return M


def graft(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Adam grafting: U = P * ||A||_F / ||P||_F (U = 0 where P = 0)."""
    norm_p = torch.linalg.vector_norm(P)
    if norm_p == 0:
        return torch.zeros_like(P)
    return P * (torch.linalg.vector_norm(A) / norm_p)
