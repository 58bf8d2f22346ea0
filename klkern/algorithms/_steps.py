"""The steady step of each algorithm over a stack of blocks, in phases (the torch path).

The step plan (klkern/engine/_plan.py) runs, for every stack of a device:

1. ``project`` (KL-Shampoo, KL-SOAP): the rotated gradient ``Gr = G x_k Q_k^T`` and step 5's
   projections from the old ``lam``, written into the plan's flat projection buffer;
2. once for all stacks: ``spike_threshold``'s factor of every block;
3. ``update``: the moments, the update direction ``U`` and the factor EMAs;
4. once for all stacks: the eigenvalue EMA of every KL block and its floor;
5. ``late`` (KL-Shampoo with ``eigenvalues_first``): ``U`` from the new eigenvalues;
6. the write-back ``W <- W + update U; W <- W + decay W`` (SPEC steps 7-8).

Masking (klkern/engine/_guard.py): a block with ``keep = False`` has a zero gradient (so a zero rotated
gradient, projections and factor terms), betas of 1 (``st.coef("b1")`` etc. are 1 there) and an
update and weight decay of 0, so each in-place EMA below leaves its state exactly as it was
(``x * 1 + 0``) and its parameter is not changed. For a block that steps, the coefficients are
the SPEC's scalars, and every formula is the one of klkern/reference.py (tested against it).

Differences from the literal reference (exact identities): the factors are kept in their own
eigenbasis, ``R_k = Q_k^T S_k Q_k``, so the factor EMA needs one product per mode of ``Gr`` and
the refresh is ``qr(Q_k R_k)``; momentum is kept in the rotated basis (KL-Shampoo too); a 2-D
KL-Shampoo step costs 6 matrix products against 12 for the reference.
"""

from __future__ import annotations

import math

import torch

from ..runtime import _precision
from . import _functional as F
from . import _stacked, _tracking

__all__ = ["STEPS", "WRITTEN"]

# What a stack's update phase returns when its kernels wrote the update into the parameters
# themselves (klkern/algorithms/_triton_path.py): the write-back (klkern/engine/_write.py) skips it.
WRITTEN = torch.empty(0)


# ---------------------------------------------------------------------- stack helpers


def _load(st, name: str) -> torch.Tensor:
    """A state tensor in float32 (the buffer itself when it is float32)."""
    return st.bufs[name].float()


def _store(st, name: str, value: torch.Tensor) -> None:
    if st.bufs[name] is not value:
        st.bufs[name].copy_(value)


def _bases(st, prefix: str = "Q") -> list:
    """The stack's float32 bases (cached when the state is float32: refreshes update them in place)."""
    key = f"bases:{prefix}"
    if key in st.cache:
        return st.cache[key]
    Qs = [st.bufs[f"{prefix}{k}"].float() if on else None for k, on in enumerate(st.mask)]
    if all(Q is None or Q is st.bufs[f"{prefix}{k}"] for k, Q in enumerate(Qs)):
        st.cache[key] = Qs
    return Qs


def _transposed(st, Qs: list, prefix: str = "Q") -> list:
    """Their transposes (views; cached with the bases)."""
    key = f"bases_t:{prefix}"
    if key in st.cache:
        return st.cache[key]
    Ts = [Q.mT if Q is not None else None for Q in Qs]
    if f"bases:{prefix}" in st.cache:
        st.cache[key] = Ts
    return Ts


def _two_d(st) -> bool:
    return len(st.shape) == 2 and all(st.mask)


def rotate(st, X: torch.Tensor, mode: str, prefix: str = "Q") -> torch.Tensor:
    """X x_k Q_k^T for every preconditioned mode (Q_a^T X Q_b in 2-D, (X Q_b) first)."""
    Qs = _bases(st, prefix)
    if _two_d(st):
        Ts = _transposed(st, Qs, prefix)
        return _precision.bmm(Ts[0], _precision.bmm(X, Qs[1], mode), mode)
    return _stacked._rotate(X, Qs, mode)


