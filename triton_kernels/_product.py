"""The product every fused operation is built on: one output tile of ``A[b] @ B[b]``.

:func:`tile_product` runs the K loop of one (BLOCK_M, BLOCK_N) output tile of a batched product
whose operands are addressed through strides (a transpose costs nothing), accumulating in fp32,
and returns the tile in registers; each fused operation (rotate.py, factor_ema.py,
precondition.py, product.py) adds its own epilogue. An optional per-column weight of A
(``w_k``, e.g. ``1 / lam`` of the factor EMA) is applied to A's tile in fp32 as it is loaded.

``DOT`` is the product's arithmetic (_config.py maps the optimizer's precision to it):

* ``"ieee"``: true fp32 on the FMA units;
* ``"tf32x3"``: fp32-accurate on tensor cores: each fp32 operand split into a TF32 part and a
  TF32 remainder, three TF32 products summed (``lo*hi + hi*lo + hi*hi``; the ``lo*lo`` term is
  below fp32's rounding), so the result's error is that of an fp32 product up to a small factor
  (tests/test_triton.py measures it against float64);
* ``"tf32"``: TF32 operands (10-bit mantissa), tensor cores;
* ``"bf16"``: bf16 operands, tensor cores.

Under the interpreter ``tl.dot`` is numpy's fp32 product whatever ``input_precision`` says and
multiplies bf16 wrongly; with ``EMULATE`` the operands are rounded here with integer arithmetic
as the GPU rounds them (bf16: to nearest even; TF32: ``cvt.rna``, to nearest, ties away from
zero) and multiplied in fp32, so the CPU tests measure each mode's rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_tf32(x):
    """fp32 -> the nearest TF32 value (ties away from zero), held in fp32 (cvt.rna.tf32.f32)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), held in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot_operand(x, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """A tile as the product consumes it: bf16 for "bf16", else fp32 (under EMULATE, bf16 and
    TF32 rounded here and held in fp32)."""
    if DOT == "bf16":
        if EMULATE:
            x = round_bf16(x.to(tl.float32))
        else:
            x = x.to(tl.bfloat16)
    else:
        x = x.to(tl.float32)
        if DOT == "tf32":
            if EMULATE:
                x = round_tf32(x)
    return x


@triton.jit
def dot_acc(a, b, acc, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` with operands from :func:`dot_operand`, in ``DOT``'s arithmetic."""
    if EMULATE:
        if DOT == "tf32x3":
            a_hi = round_tf32(a)
            b_hi = round_tf32(b)
            a_lo = round_tf32(a - a_hi)
            b_lo = round_tf32(b - b_hi)
            acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == "bf16":
        acc = tl.dot(a, b, acc)
    elif DOT == "tf32":
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif DOT == "tf32x3":
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def tile_of(pid, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows and columns of output tile ``pid`` (row-major over tiles of an (M, N) result)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@triton.jit
def tile_product(A, B, WK, rows, cols, M, N, K, s_am, s_ak, s_bk, s_bn,
                 HAS_WK: tl.constexpr, DOT: tl.constexpr, EMULATE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile ``A[rows, :] diag(w) @ B[:, cols]`` of one matrix (A, B, WK already offset to it)."""
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * s_am + ks[None, :] * s_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_WK:
            w = tl.load(WK + ks, mask=k_ok, other=0.0)
            a = a.to(tl.float32) * w[None, :]
        b = tl.load(B + ks[:, None] * s_bk + cols[None, :] * s_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(dot_operand(a, DOT, EMULATE), dot_operand(b, DOT, EMULATE), acc, DOT, EMULATE)
    return acc
