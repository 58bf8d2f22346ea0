"""The Triton path: the phases of klkern/algorithms/_steps.py with the fused kernels.

Same phases, masks and math as :mod:`klkern.algorithms._steps` (tested against it and against
:mod:`klkern.reference`), for 2-D blocks with one or both modes preconditioned (a mode above
``max_precond_dim`` with ``large_dim_policy="identity"`` is left unrotated: its products are
skipped, its eigenvalues are 1) and for the AdamW path; every other block shape, and Shampoo's
one-sided blocks, keep the torch path. Each element of a block's state is read and
written once per step, inside the products that need it:

1. KL-Shampoo, KL-SOAP (``project``) and SOAP (``update``): :func:`~klkern.triton_kernels.rotate`,
   ``Gr = Q_a^T G Q_b`` with the guard's mask, step 5's projections, the moments and the
   direction ``X`` (``M * D`` or ``m / (sqrt(v) + eps)``) in its epilogue;
2. ``update``: under ``spike_threshold``, :func:`~klkern.triton_kernels.scaled_moments_` (the
   moments and the direction from ``s Gr``, the rotation having left them out), the factor
   EMAs one product each with the per-block beta in the epilogue
   (:func:`~klkern.triton_kernels.factor_ema_`), and
   :func:`~klkern.triton_kernels.precondition`: ``U = Q_a X Q_b^T`` with the unseen directions
   masked and SPEC step 8 written into the parameters in its epilogue (the phase returns
   ``WRITTEN``); where the write-back needs U itself (``normalize_grads``, a group whose
   hyperparameters do not bound the update, a block that is not a view of its parameter), U
   is stored and the torch write-back applies it;
3. the AdamW path: :func:`~klkern.triton_kernels.adamw_`, written into the parameters.

The engine leaves the gradients of a kernel stack as they came (a block that does not step is
masked inside the kernels, klkern/engine/_engine.py), and computes ``sqrt(lam)`` before the
projections (the direction uses the old lam).
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
from ._steps import WRITTEN

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(path: str, block_shape: tuple, mask, hp: StepHyperparameters) -> bool:
    if not ALGORITHMS[path].preconditioned:  # the AdamW path
        return True
    if ALGORITHMS[path].exact_mode(hp):  # the idealized mode: torch path
        return False
    if path not in STEPS or len(block_shape) != 2:
        return False
    return all(mask) if ALGORITHMS[path].inverse_root else any(mask)


def _bases(st):
    """(Q_a, Q_b), None for an unrotated side."""
    return st.bufs.get("Q0"), st.bufs.get("Q1")


def _vecs(st, name: str) -> tuple:
    """A per-side vector of the plan's buffers, (side a, side b), None for an unrotated side."""
    return st.cache.get(f"{name}_vec0"), st.cache.get(f"{name}_vec1")


def _writes_params(st, hp) -> bool:
    """Whether the last product may write the parameters (else it stores U for the write-back)."""
    if st.group["normalize_grads"] or "before" in st.cache:
        return False
    return _param_table(st) is not None


def _param_table(st):
    """The stack's parameter views as a kernel writes them (made once per plan), or None when a
    block is not a view of its parameter or the parameters' dtype is not one the kernels write."""
    cached = st.cache.get("param_table")
    if cached is None or cached[0] != st.targets_version:
        table = None
        if st.W is st.G and all(t is not None and t.dim() == 2 and t.dtype in _KERNEL_DTYPES for t in st.targets) \
                and len({t.dtype for t in st.targets}) == 1:
            table = K.ParamTable(list(st.targets))
        cached = st.cache["param_table"] = (st.targets_version, table)
    return cached[1]


def _moments(st, hp) -> dict:
    b1 = st.cache["b1:vec"]
    if "exp_avg_sq" in st.bufs:
        return dict(adam=(st.bufs["exp_avg"], b1, st.bufs["exp_avg_sq"], st.cache["b2:vec"]))
    return dict(momentum=(st.bufs["exp_avg"], b1))


