"""Kronecker-factor EMA with inverse-eigenvalue weighting, one triangle computed.

``R[b] <- beta * R[b] + alpha * X[b] diag(w[b]) X[b]^T`` for a stack of
blocks, X (B, d, K) addressed by strides (so ``Gr`` and ``Gr^T`` are the same
buffer), w (B, K) applied to the X tiles as they are loaded (``w = 1/lam`` of
the other side for KL-Shampoo/KL-SOAP; no weights for SOAP and Shampoo).
Only tiles on and below the diagonal are computed (SYRK shape); each
off-diagonal tile is written to both its place and its mirror, so the
result is exactly symmetric outside the diagonal tiles. The EMA reads the
old R tile from the lower triangle (R is symmetric). The product's operands
follow ``precision`` (see _config.py); the weights are applied in fp32 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gemm
from ._config import aligned, dot_constexprs, launch, pick_tiles, run_tiles
from .gemm import dot_acc, dot_operand


@triton.jit
def _factor_ema_kernel(
    R, X, W, PAIRS, d, K,
    s_rb, s_rm, s_rn, s_xb, s_xd, s_xk, s_wb,
    beta, alpha,
    HAS_W: tl.constexpr, DOT: tl.constexpr, EMULATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ti = tl.load(PAIRS + 2 * pid)
    tj = tl.load(PAIRS + 2 * pid + 1)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < d
    col_ok = cols < d
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xi = tl.load(X + b * s_xb + rows[:, None] * s_xd + ks[None, :] * s_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xj = tl.load(X + b * s_xb + ks[:, None] * s_xk + cols[None, :] * s_xd,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_W:
            w = tl.load(W + b * s_wb + ks, mask=k_ok, other=0.0)
            xi = xi.to(tl.float32) * w[None, :]
        acc = dot_acc(dot_operand(xi, DOT, EMULATE), dot_operand(xj, DOT, EMULATE), acc, DOT, EMULATE)
    mask = row_ok[:, None] & col_ok[None, :]
    lower = R + b * s_rb + rows[:, None] * s_rm + cols[None, :] * s_rn
    old = tl.load(lower, mask=mask, other=0.0).to(tl.float32)
    new = (beta * old + alpha * acc).to(R.dtype.element_ty)
    tl.store(lower, new, mask=mask)
    if ti != tj:
        upper = R + b * s_rb + cols[None, :] * s_rm + rows[:, None] * s_rn
        tl.store(upper, new, mask=mask)


_PAIRS: dict = {}


def _tile_pairs(tiles: int, device) -> torch.Tensor:
    """(ti, tj) with ti >= tj for every lower-triangle tile, flattened int32."""
    key = (tiles, str(device))
    if key not in _PAIRS:
        pairs = [(i, j) for i in range(tiles) for j in range(i + 1)]
        _PAIRS[key] = torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1)
    return _PAIRS[key]


def _plan(R, Xd, weights, precision):
    """(DOT/EMULATE constexprs, tile config, aligned) of a launch."""
    dots = dot_constexprs(precision)
    d, K = Xd.shape[1], Xd.shape[2]
    is_aligned = aligned(d, K, *R.stride(), *Xd.stride(), *(weights.stride() if weights is not None else ()))
    return dots, pick_tiles("syrk", dots["DOT"], d, is_aligned), is_aligned


def tile_width(R: torch.Tensor, X: torch.Tensor, weights: torch.Tensor | None = None, transpose_x: bool = False,
               precision: str = "highest") -> int:
    """Rows (and columns) per tile of the :func:`factor_ema_` call with these arguments: entries
    whose row and column tiles differ are written exactly symmetric."""
    Xd = X.transpose(1, 2) if transpose_x else X
    return run_tiles(_plan(R, Xd, weights, precision)[1])["BLOCK"]


def factor_ema_(R: torch.Tensor, X: torch.Tensor, weights: torch.Tensor | None, beta: float,
                alpha: float, transpose_x: bool = False, precision: str = "highest") -> torch.Tensor:
    """In place: ``R <- beta R + alpha X diag(weights) X^T`` per batch element.

    R: (B, d, d) float32 or bfloat16 (symmetric); X: (B, d, K), or (B, K, d)
    with ``transpose_x`` (then ``X^T diag(w) X``); weights: (B, K) float32 or None;
    ``precision``: the product's operands ("highest", "high", "medium").
    """
    if R.dim() == 3 and R.shape[0] > gemm.MAX_GRID_Y:  # the batch is the grid's y dimension
        for lo in range(0, R.shape[0], gemm.MAX_GRID_Y):
            hi = lo + gemm.MAX_GRID_Y
            factor_ema_(R[lo:hi], X[lo:hi], None if weights is None else weights[lo:hi], beta, alpha,
                        transpose_x=transpose_x, precision=precision)
        return R
    Xd = X.transpose(1, 2) if transpose_x else X
    if R.dim() != 3 or Xd.dim() != 3 or R.shape[0] != Xd.shape[0] or R.shape[1] != R.shape[2] \
            or R.shape[1] != Xd.shape[1]:
        raise ValueError(f"factor_ema_: R {tuple(R.shape)} does not match X {tuple(Xd.shape)}")
    batch, d, K = Xd.shape
    if weights is not None and (weights.shape != (batch, K) or weights.dtype != torch.float32):
        raise ValueError(f"factor_ema_: weights must be float32 of shape {(batch, K)}, got "
                         f"{weights.dtype} {tuple(weights.shape)}")
    dots, cfg, is_aligned = _plan(R, Xd, weights, precision)
    tiles = triton.cdiv(d, run_tiles(cfg)["BLOCK"])
    pairs = _tile_pairs(tiles, R.device)
    args = (R, Xd, weights if weights is not None else Xd, pairs, d, K,
            R.stride(0), R.stride(1), R.stride(2), Xd.stride(0), Xd.stride(1), Xd.stride(2),
            weights.stride(0) if weights is not None else 0, float(beta), float(alpha))
    launch(_factor_ema_kernel, (tiles * (tiles + 1) // 2, batch), args, dict(HAS_W=weights is not None, **dots), cfg,
           "syrk", is_aligned)
    return R
