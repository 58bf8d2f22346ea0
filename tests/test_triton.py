"""Triton kernels against klkern.reference, and the Triton path against the torch path.

On a machine without a GPU these run on CPU tensors through Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1); with a GPU, on CUDA. The
interpreter is slow (about 1.5 ms per program and 8 ms per inner step), so
shapes stay small; they are chosen not to be multiples of the tiles (32 under
the interpreter, 64/128 on a GPU).

Tolerances: kernels accumulate in fp32 in another order than torch, so
fp32 results agree to a few ulps of the largest entry: FP32_TOL = 2e-5
relative to the largest magnitude (products over up to 300 terms). bf16
inputs are rounded the same way on both sides; bf16 outputs (state or
parameters) may differ by one bf16 rounding: BF16_TOL = 1e-2 relative.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _helpers import kernel_device, kernel_skip_reason, rel_err

import klkern
from klkern import reference as R
from klkern.runtime import _backend

pytestmark = pytest.mark.skipif(kernel_device() is None, reason=kernel_skip_reason())

if _backend.triton_import_error() is None:
    import importlib

    from klkern import triton_kernels as K
    from klkern.triton_kernels import _config

    # the operations' modules (their names are shadowed by the functions in the package)
    ROT, FE, PR, AD = (importlib.import_module(f"klkern.triton_kernels.{name}")
                       for name in ("rotate", "factor_ema", "product", "adamw"))

DEVICE = kernel_device() or torch.device("cpu")  # CUDA on a GPU machine, else the interpreter
FP32_TOL = 2e-5
BF16_TOL = 1e-2
SHAPES = [(1, 1, 1), (1, 3, 5), (2, 17, 130), (1, 64, 64), (3, 20, 9)]
LARGE_SHAPES = [(1, 100, 300)]  # a few seconds in the interpreter


def _orth(B, d, gen):
    return torch.linalg.qr(torch.randn(B, d, d, generator=gen))[0]


def _case(B, m, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(B, m, n, generator=gen)
    Qa, Qb = _orth(B, m, gen), _orth(B, n, gen)
    lam_a = torch.rand(B, m, generator=gen) + 0.05
    lam_b = torch.rand(B, n, generator=gen) + 0.05
    M = torch.randn(B, m, n, generator=gen)
    v = torch.rand(B, m, n, generator=gen) + 0.01
    return G, Qa, Qb, lam_a, lam_b, M, v


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


def _shapes():
    return SHAPES + LARGE_SHAPES


# ---------------------------------------------------------------------------- the product


PRECISIONS = ["highest", "high", "medium"]
# Per precision, how far a product's operand rounding moves it (relative to the largest entry):
# fp32-accurate "highest" (3xTF32 or fp32) within FP32_TOL; TF32 operands (10-bit mantissa,
# emulated on the CPU) about 2^-11 per operand; bf16 operands (8 bits) about 2^-8 per operand.
PRODUCT_TOL = {"highest": FP32_TOL, "high": 2e-3, "medium": 1.5e-2}


@pytest.fixture
def tf32_emulated():
    from klkern.runtime import _precision

    _precision.emulate_tf32_off_gpu(True)
    yield
    _precision.emulate_tf32_off_gpu(False)


@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize("precision", PRECISIONS)
def test_product_matches_float64_at_each_precision(shape, precision, tf32_emulated):
    """batched_product (transposes through strides) against the float64 product of the same
    fp32 operands, and against its torch reference at the same precision."""
    B, m, n = shape
    gen = torch.Generator().manual_seed(11)
    A = torch.randn(B, n, m, generator=gen)  # used transposed
    Bm = torch.randn(B, n, n, generator=gen)
    C = K.batched_product(*_dev(A, Bm), transpose_a=True, precision=precision).cpu()
    exact = A.double().mT @ Bm.double()
    assert rel_err(C, exact) < PRODUCT_TOL[precision]
    ref = PR.reference_product(A, Bm, transpose_a=True, precision=precision)
    assert rel_err(C, ref) < FP32_TOL if precision == "highest" else rel_err(C, ref) < PRODUCT_TOL[precision] / 10


def _ill_conditioned_factor(B, d, gen):
    """A symmetric factor with eigenvalues spanning 1e-16..10 (what a long run's factors hold)."""
    Q = torch.linalg.qr(torch.randn(B, d, d, generator=gen, dtype=torch.float64))[0]
    return Q @ torch.diag_embed(torch.logspace(-16, 1, d, dtype=torch.float64).expand(B, d)) @ Q.mT


def _real_gradient(gen):
    """A weight gradient of a small tanh MLP on a regression batch (heavy-tailed rows, low rank)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = torch.nn.Sequential(torch.nn.Linear(40, 96), torch.nn.Tanh(), torch.nn.Linear(96, 72))
    X = torch.randn(256, 40, generator=gen) * torch.logspace(-2, 1, 40)
    (net(X) - torch.randn(256, 72, generator=gen)).pow(3).abs().mean().backward()
    return net[2].weight.grad.T.contiguous().double().unsqueeze(0)  # (1, 96, 72)


@pytest.mark.parametrize("case", ["factor@basis", "basis^T@factor@basis", "gradient@basis", "gradient^T@gradient"])
def test_tf32x3_error_within_twice_fp32(case):
    """"highest" by 3xTF32 (split operands, three TF32 products, the GPU's tf32x3 scheme emulated
    with its roundings) against float64, on the operands a step and a refresh multiply: its max
    error relative to the largest entry is within 2x of a true fp32 product's (the kernel with
    DOT "ieee"), and of torch's fp32 bmm's. (A GPU may differ in the last bits of accumulation
    order; the GPU suite's kernels part confirms it there.)"""
    gen = torch.Generator().manual_seed(12)
    d = 96
    basis = torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=torch.float64))[0]
    if case == "factor@basis":
        A, Bm = _ill_conditioned_factor(2, d, gen), basis
    elif case == "basis^T@factor@basis":
        A, Bm = basis.mT @ _ill_conditioned_factor(2, d, gen), basis
    elif case == "gradient@basis":
        G = _real_gradient(gen)
        A, Bm = G.mT, basis[:1, :96]
    else:
        G = _real_gradient(gen)
        A, Bm = G.mT, G
    A32, B32 = _dev(A.float(), Bm.float())
    exact = A32.double().cpu() @ B32.double().cpu()  # the fp32 operands, multiplied exactly
    errors = {}
    for dot in ("tf32x3", "ieee"):
        previous = _config.highest_dot(dot)
        try:
            errors[dot] = rel_err(K.batched_product(A32, B32, precision="highest").cpu(), exact)
        finally:
            _config.highest_dot(previous)
    errors["torch"] = rel_err(torch.bmm(A32.cpu(), B32.cpu()), exact)
    assert errors["tf32x3"] <= 2 * max(errors["ieee"], errors["torch"]), errors
    assert errors["tf32x3"] < 1e-6, errors