def rotate_back(st, X: torch.Tensor, mode: str, prefix: str = "Q") -> torch.Tensor:
    """X x_k Q_k for every preconditioned mode (Q_a X Q_b^T in 2-D, (X Q_b^T) first)."""
    Qs = _bases(st, prefix)
    if _two_d(st):
        Ts = _transposed(st, Qs, prefix)
        return _precision.bmm(Qs[0], _precision.bmm(X, Ts[1], mode), mode)
    return _stacked._rotate_back(X, Qs, mode)


def _lams(st) -> list:
    return [st.bufs[f"lam{k}"] if on else None for k, on in enumerate(st.mask)]


def _lam_along(st, k: int) -> torch.Tensor:
    """lam_k (a view into the plan's flat buffer) shaped to broadcast along mode k (made once)."""
    key = f"lam_along{k}"
    if key not in st.cache:
        st.cache[key] = _stacked._along(st.bufs[f"lam{k}"], k, len(st.shape))
    return st.cache[key]


def _lam_others(st, k: int):
    """prod_{j != k} lam_j, broadcast (None when mode k is the only preconditioned one)."""
    others = [j for j, on in enumerate(st.mask) if on and j != k]
    if not others:
        return None
    if len(others) == 1:
        return _lam_along(st, others[0])
    out = _lam_along(st, others[0])
    for j in others[1:]:
        out = out * _lam_along(st, j)
    return out


def _factor_ema_(st, name: str, X: torch.Tensor, k: int, alpha: float, mode: str, left=None) -> None:
    """R <- fb R + alpha L_(k) X_(k)^T for the stack (fb masked: 1 for a skipped block, whose
    X is zero), in place; the product at ``mode``."""
    R = _load(st, name)
    R.mul_(st.coef_matrix("fb"))
    if _two_d(st):
        L = X if left is None else left
        if k == 0:
            _precision.baddbmm_(R, L, X.mT, 1.0, alpha, mode)
        else:
            _precision.baddbmm_(R, L.mT, X, 1.0, alpha, mode)
    else:
        _stacked._gram_(R, X, k, 1.0, alpha, mode, left)
    _store(st, name, R)


def _adam_moments_(st, Gr: torch.Tensor, hp) -> tuple[torch.Tensor, torch.Tensor]:
    """m <- b1 m + (1 - b1) Gr and v <- b2 v + (1 - b2) Gr^2 in place (masked betas)."""
    m, v = _load(st, "exp_avg"), _load(st, "exp_avg_sq")
    m.mul_(st.coef("b1")).add_(Gr, alpha=1 - hp.beta1)
    v.mul_(st.coef("b2")).addcmul_(Gr, Gr, value=1 - hp.beta2)
    _store(st, "exp_avg", m)
    _store(st, "exp_avg_sq", v)
    return m, v


