"""The Triton path: the functional steps of _functional with the fused kernels.

Same signatures and the same math as :mod:`klkern._functional` (tested
against it and against :mod:`klkern.reference`), for 2-D blocks with both
modes preconditioned; every other block shape keeps the torch path. Each
step takes an optional ``write=(ParamTable, lr, weight_decay)``: when given,
the update is applied to the parameters inside the last kernel and the step
returns ``(None, scale)``. Initialisation, eigenbasis refreshes (QR,
eigendecomposition) and the O(m + n) eigenvalue updates stay in torch.
"""

from __future__ import annotations

import torch

from . import _functional as F
from . import triton_kernels as K
from .triton_kernels._config import intermediate_dtype


def supports(path: str, block_shape: tuple, mask) -> bool:
    return path in STEPS and len(block_shape) == 2 and all(mask)


def _kl_factors_and_lams(bufs, Gr, proj, hp, t) -> None:
    """Steps 4-5 from the old lam: weighted factor EMAs (one triangle each), the KL diagnostic,
    then lam EMA + floor."""
    beta2 = hp["factor_beta"]
    _, m, n = Gr.shape
    lam_a, lam_b = bufs["lam0"], bufs["lam1"]
    mode = hp["factor_mode"]
    K.factor_ema_(bufs["R0"], Gr, 1.0 / lam_b, beta2, (1 - beta2) / n, precision=mode)
    K.factor_ema_(bufs["R1"], Gr, 1.0 / lam_a, beta2, (1 - beta2) / m, transpose_x=True, precision=mode)
    F.kl_from_projection_(bufs, proj[0], [lam_a, lam_b], 0, Gr)
    F.lam_ema_(bufs, {0: proj[0], 1: proj[1]}, hp, t)


def _write_args(write, scale):
    if write is None:
        return {}
    table, lr, wd = write
    return dict(params=table, step=lr * scale, decay=1.0 - lr * wd)


def _kl_step(bufs, G, mask, hp, t, write, adam: bool):
    """KL-Shampoo (momentum, D from lam) or KL-SOAP (Adam in the rotated basis): SPEC steps 1-6."""
    Qa, Qb = bufs["Q0"], bufs["Q1"]
    lam = (bufs["lam0"], bufs["lam1"])
    m, v = bufs["exp_avg"], bufs["exp_avg_sq"] if adam else None
    mode = hp["rotation_mode"]
    threshold = F.spike_threshold(hp, t)
    fused = threshold is None  # else the moments wait for spike_threshold's factor
    Gr, proj = K.rotate_project(G, Qa, Qb, lam=lam, momentum=m if fused else None, beta1=hp["beta1"],
                                second_moment=v if fused else None, beta2=hp["beta2"], precision=mode)
    if not fused:
        scale = F.spike_scale({0: proj[0], 1: proj[1]}, list(lam), threshold)
        Gr = F._scale_blocks(Gr, scale).to(Gr.dtype)
        proj = tuple(F._scale_blocks(p, scale * scale) for p in proj)
        g = Gr.float()  # one rounding per moment, as in the kernel
        m.copy_(m.float().mul_(hp["beta1"]).add_(g, alpha=1 - hp["beta1"]))
        if adam:
            v.copy_(v.float().mul_(hp["beta2"]).addcmul_(g, g, value=1 - hp["beta2"]))
    first = not adam and hp.get("eigenvalues_first", False)  # D from lam that includes this gradient
    if first:
        _kl_factors_and_lams(bufs, Gr, proj, hp, t)
    scaling = dict(v=v) if adam else dict(lam=lam)
    U = K.precondition(m, Qa, Qb, eps=hp["eps"], **scaling, **_write_args(write, 1.0), precision=mode)
    if not first:
        _kl_factors_and_lams(bufs, Gr, proj, hp, t)
    if t % hp["precondition_frequency"] == 0:
        F.refresh_(bufs, mask, hp, t)
    return U, 1.0  # U is None when the kernel wrote the parameters


def klshampoo_step(bufs, G, mask, hp, t, write=None):
    if hp["eigenbasis"] == "eigh":  # idealized mode: exact eigenvalues, torch path
        return F.klshampoo_step(bufs, G, mask, hp, t)
    return _kl_step(bufs, G, mask, hp, t, write, adam=False)


def klsoap_step(bufs, G, mask, hp, t, write=None):
    return _kl_step(bufs, G, mask, hp, t, write, adam=True)


def soap_step(bufs, G, mask, hp, t, write=None):
    Qa, Qb = bufs["Q0"], bufs["Q1"]
    m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
    scale = F._bias_scale(hp, t)
    mode, fmode = hp["rotation_mode"], hp["factor_mode"]
    Gr, _ = K.rotate_project(G, Qa, Qb, momentum=m, beta1=hp["beta1"], second_moment=v, beta2=hp["beta2"],
                             precision=mode)
    U = K.precondition(m, Qa, Qb, eps=hp["eps"], v=v, **_write_args(write, scale), precision=mode)
    F.soap_track_kl_(bufs, Gr, mask)
    beta2 = hp["factor_beta"]
    K.factor_ema_(bufs["R0"], Gr, None, beta2, 1 - beta2, precision=fmode)
    K.factor_ema_(bufs["R1"], Gr, None, beta2, 1 - beta2, transpose_x=True, precision=fmode)
    if t % hp["precondition_frequency"] == 0:
        F.refresh_(bufs, mask, hp, t, sort_v=True)
    return U, scale


def shampoo_step(bufs, G, mask, hp, t, write=None):
    """Factor EMAs (one triangle, true fp32: Shampoo inverts their eigenvalues) and the
    two-sided product L_root M R_root in kernels; roots, moments and grafting in torch
    (grafting needs ||P|| before any write)."""
    beta2 = hp["factor_beta"]
    K.factor_ema_(bufs["L0"], G, None, beta2, 1 - beta2)
    K.factor_ema_(bufs["L1"], G, None, beta2, 1 - beta2, transpose_x=True)
    if t % hp["precondition_frequency"] == 0:
        F.shampoo_roots_(bufs, mask, hp, G)
    m, A = F.shampoo_moments(bufs, G, hp, t)
    if t < hp["precondition_frequency"]:
        return A, 1.0
    mode = hp["rotation_mode"]
    # m R_root^T (R_root is symmetric up to rounding; the torch path multiplies by the transpose too)
    T = K.batched_gemm(m, bufs["root1"], transpose_b=True, precision=mode,
                       out=torch.empty(m.shape, dtype=intermediate_dtype(mode), device=m.device))
    P = K.batched_gemm(bufs["root0"], T, out=torch.empty(m.shape, device=m.device), precision=mode)
    return F.shampoo_graft(P, A, hp), 1.0


# Steps that can write the parameters themselves.
WRITES = {"klshampoo", "klsoap", "soap"}

STEPS = {
    "klshampoo": klshampoo_step,
    "klsoap": klsoap_step,
    "soap": soap_step,
    "shampoo": shampoo_step,
}
