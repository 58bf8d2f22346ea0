"""Batched matrix product with the fused prologues and epilogues of the optimizer step.

One kernel, ``_gemm_kernel``, computes ``C[b] = P(A[b]) @ B[b]`` for a stack
of same-shape blocks in one launch (grid: output tiles x batch), in fp32
accumulation. Operands are addressed through strides, so transposes
(``Q^T``) cost nothing. What happens around the product is chosen by
constexpr flags, so each variant compiles to straight-line code:

prologue on A (applied to every A tile as it is loaded):
  * ``PRO_KL``: ``A_ij / (sqrt(lam_a_i * lam_b_j) + eps)`` (KL-Shampoo's D),
  * ``PRO_ADAM``: ``A_ij / (sqrt(V_ij) + eps)`` (SOAP/KL-SOAP direction m / (sqrt(v) + eps)).
the product itself (``DOT``, see _config.py): "ieee" true fp32, "tf32" or
"bf16" operands on tensor cores; the prologue math is fp32 before the cast.
epilogue on the output tile (``Gr`` when this is the second rotation product):
  * ``STORE_C``: write C,
  * ``HAS_MOM``: ``MOM <- beta1 MOM + (1 - beta1) C`` (rotated momentum / first moment),
  * ``HAS_V2``: ``V2 <- beta2 V2 + (1 - beta2) C^2`` (rotated second moment),
  * ``HAS_PROJ``: per-tile partial sums of the diagonal eigenvalue projection,
    ``sum_j C_ij^2 / lam_b_j`` per row and ``sum_i C_ij^2 / lam_a_i`` per
    column, written to (B, M, tiles_n) and (B, N, tiles_m) buffers that the
    caller sums (deterministic, no atomics),
  * ``EPI_PARAM``: the parameter update ``W <- (W - step * C) * decay`` on the
    parameter itself, found through a table of data pointers and strides
    (one entry per block: blocks of different parameters share a launch),
    in the parameter's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import aligned, dot_constexprs, launch, pick_tiles, run_tiles

PRO_NONE, PRO_KL, PRO_ADAM = 0, 1, 2

# CUDA's limit on a grid's y dimension, which indexes the blocks of a stack: larger stacks are
# launched in chunks of this many blocks.
MAX_GRID_Y = 65535

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def dot_operand(x, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """A tile as the product consumes it: fp32 ("ieee"/"tf32") or bf16; under EMULATE
    (the interpreter) rounded to bf16 / TF32 with integer arithmetic and held in fp32
    (the interpreter's own fp32 -> bf16 conversion truncates; a GPU rounds to nearest even)."""
    if DOT == "bf16":
        if EMULATE:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = x.to(tl.bfloat16)
    else:
        x = x.to(tl.float32)
        if DOT == "tf32":
            if EMULATE:  # cvt.rna.tf32.f32: round to nearest, ties away from zero
                bits = x.to(tl.uint32, bitcast=True)
                x = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def dot_acc(a, b, acc, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b with operands from :func:`dot_operand`."""
    if EMULATE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == "bf16":
        acc = tl.dot(a, b, acc)
    elif DOT == "tf32":
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _gemm_kernel(
    A, B, C, M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
    LAM_A, LAM_B, s_lab, s_lbb, V, s_vb, s_vm, s_vk, eps,
    MOM, s_mb, s_mm, s_mn, beta1,
    V2, s_2b, s_2m, s_2n, beta2,
    INV_A, INV_B, s_iab, s_ibb, PROW, PCOL, tiles_m, tiles_n,
    PTRS, PSTRIDES, step, decay,
    PRO: tl.constexpr, STORE_C: tl.constexpr, HAS_MOM: tl.constexpr, HAS_V2: tl.constexpr,
    HAS_PROJ: tl.constexpr, EPI_PARAM: tl.constexpr, W_DTYPE: tl.constexpr,
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
    if PRO == 1:
        lam_row = tl.load(LAM_A + b * s_lab + rows, mask=row_ok, other=1.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(A + b * s_ab + rows[:, None] * s_am + ks[None, :] * s_ak, mask=a_mask, other=0.0)
        if PRO == 1:
            lam_col = tl.load(LAM_B + b * s_lbb + ks, mask=k_ok, other=1.0)
            a = a.to(tl.float32) / (tl.sqrt(lam_row[:, None] * lam_col[None, :]) + eps)
        if PRO == 2:
            v = tl.load(V + b * s_vb + rows[:, None] * s_vm + ks[None, :] * s_vk, mask=a_mask, other=0.0)
            a = a.to(tl.float32) / (tl.sqrt(v.to(tl.float32)) + eps)
        bt = tl.load(B + b * s_bb + ks[:, None] * s_bk + cols[None, :] * s_bn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(dot_operand(a, DOT, EMULATE), dot_operand(bt, DOT, EMULATE), acc, DOT, EMULATE)

    out_mask = row_ok[:, None] & col_ok[None, :]
    if STORE_C:
        c_ptrs = C + b * s_cb + rows[:, None] * s_cm + cols[None, :] * s_cn
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=out_mask)
    if HAS_MOM:
        m_ptrs = MOM + b * s_mb + rows[:, None] * s_mm + cols[None, :] * s_mn
        mom = tl.load(m_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        mom = beta1 * mom + (1.0 - beta1) * acc
        tl.store(m_ptrs, mom.to(MOM.dtype.element_ty), mask=out_mask)
    if HAS_V2:
        v_ptrs = V2 + b * s_2b + rows[:, None] * s_2m + cols[None, :] * s_2n
        v2 = tl.load(v_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        v2 = beta2 * v2 + (1.0 - beta2) * acc * acc
        tl.store(v_ptrs, v2.to(V2.dtype.element_ty), mask=out_mask)
    if HAS_PROJ:
        inv_a = tl.load(INV_A + b * s_iab + rows, mask=row_ok, other=0.0)
        inv_b = tl.load(INV_B + b * s_ibb + cols, mask=col_ok, other=0.0)
        sq = acc * acc
        row_part = tl.sum(sq * inv_b[None, :], axis=1)
        col_part = tl.sum(sq * inv_a[:, None], axis=0)
        tl.store(PROW + (b * M + rows) * tiles_n + pid_n, row_part, mask=row_ok)
        tl.store(PCOL + (b * N + cols) * tiles_m + pid_m, col_part, mask=col_ok)
    if EPI_PARAM:
        w_base = tl.load(PTRS + b).to(tl.pointer_type(W_DTYPE))
        w_rs = tl.load(PSTRIDES + 2 * b)
        w_cs = tl.load(PSTRIDES + 2 * b + 1)
        w_ptrs = w_base + rows[:, None] * w_rs + cols[None, :] * w_cs
        w = tl.load(w_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        w = (w - step * acc) * decay
        tl.store(w_ptrs, w.to(W_DTYPE), mask=out_mask)


class ParamTable:
    """Where the rows of a stacked update go: one 2-D view of a parameter per block.

    ``views`` are views (not copies) of the parameters, all of one shape and
    dtype, on one device. The kernel writes ``(W - step * U) * decay`` into
    them; the pointer table keeps the parameters alive only as long as this
    object (the caller holds the parameters anyway).
    """

    def __init__(self, views: list):
        first = views[0]
        if first.dim() != 2 or any(v.shape != first.shape or v.dtype != first.dtype for v in views):
            raise ValueError("ParamTable: views must be 2-D and share shape and dtype")
        if first.dtype not in _TL_DTYPES:
            raise ValueError(f"ParamTable: parameter dtype {first.dtype} not supported")
        self.views = views
        self.shape = tuple(first.shape)
        self.dtype = first.dtype
        self.ptrs, self.strides = _pointer_table(first.device, tuple(v.data_ptr() for v in views),
                                                 tuple(s for v in views for s in v.stride()))


# Device copies of pointer tables, keyed by their contents: a step builds the same tables
# every time (parameters do not move), and building one on the device is a synchronising
# host-to-device copy. A hit is always right (the key is the table); bounded in size.
_TABLES: dict = {}
_TABLES_MAX = 4096


def _pointer_table(device, ptrs: tuple, strides: tuple):
    key = (str(device), ptrs, strides)
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        hit = (torch.tensor(ptrs, dtype=torch.int64, device=device),
               torch.tensor(strides, dtype=torch.int64, device=device))
        _TABLES[key] = hit
    return hit


def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2))


def batched_gemm(A, B, *, out=None, transpose_a=False, transpose_b=False, prologue=PRO_NONE,
                 lam_a=None, lam_b=None, v=None, eps=0.0, momentum=None, beta1=0.0,
                 second_moment=None, beta2=0.0, proj_inv=None, params: ParamTable | None = None,
                 step=0.0, decay=1.0, precision="highest"):
    """``P(A) @ B`` per batch element with the fused prologue/epilogue (see module doc).

    A: (Bt, M, K) (or (Bt, K, M) with ``transpose_a``), B: (Bt, K, N) (or
    (Bt, N, K) with ``transpose_b``). ``precision`` ("highest", "high",
    "medium") sets the product's operands (SPEC "Precision"). Returns ``out``
    (written when given), and with ``proj_inv=(inv_a, inv_b)`` also the
    projection sums ``(row_sums (Bt, M), col_sums (Bt, N))``.
    """
    if A.shape[0] > MAX_GRID_Y:  # the batch is the grid's y dimension: launch it in chunks
        def cut(t, lo, hi):
            return None if t is None else t[lo:hi]

        sums = []
        for lo in range(0, A.shape[0], MAX_GRID_Y):
            hi = min(lo + MAX_GRID_Y, A.shape[0])
            part = batched_gemm(
                A[lo:hi], B[lo:hi], out=cut(out, lo, hi), transpose_a=transpose_a, transpose_b=transpose_b,
                prologue=prologue, lam_a=cut(lam_a, lo, hi), lam_b=cut(lam_b, lo, hi), v=cut(v, lo, hi), eps=eps,
                momentum=cut(momentum, lo, hi), beta1=beta1, second_moment=cut(second_moment, lo, hi),
                beta2=beta2, proj_inv=None if proj_inv is None else tuple(t[lo:hi] for t in proj_inv),
                params=None if params is None else ParamTable(params.views[lo:hi]), step=step, decay=decay,
                precision=precision)
            if proj_inv is not None:
                sums.append(part[1])
        if proj_inv is not None:
            return out, (torch.cat([r for r, _ in sums]), torch.cat([c for _, c in sums]))
        return out
    At = A.transpose(1, 2) if transpose_a else A
    Bm = B.transpose(1, 2) if transpose_b else B
    batch, M, K = At.shape
    if Bm.shape[0] != batch or Bm.shape[1] != K:
        raise ValueError(f"batched_gemm: shapes {tuple(At.shape)} @ {tuple(Bm.shape)} do not match")
    N = Bm.shape[2]
    dots = dot_constexprs(precision)
    dummy = At  # never dereferenced when its flag is off
    zero3 = (0, 0, 0)
    vt = v.transpose(1, 2) if (v is not None and transpose_a) else v
    strides = [*_strides3(At), *_strides3(Bm)] + [
        s for t in (out, vt, momentum, second_moment) if t is not None for s in _strides3(t)] + [
        t.stride(0) for t in (lam_a, lam_b) + (tuple(proj_inv) if proj_inv is not None else ()) if t is not None]
    is_aligned = aligned(M, N, K, *strides)
    cfg = pick_tiles("gemm", dots["DOT"], min(M, N), is_aligned)
    if prologue == PRO_KL and (lam_a is None or lam_b is None):
        raise ValueError("batched_gemm: prologue PRO_KL needs lam_a and lam_b")
    if prologue == PRO_ADAM and (v is None or v.shape != At.shape):
        raise ValueError("batched_gemm: prologue PRO_ADAM needs v of A's shape")
    run = run_tiles(cfg)
    tiles_m, tiles_n = triton.cdiv(M, run["BLOCK_M"]), triton.cdiv(N, run["BLOCK_N"])
    if proj_inv is not None:
        row_part = torch.empty(batch, M, tiles_n, dtype=torch.float32, device=A.device)
        col_part = torch.empty(batch, N, tiles_m, dtype=torch.float32, device=A.device)
    args = (
        At, Bm, out if out is not None else dummy, M, N, K,
        *_strides3(At), *_strides3(Bm), *(_strides3(out) if out is not None else zero3),
        lam_a if lam_a is not None else dummy, lam_b if lam_b is not None else dummy,
        lam_a.stride(0) if lam_a is not None else 0, lam_b.stride(0) if lam_b is not None else 0,
        vt if vt is not None else dummy, *(_strides3(vt) if vt is not None else zero3), float(eps),
        momentum if momentum is not None else dummy,
        *(_strides3(momentum) if momentum is not None else zero3), float(beta1),
        second_moment if second_moment is not None else dummy,
        *(_strides3(second_moment) if second_moment is not None else zero3), float(beta2),
        proj_inv[0] if proj_inv is not None else dummy, proj_inv[1] if proj_inv is not None else dummy,
        proj_inv[0].stride(0) if proj_inv is not None else 0, proj_inv[1].stride(0) if proj_inv is not None else 0,
        row_part if proj_inv is not None else dummy, col_part if proj_inv is not None else dummy,
        tiles_m, tiles_n,
        params.ptrs if params is not None else dummy, params.strides if params is not None else dummy,
        float(step), float(decay),
    )
    constexprs = dict(
        PRO=prologue, STORE_C=out is not None, HAS_MOM=momentum is not None,
        HAS_V2=second_moment is not None, HAS_PROJ=proj_inv is not None, EPI_PARAM=params is not None,
        W_DTYPE=_TL_DTYPES[params.dtype] if params is not None else tl.float32, **dots,
    )
    launch(_gemm_kernel, (tiles_m * tiles_n, batch), args, constexprs, cfg, "gemm", is_aligned)
    if proj_inv is not None:
        row_sums, col_sums = row_part.sum(-1), col_part.sum(-1)
        return out, (row_sums, col_sums)
    return out