# ---------------------------------------------------------------------------- rotate


def _rotate_inputs(B, m, n, kind, state_dtype=torch.float32, seed=0):
    G, Qa, Qb, lam_a, lam_b, M, v = _case(B, m, n, seed=seed)
    keep = torch.ones(B, dtype=torch.bool)
    keep[B // 2] = B == 1  # one block of a stack does not step (all of a single-block stack step)
    G[B // 2, 0, 0] = float("nan") if B > 1 else G[0, 0, 0]  # ... whatever its gradient holds
    b1 = torch.where(keep, 0.9, 1.0)
    b2 = torch.where(keep, 0.95, 1.0)
    state = (M.to(state_dtype), v.to(state_dtype))
    moments = dict(momentum=(state[0].clone(), b1)) if kind == "kl" else \
        dict(adam=(state[0].clone(), b1, state[1].clone(), b2))
    return G, Qa, Qb, keep, lam_a, lam_b, moments


@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize("kind", ["kl", "adam"])
def test_rotate_matches_reference(shape, kind):
    """Gr = Q_a^T G Q_b with its epilogue: a block that does not step gets Gr = 0 and keeps its
    moments (NaN gradient included), the projections of SPEC step 5, the moments (SPEC step 1, or
    Adam's), and the direction M * D or m / (sqrt(v) + eps), each against klkern.reference."""
    B, m, n = shape
    G, Qa, Qb, keep, lam_a, lam_b, moments = _rotate_inputs(B, m, n, kind)
    before = {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in moments.items()}
    eps = 1e-8
    X = torch.empty(B, m, n, device=DEVICE)
    dev_moments = {k: tuple(t.to(DEVICE) for t in v) for k, v in moments.items()}
    Gr, (pa, pb) = K.rotate(*_dev(G, Qa, Qb, keep), projection=tuple(_dev(1 / (m * lam_a), 1 / (n * lam_b))),
                            betas=(0.1, 0.05), eps=eps, sqrt_lam=tuple(_dev(lam_a.sqrt(), lam_b.sqrt())),
                            direction=X, **dev_moments)
    state = next(iter(dev_moments.values()))
    old = next(iter(before.values()))
    for b in range(B):
        if not keep[b]:
            assert torch.equal(Gr[b].cpu(), torch.zeros(m, n)) and not pa[b].any() and not pb[b].any()
            assert torch.equal(state[0][b].cpu(), old[0][b])
            continue
        Qs = [Qa[b], Qb[b]]
        Gr_ref = R.rotate(G[b], Qs)
        assert rel_err(Gr[b].cpu(), Gr_ref) < FP32_TOL
        new_a, new_b = R.eigenvalue_update([lam_a[b], lam_b[b]], G[b], Qs, 0.5)
        assert rel_err(0.5 * lam_a[b] + 0.5 * pa[b].cpu(), new_a) < FP32_TOL
        assert rel_err(0.5 * lam_b[b] + 0.5 * pb[b].cpu(), new_b) < FP32_TOL
        if kind == "kl":
            M_ref = R.momentum_update(old[0][b], Gr_ref, 0.9)
            X_ref = M_ref * R.kl_scaling([lam_a[b], lam_b[b]], 2, eps)
        else:
            M_ref, v_ref = R.adam_moments(old[0][b], old[2][b], Gr_ref, 0.9, 0.95)
            assert rel_err(state[2][b].cpu(), v_ref) < FP32_TOL
            X_ref = R.adam_direction(M_ref, v_ref, eps)
        assert rel_err(state[0][b].cpu(), M_ref) < FP32_TOL
        assert rel_err(X[b].cpu(), X_ref) < 10 * FP32_TOL  # a quotient of rounded terms


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["kl", "adam"])
def test_rotate_against_its_torch_reference(state_dtype, precision, kind, tf32_emulated):
    """The fused rotation and its unfused torch reference (rotate.reference_rotate) at every
    precision and state dtype: same products, same element-wise math, once per element."""
    B, m, n = 3, 20, 36
    outs = []
    for fn in (K.rotate, ROT.reference_rotate):
        G, Qa, Qb, keep, lam_a, lam_b, moments = _rotate_inputs(B, m, n, kind, state_dtype, seed=3)
        moments = {k: tuple(t.to(DEVICE) for t in v) for k, v in moments.items()}
        X = torch.empty(B, m, n, device=DEVICE)
        Gr, proj = fn(*_dev(G, Qa.to(state_dtype), Qb.to(state_dtype), keep),
                      projection=tuple(_dev(1 / (m * lam_a), 1 / (n * lam_b))), betas=(0.1, 0.05), eps=1e-8,
                      sqrt_lam=tuple(_dev(lam_a.sqrt(), lam_b.sqrt())), direction=X, precision=precision,
                      **moments)
        outs.append([Gr, *proj, *[t for t in next(iter(moments.values())) if t.dim() == 3], X])
    tol = FP32_TOL if state_dtype == torch.float32 else BF16_TOL
    for a, b in zip(*outs):
        assert rel_err(a.float().cpu(), b.float().cpu()) < tol


@pytest.mark.parametrize("kind", ["kl", "adam"])
def test_scaled_moments_equal_rotating_the_scaled_gradient(kind):
    """rotate with no moments, then scaled_moments_ with s per block, gives the moments and
    direction of rotating s G with them in the epilogue; a block that does not step (betas 1,
    Gr masked to 0) keeps its state exactly."""
    B, m, n = 3, 17, 24
    spike = torch.tensor([0.25, 1.0, 0.6])
    results = []
    for split in (True, False):
        G, Qa, Qb, keep, lam_a, lam_b, moments = _rotate_inputs(B, m, n, kind, seed=4)
        before = next(iter(moments.values()))[0][1].clone()
        moments = {k: tuple(t.to(DEVICE) for t in v) for k, v in moments.items()}
        X = torch.empty(B, m, n, device=DEVICE)
        common = dict(betas=(0.1, 0.05), eps=1e-8, sqrt_lam=tuple(_dev(lam_a.sqrt(), lam_b.sqrt())), direction=X)
        if split:
            Gr, _ = K.rotate(*_dev(G, Qa, Qb, keep), betas=(0.1, 0.05), eps=1e-8)
            K.scaled_moments_(Gr, spike.to(DEVICE), **common, **moments)
        else:
            K.rotate(*_dev(G * spike.view(-1, 1, 1), Qa, Qb, keep), **common, **moments)
        state = next(iter(moments.values()))
        assert torch.equal(state[0][1].cpu(), before)  # block 1 does not step (_rotate_inputs)
        results.append([t for t in state if t.dim() == 3] + [X])
    for a, b in zip(*results):
        assert rel_err(a.cpu(), b.cpu()) < 10 * FP32_TOL


@pytest.mark.parametrize("kind", ["kl", "adam"])
@pytest.mark.parametrize("outlier", [1e4, 1e8])
def test_scaled_moments_after_an_outlier_keep_fp32_accuracy(kind, outlier):
    """An outlier gradient (x1e4, x1e8) that spike_threshold scales back by s = 1/outlier: the
    moments and the direction are float32-accurate against float64. Correcting moments made from
    the unscaled gradient afterwards (an earlier design) subtracted numbers up to 1e16 times
    larger than v and left it to rounding (relative error 0.26 at x1e4)."""
    B, m, n = 2, 17, 24
    G, Qa, Qb, keep, lam_a, lam_b, moments = _rotate_inputs(B, m, n, kind, seed=11)
    keep[:] = True
    b1 = torch.full((B,), 0.9)
    b2 = torch.full((B,), 0.95)
    state = [t.clone() for t in (moments.get("momentum") or moments["adam"]) if t.dim() == 3]
    Gr = torch.randn(B, m, n, generator=torch.Generator().manual_seed(12)) * 1e-3
    Gr[0] *= outlier
    spike = torch.tensor([1 / outlier, 1.0])
    dev = [t.clone().to(DEVICE) for t in state]  # updated in place; state keeps the old values
    kw = dict(momentum=(dev[0], b1.to(DEVICE))) if kind == "kl" else \
        dict(adam=(dev[0], b1.to(DEVICE), dev[1], b2.to(DEVICE)))
    X = torch.empty(B, m, n, device=DEVICE)
    roots = (lam_a.sqrt(), lam_b.sqrt())
    K.scaled_moments_(Gr.to(DEVICE), spike.to(DEVICE), betas=(0.1, 0.05), eps=1e-8, sqrt_lam=tuple(_dev(*roots)),
                      direction=X, **kw)
    g = Gr.double() * spike.double().view(-1, 1, 1)
    mom = 0.9 * state[0].double() + 0.1 * g
    expect = [mom]
    if kind == "adam":
        v = 0.95 * state[1].double() + 0.05 * g * g
        expect += [v, mom / (v.sqrt() + 1e-8)]
    else:
        expect += [mom / (roots[0].double()[:, :, None] * roots[1].double()[:, None, :] + 1e-8)]
    for got, ref in zip(dev[: len(expect) - 1] + [X], expect):
        assert rel_err(got.double().cpu(), ref) < 10 * FP32_TOL


ONE_SIDED_SHAPES = [(1, 1, 1), (2, 17, 130), (3, 20, 9)]


def _identity(B, d):
    return torch.eye(d).expand(B, d, d).contiguous()


@pytest.mark.parametrize("shape", ONE_SIDED_SHAPES)
@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("kind", ["kl", "adam"])
def test_rotate_one_sided_is_the_identity_on_the_other_side(shape, side, kind):
    """A side left unrotated (large_dim_policy="identity": identity factor, unit eigenvalues)
    takes one product, and every output (Gr, the rotated side's projection, the moments, the
    direction) equals the two-sided rotation with Q = I, lam = 1 on that side."""
    B, m, n = shape
    outs = []
    for one_sided in (True, False):
        G, Qa, Qb, keep, lam_a, lam_b, moments = _rotate_inputs(B, m, n, kind, seed=6)
        moments = {k: tuple(t.to(DEVICE) for t in v) for k, v in moments.items()}
        if side == "a":
            Qb, lam_b = (None if one_sided else _identity(B, n)), torch.ones(B, n)
        else:
            Qa, lam_a = (None if one_sided else _identity(B, m)), torch.ones(B, m)
        w = [1 / (m * lam_a), 1 / (n * lam_b)]
        roots = [lam_a.sqrt(), lam_b.sqrt()]
        if one_sided:
            off = 1 if side == "a" else 0
            w[off] = roots[off] = None
        X = torch.empty(B, m, n, device=DEVICE)
        Gr, proj = K.rotate(G.to(DEVICE), *(q if q is None else q.to(DEVICE) for q in (Qa, Qb)), keep.to(DEVICE),
                            projection=tuple(t if t is None else t.to(DEVICE) for t in w), betas=(0.1, 0.05),
                            eps=1e-8, sqrt_lam=tuple(t if t is None else t.to(DEVICE) for t in roots),
                            direction=X, **moments)
        on = 0 if side == "a" else 1
        outs.append([Gr, proj[on], *[t for t in next(iter(moments.values())) if t.dim() == 3], X])
        if one_sided:
            assert proj[1 - on] is None
    for a, b in zip(*outs):
        assert rel_err(a.cpu(), b.cpu()) < FP32_TOL


@pytest.mark.parametrize("side", ["a", "b"])
def test_scaled_moments_one_sided(side):
    """scaled_moments_ with an unrotated side's root left out equals it with that root 1."""
    B, m, n = 3, 17, 24
    spike = torch.tensor([0.25, 1.0, 0.6], device=DEVICE)
    results = []
    for one_sided in (True, False):
        G, Qa, Qb, keep, lam_a, lam_b, moments = _rotate_inputs(B, m, n, "kl", seed=4)
        moments = {k: tuple(t.to(DEVICE) for t in v) for k, v in moments.items()}
        roots = [lam_a.sqrt().to(DEVICE), lam_b.sqrt().to(DEVICE)]
        off = 1 if side == "a" else 0
        roots[off] = None if one_sided else torch.ones_like(roots[off])
        X = torch.zeros(B, m, n, device=DEVICE)
        K.scaled_moments_(G.nan_to_num().to(DEVICE), spike, betas=(0.1, 0.05), eps=1e-8, sqrt_lam=tuple(roots),
                          direction=X, **moments)
        results.append([moments["momentum"][0], X])
    for a, b in zip(*results):
        assert rel_err(a.cpu(), b.cpu()) < FP32_TOL


def test_scaled_moments_bad_input():
    Gr = torch.zeros(2, 3, 4, device=DEVICE)
    spike = torch.ones(2, device=DEVICE)
    M, b = torch.zeros(2, 3, 4, device=DEVICE), torch.ones(2, device=DEVICE)
    X = torch.zeros(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="sqrt_lam_b: expected shape"):
        K.scaled_moments_(Gr, spike, momentum=(M, b), sqrt_lam=(None, torch.ones(2, 2, device=DEVICE)), direction=X)
    with pytest.raises(ValueError, match="must be a pair"):
        K.scaled_moments_(Gr, spike, momentum=(M, b), sqrt_lam=(torch.ones(2, 3, device=DEVICE),), direction=X)
    with pytest.raises(ValueError, match="direction: expected shape"):
        K.scaled_moments_(Gr, spike, momentum=(M, b), sqrt_lam=(None, torch.ones(2, 4, device=DEVICE)),
                          direction=torch.zeros(2, 4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="Gr must be a"):
        K.scaled_moments_(Gr[0], spike, momentum=(M, b))
    with pytest.raises(ValueError, match="one of them"):
        K.scaled_moments_(Gr, spike)


def test_one_sided_bad_input():
    G = torch.zeros(2, 3, 4, device=DEVICE)
    keep = torch.ones(2, dtype=torch.bool, device=DEVICE)
    Qa = torch.zeros(2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="at least one of Q_a, Q_b"):
        K.rotate(G, None, None, keep)
    with pytest.raises(ValueError, match="at least one of Q_a, Q_b"):
        K.precondition(G, None, None)
    with pytest.raises(ValueError, match="sqrt_lam of side b must be None"):
        K.rotate(G, Qa, None, keep, sqrt_lam=(torch.ones(2, 3, device=DEVICE), torch.ones(2, 4, device=DEVICE)))
    with pytest.raises(ValueError, match="projection weights of side a is missing"):
        K.rotate(G, Qa, None, keep, projection=(None, None))


# ---------------------------------------------------------------------------- factor EMA


@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize("side", [0, 1])
def test_factor_ema_matches_kl_factor_update(shape, side):
    """In the rotated basis: R_k = Q_k^T S_k Q_k updated by the weighted EMA of Gr, per-block
    beta and spike scale s (weight s^2); a block that does not step (keep False) is left exactly
    as it was, not even mirrored, whatever its Gr holds."""
    B, m, n = shape
    G, Qa, Qb, lam_a, lam_b, _, _ = _case(B, m, n, seed=2)
    beta2 = 0.95
    gen = torch.Generator().manual_seed(3)
    Ss = []
    for d in (m, n):
        X = torch.randn(B, d, d + 2, generator=gen)
        Ss.append(X @ X.mT / d)
    Q = (Qa, Qb)[side]
    R0 = Q.mT @ Ss[side] @ Q
    Rk = R0.clone().to(DEVICE)
    scale = torch.linspace(1.0, 0.5, B)
    beta = torch.full((B,), beta2)
    frozen = B // 2 if B > 1 else None
    Gr = Qa.mT @ G @ Qb  # unscaled: the kernel applies s^2
    if frozen is not None:
        beta[frozen] = 1.0
        Gr[frozen] = float("nan")  # not read
    weights = 1.0 / (lam_b if side == 0 else lam_a)
    alpha = (1 - beta2) / (n if side == 0 else m)
    keep = beta < 1
    K.factor_ema_(Rk, Gr.to(DEVICE), weights.to(DEVICE), beta.to(DEVICE), alpha, scale=scale.to(DEVICE),
                  keep=keep.to(DEVICE), transpose_x=side == 1)
    for b in range(B):
        if b == frozen:
            assert torch.equal(Rk[b].cpu(), R0[b])
            continue
        new = R.kl_factor_update([Ss[0][b], Ss[1][b]], scale[b] * G[b], [Qa[b], Qb[b]], [lam_a[b], lam_b[b]], beta2)
        expect = Q[b].mT @ new[side] @ Q[b]
        assert rel_err(Rk[b].cpu(), expect) < FP32_TOL
        # mirrored tiles: exactly symmetric wherever the row and column tiles differ
        width = FE.tile_width(Rk, Gr.to(DEVICE), weights.to(DEVICE), transpose_x=side == 1)
        tile = torch.arange(Rk.shape[-1], device=Rk.device) // width
        off = tile[:, None] != tile[None, :]
        assert torch.equal(Rk[b][off], Rk[b].mT[off])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 17, 130), (3, 33, 5)])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_factor_ema_unweighted_matches_factor_ema(shape, state_dtype):
    """SOAP/Shampoo factors: F <- beta2 F + (1 - beta2) G G^T (and G^T G)."""
    B, m, n = shape
    G = _case(B, m, n, seed=4)[0]
    F0 = [torch.eye(m).repeat(B, 1, 1), torch.eye(n).repeat(B, 1, 1) * 2]
    out = [F.to(state_dtype).clone().to(DEVICE) for F in F0]
    K.factor_ema_(out[0], G.to(DEVICE), None, 0.9, 0.1)
    K.factor_ema_(out[1], G.to(DEVICE), None, 0.9, 0.1, transpose_x=True)
    tol = FP32_TOL if state_dtype == torch.float32 else BF16_TOL
    for b in range(B):
        expect = R.factor_ema([F0[0][b].to(state_dtype).float(), F0[1][b].to(state_dtype).float()], G[b], 0.9)
        for k in (0, 1):
            assert rel_err(out[k][b].float().cpu(), expect[k]) < tol


