"""Fused operation: rotate the direction back and write the parameters, in one pass.

``U = Q_a X Q_b^T`` for a stack of blocks in two launches (``T = X Q_b^T`` with nothing fused,
product.py; then ``U = Q_a T``), where ``X`` is the direction :func:`~.rotate.rotate` wrote
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

from ._config import STATE_DTYPES, Traffic, check_stack, intermediate_dtype, launch, nbytes
from ._product import tile_of, tile_product
from .product import TL_DTYPES, ParamTable, batched_product, check_device, in_chunks, product_tiles, strides3


@triton.jit
def _precondition_kernel(
    QA, T, U, M, N,
    s_qb, s_qm, s_qk, s_tb, s_tk, s_tn, s_ub, s_um, s_un,
    LIVE_A, LIVE_B, s_la, s_lb,
    PTRS, PSTRIDES, UPDATE, DECAY,
    LIVE: tl.constexpr, WRITE: tl.constexpr, W_DTYPE: tl.constexpr,
    DOT: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows, cols = tile_of(tl.program_id(0), N, BLOCK_M, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tile_product(QA + b * s_qb, T + b * s_tb, QA, rows, cols, M, N, M, s_qm, s_qk, s_tk, s_tn,
                       False, DOT, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K)
    if LIVE:
        l_a = tl.load(LIVE_A + b * s_la + rows, mask=row_ok, other=0.0)
        l_b = tl.load(LIVE_B + b * s_lb + cols, mask=col_ok, other=0.0)
        acc = acc * l_a[:, None] * l_b[None, :]
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


def precondition(X: torch.Tensor, Q_a: torch.Tensor, Q_b: torch.Tensor, *, live=None,
                 params: ParamTable | None = None, update: torch.Tensor | None = None,
                 decay: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 precision: str = "highest"):
    """``U = Q_a X Q_b^T`` (masked by ``live``), written into ``params`` or returned.

    X: (B, m, n) float32/bfloat16; Q_a (B, m, m), Q_b (B, n, n) float32/bfloat16;
    live: ``(live_a (B, m), live_b (B, n))`` float32 0/1 or None; params: a ParamTable of B
    views of shape (m, n), with update and decay (B,) float32 (SPEC step 8, module doc); else U
    is stored into ``out`` (or a new float32 tensor) and returned. ``precision``: the products'
    arithmetic ("highest", "high", "medium").
    """
    if X.dim() != 3:
        raise ValueError(f"precondition: X must be a (B, m, n) stack, got shape {tuple(X.shape)}")
    B, m, n = X.shape
    check_stack("X", X, (B, m, n), STATE_DTYPES)
    check_stack("Q_a", Q_a, (B, m, m), STATE_DTYPES)
    check_stack("Q_b", Q_b, (B, n, n), STATE_DTYPES)
    if live is not None:
        check_stack("live_a", live[0], (B, m))
        check_stack("live_b", live[1], (B, n))
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
    T = batched_product(X, Q_b, transpose_b=True, precision=precision, out_dtype=intermediate_dtype(precision))
    dots, cfg, is_aligned, tiles_m, tiles_n = product_tiles(m, n, m, precision, Q_a, T, out, table="precondition")
    dummy = T
    zero3 = (0, 0, 0)

    def run(part):
        qa, t_, u = part(Q_a), part(T), part(out)
        lv = (part(live[0]), part(live[1])) if live is not None else None
        table = params.part(part) if params is not None else None
        args = (qa, t_, u if u is not None else dummy, m, n,
                *strides3(qa), *strides3(t_), *(strides3(u) if u is not None else zero3),
                lv[0] if lv is not None else dummy, lv[1] if lv is not None else dummy,
                lv[0].stride(0) if lv is not None else 0, lv[1].stride(0) if lv is not None else 0,
                table.ptrs if table is not None else dummy, table.strides if table is not None else dummy,
                part(update) if table is not None else dummy, part(decay) if table is not None else dummy)
        if table is not None:  # the result is the parameters' new values; their old ones are read besides
            traffic = Traffic(product=nbytes(qa, t_) + table.nbytes,
                              extra=table.nbytes + nbytes(*(lv or ()), part(update), part(decay)))
        else:
            traffic = Traffic(product=nbytes(qa, t_, u), extra=nbytes(*(lv or ())))
        launch(_precondition_kernel, (tiles_m * tiles_n, part.size), args,
               dict(LIVE=live is not None, WRITE=table is not None,
                    W_DTYPE=TL_DTYPES[params.dtype] if params is not None else tl.float32, **dots),
               cfg, "precondition", is_aligned, traffic)

    in_chunks(B, run)
    return None if params is not None else out


def reference_precondition(X, Q_a, Q_b, *, live=None, params: ParamTable | None = None, update=None, decay=None,
                           out=None, precision="highest"):
    """:func:`precondition` in torch (the products at ``precision``)."""
    from klkern.runtime._precision import bmm

    U = bmm(Q_a, bmm(X.float(), Q_b.mT, precision), precision)
    if live is not None:
        U = U * live[0][:, :, None] * live[1][:, None, :]
    if params is None:
        if out is None:
            return U
        out.copy_(U)
        return out
    for b, view in enumerate(params.views):
        w = view.float() + update[b] * U[b]
        view.copy_(w + decay[b] * w)
    return None
