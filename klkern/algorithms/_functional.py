"""The torch path's building blocks: initialisation, refresh and eigenvalue estimates over a
stack (the products and state access they share: klkern/algorithms/_stacked.py; the seen directions and
the tracked KL objective: klkern/algorithms/_tracking.py).

Every function works on a batch of ``B`` same-shape blocks: ``G`` is
(B, d_0, ..., d_{n-1}) float32 and ``bufs`` maps state names to stacked
tensors (B, ...). The steady step of each algorithm is in :mod:`klkern.algorithms._steps`.
Differences from the literal reference (all exact identities, tested against
:mod:`klkern.reference`):

* Kronecker factors are kept in their own eigenbasis, ``R_k = Q_k^T S_k Q_k``
  (SOAP's GG and the KL factors alike), so the factor EMA needs one product
  per mode of the rotated gradient ``Gr`` (``Gr diag(1/lam_b) Gr^T`` for
  KL, ``Gr Gr^T`` for SOAP), the eigenvalue projection reads ``Gr`` only, and
  the refresh is ``qr(Q_k R_k)``.
* Momentum is kept in the rotated basis (KL-Shampoo too), so ``Q^T M Q`` is a
  moving average of ``Gr`` and costs nothing; it is carried into the new basis
  at a refresh.
* With these, a 2-D KL-Shampoo step costs 6 matrix products (2 for ``Gr``, 2
  for ``U``, 2 for the factors) against 12 for the reference.

State names: ``exp_avg``, ``exp_avg_sq`` (block-shaped), ``Q{k}``, ``R{k}``
(KL-Shampoo, KL-SOAP, SOAP), ``L{k}``, ``root{k}`` (Shampoo) and ``lam{k}``
(KL variants) for every preconditioned mode k. ``lam``, ``exp_avg_sq``, ``L`` and
``root`` are always float32 (FLOAT32_STATE), and Shampoo's ``exp_avg`` too
(Algorithm.float32_names); the others may be stored in a lower ``state_dtype`` and are
computed in float32.
"""

from __future__ import annotations

import math

import torch

from .. import linalg
from ..linalg import (BasisChange, EighFailure, batched_qr, eigh_descending, idle_columns, null_rtol, power_step,
                      undetermined)
from ..runtime import _precision
from ._algorithms import SHAMPOO
from ._stacked import _along, _load, _modes, _new_state, _rotate, _store, _unfold
from ._tracking import _kl_names, _seen_names, see_, track_kl_

__all__ = ["INITS", "refresh_"]

def _eigh_stack(S: torch.Tensor, fallback: torch.Tensor | None, rtol: float | None = None,
                reference: torch.Tensor | None = None):
    """Batched descending eigh, the directions without energy (eigenvalues at most ``rtol`` of the
    largest) made canonical from the columns of ``reference`` (default the identity;
    linalg.complete_null); a block whose solve fails even in float64 keeps ``fallback[b]`` (its
    previous basis) or the identity. Returns (evals, evecs, ok)."""
    try:
        evals, evecs = eigh_descending(S, rtol, reference)
        return evals, evecs, None
    except EighFailure:
        pass
    evals = torch.zeros(S.shape[:-1], dtype=S.dtype, device=S.device)
    evecs = torch.empty_like(S)
    ok = torch.ones(S.shape[0], dtype=torch.bool)
    for b in range(S.shape[0]):
        try:
            evals[b], evecs[b] = eigh_descending(S[b], rtol, None if reference is None else reference[b])
        except EighFailure:
            ok[b] = False
            evecs[b] = fallback[b] if fallback is not None else torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return evals, evecs, ok