@pytest.mark.parametrize("precision", PRECISIONS)
def test_factor_ema_against_its_torch_reference(precision, tf32_emulated):
    """On and below the diagonal tiles (the kernel mirrors the rest; at "medium" the reference's
    full product is not exactly symmetric), at every precision."""
    B, d, k = 3, 40, 24
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(B, k, d, generator=gen)
    w = torch.rand(B, k, generator=gen) + 0.1
    R0 = torch.randn(B, d, d, generator=gen)
    R0 = R0 + R0.mT
    beta, scale = torch.tensor([0.9, 1.0, 0.8]), torch.tensor([1.0, 0.3, 0.5])
    outs = []
    for fn in (K.factor_ema_, FE.reference_factor_ema):
        Rk = R0.clone().to(DEVICE)
        fn(Rk, *_dev(X, w, beta), 0.2, scale=scale.to(DEVICE), transpose_x=True, precision=precision)
        outs.append(Rk.cpu())
    lower = torch.ones(d, d, dtype=torch.bool).tril()
    assert rel_err(outs[0][:, lower], outs[1][:, lower]) < (FP32_TOL if precision == "highest" else 1e-2)


def test_factor_ema_bad_input():
    R_ = torch.zeros(2, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        K.factor_ema_(R_, torch.zeros(2, 5, 3, device=DEVICE), None, 0.9, 0.1)
    with pytest.raises(ValueError, match="weights"):
        K.factor_ema_(R_, torch.zeros(2, 4, 3, device=DEVICE), torch.ones(2, 4, device=DEVICE), 0.9, 0.1)
    with pytest.raises(ValueError, match="beta"):
        K.factor_ema_(R_, torch.zeros(2, 4, 3, device=DEVICE), None, torch.ones(3, device=DEVICE), 0.1)


# ---------------------------------------------------------------------------- precondition


@pytest.mark.parametrize("shape", _shapes())
def test_precondition_matches_reference(shape):
    """U = Q_a X Q_b^T with X = M * D (the direction rotate wrote), masked by the directions that
    saw a gradient: klkern.reference's rotated_precondition and mask_unseen."""
    B, m, n = shape
    _, Qa, Qb, lam_a, lam_b, M, _ = _case(B, m, n, seed=5)
    eps = 1e-8
    Mr = Qa.mT @ M @ Qb  # the fast paths keep momentum in the rotated basis
    D = torch.stack([R.kl_scaling([lam_a[b], lam_b[b]], 2, eps) for b in range(B)])
    gen = torch.Generator().manual_seed(8)
    live = ((torch.rand(B, m, generator=gen) > 0.2).float(), (torch.rand(B, n, generator=gen) > 0.2).float())
    U = K.precondition(*_dev(Mr * D, Qa, Qb), live=tuple(_dev(*live))).cpu()
    for b in range(B):
        expect = R.rotated_precondition(M[b], [Qa[b], Qb[b]], D[b]) * live[0][b][:, None] * live[1][b][None, :]
        assert rel_err(U[b], expect) < FP32_TOL


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 17, 130), (3, 20, 9)])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_precondition_writes_parameters(shape, param_dtype):
    """SPEC step 8 in the epilogue, per-block update and decay (0 and 0: a block that does not
    step is left as it was), into strided views of parameters of one dtype."""
    B, m, n = shape
    _, Qa, Qb, _, _, mr, v = _case(B, m, n, seed=6)
    gen = torch.Generator().manual_seed(7)
    # Blocks of different parameters and strided views share one launch.
    big = torch.randn(m, 2 * n + 1, generator=gen).to(param_dtype).to(DEVICE)
    others = [torch.randn(m, n, generator=gen).to(param_dtype).to(DEVICE) for _ in range(B - 1)]
    views = [big[:, 1:n + 1]] + others
    before = [w.float().cpu().clone() for w in views]
    big_before = big.clone()
    lr, wd, scale, eps = 0.05, 0.1, 0.7, 1e-8
    update = torch.full((B,), -lr * scale)
    decay = torch.full((B,), -lr * wd)
    if B > 1:
        update[1] = decay[1] = 0.0
    X = mr / (v.sqrt() + eps)
    out = K.precondition(*_dev(X, Qa, Qb), params=K.ParamTable(views), update=update.to(DEVICE),
                         decay=decay.to(DEVICE))
    assert out is None
    tol = FP32_TOL if param_dtype == torch.float32 else BF16_TOL
    for b in range(B):
        if B > 1 and b == 1:
            assert torch.equal(views[b].float().cpu(), before[b])
            continue
        U = Qa[b] @ R.adam_direction(mr[b], v[b], eps) @ Qb[b].mT
        expect = R.apply_update(before[b], U, lr * scale, lr, wd).to(param_dtype).float()
        assert rel_err(views[b].float().cpu(), expect) < tol
    # Nothing outside the views was touched.
    assert torch.equal(big[:, 0], big_before[:, 0]) and torch.equal(big[:, n + 1:], big_before[:, n + 1:])


