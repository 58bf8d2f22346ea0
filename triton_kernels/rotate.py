"""Fused operation: rotate the gradient, and everything SPEC step 3 needs from it, in one pass.

``Gr = Q_a^T G Q_b`` for a stack of blocks in two launches (``T = G Q_b`` with nothing fused,
product.py; then ``Gr = Q_a^T T``), the second one's epilogue doing, from the tile in registers,
every element-wise thing the step does with ``Gr`` (each element touched once). A block with one
mode left unrotated (``max_precond_dim`` with ``large_dim_policy="identity"``: an identity factor,
unit eigenvalues) takes one launch, ``Gr = G Q_b`` or ``Gr = Q_a^T G``, with the same epilogue:

* the guard's mask: ``Gr = 0`` for a block that does not step (``keep[b]`` False), whatever
  its gradient held (NaN included);
* ``Gr`` stored (the factor EMAs' operand) in the dtype the next product reads;
* the diagonal eigenvalue projections of SPEC step 5 (KL-Shampoo, KL-SOAP), per-tile partial sums
  ``sum_j Gr_ij^2 w_b_j`` and ``sum_i Gr_ij^2 w_a_i`` with ``w = 1 / (d lam)`` (the old lam),
  summed by the launcher (deterministic, no atomics);
* the moments: KL-Shampoo's momentum ``M <- b1 M + (1 - beta1) Gr`` (SPEC step 1, M in the
  rotated basis), or Adam's ``m`` and ``v`` (SOAP, KL-SOAP), with per-block betas (1 for a block
  that does not step, so its state stays as it was);
* the direction the preconditioning multiplies next, in the dtype that product reads:
  ``X = M / (sqrt(lam_a) sqrt(lam_b)^T + eps)`` (KL-Shampoo, SPEC steps 2-3, the old lam) or
  ``X = m / (sqrt(v) + eps)`` (Adam).

``spike_threshold`` scales a block's ``Gr`` by ``s <= 1`` after the projections decide it
(klkern/engine/_plan.py ``spike_scales``): a stack under it rotates with no moments (Gr stored
in float32, and the projections), and :func:`scaled_moments_` then updates the moments and the
direction from ``s Gr`` (one element-wise pass). Torch references: :func:`reference_rotate`,
:func:`reference_scaled_moments`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (STATE_DTYPES, Traffic, check_sides, check_stack, intermediate_dtype, launch, nbytes, pick_tiles,
                      run_tiles)
from ._product import tile_of, tile_product
from .product import batched_product, check_device, in_chunks, product_tiles, strides3

MOMENTS_NONE, MOMENTS_MOMENTUM, MOMENTS_ADAM = 0, 1, 2


@triton.jit
def _direction(mom, v, SQ_A, SQ_B, s_sa, s_sb, b, rows, cols, row_ok, col_ok, eps, MOMENTS: tl.constexpr,
               SIDE_A: tl.constexpr, SIDE_B: tl.constexpr):
    """The direction tile: ``M / (sqrt(lam_a) sqrt(lam_b)^T + eps)`` (KL-Shampoo, ``MOMENTS`` 1;
    an unrotated side's eigenvalues are 1) or ``m / (sqrt(v) + eps)`` (Adam, 2)."""
    if MOMENTS == 1:
        if SIDE_A and SIDE_B:
            r_a = tl.load(SQ_A + b * s_sa + rows, mask=row_ok, other=1.0)
            r_b = tl.load(SQ_B + b * s_sb + cols, mask=col_ok, other=1.0)
            x = mom / (r_a[:, None] * r_b[None, :] + eps)
        elif SIDE_A:
            r_a = tl.load(SQ_A + b * s_sa + rows, mask=row_ok, other=1.0)
            x = mom / (r_a[:, None] + eps)
        else:
            r_b = tl.load(SQ_B + b * s_sb + cols, mask=col_ok, other=1.0)
            x = mom / (r_b[None, :] + eps)
    else:
        x = mom / (tl.sqrt(v) + eps)
    return x


@triton.jit
def _moments(gr, b, rows, cols, row_ok, col_ok, mask, MOM, s_mb, s_mm, s_mn, B1, c1, V, s_vb, s_vm, s_vn, B2, c2,
             SQ_A, SQ_B, s_sa, s_sb, eps, X, s_xb, s_xm, s_xn, MOMENTS: tl.constexpr, DIRECTION: tl.constexpr,
             SIDE_A: tl.constexpr, SIDE_B: tl.constexpr):
    """From a tile of the rotated gradient in registers: the moments with per-block betas
    (``M <- b1 M + c1 Gr``; Adam's ``v <- b2 v + c2 Gr^2`` too) stored, and the direction."""
    m_ptrs = MOM + b * s_mb + rows[:, None] * s_mm + cols[None, :] * s_mn
    mom = tl.load(B1 + b) * tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32) + c1 * gr
    tl.store(m_ptrs, mom.to(MOM.dtype.element_ty), mask=mask)
    v = mom
    if MOMENTS == 2:
        v_ptrs = V + b * s_vb + rows[:, None] * s_vm + cols[None, :] * s_vn
        v = tl.load(B2 + b) * tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32) + c2 * gr * gr
        tl.store(v_ptrs, v.to(V.dtype.element_ty), mask=mask)
    if DIRECTION:
        x = _direction(mom, v, SQ_A, SQ_B, s_sa, s_sb, b, rows, cols, row_ok, col_ok, eps, MOMENTS,
                       SIDE_A, SIDE_B)
        tl.store(X + b * s_xb + rows[:, None] * s_xm + cols[None, :] * s_xn, x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_kernel(
    A, BM, GR, M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_gb, s_gm, s_gn,
    KEEP,
    PW_A, PW_B, s_pa, s_pb, PROW, PCOL, tiles_m, tiles_n,
    MOM, s_mb, s_mm, s_mn, B1, c1,
    V, s_vb, s_vm, s_vn, B2, c2,
    SQ_A, SQ_B, s_sa, s_sb, eps,
    X, s_xb, s_xm, s_xn,
    STORE_GR: tl.constexpr, PROJ: tl.constexpr, MOMENTS: tl.constexpr, DIRECTION: tl.constexpr,
    SIDE_A: tl.constexpr, SIDE_B: tl.constexpr,
    DOT: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    # Gr = A B: Q_a^T (G Q_b), Q_a^T G or G Q_b (the launcher's strides read Q_a transposed)
    acc = tile_product(A + b * s_ab, BM + b * s_bb, A, rows, cols, M, N, K, s_am, s_ak, s_bk, s_bn,
                       False, DOT, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K)
    keep = tl.load(KEEP + b)
    gr = tl.where(keep, acc, 0.0)
    if STORE_GR:
        tl.store(GR + b * s_gb + rows[:, None] * s_gm + cols[None, :] * s_gn, gr.to(GR.dtype.element_ty), mask=mask)
    if PROJ:  # per rotated side; an unrotated side weighs 1 / its size (unit eigenvalues)
        sq = gr * gr
        if SIDE_A:
            if SIDE_B:
                w_b = tl.load(PW_B + b * s_pb + cols, mask=col_ok, other=0.0)
                row_sum = tl.sum(sq * w_b[None, :], axis=1)
            else:
                row_sum = tl.sum(sq, axis=1) / N
            tl.store(PROW + (b * M + rows) * tiles_n + pid_n, row_sum, mask=row_ok)
        if SIDE_B:
            if SIDE_A:
                w_a = tl.load(PW_A + b * s_pa + rows, mask=row_ok, other=0.0)
                col_sum = tl.sum(sq * w_a[:, None], axis=0)
            else:
                col_sum = tl.sum(sq, axis=0) / M
            tl.store(PCOL + (b * N + cols) * tiles_m + pid_m, col_sum, mask=col_ok)
    if MOMENTS != 0:
        _moments(gr, b, rows, cols, row_ok, col_ok, mask, MOM, s_mb, s_mm, s_mn, B1, c1, V, s_vb, s_vm, s_vn, B2, c2,
                 SQ_A, SQ_B, s_sa, s_sb, eps, X, s_xb, s_xm, s_xn, MOMENTS, DIRECTION, SIDE_A, SIDE_B)


def _checked_moments(momentum, adam, B: int, m: int, n: int):
    """``(moments, kind)``: KL-Shampoo's ``momentum=(M, b1)`` (kind 1), Adam's ``adam=(m, b1, v, b2)``
    (kind 2) or neither (None, 0), their shapes and dtypes checked (state (B, m, n), betas (B,))."""
    moments = momentum if momentum is not None else adam
    kind = 1 if momentum is not None else (2 if adam is not None else 0)
    if moments is not None:
        check_stack("momentum", moments[0], (B, m, n), STATE_DTYPES)
        check_stack("b1", moments[1], (B,))
        if kind == 2:
            check_stack("v", moments[2], (B, m, n), STATE_DTYPES)
            check_stack("b2", moments[3], (B,))
    return moments, kind


def rotate(G: torch.Tensor, Q_a: torch.Tensor | None, Q_b: torch.Tensor | None, keep: torch.Tensor, *,
           projection=None, momentum=None, adam=None, betas: tuple = (0.0, 0.0), eps: float = 0.0,
           sqrt_lam=None, direction: torch.Tensor | None = None, store: bool = True,
           precision: str = "highest", gr_dtype: torch.dtype = torch.float32):
    """``Gr = Q_a^T G Q_b`` with the step's element-wise work in the epilogue (module doc).

    G: (B, m, n) float32/bfloat16/float16; Q_a (B, m, m), Q_b (B, n, n) float32/bfloat16, or
    None for a side left unrotated (identity factor, unit eigenvalues; not both);
    keep: (B,) bool, False for a block that does not step (its Gr is 0).
    ``projection=(w_a (B, m), w_b (B, n))``, float32 weights ``1 / (d lam)`` of SPEC step 5
    (None for an unrotated side): also return ``(proj_a (B, m), proj_b (B, n))``,
    ``proj_a_i = sum_j Gr_ij^2 w_b_j`` (``w_b = 1 / n`` for an unrotated side b), None for an
    unrotated side. ``momentum=(M (B, m, n), b1 (B,))`` (KL-Shampoo) or ``adam=(m, b1, v, b2)``
    (SOAP, KL-SOAP): state updated in place with per-block betas (float32 vectors) and the
    constant weights ``betas = (1 - beta1, 1 - beta2)``. ``direction`` (B, m, n): receives ``X``
    (KL-Shampoo needs ``sqrt_lam=(sqrt(lam_a), sqrt(lam_b))``, None for an unrotated side, and
    ``eps``; Adam ``eps``). ``store``: return Gr (of ``gr_dtype``); else only the epilogue's
    outputs. ``precision``: the products' arithmetic ("highest", "high", "medium").
    Returns ``(Gr or None, (proj_a, proj_b) or None)``. Raises ValueError for shapes, dtypes or
    arguments that do not fit together.
    """
    if G.dim() != 3:
        raise ValueError(f"rotate: G must be a (B, m, n) stack, got shape {tuple(G.shape)}")
    B, m, n = G.shape
    if Q_a is None and Q_b is None:
        raise ValueError("rotate: at least one of Q_a, Q_b is needed (a block with no rotated side "
                         "takes the AdamW path)")
    side_a, side_b = Q_a is not None, Q_b is not None
    check_stack("G", G, (B, m, n), (torch.float32, torch.bfloat16, torch.float16))
    if side_a:
        check_stack("Q_a", Q_a, (B, m, m), STATE_DTYPES)
    if side_b:
        check_stack("Q_b", Q_b, (B, n, n), STATE_DTYPES)
    check_stack("keep", keep, (B,), (torch.bool,))
    if momentum is not None and adam is not None:
        raise ValueError("rotate: pass momentum (KL-Shampoo) or adam (SOAP, KL-SOAP), not both")
    moments, kind = _checked_moments(momentum, adam, B, m, n)
    if direction is not None:
        if kind == 0:
            raise ValueError("rotate: a direction needs the moments it is made of (momentum or adam)")
        check_stack("direction", direction, (B, m, n), (torch.float32, torch.bfloat16))
        if kind == 1 and sqrt_lam is None:
            raise ValueError("rotate: KL-Shampoo's direction needs sqrt_lam=(sqrt(lam_a), sqrt(lam_b))")
    check_sides("rotate", "sqrt_lam", sqrt_lam, B, m, n, side_a, side_b)
    check_sides("rotate", "projection weights", projection, B, m, n, side_a, side_b)
    check_device(G.device, Q_a=Q_a, Q_b=Q_b, keep=keep, direction=direction)
    if side_a and side_b:  # Gr = Q_a^T (G Q_b): A[i, k] = Q_a[k, i]
        T = batched_product(G, Q_b, precision=precision, out_dtype=intermediate_dtype(precision))
        A, s_am, s_ak, Bm, K = Q_a, Q_a.stride(2), Q_a.stride(1), T, m
    elif side_a:  # Gr = Q_a^T G
        A, s_am, s_ak, Bm, K = Q_a, Q_a.stride(2), Q_a.stride(1), G, m
    else:  # Gr = G Q_b
        A, s_am, s_ak, Bm, K = G, G.stride(1), G.stride(2), Q_b, n
    Gr = torch.empty(B, m, n, dtype=gr_dtype, device=G.device) if store else None
    dots, cfg, is_aligned, tiles_m, tiles_n = product_tiles(m, n, K, precision, A, Bm, Gr, *(
        t for t in (moments or ()) if t is not None and t.dim() == 3), direction, table="rotate")
    partial = None
    if projection is not None:
        partial = (torch.empty(B, m, tiles_n, dtype=torch.float32, device=G.device) if side_a else None,
                   torch.empty(B, n, tiles_m, dtype=torch.float32, device=G.device) if side_b else None)
    dummy = Bm
    zero3 = (0, 0, 0)
    mom = moments[0] if moments is not None else None
    v = moments[2] if kind == 2 else None

    def run(part):
        a_, b_, gr, mo, vv, x = part(A), part(Bm), part(Gr), part(mom), part(v), part(direction)
        pw = (part(projection[0]), part(projection[1])) if projection is not None else (None, None)
        sq = (part(sqrt_lam[0]), part(sqrt_lam[1])) if sqrt_lam is not None else (None, None)
        prow, pcol = (part(partial[0]), part(partial[1])) if partial is not None else (None, None)
        args = (
            a_, b_, gr if gr is not None else dummy, m, n, K,
            a_.stride(0), s_am, s_ak, *strides3(b_), *(strides3(gr) if gr is not None else zero3),
            part(keep),
            pw[0] if pw[0] is not None else dummy, pw[1] if pw[1] is not None else dummy,
            pw[0].stride(0) if pw[0] is not None else 0, pw[1].stride(0) if pw[1] is not None else 0,
            prow if prow is not None else dummy, pcol if pcol is not None else dummy, tiles_m, tiles_n,
            mo if mo is not None else dummy, *(strides3(mo) if mo is not None else zero3),
            part(moments[1]) if moments is not None else dummy, float(betas[0]),
            vv if vv is not None else dummy, *(strides3(vv) if vv is not None else zero3),
            part(moments[3]) if kind == 2 else dummy, float(betas[1]),
            sq[0] if sq[0] is not None else dummy, sq[1] if sq[1] is not None else dummy,
            sq[0].stride(0) if sq[0] is not None else 0, sq[1].stride(0) if sq[1] is not None else 0, float(eps),
            x if x is not None else dummy, *(strides3(x) if x is not None else zero3),
        )
        state = nbytes(mo, vv)
        traffic = Traffic(product=nbytes(a_, b_, gr),
                          extra=2 * state + nbytes(x, part(keep), *pw, *sq, prow, pcol))
        launch(_rotate_kernel, (tiles_m * tiles_n, part.size), args,
               dict(STORE_GR=gr is not None, PROJ=projection is not None, MOMENTS=kind,
                    DIRECTION=direction is not None, SIDE_A=side_a, SIDE_B=side_b, **dots),
               cfg, "rotate", is_aligned, traffic)

    in_chunks(B, run)
    if partial is None:
        return Gr, None
    return Gr, tuple(p.sum(-1) if p is not None else None for p in partial)


@triton.jit
def _scaled_moments_kernel(
    GR, M, N, s_gb, s_gm, s_gn, SPIKE,
    MOM, s_mb, s_mm, s_mn, B1, c1,
    V, s_vb, s_vm, s_vn, B2, c2,
    SQ_A, SQ_B, s_sa, s_sb, eps,
    X, s_xb, s_xm, s_xn,
    MOMENTS: tl.constexpr, DIRECTION: tl.constexpr, SIDE_A: tl.constexpr, SIDE_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows, cols = tile_of(tl.program_id(0), N, BLOCK_M, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    gr = tl.load(GR + b * s_gb + rows[:, None] * s_gm + cols[None, :] * s_gn, mask=mask, other=0.0).to(tl.float32)
    gr = gr * tl.load(SPIKE + b)
    _moments(gr, b, rows, cols, row_ok, col_ok, mask, MOM, s_mb, s_mm, s_mn, B1, c1, V, s_vb, s_vm, s_vn, B2, c2,
             SQ_A, SQ_B, s_sa, s_sb, eps, X, s_xb, s_xm, s_xn, MOMENTS, DIRECTION, SIDE_A, SIDE_B)


def scaled_moments_(Gr: torch.Tensor, spike: torch.Tensor, *, momentum=None, adam=None, betas: tuple = (0.0, 0.0),
                    eps: float = 0.0, sqrt_lam=None, direction: torch.Tensor | None = None) -> None:
    """The moments and the direction from ``s Gr``, in place, for a stack whose blocks
    ``spike_threshold`` may scale (``s <= 1`` per block, known only after :func:`rotate` wrote
    ``Gr`` and the projections; klkern/engine/_plan.py ``spike_scales``): KL-Shampoo's
    ``M <- b1 M + (1 - beta1) s Gr`` or Adam's ``m`` and ``v <- b2 v + (1 - beta2) s^2 Gr^2``, then
    ``X`` as :func:`rotate` makes it. Computed from the scaled gradient, never by subtracting the
    unscaled one's share afterwards: after an outlier ``Gr^2`` exceeds ``v`` by orders of
    magnitude, and that difference would leave ``v`` to rounding.

    Gr: (B, m, n) float32/bfloat16 (zero for a block that does not step); spike: (B,) float32;
    ``momentum=(M, b1)`` / ``adam=(m, b1, v, b2)`` with per-block betas (B,) float32 (1 for a block
    that does not step); ``betas = (1 - beta1, 1 - beta2)``; ``direction`` (B, m, n) receives X
    (KL-Shampoo: ``sqrt_lam=(sqrt(lam_a) (B, m), sqrt(lam_b) (B, n))``, None for an unrotated
    side). Raises ValueError for shapes, dtypes or arguments that do not fit together."""
    if Gr.dim() != 3:
        raise ValueError(f"scaled_moments_: Gr must be a (B, m, n) stack, got shape {tuple(Gr.shape)}")
    B, m, n = Gr.shape
    check_stack("Gr", Gr, (B, m, n), (torch.float32, torch.bfloat16))
    check_stack("spike", spike, (B,))
    if (momentum is None) == (adam is None):
        raise ValueError("scaled_moments_: pass momentum (KL-Shampoo) or adam (KL-SOAP), one of them")
    moments, kind = _checked_moments(momentum, adam, B, m, n)
    if direction is not None:
        check_stack("direction", direction, (B, m, n), (torch.float32, torch.bfloat16))
    check_sides("scaled_moments_", "sqrt_lam", sqrt_lam, B, m, n)
    sides = (True, True) if sqrt_lam is None else (sqrt_lam[0] is not None, sqrt_lam[1] is not None)
    if direction is not None and kind == 1 and (sqrt_lam is None or not any(sides)):
        raise ValueError("scaled_moments_: KL-Shampoo's direction needs sqrt_lam=(sqrt(lam_a), sqrt(lam_b))")
    check_device(Gr.device, spike=spike, direction=direction)
    mom = moments[0]
    v = moments[2] if kind == 2 else None
    cfg = pick_tiles("elementwise", "ieee", min(m, n), True)
    run = run_tiles(cfg)
    tiles = triton.cdiv(m, run["BLOCK_M"]) * triton.cdiv(n, run["BLOCK_N"])
    dummy = Gr
    zero3 = (0, 0, 0)

    def go(part):
        gr, mo, vv, x = part(Gr), part(mom), part(v), part(direction)
        b1, b2 = part(moments[1]), part(moments[3]) if kind == 2 else None
        sq = (part(sqrt_lam[0]), part(sqrt_lam[1])) if sqrt_lam is not None else (None, None)
        args = (gr, m, n, *strides3(gr), part(spike),
                mo, *strides3(mo), b1, float(betas[0]),
                vv if vv is not None else dummy, *(strides3(vv) if vv is not None else zero3),
                b2 if b2 is not None else dummy, float(betas[1]),
                sq[0] if sq[0] is not None else dummy, sq[1] if sq[1] is not None else dummy,
                sq[0].stride(0) if sq[0] is not None else 0, sq[1].stride(0) if sq[1] is not None else 0, float(eps),
                x if x is not None else dummy, *(strides3(x) if x is not None else zero3))
        traffic = Traffic(extra=nbytes(gr, part(spike), b1, b2, x, *sq) + 2 * nbytes(mo, vv))
        launch(_scaled_moments_kernel, (tiles, part.size), args,
               dict(MOMENTS=kind, DIRECTION=direction is not None, SIDE_A=sides[0], SIDE_B=sides[1]),
               cfg, "elementwise", True, traffic)

    in_chunks(B, go)


# ---------------------------------------------------------------------------------- references


def reference_rotate(G, Q_a, Q_b, keep, *, projection=None, momentum=None, adam=None, betas=(0.0, 0.0), eps=0.0,
                     sqrt_lam=None, direction=None, store=True, precision="highest", gr_dtype=torch.float32):
    """:func:`rotate` in torch, unfused (the products at ``precision``, the rest in float32)."""
    from klkern.runtime._precision import bmm

    Gr = G.float() if Q_b is None else bmm(G, Q_b, precision)
    Gr = Gr if Q_a is None else bmm(Q_a.mT, Gr, precision)
    Gr = torch.where(keep.view(-1, 1, 1), Gr, torch.zeros((), device=Gr.device))
    proj = None
    if projection is not None:
        sq = Gr * Gr
        B, m, n = Gr.shape
        w_a = projection[0] if Q_a is not None else torch.full((B, m), 1 / m, device=Gr.device)
        w_b = projection[1] if Q_b is not None else torch.full((B, n), 1 / n, device=Gr.device)
        proj = ((sq * w_b[:, None, :]).sum(-1) if Q_a is not None else None,
                (sq * w_a[:, :, None]).sum(1) if Q_b is not None else None)
    moments = momentum if momentum is not None else adam
    if moments is not None:
        mom = moments[1].view(-1, 1, 1) * moments[0].float() + betas[0] * Gr
        moments[0].copy_(mom)
        if adam is not None:
            v = adam[3].view(-1, 1, 1) * adam[2].float() + betas[1] * Gr * Gr
            adam[2].copy_(v)
        if direction is not None:
            direction.copy_(_reference_direction(mom, v if adam is not None else None, sqrt_lam, eps))
    return (Gr.to(gr_dtype) if store else None), proj


def _reference_direction(mom, v, sqrt_lam, eps):
    """``M / (sqrt(lam_a) sqrt(lam_b)^T + eps)`` (an unrotated side's root is 1) or ``m / (sqrt(v) + eps)``."""
    if v is not None:
        return mom / (v.sqrt() + eps)
    root = 1.0
    if sqrt_lam[0] is not None:
        root = root * sqrt_lam[0][:, :, None]
    if sqrt_lam[1] is not None:
        root = root * sqrt_lam[1][:, None, :]
    return mom / (root + eps)


def reference_scaled_moments(Gr, spike, *, momentum=None, adam=None, betas=(0.0, 0.0), eps=0.0, sqrt_lam=None,
                             direction=None) -> None:
    """:func:`scaled_moments_` in torch (float32)."""
    gr = Gr.float() * spike.view(-1, 1, 1)
    moments = momentum if momentum is not None else adam
    mom = moments[1].view(-1, 1, 1) * moments[0].float() + betas[0] * gr
    moments[0].copy_(mom)
    v = None
    if adam is not None:
        v = adam[3].view(-1, 1, 1) * adam[2].float() + betas[1] * gr * gr
        adam[2].copy_(v)
    if direction is not None:
        direction.copy_(_reference_direction(mom, v, sqrt_lam, eps))