def _floor(lam: torch.Tensor, eigval_clamp: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC step 5's floor in place: lam <- max(lam, s / c^2), c = max(10, min(d, eigval_clamp)),
    s the block's floor scale (:func:`floor_scales`; ``scale`` (B,) for a (B, d) stack, None: 1)."""
    c = max(10.0, min(float(lam.shape[-1]), float(eigval_clamp)))
    if scale is None:
        return lam.clamp_(min=1.0 / (c * c))
    return torch.maximum(lam, (scale / (c * c)).unsqueeze(-1).to(lam.dtype), out=lam)


def floor_scales(bufs: dict) -> torch.Tensor:
    """(B,) the scale s of each block's eigenvalue floor s / c_k^2 (``eigval_floor``): the state
    ``floor_scale`` (set at initialisation, reference.floor_anchor) where it is positive, else 1
    (reference.floor_scale)."""
    s = bufs["floor_scale"]
    return torch.where(s > 0, s, torch.ones_like(s))


def anchor_scale(G: torch.Tensor, mask, hp) -> torch.Tensor:
    """(B,) the floor scale of each block of a stack, from the gradient that initialises it
    (reference.floor_anchor): mean(G^2)^(1/K) per block for "relative" (K preconditioned modes),
    the value the scale-free initialisations start lam at; 1 for "absolute"."""
    if hp.eigval_floor != "relative":
        return torch.ones(G.shape[0], dtype=torch.float32, device=G.device)
    return _gradient_scale(G, mask)


def _gradient_scale(G: torch.Tensor, mask) -> torch.Tensor:
    """(B,) mean(G^2)^(1/K) per block of a stack (K preconditioned modes), in float32."""
    return G.double().pow(2).reshape(G.shape[0], -1).mean(1).pow(1.0 / len(_modes(mask))).float()


# the KL objective of each block's estimate, tracked every step (optimizer.diagnostics())
def _rotated_factor_init(G, mask, scale_of_mode, state_dtype, extra: dict):
    """Common init of the rotated-factor algorithms: S_k = c_k G_(k) G_(k)^T,
    Q_k = eigenvectors (descending), R_k = Q_k^T S_k Q_k. Returns (bufs, evals).

    S_k and its eigendecomposition are computed in float64 (the Gram of float32 data squares its
    condition: in float32 the eigenvectors of eigenvalues below ~1e-6 of the largest are
    rounding), and the directions without energy (a rank-deficient G: the larger factor of every
    non-square block) get the canonical basis of linalg.complete_null, so the basis, and the
    steps after it, are continuous in G (docs/conventions.md, "Directions without energy")."""
    B = G.shape[0]
    shapes = dict(extra)
    for k in _modes(mask):
        d = G.shape[k + 1]
        shapes[f"Q{k}"] = (B, d, d)
        shapes[f"R{k}"] = (B, d, d)
    bufs = _new_state(G, shapes, state_dtype)
    if BASES_COLUMN_MAJOR and not G.is_cuda:
        for k in _modes(mask):
            bufs[f"Q{k}"] = bufs[f"Q{k}"].mT  # zeros, stored column-major (BASES_COLUMN_MAJOR)
    evals_of = {}
    G64 = G.double()
    for k in _modes(mask):
        X = _unfold(G64, k)
        S = torch.bmm(X, X.mT).mul_(scale_of_mode(k))  # float64: no matmul precision applies
        evals, Q, _ = _eigh_stack(S, None, null_rtol(S.shape[-1], gram=True))
        _store(bufs, f"Q{k}", Q)
        _store(bufs, f"R{k}", Q.mT @ S @ Q)
        evals_of[k] = evals.float()
    return bufs, evals_of


# On the CPU the bases Q_k are stored column-major (each (d, d) matrix transposed in memory;
# the values are the same): the refresh's Q <- Q V applies LAPACK's reflectors (torch.ormqr),
# which reads and writes that layout, so Q is updated in place. A row-major basis costs two
# transposing copies per refresh (~90 ms per 3072 x 3072 factor on a 2-core CPU, against ~370 ms
# for the product itself); the step's products take either layout at the same speed. Buffers that
# arrive row-major (a checkpoint written before, a copy) work too, only slower.
BASES_COLUMN_MAJOR = True


def column_major(X: torch.Tensor) -> bool:
    """Whether the stack X (..., m, n) is stored column-major (and not also row-major)."""
    return X.dim() >= 2 and X.mT.is_contiguous() and not X.is_contiguous()


# A refresh keeps Q orthogonal by composing it with the refresh's orthogonal V (power_step);
# rounding makes Q^T Q drift from I by ~6e-8 per refresh (measured, d = 256, fp32). Every
# REORTHOGONALIZE_EVERY-th refresh runs the QR of Q R itself, which returns an orthogonal Q
# whatever the drift (|Q^T Q - I| stays below ~4e-6 over 1000 refreshes, tests/test_refresh.py).
REORTHOGONALIZE_EVERY = 32


def staleness(R: torch.Tensor) -> torch.Tensor:
    """How far a basis is from diagonalising its factor: ||offdiag(R)||_F^2 / ||diag(R)||^2 for
    R = Q^T S Q (..., d, d), per matrix (0: Q diagonalises S). float32, shape R.shape[:-2]."""
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    off = R - torch.diag_embed(diag)  # summed directly: ||R||^2 - ||diag||^2 cancels to <= 0
    return (off * off).sum((-2, -1)) / (diag * diag).sum(-1).clamp(min=1e-30)


def refresh_(bufs: dict, mask, hp, t: int, sort_v: bool = False) -> None:
    """The eigenbasis refresh of the rotated factors at step t (SPEC step 6), Q <- qr(S Q) = qr(Q R).

    Per factor: one QR of R (linalg.power_step: qr(Q R) = Q qr(R)), Q <- Q V, R <- V^T R V, and
    the rotated momentum exp_avg carried into the new basis (X x_k V^T); on CUDA the factors of one
    size go through one QR call. With ``sort_v`` (SOAP) the columns are first sorted by diag(R)
    descending and exp_avg_sq is permuted along that mode. Every REORTHOGONALIZE_EVERY-th refresh
    forms Q R and its QR instead (same result in exact arithmetic; resets Q's orthogonality).

    With ``hp.staleness_threshold`` set, only the blocks whose factor's ``staleness`` exceeds
    it are refreshed along that mode (every block at a REORTHOGONALIZE_EVERY-th refresh).

    A column of S Q that adds at most linalg.null_rtol(d) of the largest to the columns before
    it (a direction without energy, or one they already span: a rank-deficient factor) gets a
    vector the rounding picks, which every later column is orthogonalised against; the QR is
    then taken again with such a column replaced by its old basis vector (linalg.power_step's
    ``rtol``). SOAP's sort is stable and puts the directions without energy (R_jj at most
    null_rtol(d) of the largest) last, in order.
    """
    direct = (t // hp.precondition_frequency) % REORTHOGONALIZE_EVERY == 0
    threshold = None if direct else hp.staleness_threshold
    Qs, Rs, orders, chosen = {}, {}, {}, {}
    for k in _modes(mask):
        Q, R = _load(bufs, f"Q{k}"), _load(bufs, f"R{k}")
        if threshold is not None:
            index = torch.nonzero(staleness(R) > threshold).squeeze(1)  # one host read per mode
            if index.numel() == 0:
                continue
            if index.numel() < R.shape[0]:
                chosen[k] = index
                Q, R = Q[index], R[index]
        Qs[k], Rs[k] = Q, R
        if sort_v:
            idle = idle_columns(R, null_rtol(R.shape[-1]))
            energy = torch.diagonal(R, dim1=-2, dim2=-1).masked_fill(idle, -math.inf)
            order = torch.argsort(energy, dim=-1, descending=True, stable=True)
            if bool((order != torch.arange(order.shape[-1], device=order.device)).any()):  # else nothing moves
                orders[k] = order
                _put(bufs, "exp_avg_sq", chosen.get(k), lambda v, k=k: v.gather(
                    k + 1, _along(orders[k], k, v.dim() - 1).expand_as(v)))
    by_size: dict = {}
    for k in Qs:  # with an explicit V (CUDA), modes of one size go through one batched QR call;
        # LAPACK's reflectors (CPU) take the matrices one at a time, so there each mode keeps its
        # own call and its results are written into its state directly (no concatenation, no copies)
        size = Rs[k].shape[-1]
        by_size.setdefault((size, k) if linalg.applies_reflectors(Rs[k]) else size, []).append(k)
    for group in by_size.values():
        def joined(parts: dict):
            return parts[group[0]] if len(group) == 1 else torch.cat([parts[k] for k in group])
        Q, R = joined(Qs), joined(Rs)
        rtol = null_rtol(R.shape[-1])
        if any(k in orders for k in group):  # sorted columns (SOAP), the identity where already sorted
            perm: torch.Tensor | None = joined({k: orders.get(k, torch.arange(
                Rs[k].shape[-1], device=Rs[k].device).expand(Rs[k].shape[:-1])) for k in group})
        else:
            perm = None
        if direct:
            Y = _precision.bmm(Q, R, "highest")
            if perm is not None:
                Y = Y.gather(2, perm.unsqueeze(1).expand_as(Y))
            Q_new = batched_qr(Y)  # columns the QR cannot determine: again, with the old vectors
            missing = undetermined((Q_new * Y).sum(-2).abs(), rtol)
            if bool(missing.any()):
                own = Q if perm is None else Q.gather(2, perm.unsqueeze(1).expand_as(Q))
                Q_new = batched_qr(torch.where(missing.unsqueeze(1), own, Y))
            change = BasisChange(V=_precision.bmm(Q.mT, Q_new, "highest"))
            R_new = change.apply(_precision.bmm(change.V.mT, R, "highest"))
        else:
            # one mode of its size, every block: R_new and Q_new are written into the state itself
            # (Q in place: with the CPU's column-major bases, no copy at all)
            whole = len(group) == 1 and group[0] not in chosen
            def into(name):
                return bufs[name] if whole and bufs[name].dtype == R.dtype else None
            change, R_new = power_step(R, perm, out=into(f"R{group[0]}"), rtol=rtol)
            Q_new = change.apply(Q, out=into(f"Q{group[0]}"))
        sizes = [Qs[k].shape[0] for k in group]
        for k, q, r, part in zip(group, Q_new.split(sizes), R_new.split(sizes), change.split(sizes)):
            _put(bufs, f"Q{k}", chosen.get(k), lambda _: q)
            _put(bufs, f"R{k}", chosen.get(k), lambda _: r)
            _put(bufs, "exp_avg", chosen.get(k), lambda m, k=k, part=part: part.mode_product(m, k))


def _put(bufs: dict, name: str, index, new) -> None:
    """bufs[name] <- new(its float32 value), on the blocks in ``index`` (None: every block)."""
    if index is None:
        _store(bufs, name, new(_load(bufs, name)))
    else:
        bufs[name].index_copy_(0, index, new(_load(bufs, name)[index]).to(bufs[name].dtype))


def on_blocks_(bufs: dict, index: torch.Tensor | None, fn, keep: torch.Tensor | None = None) -> None:
    """Run ``fn(bufs)`` on the blocks in ``index`` only (None: all): on copies of their state,
    written back into the stacked buffers (a refresh of some blocks of a stack). With ``keep``
    ((B,) bool, on the device) a block's result is written only where keep is True: the others
    keep their state (a skipped step), decided without reading keep back to the host."""
    if index is not None and index.numel() == 0:
        return
    if index is None and keep is None:
        fn(bufs)
        return
    part = {name: (buf.index_select(0, index) if index is not None else buf.clone()) for name, buf in bufs.items()}
    fn(part)
    chosen = keep if index is None or keep is None else keep.index_select(0, index)
    for name, buf in bufs.items():
        new = part[name].to(buf.dtype)
        if chosen is not None:
            old = buf.index_select(0, index) if index is not None else buf
            new = torch.where(chosen.view((-1,) + (1,) * (new.dim() - 1)), new, old)
        if index is None:
            buf.copy_(new)
        else:
            buf.index_copy_(0, index, new)


# spike_threshold: an outlier gradient is scaled down until no eigendirection's projection exceeds
# SPIKE_CLIP times its estimate (one step then grows each estimate by at most
# beta2 + (1 - beta2) * SPIKE_CLIP, 1.45x at beta2 = 0.95), but never below a whitened energy of
# SPIKE_GROWTH, so that estimates far below the gradients (a lasting change of scale, or the
# estimates after a rank-1 first gradient) grow on average and catch up instead of being
# outrun forever (reference.spike_scale). The step computes the factor of every block of a device
# at once (klkern.engine._plan.DevicePlan.spike_scales): with the whitened energy per entry
# e = mean(Gr^2 / prod_k lam_k) = mean_i(proj_k_i / lam_k_i) (about 1 for a gradient the estimate
# expects) and r = max_k max_i proj_k_i / lam_k_i, it is sqrt(min(1, max(SPIKE_CLIP / r,
# SPIKE_GROWTH / e))) where e exceeds the threshold, exactly 1 elsewhere.
SPIKE_CLIP = 10.0
SPIKE_GROWTH = 2.0


def spike_threshold(hp, t: int):
    """The threshold in force at step t: none at t = 1, whose projection sets the scale of
    estimates that start from a constant (init_factor=0.1), so it is no outlier against them."""
    return hp.spike_threshold if t > 1 else None


def lam_weight(hp, t: int) -> float:
    """Step 5's EMA weight w of the projections (lam <- (1 - w) lam + w proj): 1 - beta2, or its
    bias-corrected (1 - beta2) / (1 - beta2^t) for init_factor="debiased"."""
    beta2 = hp.factor_beta
    return (1 - beta2) / (1 - beta2**t) if hp.init_factor == "debiased" else 1 - beta2


def _init_lams_(bufs, G, mask, hp) -> None:
    """Step 0 eigenvalue estimates (reference.init_eigenvalues): init_factor in every entry,
    or for "rms"/"debiased" mean(G^2)^(1/K) per block (K preconditioned modes), floored."""
    rule = hp.init_factor
    modes = _modes(mask)
    if isinstance(rule, str):
        value = _gradient_scale(G, mask)
    for k in modes:
        lam = bufs[f"lam{k}"]
        if isinstance(rule, str):
            lam.copy_(value.unsqueeze(1).expand_as(lam))
            _floor(lam, hp.eigval_clamp, floor_scales(bufs))
        else:
            lam.fill_(rule)


# --------------------------------------------------------------------------
# KL-Shampoo


def klshampoo_init(G, mask, hp):
    N = G[0].numel()
    extra = {"exp_avg": tuple(G.shape), **_kl_names(G.shape[0]), **_seen_names(G, mask),
             "floor_scale": (G.shape[0],)}
    for k in _modes(mask):
        extra[f"lam{k}"] = (G.shape[0], G.shape[k + 1])
    scale = lambda k: (1 - hp.factor_beta) * G.shape[k + 1] / N  # noqa: E731
    bufs, evals = _rotated_factor_init(G, mask, scale, hp.state_dtype, extra)
    bufs["floor_scale"].copy_(anchor_scale(G, mask, hp))
    for k in _modes(mask):
        if hp.eigenbasis == "eigh":
            bufs[f"lam{k}"].copy_(_floor(evals[k].clone(), hp.eigval_clamp, floor_scales(bufs)))
    if hp.eigenbasis != "eigh":
        _init_lams_(bufs, G, mask, hp)
    see_(bufs, G, mask)
    return bufs


def _refresh_exact(bufs, mask, Qs, eigval_clamp, direct: bool = False) -> None:
    """Idealized mode: exact eigendecomposition of S = Q R Q^T via R = V diag V^T (Q <- Q V);
    exp_avg is carried into the new basis. ``direct`` (every REORTHOGONALIZE_EVERY-th refresh):
    the eigendecomposition of S = Q R Q^T itself, whose eigenvectors are orthogonal however far
    rounding has drifted the composed Q, with V = Q^T Q_new for the carry."""
    for k in _modes(mask):
        R = _load(bufs, f"R{k}")
        R = 0.5 * (R + R.mT)
        rtol = null_rtol(R.shape[-1])  # directions without energy keep the old basis's vectors
        if direct:
            S = _precision.bmm(_precision.bmm(Qs[k], R, "highest"), Qs[k].mT, "highest")
            evals, Q_new, ok = _eigh_stack(0.5 * (S + S.mT), Qs[k], rtol, Qs[k])
            V = _precision.bmm(Qs[k].mT, Q_new, "highest")
            R_new = _precision.bmm(_precision.bmm(Q_new.mT, S, "highest"), Q_new, "highest")
        else:
            identity = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
            mm = _precision.exact_matmul
            evals, V, ok = _eigh_stack(R, identity, rtol)
            Q_new, R_new = mm(Qs[k], V), mm(mm(V.mT, R), V)
        lam = bufs[f"lam{k}"]
        new_lam = _floor(evals, eigval_clamp, floor_scales(bufs))
        if ok is not None:  # keep the previous eigenvalues where the solve failed
            new_lam = torch.where(ok.to(lam.device).unsqueeze(-1), new_lam, lam)
        lam.copy_(new_lam)
        _store(bufs, f"Q{k}", Q_new)
        _store(bufs, f"R{k}", R_new)
        _store(bufs, "exp_avg", BasisChange(V=V).mode_product(_load(bufs, "exp_avg"), k))


# --------------------------------------------------------------------------
# KL-SOAP


def klsoap_init(G, mask, hp):
    N = G[0].numel()
    extra = {"exp_avg": tuple(G.shape), "exp_avg_sq": tuple(G.shape), **_kl_names(G.shape[0]),
             **_seen_names(G, mask), "floor_scale": (G.shape[0],)}
    for k in _modes(mask):
        extra[f"lam{k}"] = (G.shape[0], G.shape[k + 1])
    scale = lambda k: (1 - hp.factor_beta) * G.shape[k + 1] / N  # noqa: E731
    bufs, _ = _rotated_factor_init(G, mask, scale, hp.state_dtype, extra)
    bufs["floor_scale"].copy_(anchor_scale(G, mask, hp))
    _init_lams_(bufs, G, mask, hp)
    see_(bufs, G, mask)
    return bufs


# --------------------------------------------------------------------------
# SOAP


def soap_init(G, mask, hp):
    extra = {"exp_avg": tuple(G.shape), "exp_avg_sq": tuple(G.shape), **_kl_names(G.shape[0]),
             **_seen_names(G, mask)}
    scale = lambda k: 1 - hp.factor_beta  # noqa: E731
    bufs, _ = _rotated_factor_init(G, mask, scale, hp.state_dtype, extra)
    see_(bufs, G, mask)
    return bufs


def soap_track_kl_(bufs, Gr, mask, keep: torch.Tensor | None = None) -> None:
    """SOAP's estimate for the KL diagnostic: its eigenbasis with the eigenvalues diag(R_k) of
    its Gram factors (before this step's update), floored at the factor's resolution
    (linalg.null_rtol(d) of the largest, and 1e-30): a direction without energy would otherwise
    weigh its rotated gradient's rounding by the inverse of its own (since the bases are
    canonical, R_jj is ~1e-17 of the largest there)."""
    lams: list[torch.Tensor | None] = []
    for k, on in enumerate(mask):
        if on:
            diag = torch.diagonal(_load(bufs, f"R{k}"), dim1=-2, dim2=-1)
            floor = diag.amax(-1, keepdim=True) * null_rtol(diag.shape[-1])
            lams.append(torch.maximum(diag, floor).clamp(min=1e-30))
        else:
            lams.append(None)
    track_kl_(bufs, Gr, lams, keep)


def bias_scale(hp, t) -> float:
    """Adam's bias correction of the step size, sqrt(1 - beta2^t) / (1 - beta1^t) (1 without
    ``correct_bias``)."""
    if not hp.correct_bias:
        return 1.0
    return math.sqrt(1 - hp.beta2 ** t) / (1 - hp.beta1 ** t)


# --------------------------------------------------------------------------
# Shampoo


def shampoo_init(G, mask, hp):
    shapes = {"exp_avg": tuple(G.shape), "exp_avg_sq": tuple(G.shape), **_kl_names(G.shape[0]),
              **_seen_names(G, mask)}
    for k in _modes(mask):
        d = G.shape[k + 1]
        shapes[f"L{k}"] = (G.shape[0], d, d)
        shapes[f"root{k}"] = (G.shape[0], d, d)
    bufs = _new_state(G, shapes, hp.state_dtype, float32=SHAMPOO.float32_names)
    see_(bufs, G, mask)
    return bufs


def shampoo_roots_(bufs, mask, hp, G: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> None:
    """root_k <- (max(L_k, tau_k) + eps I)^-p by eigendecomposition (previous root where it fails,
    and for the blocks whose ``keep`` is False: a skipped step). tau_k = linalg.null_rtol(d) of
    L_k's largest eigenvalue, its float32 resolution (the SPEC floors at 0): below it the
    eigenvalues are rounding, which eps^-p amplified (a 1e-7 change of the gradients moved a
    run with batches of 8 through 64-wide layers, refreshed every 3 steps, by 1.9e-2; floored,
    by 8.5e-3; tests/test_continuity.py is of the kind). A function of L, the root is then the
    same whatever basis the solver picks for those directions.

    With ``G``, the KL diagnostic of Shampoo's estimate kron_k (L_k + eps)^(2p) is tracked here,
    where its eigendecomposition exists (on this step's gradient, which L already includes)."""
    Qs: list = [None] * len(mask)
    lams: list = [None] * len(mask)
    for k in _modes(mask):
        previous = _load(bufs, f"root{k}")
        L = _load(bufs, f"L{k}")
        evals, Q, ok = _eigh_stack(L, None)
        resolution = evals[:, :1].clamp(min=0) * null_rtol(L.shape[-1])
        shifted = torch.maximum(evals, resolution) + hp.eps
        root = _precision.exact_matmul(Q * shifted.pow(-hp.exponent).unsqueeze(-2), Q.mT)
        if ok is not None:  # keep the previous root where the solve failed
            root = torch.where(ok.to(root.device).view(-1, 1, 1), root, previous)
        if keep is not None:
            root = torch.where(keep.view(-1, 1, 1), root, previous)
        _store(bufs, f"root{k}", root)
        Qs[k], lams[k] = Q, shifted.pow(2 * hp.exponent)
    if G is not None:
        track_kl_(bufs, _rotate(G, Qs), lams, keep)


def shampoo_graft(P, A, hp):
    """Grafting "adam": P scaled per block to the Frobenius norm of A; "none": P."""
    if hp.grafting == "none":
        return P
    dims = tuple(range(1, P.dim()))
    norm_p = torch.linalg.vector_norm(P, dim=dims, keepdim=True)
    norm_a = torch.linalg.vector_norm(A, dim=dims, keepdim=True)
    ratio = torch.where(norm_p > 0, norm_a / norm_p, torch.zeros_like(norm_p))
    return P * ratio


# --------------------------------------------------------------------------
# AdamW path (1-D parameters, modes above max_precond_dim)


def adamw_init(G, mask, hp):
    return _new_state(G, {"exp_avg": tuple(G.shape), "exp_avg_sq": tuple(G.shape)}, hp.state_dtype)


# Each path's initialisation from the first gradient (its steady step: klkern.algorithms._steps.STEPS).
INITS = {
    "klshampoo": klshampoo_init,
    "klsoap": klsoap_init,
    "soap": soap_init,
    "shampoo": shampoo_init,
    "adamw": adamw_init,
}