@pytest.mark.parametrize("shape", ONE_SIDED_SHAPES)
@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("write", [False, True])
def test_precondition_one_sided_is_the_identity_on_the_other_side(shape, side, write):
    """U = Q_a X or X Q_b^T (one product; the live mask of the rotated side only), stored or
    written into the parameters, equals the two-sided product with Q = I on the other side."""
    B, m, n = shape
    _, Qa, Qb, _, _, M, _ = _case(B, m, n, seed=7)
    gen = torch.Generator().manual_seed(9)
    live = [(torch.rand(B, m, generator=gen) > 0.2).float(), (torch.rand(B, n, generator=gen) > 0.2).float()]
    outs = []
    for one_sided in (True, False):
        qa, qb, lv = Qa, Qb, list(live)
        if side == "a":
            qb, lv[1] = (None, None) if one_sided else (_identity(B, n), torch.ones(B, n))
        else:
            qa, lv[0] = (None, None) if one_sided else (_identity(B, m), torch.ones(B, m))
        args = [t if t is None else t.to(DEVICE) for t in (M, qa, qb)]
        live_dev = tuple(t if t is None else t.to(DEVICE) for t in lv)
        if write:
            W = torch.randn(B, m, n, generator=torch.Generator().manual_seed(10)).to(DEVICE)
            update = torch.full((B,), -0.1, device=DEVICE)
            decay = torch.full((B,), -1e-3, device=DEVICE)
            assert K.precondition(*args, live=live_dev, params=K.ParamTable(list(W.unbind(0))), update=update,
                                  decay=decay) is None
            outs.append(W)
        else:
            outs.append(K.precondition(*args, live=live_dev))
    assert rel_err(outs[0].cpu(), outs[1].cpu()) < FP32_TOL