def _rotate(st, hp, projection: bool):
    """Gr with the moments and, unless eigenvalues_first, the direction; the projections into
    the plan's buffer. Under spike_threshold (``st.spike``) the moments wait for the blocks'
    scales (:func:`_scaled_moments`) and Gr is kept in float32 for them."""
    Qa, Qb = _bases(st)
    moments = _moments(st, hp)
    fused = not hp.eigenvalues_first
    X = torch.empty((st.B,) + st.shape, dtype=intermediate_dtype(hp.rotation_mode), device=st.G.device) \
        if fused else None
    epilogue = {} if st.spike else dict(
        direction=X, sqrt_lam=_vecs(st, "sqrt_lam") if "momentum" in moments else None, **moments)
    Gr, proj = K.rotate(st.G, Qa, Qb, st.keep, projection=_vecs(st, "proj_weight") if projection else None,
                        betas=(1 - hp.beta1, 1 - hp.beta2), eps=hp.eps, precision=hp.rotation_mode,
                        gr_dtype=torch.float32 if st.spike else intermediate_dtype(hp.factor_mode), **epilogue)
    if proj is not None:
        for k, part in enumerate(proj):
            if part is not None:
                st.proj[k].copy_(part)
    return Gr, X


def kl_project(st, hp, carry=None):
    """Phase 1: Gr, the projections, the moments and the direction from the old lam."""
    Gr, X = _rotate(st, hp, projection=True)
    if st.track_kl:
        first = 0 if st.mask[0] else 1
        _tracking.kl_from_projection_(st.bufs, st.proj[first], [st.bufs.get("lam0"), st.bufs.get("lam1")], first, Gr,
                                      keep=st.keep)
    return Gr, X


def _scaled_moments(st, hp, Gr, X) -> None:
    """Under spike_threshold: the moments and the direction from s Gr (s per block, 1 for most),
    computed from the scaled gradient as the torch path does (klkern/algorithms/_steps.py
    ``_spiked``)."""
    if not st.spike:
        return
    moments = _moments(st, hp)
    K.scaled_moments_(Gr, st.cache["spike_vec"], betas=(1 - hp.beta1, 1 - hp.beta2), eps=hp.eps,
                      sqrt_lam=_vecs(st, "sqrt_lam") if "momentum" in moments else None, direction=X, **moments)


def _kl_factors(st, hp, Gr: torch.Tensor) -> None:
    """R_a <- fb R_a + (1 - fb)/n s^2 Gr diag(1/lam_b) Gr^T and R_b alike, one product each (fb
    per block: 1 for a skipped block, whose Gr is zero; s: spike_threshold's factor); the rotated
    sides only (an unrotated side's 1 / lam is 1)."""
    fb = hp.factor_beta
    _, m, n = Gr.shape
    inv_a, inv_b = _vecs(st, "inv_lam")
    beta = st.cache["fb:vec"]
    scale = st.cache["spike_vec"] if st.spike else None
    if st.mask[0]:
        K.factor_ema_(st.bufs["R0"], Gr, inv_b, beta, (1 - fb) / n, scale=scale, keep=st.keep,
                      precision=hp.factor_mode)
    if st.mask[1]:
        K.factor_ema_(st.bufs["R1"], Gr, inv_a, beta, (1 - fb) / m, scale=scale, keep=st.keep, transpose_x=True,
                      precision=hp.factor_mode)


def _precondition(st, hp, X):
    """U = Q_a X Q_b^T masked, written into the parameters (WRITTEN) or returned."""
    Qa, Qb = _bases(st)
    live = _vecs(st, "live") if hp.mask_unseen else None
    if _writes_params(st, hp):
        K.precondition(X, Qa, Qb, live=live, params=_param_table(st), update=st.cache["update:vec"],
                       decay=st.cache["decay:vec"], precision=hp.rotation_mode)
        return WRITTEN
    return K.precondition(X, Qa, Qb, live=live, precision=hp.rotation_mode)


def _update(st, hp, carry):
    Gr, X = carry
    _scaled_moments(st, hp, Gr, X)
    _kl_factors(st, hp, Gr)
    return None if X is None else _precondition(st, hp, X)


def klshampoo_late(st, hp, carry=None):
    """eigenvalues_first: X = M / (sqrt(lam_a) sqrt(lam_b)^T + eps) from the new lam, then U."""
    if not hp.eigenvalues_first:
        return None
    roots = _vecs(st, "sqrt_lam")
    M = st.bufs["exp_avg"].float()
    if roots[0] is not None and roots[1] is not None:
        X = M / torch.addcmul(S._constant(st, "eps", hp.eps), roots[0][:, :, None], roots[1][:, None, :])
    else:
        X = M / (roots[0][:, :, None] if roots[0] is not None else roots[1][:, None, :]).add(hp.eps)
    return _precondition(st, hp, X)


