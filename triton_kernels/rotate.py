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
(klkern/engine/_plan.py ``spike_scales``): the epilogue updates with ``s = 1`` and
:func:`spike_correct_` redoes the moments and the direction of the blocks whose ``s`` is not 1,
reading nothing for the others. Torch references: :func:`reference_rotate`,
:func:`reference_spike_correct`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import STATE_DTYPES, Traffic, check_stack, intermediate_dtype, launch, nbytes, pick_tiles, run_tiles
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
        m_ptrs = MOM + b * s_mb + rows[:, None] * s_mm + cols[None, :] * s_mn
        mom = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        mom = tl.load(B1 + b) * mom + c1 * gr
        tl.store(m_ptrs, mom.to(MOM.dtype.element_ty), mask=mask)
        v = mom
        if MOMENTS == 2:
            v_ptrs = V + b * s_vb + rows[:, None] * s_vm + cols[None, :] * s_vn
            v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(B2 + b) * v + c2 * gr * gr
            tl.store(v_ptrs, v.to(V.dtype.element_ty), mask=mask)
        if DIRECTION:
            x = _direction(mom, v, SQ_A, SQ_B, s_sa, s_sb, b, rows, cols, row_ok, col_ok, eps, MOMENTS,
                           SIDE_A, SIDE_B)
            tl.store(X + b * s_xb + rows[:, None] * s_xm + cols[None, :] * s_xn, x.to(X.dtype.element_ty), mask=mask)


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
    moments = momentum if momentum is not None else adam
    kind = 1 if momentum is not None else (2 if adam is not None else 0)
    if moments is not None:
        check_stack("momentum", moments[0], (B, m, n), STATE_DTYPES)
        check_stack("b1", moments[1], (B,))
        if kind == 2:
            check_stack("v", moments[2], (B, m, n), STATE_DTYPES)
            check_stack("b2", moments[3], (B,))
    if direction is not None:
        if kind == 0:
            raise ValueError("rotate: a direction needs the moments it is made of (momentum or adam)")
        check_stack("direction", direction, (B, m, n), (torch.float32, torch.bfloat16))
        if kind == 1 and sqrt_lam is None:
            raise ValueError("rotate: KL-Shampoo's direction needs sqrt_lam=(sqrt(lam_a), sqrt(lam_b))")
    _check_sides("sqrt_lam", sqrt_lam, B, m, n, side_a, side_b)
    _check_sides("projection weights", projection, B, m, n, side_a, side_b)
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


def _check_sides(name: str, pair, B: int, m: int, n: int, side_a: bool, side_b: bool) -> None:
    """``pair = (vector of side a (B, m), of side b (B, n))``: given for a rotated side, None for an
    unrotated one."""
    if pair is None:
        return
    for vec, d, on, side in ((pair[0], m, side_a, "a"), (pair[1], n, side_b, "b")):
        if on and vec is None:
            raise ValueError(f"rotate: {name} of side {side} is missing (that side is rotated)")
        if not on and vec is not None:
            raise ValueError(f"rotate: {name} of side {side} must be None (that side is not rotated: unit "
                             "eigenvalues)")
        if vec is not None:
            check_stack(f"{name}_{side}", vec, (B, d))


@triton.jit
def _spike_correct_kernel(
    GR, M, N, s_gb, s_gm, s_gn, SPIKE,
    MOM, s_mb, s_mm, s_mn, c1,
    V, s_vb, s_vm, s_vn, c2,
    SQ_A, SQ_B, s_sa, s_sb, eps,
    X, s_xb, s_xm, s_xn,
    MOMENTS: tl.constexpr, DIRECTION: tl.constexpr, SIDE_A: tl.constexpr, SIDE_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    s = tl.load(SPIKE + b)
    if s != 1.0:  # every other block: nothing read, nothing written
        rows, cols = tile_of(tl.program_id(0), N, BLOCK_M, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        gr = tl.load(GR + b * s_gb + rows[:, None] * s_gm + cols[None, :] * s_gn, mask=mask, other=0.0).to(tl.float32)
        m_ptrs = MOM + b * s_mb + rows[:, None] * s_mm + cols[None, :] * s_mn
        mom = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32) - c1 * (1.0 - s) * gr
        tl.store(m_ptrs, mom.to(MOM.dtype.element_ty), mask=mask)
        v = mom
        if MOMENTS == 2:
            v_ptrs = V + b * s_vb + rows[:, None] * s_vm + cols[None, :] * s_vn
            v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32) - c2 * (1.0 - s * s) * gr * gr
            v = tl.maximum(v, 0.0)
            tl.store(v_ptrs, v.to(V.dtype.element_ty), mask=mask)
        if DIRECTION:
            x = _direction(mom, v, SQ_A, SQ_B, s_sa, s_sb, b, rows, cols, row_ok, col_ok, eps, MOMENTS,
                           SIDE_A, SIDE_B)
            tl.store(X + b * s_xb + rows[:, None] * s_xm + cols[None, :] * s_xn, x.to(X.dtype.element_ty), mask=mask)