def _adam_direction(m: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    return m / (torch.sqrt(v) + eps)


def masked(st, hp, U: torch.Tensor) -> torch.Tensor:
    """U with the directions that never saw a gradient set to 0 (mask_unseen; the mask is the
    plan's, updated from this step's gradient by DevicePlan.see), in place."""
    if hp.mask_unseen:
        for k, on in enumerate(st.mask):
            if on:
                U.mul_(st.cache[f"live{k}"])
    return U


# ---------------------------------------------------------------------- KL-Shampoo, KL-SOAP


def kl_project(st, hp, carry=None):
    """Phase 1: Gr from the old bases and step 5's projections from the old lam, per mode
    ``proj_k = mean over the other modes of Gr^2 / prod_{j != k} lam_j``, written into the
    plan's buffer (``st.proj[k]``; in 2-D two products of Gr^2 with the weights 1 / (d_j lam_j)).
    At a refresh step (and the first update) the tracked KL diagnostic folds this gradient in,
    before the estimate sees it. Returns (Gr, None)."""
    Gr = rotate(st, st.G, hp.rotation_mode)
    if _two_d(st):
        squares = Gr * Gr
        # eigenvalue estimates: float32-accurate whatever the settings
        _precision.exact_matmul(squares, st.cache["proj_weight_mat1"], out=st.cache["proj_mat0"])
        _precision.exact_matmul(st.cache["proj_weight_mat0"], squares, out=st.cache["proj_mat1"])
    else:
        nd = len(st.shape)
        for k, on in enumerate(st.mask):
            if not on:
                continue
            others = _lam_others(st, k)
            W = Gr if others is None else Gr / others
            dims = [j + 1 for j in range(nd) if j != k]
            if dims:
                torch.mean(W * Gr, dim=dims, out=st.proj[k])
            else:
                torch.mul(W, Gr, out=st.proj[k])
    if st.track_kl:
        first = next(k for k, on in enumerate(st.mask) if on)
        _tracking.kl_from_projection_(st.bufs, st.proj[first], _lams(st), first, Gr, keep=st.keep)
    return Gr, None


def _spiked(st, carry) -> torch.Tensor:
    """Gr scaled by spike_threshold's factor (in place; 1: not scaled)."""
    Gr = carry[0]
    if st.spike:
        Gr.mul_(st.coef("spike"))
    return Gr


def _kl_factors(st, hp, Gr: torch.Tensor) -> None:
    """Step 4 in the rotated basis, every mode from the old lam:
    R_k <- fb R_k + (1 - fb) (d_k / N) W_(k) Gr_(k)^T with W_k = Gr / prod_{j != k} lam_j (the
    weights on one side, as the kernel applies them; 1 / lam from the plan's buffer)."""
    fb = hp.factor_beta
    N = math.prod(st.shape)
    for k, on in enumerate(st.mask):
        if not on:
            continue
        others = [j for j, o in enumerate(st.mask) if o and j != k]
        W = Gr
        for j in others:
            W = W * st.cache[f"inv_lam{j}"]
        _factor_ema_(st, f"R{k}", Gr, k, (1 - fb) * st.shape[k] / N, hp.factor_mode, left=W)


def kl_direction(st, hp, M: torch.Tensor | None = None) -> torch.Tensor:
    """U = Q_a [M / (sqrt(lam_a lam_b^T) + eps)] Q_b^T from the current lam (SPEC steps 2-3;
    sqrt(lam) from the plan's buffer)."""
    M = _load(st, "exp_avg") if M is None else M
    roots = [st.cache[f"sqrt_lam{k}"] for k, on in enumerate(st.mask) if on]
    if len(roots) == 2:
        denominator = torch.addcmul(_constant(st, "eps", hp.eps), roots[0], roots[1])
    else:
        product = roots[0]
        for root in roots[1:]:
            product = product * root
        denominator = product + hp.eps
    return masked(st, hp, rotate_back(st, M / denominator, hp.rotation_mode))


def _constant(st, name: str, value: float) -> torch.Tensor:
    """A 0-d float32 tensor holding ``value`` on the stack's device (made again when it changes)."""
    cached = st.cache.get(f"const:{name}")
    if cached is None or cached[0] != value:
        cached = (value, torch.tensor(value, dtype=torch.float32, device=st.G.device))
        st.cache[f"const:{name}"] = cached
    return cached[1]


def klshampoo_update(st, hp, carry):
    """Phase 3 of KL-Shampoo: momentum (step 1), U from the old lam (steps 2-3; None with
    eigenvalues_first, whose U waits for the new lam) and the factor EMAs (step 4)."""
    Gr = _spiked(st, carry)
    M = _load(st, "exp_avg")
    M.mul_(st.coef("b1")).add_(Gr, alpha=1 - hp.beta1)
    _store(st, "exp_avg", M)
    U = None if hp.eigenvalues_first else kl_direction(st, hp, M)
    _kl_factors(st, hp, Gr)
    return U


def klshampoo_late(st, hp, carry=None):
    return kl_direction(st, hp) if hp.eigenvalues_first else None


def klsoap_update(st, hp, carry):
    """KL-SOAP: Adam in the rotated basis, ``U = Q_a [m / (sqrt(v) + eps)] Q_b^T``, and the
    factor EMAs of KL-Shampoo."""
    Gr = _spiked(st, carry)
    m, v = _adam_moments_(st, Gr, hp)
    U = masked(st, hp, rotate_back(st, _adam_direction(m, v, hp.eps), hp.rotation_mode))
    _kl_factors(st, hp, Gr)
    return U


# ---------------------------------------------------------------------- SOAP


def soap_update(st, hp, carry=None):
    """SOAP: Adam on Gr, ``U = rotate_back(m / (sqrt(v) + eps))`` (the bias correction is in the
    update coefficient), then GG_k <- fb GG_k + (1 - fb) Gr_(k) Gr_(k)^T in the eigenbasis."""
    Gr = rotate(st, st.G, hp.rotation_mode)
    if st.track_kl:
        F.soap_track_kl_(st.bufs, Gr, st.mask, keep=st.keep)
    m, v = _adam_moments_(st, Gr, hp)
    U = masked(st, hp, rotate_back(st, _adam_direction(m, v, hp.eps), hp.rotation_mode))
    fb = hp.factor_beta
    for k, on in enumerate(st.mask):
        if on:
            _factor_ema_(st, f"R{k}", Gr, k, 1 - fb, hp.factor_mode)
    return U


# ---------------------------------------------------------------------- Shampoo


def shampoo_update(st, hp, carry=None):
    """Shampoo: factors L_k <- fb L_k + (1 - fb) G_(k) G_(k)^T (true fp32: their eigenvalues
    are inverted); at a refresh step the roots; the Adam direction A (bias-corrected); until the
    first roots exist U = A, then P = M x_k root_k grafted to ||A|| per block."""
    G = st.G
    fb = hp.factor_beta
    for k, on in enumerate(st.mask):
        if on:
            _factor_ema_(st, f"L{k}", G, k, 1 - fb, "highest")
    if st.refresh:
        F.shampoo_roots_(st.bufs, st.mask, hp, G, keep=st.keep)
    m, v = _adam_moments_(st, G, hp)
    A = _adam_direction(m, v, hp.eps).mul_(st.coef("bias"))  # Adam's bias correction
    if not st.roots:
        return A
    P = rotate_back(st, m, hp.rotation_mode, prefix="root")  # m x_k root_k, last mode first
    return F.shampoo_graft(masked(st, hp, P), A, hp)  # masked first: the graft scales what is left


# ---------------------------------------------------------------------- AdamW path


def adamw_update(st, hp, carry=None):
    """The AdamW path of every member (1-D parameters, modes above max_precond_dim) as one flat
    vector: ``U = m / (sqrt(v) + eps)``; a member that is skipped keeps m and v (selected, since
    its betas cannot be masked entry by entry without a vector of them)."""
    keep = st.cache["keep_e"]
    G = st.G
    m_buf, v_buf = st.bufs["exp_avg"], st.bufs["exp_avg_sq"]
    m, v = m_buf.float(), v_buf.float()
    m_new = torch.mul(m, hp.beta1).add_(G, alpha=1 - hp.beta1)
    v_new = torch.mul(v, hp.beta2).addcmul_(G, G, value=1 - hp.beta2)
    _select_(m_buf, keep, m_new)
    _select_(v_buf, keep, v_new)
    return _adam_direction(m_new, v_new, hp.eps)


def _select_(buf: torch.Tensor, keep: torch.Tensor, new: torch.Tensor) -> None:
    """buf <- new where keep, in place."""
    if buf.dtype == new.dtype:
        torch.where(keep, new, buf, out=buf)
    else:
        buf.copy_(torch.where(keep, new, buf.float()))


STEPS = {
    # path: (project or None, update, late or None)
    "klshampoo": (kl_project, klshampoo_update, klshampoo_late),
    "klsoap": (kl_project, klsoap_update, None),
    "soap": (None, soap_update, None),
    "shampoo": (None, shampoo_update, None),
    "adamw": (None, adamw_update, None),
}