def soap_update(st, hp, carry=None):
    Gr, X = _rotate(st, hp, projection=False)
    if st.track_kl:
        F.soap_track_kl_(st.bufs, Gr, st.mask, keep=st.keep)
    fb = hp.factor_beta
    for k, on in enumerate(st.mask):
        if on:
            K.factor_ema_(st.bufs[f"R{k}"], Gr, None, st.cache["fb:vec"], 1 - fb, keep=st.keep, transpose_x=k == 1,
                          precision=hp.factor_mode)
    return _precondition(st, hp, X)


def shampoo_update(st, hp, carry=None):
    """Factor EMAs (one product each, per-block beta in the epilogue, fp32-accurate: Shampoo
    inverts their eigenvalues) and the two-sided product L_root M R_root in kernels; roots,
    moments and grafting in torch (the gradient is zeroed for a block that does not step)."""
    G = st.G
    fb = hp.factor_beta
    for k, name in enumerate(("L0", "L1")):
        K.factor_ema_(st.bufs[name], G, None, st.cache["fb:vec"], 1 - fb, keep=st.keep, transpose_x=k == 1,
                      precision="highest")
    if st.refresh:
        F.shampoo_roots_(st.bufs, st.mask, hp, G, keep=st.keep)
    m, v = S._adam_moments_(st, G, hp)
    A = S._adam_direction(m, v, hp.eps).mul_(st.coef("bias"))  # Adam's bias correction
    if not st.roots:
        return A
    mode = hp.rotation_mode
    # m R_root^T (R_root is symmetric up to rounding; the torch path multiplies by the transpose too)
    T = K.batched_product(m, st.bufs["root1"], transpose_b=True, precision=mode, out_dtype=intermediate_dtype(mode))
    P = K.batched_product(st.bufs["root0"], T, precision=mode)
    return F.shampoo_graft(S.masked(st, hp, P), A, hp)  # masked first: the graft scales what is left


def exact_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A float32-accurate product of two stacks on the kernels ("highest": 3xTF32 on tensor
    cores), for the refreshes of the stacks that run on them (klkern/engine/_refresh.py)."""
    return K.batched_product(A, B, precision="highest")


def _flat_members(st):
    """The AdamW stack's parameters as the kernel writes them (made once per plan), or None."""
    cached = st.cache.get("flat_members")
    if cached is None or cached[0] != st.targets_version:
        targets = st.targets
        ok = (st.W is st.G and all(t is not None and t.is_contiguous() for t in targets)
              and len({t.dtype for t in targets}) == 1 and targets[0].dtype in _KERNEL_DTYPES)
        cached = st.cache["flat_members"] = (st.targets_version, K.FlatMembers(list(targets)) if ok else None)
    return cached[1]


def adamw_update(st, hp, carry=None):
    """The AdamW path in one kernel, written into the parameters; the torch path's where the
    write-back needs U (normalize_grads, a group whose hyperparameters do not bound the update)
    or the parameters are not contiguous views of one dtype."""
    members = _flat_members(st)
    if members is None or st.group["normalize_grads"] or "before" in st.cache:
        return S.adamw_update(st, hp)  # its gradient was zeroed where a member does not step
    decays = st.group["weight_decay"] != 0
    K.adamw_(st.G, st.bufs["exp_avg"], st.bufs["exp_avg_sq"], st.cache["keep"], members, beta1=hp.beta1,
             beta2=hp.beta2, eps=hp.eps, update=st.cache["update"], decay=st.cache["decay"] if decays else None)
    return WRITTEN


STEPS = {
    # path: (project or None, update, late or None), as klkern.algorithms._steps.STEPS
    "klshampoo": (kl_project, _update, klshampoo_late),
    "klsoap": (kl_project, _update, None),
    "soap": (None, soap_update, None),
    "shampoo": (None, shampoo_update, None),
    "adamw": (None, adamw_update, None),
}



def masks_gradient(st, hp, unbounded: bool) -> bool:
    """Whether the stack's kernels mask a block that does not step themselves, so the engine can
    leave its gradients as they came (Shampoo's torch moments, and the AdamW path's torch
    fallback, need them zeroed)."""
    if st.adamw:
        return _flat_members(st) is not None and not st.group["normalize_grads"] and not unbounded
    return not st.algorithm.inverse_root