def spike_correct_(Gr: torch.Tensor, spike: torch.Tensor, *, momentum=None, adam=None, betas: tuple = (0.0, 0.0),
                   eps: float = 0.0, sqrt_lam=None, direction: torch.Tensor | None = None) -> None:
    """In place, for each block whose ``spike[b]`` is not 1: the moments and the direction that
    :func:`rotate` wrote with ``Gr`` redone with ``s Gr`` (``M -= (1 - beta1)(1 - s) Gr``; Adam's
    ``v -= (1 - beta2)(1 - s^2) Gr^2``, then ``X`` again). Arguments as :func:`rotate`'s
    (``momentum=(M, b1)`` / ``adam=(m, b1, v, b2)``; the per-block betas are not read;
    ``sqrt_lam`` None for an unrotated side); spike: (B,) float32. Blocks with ``s = 1`` are not
    read."""
    B, m, n = Gr.shape
    check_stack("spike", spike, (B,))
    kind = 1 if momentum is not None else 2
    moments = momentum if momentum is not None else adam
    if moments is None:
        raise ValueError("spike_correct_: pass momentum (KL-Shampoo) or adam (KL-SOAP)")
    mom = moments[0]
    v = moments[2] if kind == 2 else None
    sides = (True, True) if sqrt_lam is None else (sqrt_lam[0] is not None, sqrt_lam[1] is not None)
    if direction is not None and kind == 1 and (sqrt_lam is None or not any(sides)):
        raise ValueError("spike_correct_: KL-Shampoo's direction needs sqrt_lam=(sqrt(lam_a), sqrt(lam_b))")
    cfg = pick_tiles("elementwise", "ieee", min(m, n), True)
    run = run_tiles(cfg)
    tiles = triton.cdiv(m, run["BLOCK_M"]) * triton.cdiv(n, run["BLOCK_N"])
    dummy = Gr
    zero3 = (0, 0, 0)

    def go(part):
        gr, mo, vv, x = part(Gr), part(mom), part(v), part(direction)
        sq = (part(sqrt_lam[0]), part(sqrt_lam[1])) if sqrt_lam is not None else (None, None)
        args = (gr, m, n, *strides3(gr), part(spike),
                mo, *strides3(mo), float(betas[0]),
                vv if vv is not None else dummy, *(strides3(vv) if vv is not None else zero3), float(betas[1]),
                sq[0] if sq[0] is not None else dummy, sq[1] if sq[1] is not None else dummy,
                sq[0].stride(0) if sq[0] is not None else 0, sq[1].stride(0) if sq[1] is not None else 0, float(eps),
                x if x is not None else dummy, *(strides3(x) if x is not None else zero3))
        # what a step without a spike pays: the scale of every block (the rest is read only where s != 1)
        launch(_spike_correct_kernel, (tiles, part.size), args,
               dict(MOMENTS=kind, DIRECTION=direction is not None, SIDE_A=sides[0], SIDE_B=sides[1]),
               cfg, "elementwise", True,
               Traffic(extra=nbytes(part(spike))))

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


def reference_spike_correct(Gr, spike, *, momentum=None, adam=None, betas=(0.0, 0.0), eps=0.0, sqrt_lam=None,
                            direction=None) -> None:
    """:func:`spike_correct_` in torch."""
    s = spike.view(-1, 1, 1)
    hit = s != 1
    gr = Gr.float()
    moments = momentum if momentum is not None else adam
    mom = torch.where(hit, moments[0].float() - betas[0] * (1 - s) * gr, moments[0].float())
    moments[0].copy_(mom)
    if adam is not None:
        v = torch.where(hit, (adam[2].float() - betas[1] * (1 - s * s) * gr * gr).clamp(min=0), adam[2].float())
        adam[2].copy_(v)
    if direction is not None:
        x = _reference_direction(mom, v if adam is not None else None, sqrt_lam, eps)
        direction.copy_(torch.where(hit, x.to(direction.dtype), direction))