def test_precondition_bad_input():
    X = torch.zeros(2, 3, 4, device=DEVICE)
    Qa, Qb = torch.zeros(2, 3, 3, device=DEVICE), torch.zeros(2, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="Q_b: expected shape"):
        K.precondition(X, Qa, Qa)
    with pytest.raises(ValueError, match="dtype"):
        K.precondition(X.double(), Qa, Qb)
    with pytest.raises(ValueError, match="params table"):
        K.precondition(X, Qa, Qb, params=K.ParamTable([torch.zeros(3, 4, device=DEVICE)]))
    with pytest.raises(ValueError, match="update and decay"):
        K.precondition(X, Qa, Qb, params=K.ParamTable(list(torch.zeros(2, 3, 4, device=DEVICE).unbind(0))))


# ---------------------------------------------------------------------------- AdamW path


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_reference(param_dtype, state_dtype):
    """Members of odd sizes (a chunk boundary inside one), one that does not step (nothing of it
    written), weight decay, written into the parameters in their dtype."""
    gen = torch.Generator().manual_seed(9)
    sizes = [(5,), (7, 3), (1,), (2500,)]
    params0 = [torch.randn(*s, generator=gen).to(param_dtype) for s in sizes]
    N = sum(p.numel() for p in params0)
    G, m0, v0 = torch.randn(N, generator=gen), torch.randn(N, generator=gen), torch.rand(N, generator=gen)
    keep = torch.tensor([True, False, True, True])
    outs = []
    for fn in (K.adamw_, AD.reference_adamw):
        params = [p.clone().to(DEVICE) for p in params0]
        m_, v_ = m0.to(state_dtype).clone().to(DEVICE), v0.to(state_dtype).clone().to(DEVICE)
        fn(G.to(DEVICE), m_, v_, keep.to(DEVICE), K.FlatMembers(params), beta1=0.9, beta2=0.95, eps=1e-8,
           update=torch.tensor(-0.01, device=DEVICE), decay=torch.tensor(-1e-3, device=DEVICE))
        outs.append([*params, m_, v_])
    tol = FP32_TOL if param_dtype == state_dtype == torch.float32 else BF16_TOL
    for a, b in zip(*outs):
        assert rel_err(a.float().cpu(), b.float().cpu()) < tol
    assert torch.equal(outs[0][1].cpu(), params0[1])  # the member that does not step


