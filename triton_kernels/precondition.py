"""Fused operation: rotate the direction back and write the parameters, in one pass.

``U = Q_a X Q_b^T`` for a stack of blocks in two launches (``T = X Q_b^T`` with nothing fused,
product.py; then ``U = Q_a T``; one launch, ``U = Q_a X`` or ``U = X Q_b^T``, for a block with a
side left unrotated), where ``X`` is the direction :func:`~.rotate.rotate` wrote
(``M * D`` for KL-Shampoo, ``m / (sqrt(v) + eps)`` for Adam in the eigenbasis); the second
launch's epilogue, from the tile in registers:

* masks the directions that never saw a gradient (``mask_unseen``: ``U_ij live_a_i live_b_j``,
  0/1 vectors);
* given a :class:`~.product.ParamTable`, writes SPEC step 8 into the parameters in their own
  dtype, ``W <- W + u[b] U`` then ``W <- W + d[b] W`` (``u = -lr`` times the algorithm's step
  factor, ``d = -lr * weight_decay``, both 0 for a block that does not step: per-block float32
  vectors on the device), so neither U nor a copy of the parameters reaches memory;
* else stores U.

Torch reference: :func:`reference_precondition`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import STATE_DTYPES, Traffic, check_sides, check_stack, intermediate_dtype, launch, nbytes
from ._product import tile_of, tile_product
from .product import TL_DTYPES, ParamTable, batched_product, check_device, in_chunks, product_tiles, strides3


@triton.jit
def _precondition_kernel(
    A, BM, U, M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_ub, s_um, s_un,
    LIVE_A, LIVE_B, s_la, s_lb,
    PTRS, PSTRIDES, UPDATE, DECAY,
    LIVE_SIDE_A: tl.constexpr, LIVE_SIDE_B: tl.constexpr, WRITE: tl.constexpr, W_DTYPE: tl.constexpr,
    DOT: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows, cols = tile_of(tl.program_id(0), N, BLOCK_M, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    # U = A B: Q_a (X Q_b^T), Q_a X or X Q_b^T (the launcher's strides read Q_b transposed)
    acc = tile_product(A + b * s_ab, BM + b * s_bb, A, rows, cols, M, N, K, s_am, s_ak, s_bk, s_bn,
                       False, DOT, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K)
    if LIVE_SIDE_A:
        l_a = tl.load(LIVE_A + b * s_la + rows, mask=row_ok, other=0.0)
        acc = acc * l_a[:, None]
    if LIVE_SIDE_B:
        l_b = tl.load(LIVE_B + b * s_lb + cols, mask=col_ok, other=0.0)
        acc = acc * l_b[None, :]
    if WRITE:
        w_base = tl.load(PTRS + b).to(tl.pointer_type(W_DTYPE))
        w_rs = tl.load(PSTRIDES + 2 * b)
        w_cs = tl.load(PSTRIDES + 2 * b + 1)
        w_ptrs = w_base + rows[:, None] * w_rs + cols[None, :] * w_cs
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        w = w + tl.load(UPDATE + b) * acc
        w = w + tl.load(DECAY + b) * w
        tl.store(w_ptrs, w.to(W_DTYPE), mask=mask)
    else:
        tl.store(U + b * s_ub + rows[:, None] * s_um + cols[None, :] * s_un, acc.to(U.dtype.element_ty), mask=mask)


def precondition(X: torch.Tensor, Q_a: torch.Tensor | None, Q_b: torch.Tensor | None, *, live=None,
                 params: ParamTable | None = None, update: torch.Tensor | None = None,
                 decay: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 precision: str = "highest"):
    """``U = Q_a X Q_b^T`` (masked by ``live``), written into ``params`` or returned.

    X: (B, m, n) float32/bfloat16; Q_a (B, m, m), Q_b (B, n, n) float32/bfloat16, or None for a
    side left unrotated (not both); live: ``(live_a (B, m), live_b (B, n))`` float32 0/1 (None
    for an unrotated side), or None; params: a ParamTable of B
    views of shape (m, n), with update and decay (B,) float32 (SPEC step 8, module doc); else U
    is stored into ``out`` (or a new float32 tensor) and returned. ``precision``: the products'
    arithmetic ("highest", "high", "medium"). Raises ValueError for shapes, dtypes or arguments
    that do not fit together.
    """
    if X.dim() != 3:
        raise ValueError(f"precondition: X must be a (B, m, n) stack, got shape {tuple(X.shape)}")
    B, m, n = X.shape
    check_stack("X", X, (B, m, n), STATE_DTYPES)
    if Q_a is None and Q_b is None:
        raise ValueError("precondition: at least one of Q_a, Q_b is needed")
    if Q_a is not None:
        check_stack("Q_a", Q_a, (B, m, m), STATE_DTYPES)
    if Q_b is not None:
        check_stack("Q_b", Q_b, (B, n, n), STATE_DTYPES)
    check_sides("precondition", "live", live, B, m, n, Q_a is not None, Q_b is not None)
    live = (None, None) if live is None else live
    if params is not None:
        if len(params) != B or params.shape != (m, n):
            raise ValueError(f"precondition: params table holds {len(params)} blocks of shape "
                             f"{params.shape}, expected {B} of {(m, n)}")
        if params.device != X.device:
            raise ValueError("precondition: parameters and state are on different devices")
        if update is None or decay is None:
            raise ValueError("precondition: writing params needs the per-block update and decay vectors")
        check_stack("update", update, (B,))
        check_stack("decay", decay, (B,))
    elif out is None:
        out = torch.empty(B, m, n, dtype=torch.float32, device=X.device)
    check_device(X.device, Q_a=Q_a, Q_b=Q_b, out=out, update=update, decay=decay)
    if Q_a is not None:  # U = Q_a (X Q_b^T) or Q_a X
        T = X if Q_b is None else batched_product(X, Q_b, transpose_b=True, precision=precision,
                                                    out_dtype=intermediate_dtype(precision))
        A, s_am, s_ak, Bm, s_bk, s_bn, K = Q_a, Q_a.stride(1), Q_a.stride(2), T, T.stride(1), T.stride(2), m
    else:  # U = X Q_b^T: B[k, j] = Q_b[j, k]
        A, s_am, s_ak, Bm, s_bk, s_bn, K = X, X.stride(1), X.stride(2), Q_b, Q_b.stride(2), Q_b.stride(1), n
    dots, cfg, is_aligned, tiles_m, tiles_n = product_tiles(m, n, K, precision, A, Bm, out, table="precondition")
    dummy = Bm
    zero3 = (0, 0, 0)

    def run(part):
        a_, b_, u = part(A), part(Bm), part(out)
        lv = (part(live[0]), part(live[1]))
        table = params.part(part) if params is not None else None
        args = (a_, b_, u if u is not None else dummy, m, n, K,
                a_.stride(0), s_am, s_ak, b_.stride(0), s_bk, s_bn, *(strides3(u) if u is not None else zero3),
                lv[0] if lv[0] is not None else dummy, lv[1] if lv[1] is not None else dummy,
                lv[0].stride(0) if lv[0] is not None else 0, lv[1].stride(0) if lv[1] is not None else 0,
                table.ptrs if table is not None else dummy, table.strides if table is not None else dummy,
                part(update) if table is not None else dummy, part(decay) if table is not None else dummy)
        if table is not None:  # the result is the parameters' new values; their old ones are read besides
            traffic = Traffic(product=nbytes(a_, b_) + table.nbytes,
                              extra=table.nbytes + nbytes(*lv, part(update), part(decay)))
        else:
            traffic = Traffic(product=nbytes(a_, b_, u), extra=nbytes(*lv))
        launch(_precondition_kernel, (tiles_m * tiles_n, part.size), args,
               dict(LIVE_SIDE_A=lv[0] is not None, LIVE_SIDE_B=lv[1] is not None, WRITE=table is not None,
                    W_DTYPE=TL_DTYPES[params.dtype] if params is not None else tl.float32, **dots),
               cfg, "precondition", is_aligned, traffic)

    in_chunks(B, run)
    return None if params is not None else out


def reference_precondition(X, Q_a, Q_b, *, live=None, params: ParamTable | None = None, update=None, decay=None,
                           out=None, precision="highest"):
    """:func:`precondition` in torch (the products at ``precision``)."""
    from klkern.runtime._precision import bmm

    U = X.float() if Q_b is None else bmm(X.float(), Q_b.mT, precision)
    U = U if Q_a is None else bmm(Q_a, U, precision)
    if live is not None and live[0] is not None:
        U = U * live[0][:, :, None]
    if live is not None and live[1] is not None:
        U = U * live[1][:, None, :]
    if params is None:
        if out is None:
            return U
        out.copy_(U)
        return out
    for b, view in enumerate(params.views):
        w = view.float() + update[b] * U[b]
        view.copy_(w + decay[b] * w)
    return None
