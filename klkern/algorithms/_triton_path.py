"""The Triton path: the phases of klkern/algorithms/_steps.py with the fused kernels for the products.

Same phases, masks and math as :mod:`klkern.algorithms._steps` (tested against it and against
:mod:`klkern.reference`), for 2-D blocks with both modes preconditioned; every other block shape
keeps the torch path. The kernels compute the rotation with step 5's projections in its epilogue
(:func:`~klkern.triton_kernels.rotate_project`), the weighted factor EMAs one triangle each
(:func:`~klkern.triton_kernels.factor_ema_`) and the two-sided preconditioning with the diagonal
scaling in its prologue (:func:`~klkern.triton_kernels.precondition`); the masked moment updates,
the eigenvalue EMA, the write-back and the refreshes are the torch path's.
"""

from __future__ import annotations

import torch

from .. import triton_kernels as K
from ..triton_kernels._config import intermediate_dtype
from . import _functional as F
from . import _steps as S
from . import _tracking
from ._algorithms import ALGORITHMS
from ._hyper import StepHyperparameters


def supports(path: str, block_shape: tuple, mask, hp: StepHyperparameters) -> bool:
    if ALGORITHMS[path].exact_mode(hp):  # the idealized mode: torch path
        return False
    return path in STEPS and len(block_shape) == 2 and all(mask)


def _bases(st):
    return st.bufs["Q0"], st.bufs["Q1"]


def _lams(st):
    return st.bufs["lam0"], st.bufs["lam1"]


def kl_project(st, hp, carry=None):
    """Gr and step 5's projections (the kernel's epilogue), into the plan's buffer."""
    Qa, Qb = _bases(st)
    lam = _lams(st)
    Gr, (pa, pb) = K.rotate_project(st.G, Qa, Qb, lam=lam, precision=hp.rotation_mode)
    st.proj[0].copy_(pa)
    st.proj[1].copy_(pb)
    if st.track_kl:
        _tracking.kl_from_projection_(st.bufs, st.proj[0], list(lam), 0, Gr, keep=st.keep)
    return Gr, None


def _kl_factors(st, hp, Gr: torch.Tensor) -> None:
    """R_a <- fb R_a + (1 - fb)/n Gr diag(1/lam_b) Gr^T and R_b alike, one triangle each (fb
    masked: 1 for a skipped block, whose Gr is zero)."""
    fb = hp.factor_beta
    _, m, n = Gr.shape
    lam_a, lam_b = _lams(st)
    mode = hp.factor_mode
    R0, R1 = st.bufs["R0"], st.bufs["R1"]
    R0.mul_(st.coef_matrix("fb"))
    R1.mul_(st.coef_matrix("fb"))
    K.factor_ema_(R0, Gr, 1.0 / lam_b, 1.0, (1 - fb) / n, precision=mode)
    K.factor_ema_(R1, Gr, 1.0 / lam_a, 1.0, (1 - fb) / m, transpose_x=True, precision=mode)


def _spiked(st, carry) -> torch.Tensor:
    Gr = carry[0]
    if st.spike:
        Gr.mul_(st.coef("spike"))
    return Gr


def _direction(st, hp, **scaling) -> torch.Tensor:
    Qa, Qb = _bases(st)
    U = K.precondition(st.bufs["exp_avg"], Qa, Qb, eps=hp.eps, precision=hp.rotation_mode, **scaling)
    return S.masked(st, hp, U)


def klshampoo_update(st, hp, carry):
    Gr = _spiked(st, carry)
    M = S._load(st, "exp_avg")
    M.mul_(st.coef("b1")).add_(Gr, alpha=1 - hp.beta1)
    S._store(st, "exp_avg", M)
    U = None if hp.eigenvalues_first else _direction(st, hp, lam=_lams(st))
    _kl_factors(st, hp, Gr)
    return U


def klshampoo_late(st, hp, carry=None):
    return _direction(st, hp, lam=_lams(st)) if hp.eigenvalues_first else None


def klsoap_update(st, hp, carry):
    Gr = _spiked(st, carry)
    S._adam_moments_(st, Gr, hp)
    U = _direction(st, hp, v=st.bufs["exp_avg_sq"])
    _kl_factors(st, hp, Gr)
    return U


def soap_update(st, hp, carry=None):
    Qa, Qb = _bases(st)
    Gr, _ = K.rotate_project(st.G, Qa, Qb, precision=hp.rotation_mode)
    if st.track_kl:
        F.soap_track_kl_(st.bufs, Gr, st.mask, keep=st.keep)
    S._adam_moments_(st, Gr, hp)
    U = _direction(st, hp, v=st.bufs["exp_avg_sq"])
    fb = hp.factor_beta
    for k, name in enumerate(("R0", "R1")):
        st.bufs[name].mul_(st.coef_matrix("fb"))
        K.factor_ema_(st.bufs[name], Gr, None, 1.0, 1 - fb, transpose_x=k == 1, precision=hp.factor_mode)
    return U


def shampoo_update(st, hp, carry=None):
    """Factor EMAs (one triangle, true fp32: Shampoo inverts their eigenvalues) and the two-sided
    product L_root M R_root in kernels; roots, moments and grafting in torch."""
    G = st.G
    fb = hp.factor_beta
    for k, name in enumerate(("L0", "L1")):
        st.bufs[name].mul_(st.coef_matrix("fb"))
        K.factor_ema_(st.bufs[name], G, None, 1.0, 1 - fb, transpose_x=k == 1)
    if st.refresh:
        F.shampoo_roots_(st.bufs, st.mask, hp, G, keep=st.keep)
    m, v = S._adam_moments_(st, G, hp)
    A = S._adam_direction(m, v, hp.eps).mul_(st.coef("bias"))  # Adam's bias correction
    if not st.roots:
        return A
    mode = hp.rotation_mode
    # m R_root^T (R_root is symmetric up to rounding; the torch path multiplies by the transpose too)
    T = K.batched_gemm(m, st.bufs["root1"], transpose_b=True, precision=mode,
                       out=torch.empty(m.shape, dtype=intermediate_dtype(mode), device=m.device))
    P = K.batched_gemm(st.bufs["root0"], T, out=torch.empty(m.shape, device=m.device), precision=mode)
    return F.shampoo_graft(S.masked(st, hp, P), A, hp)  # masked first: the graft scales what is left


STEPS = {
    # path: (project or None, update, late or None), as klkern.algorithms._steps.STEPS
    "klshampoo": (kl_project, klshampoo_update, klshampoo_late),
    "klsoap": (kl_project, klsoap_update, None),
    "soap": (None, soap_update, None),
    "shampoo": (None, shampoo_update, None),
}