def test_adamw_bad_input():
    p = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        K.FlatMembers([torch.zeros(4, 4, device=DEVICE).T])
    with pytest.raises(ValueError, match="G: expected shape"):
        K.adamw_(torch.zeros(5, device=DEVICE), p, p, torch.ones(1, dtype=torch.bool, device=DEVICE),
                 K.FlatMembers([p.clone()]), beta1=0.9, beta2=0.9, eps=1e-8, update=p[0], decay=None)


# ---------------------------------------------------------------------------- whole optimizer


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    # Square weight blocks: whole trajectories are comparable (see test_optimizers.py).
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 16)).to(dtype).to(DEVICE)


def _train(cls, backend, steps, dtype=torch.float32, spikes=(), outlier=1e3, **kw):
    """``spikes``: steps whose loss is multiplied by ``outlier`` (outlier batches)."""
    model = _model(dtype)
    opt = cls(model.parameters(), lr=1e-2, backend=backend, precondition_frequency=10, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        # A new batch every step and a regression loss: every weight gradient has
        # full rank. (With one fixed batch the first rotated gradient is diagonal in
        # the basis built from that same gradient; with softmax cross-entropy the
        # last layer's gradient has a null direction. Either way some rotated
        # entries are pure roundoff, and Adam's m / sqrt(v) turns them into
        # full-size steps of arbitrary sign, in any two implementations.)
        X = torch.randn(64, 16, generator=gen).to(dtype).to(DEVICE)
        Y = torch.randn(64, 16, generator=gen).to(DEVICE)
        loss = (model(X).float() - Y).pow(2).mean() * (outlier if step in spikes else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().float().cpu() for p in model.parameters()], opt


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"])
def test_triton_path_matches_torch_path(name):
    """32 steps (3 eigenbasis refreshes), every parameter, fused parameter writes."""
    cls = getattr(klkern, name)
    torch_params, _ = _train(cls, "torch", 32)
    triton_params, _ = _train(cls, "triton", 32)
    for a, b in zip(triton_params, torch_params):
        assert rel_err(a, b) < 1e-5  # the target; measured ~1e-6


@pytest.mark.parametrize("name", ["KLShampoo", "SOAP"])
def test_triton_path_bf16_state(name):
    """bf16 state (bases, factors, moments; products and lam in fp32) on the kernels: 12 steps
    with a refresh against the torch path with the same state dtype."""
    cls = getattr(klkern, name)
    a, _ = _train(cls, "torch", 12, state_dtype=torch.bfloat16)
    b, opt = _train(cls, "triton", 12, state_dtype=torch.bfloat16)
    assert opt.state[opt.param_groups[0]["params"][0]]["blocks"][0]["Q0"].dtype == torch.bfloat16
    for x, y in zip(b, a):
        assert rel_err(x, y) < BF16_TOL


def test_triton_path_blocks_and_state_dict():
    """block_size splits (strided views of the parameters, written in the epilogue),
    12 steps with a refresh; a state-dict round trip restores the state exactly."""
    a, _ = _train(klkern.KLShampoo, "torch", 12, block_size=8)
    b, opt = _train(klkern.KLShampoo, "triton", 12, block_size=8)
    for x, y in zip(b, a):
        assert rel_err(x, y) < 1e-5
    fresh = klkern.KLShampoo(_model().parameters(), backend="triton", block_size=8)
    fresh.load_state_dict(opt.state_dict())
    for name in ("exp_avg", "R0", "lam1"):
        saved = opt.state[opt.param_groups[0]["params"][0]]["blocks"][3][name]
        loaded = fresh.state[fresh.param_groups[0]["params"][0]]["blocks"][3][name]
        assert torch.equal(saved, loaded)


def test_triton_path_bf16_parameters():
    """bf16 parameters: math in fp32, one rounding to bf16 per update. After the first
    update the two paths agree to one bf16 rounding; later steps are not compared
    because a one-ulp difference in a bf16 weight changes the next bf16 forward pass."""
    a, _ = _train(klkern.KLShampoo, "torch", 2, dtype=torch.bfloat16, block_size=8)
    b, opt = _train(klkern.KLShampoo, "triton", 2, dtype=torch.bfloat16, block_size=8)
    for x, y in zip(b, a):
        assert rel_err(x, y) < BF16_TOL
    assert all(p.dtype == torch.bfloat16 for p in opt.param_groups[0]["params"])


def test_param_table_is_built_once_per_layout():
    """A step builds the same pointer tables every time; each is copied to the device once (a
    host-to-device copy synchronises), and a new layout (other tensors) gets its own."""
    W = torch.randn(3, 4, 5, device=DEVICE)
    first, again = K.ParamTable(list(W.unbind(0))), K.ParamTable(list(W.unbind(0)))
    assert first.ptrs is again.ptrs and first.strides is again.strides
    other = K.ParamTable(list(W.transpose(1, 2).unbind(0)))  # same pointers, other strides
    assert other.strides is not first.strides and other.strides.tolist() == [1, 5] * 3
    assert other.ptrs.tolist() == [v.data_ptr() for v in W.unbind(0)]


def test_stacks_beyond_the_grid_limit_launch_in_chunks(monkeypatch):
    """A stack taller than CUDA's grid-y limit (65,535 blocks) is launched in chunks; with the
    limit lowered to 2, a stack of 5 gives exactly the single-launch results, projections,
    moments and parameter writes included."""
    G, Qa, Qb, lam_a, lam_b, M, v = _case(5, 6, 9, seed=7)
    W = torch.randn(5, 6, 9)
    keep = torch.tensor([True, True, False, True, True])

    def run():
        mom, sq, w = M.clone().to(DEVICE), v.clone().to(DEVICE), W.clone().to(DEVICE)
        b = torch.full((5,), 0.9, device=DEVICE)
        X = torch.empty(5, 6, 9, device=DEVICE)
        Gr, proj = K.rotate(*_dev(G, Qa, Qb, keep), projection=tuple(_dev(1 / lam_a, 1 / lam_b)),
                            adam=(mom, b, sq, b), betas=(0.1, 0.05), eps=1e-8, direction=X)
        K.scaled_moments_(Gr, torch.tensor([1.0, 0.5, 1.0, 1.0, 0.2], device=DEVICE), adam=(mom, b, sq, b),
                          betas=(0.1, 0.05), eps=1e-8, direction=X)
        Rk = torch.eye(6).repeat(5, 1, 1).to(DEVICE)
        K.factor_ema_(Rk, Gr, (1.0 / lam_b).to(DEVICE), b, 0.1)
        K.precondition(X, *_dev(Qa, Qb), params=K.ParamTable(list(w.unbind(0))), update=-b / 10, decay=b - 1)
        return [Gr, *proj, mom, sq, X, Rk, w]

    whole = run()
    monkeypatch.setattr(PR, "MAX_GRID_Y", 2)
    chunked = run()
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- dispatch


def test_backend_errors_and_override(monkeypatch):
    p = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="backend='cuda'"):
        klkern.KLShampoo([p], backend="cuda")
    monkeypatch.setenv("KLKERN_BACKEND", "torch")
    assert _backend.resolve("triton", torch.device("cpu")) == "torch"
    monkeypatch.setenv("KLKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="KLKERN_BACKEND"):
        _backend.resolve("auto", torch.device("cpu"))
    monkeypatch.delenv("KLKERN_BACKEND")
    assert _backend.resolve("auto", torch.device("cpu")) == "torch"  # CPU: always torch under auto
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve("triton", torch.device("cpu"))


def test_auto_follows_the_measured_table(monkeypatch):
    """backend="auto" runs the kernels on CUDA only at the precisions where they measured faster
    (_backend.AUTO_KERNELS), never on the CPU; "triton" runs them whatever the table says."""
    monkeypatch.delenv("KLKERN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_cuda_driver_ok", lambda: True)
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "AUTO_KERNELS", {"highest": False, "high": True, "medium": False})
    assert _backend.resolve("auto", cuda, "high") == "triton"
    assert _backend.resolve("auto", cuda, "highest") == "torch"
    assert _backend.resolve("auto", cuda, "medium") == "torch"
    assert _backend.resolve("auto", cuda) == "torch"
    assert _backend.resolve("auto", torch.device("cpu"), "high") == "torch"
    assert _backend.resolve("triton", cuda, "highest") == "triton"
    # today's table (first GPU run): the torch path was faster everywhere
    assert set(_backend.AUTO_KERNELS) == {"highest", "high", "medium"}


def test_import_is_silent_without_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-W", "error", "-c",
                          "import klkern, torch; p = torch.nn.Parameter(torch.ones(4, 4)); "
                          "o = klkern.KLShampoo([p]); p.grad = torch.ones(4, 4); o.step(); o.step()"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP"])
def test_triton_path_scale_free_initialisation(name):
    """init_factor="debiased" (bias-corrected eigenvalue EMA) on both paths, 12 steps with a refresh."""
    cls = getattr(klkern, name)
    a, _ = _train(cls, "torch", 12, init_factor="debiased")
    b, opt = _train(cls, "triton", 12, init_factor="debiased")
    for x, y in zip(b, a):
        assert rel_err(x, y) < 1e-5


def test_triton_path_eigenvalues_first():
    """KL-Shampoo's Adam-order option on the kernels: 12 steps with a refresh against the torch path."""
    a, _ = _train(klkern.KLShampoo, "torch", 12, eigenvalues_first=True)
    b, _ = _train(klkern.KLShampoo, "triton", 12, eigenvalues_first=True)
    for x, y in zip(b, a):
        assert rel_err(x, y) < 1e-5


@pytest.mark.parametrize("outlier", [1e3, 1e6])
@pytest.mark.parametrize("name, options", [("KLShampoo", {}), ("KLShampoo", {"eigenvalues_first": True}),
                                           ("KLSOAP", {})], ids=["klshampoo", "klshampoo-first", "klsoap"])
def test_triton_path_spike_threshold(name, options, outlier):
    """spike_threshold on the kernels (the moments then update outside the rotate kernel, from
    the scaled gradient): two outlier batches (loss x1e3, x1e6) in 12 steps with a refresh,
    against the torch path, and away from the run without it. (With moments corrected after the
    fact, KL-SOAP ended 1e6 away at x1e4: its v was left to rounding.)"""
    cls = getattr(klkern, name)
    a, _ = _train(cls, "torch", 12, spikes=(4, 9), outlier=outlier, **options)
    b, _ = _train(cls, "triton", 12, spikes=(4, 9), outlier=outlier, **options)
    for x, y in zip(b, a):
        assert rel_err(x, y) < 1e-5
    c, _ = _train(cls, "triton", 12, spikes=(4, 9), outlier=outlier, spike_threshold=None, **options)
    assert max(rel_err(x, y) for x, y in zip(b, c)) > 1e-2


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP", "SOAP"])
def test_triton_path_one_sided_blocks(name, monkeypatch):
    """A mode above max_precond_dim left unrotated (large_dim_policy="identity", SOAP's default;
    GPT-2's embedding on SOAP) runs on the kernels, both orientations, and follows the torch path
    for 24 steps (two refreshes)."""
    from klkern.algorithms import _triton_path

    sides = set()
    rotate = _triton_path.K.rotate

    def recording(G, Q_a, Q_b, *args, **kwargs):
        sides.add((Q_a is not None, Q_b is not None))
        return rotate(G, Q_a, Q_b, *args, **kwargs)

    monkeypatch.setattr(_triton_path.K, "rotate", recording)

    def train(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16)).to(DEVICE)
        opt = getattr(klkern, name)(model.parameters(), lr=1e-2, backend=backend, precondition_frequency=10,
                                    max_precond_dim=32, large_dim_policy="identity")
        gen = torch.Generator().manual_seed(1)
        for _ in range(24):
            X, Y = torch.randn(64, 16, generator=gen).to(DEVICE), torch.randn(64, 16, generator=gen).to(DEVICE)
            opt.zero_grad()
            (model(X) - Y).pow(2).mean().backward()
            opt.step()
        return [p.detach().cpu() for p in model.parameters()]

    expect = train("torch")
    got = train("triton")
    assert sides == {(True, False), (False, True)}  # both weights took the kernels, one side each
    for a, b in zip(got, expect):
        assert rel_err(a, b) < 1e-5  # measured ~2e-7


def test_triton_path_tracks_the_same_kl_objective():
    """The kernels' projection shortcut gives the same tracked KL objective as the torch path."""
    _, torch_opt = _train(klkern.KLShampoo, "torch", 12)
    _, triton_opt = _train(klkern.KLShampoo, "triton", 12)
    a, b = torch_opt.diagnostics(), triton_opt.diagnostics()
    for key in a:
        if "kl" in a[key]:
            # a difference of O(1) float32 terms (log-ratio, logdet / N): absolute 1e-6
            assert b[key]["kl"] == pytest.approx(a[key]["kl"], rel=1e-5, abs=1e-6)


# Rectangular blocks: whole trajectories are not comparable (the factor on the longer side is
# rank-deficient, and roundoff in its null space becomes steps of arbitrary sign, in any two
# implementations), so each step starts from one shared state: the torch path's state and
# parameters are loaded into the Triton path, both take the same step, and the new parameters
# and every state tensor are compared. m != n makes every per-side scaling (1/m, 1/n, lam_a,
# lam_b, transposes) visible: exchanging two of them changes the factors by n/m.
RECT_TRITON_SHAPES = [(9, 20), (20, 9), (3, 4, 5)]
RECT_STEP_TOL = 1e-4  # of the step's own movement (parameters) or of the tensor's largest entry


def _rect_case(name, backend):
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(DEVICE)) for s in RECT_TRITON_SHAPES]
    return params, getattr(klkern, name)(params, lr=1e-2, backend=backend, precondition_frequency=3)


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"])
def test_triton_path_rectangular_step_from_shared_state(name):
    """8 steps (the first initialises, two refresh), each from the torch path's state: the Triton path's parameters
    move as the torch path's to RECT_STEP_TOL of the step, and every state tensor (factors,
    bases, eigenvalues, moments, roots) agrees to RECT_STEP_TOL of its largest entry."""
    p_torch, o_torch = _rect_case(name, "torch")
    p_triton, o_triton = _rect_case(name, "triton")
    gen = torch.Generator().manual_seed(6)
    targets = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in p_torch]
    compared = set()
    for t in range(8):
        o_triton.load_state_dict(o_torch.state_dict())
        before = []
        for a, b in zip(p_triton, p_torch):
            a.data.copy_(b.data)
            before.append(b.detach().clone())
        for ps in (p_torch, p_triton):
            noise = torch.Generator().manual_seed(100 + t)
            for p, target in zip(ps, targets):
                p.grad = (p.detach() - target) + 0.3 * torch.randn(p.shape, generator=noise).to(DEVICE)
        o_torch.step()
        o_triton.step()
        for a, b, s in zip(p_triton, p_torch, before):
            moved = float((b.detach() - s).abs().max())
            assert moved > 0 or t == 0, (t, tuple(b.shape))  # the first step only initialises
            assert float((a.detach() - b.detach()).abs().max()) <= RECT_STEP_TOL * moved, (t, tuple(b.shape))
        for a, b in zip(p_triton, p_torch):
            for i, (blk_a, blk_b) in enumerate(zip(o_triton.state[a]["blocks"], o_torch.state[b]["blocks"])):
                assert blk_a.keys() == blk_b.keys()
                for key in blk_b:
                    x, y = blk_a[key].float().cpu(), blk_b[key].float().cpu()
                    # a scalar (the tracked KL objective) is judged on a floor of 1e-2 (nats per
                    # entry): at the first update it is roundoff around 0 (|kl| ~ 1e-9) in both
                    scale = float(y.abs().max().clamp(min=1e-2 if y.dim() == 0 else 1e-30))
                    err = float((x - y).abs().max()) / scale
                    assert err <= RECT_STEP_TOL, (t, tuple(b.shape), i, key, err)
                    compared.add(key)
    assert compared >= {"exp_avg"}, compared


def test_refresh_of_a_kernel_stack_multiplies_on_the_kernels(monkeypatch):
    """A stack that runs on the kernels does its refresh's float32-accurate products (V^T R V, Q V)
    with them ("highest": 3xTF32), and the refreshed state agrees with the torch path's. (The CPU
    refresh applies LAPACK's reflectors instead of multiplying; here it forms V and multiplies, as
    on CUDA.)"""
    from klkern import linalg
    from klkern.algorithms import _triton_path

    monkeypatch.setattr(linalg, "applies_reflectors", lambda A: False)
    calls = []
    real = _triton_path.exact_product

    def counting(A, B):
        calls.append(tuple(A.shape))
        return real(A, B)

    monkeypatch.setattr(_triton_path, "exact_product", counting)
    a, _ = _train(klkern.KLShampoo, "torch", 11)
    b, _ = _train(klkern.KLShampoo, "triton", 11)  # the refresh at t = 10
    assert calls and all(len(s) == 3 for s in calls)
    for x, y in zip(b, a):
        assert rel_err(x, y) < 1e-5
