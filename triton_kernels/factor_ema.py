"""Fused operation: a Kronecker factor's EMA with inverse-eigenvalue weighting, one product.

``R[b] <- beta[b] R[b] + alpha s[b]^2 X[b] diag(w[b]) X[b]^T`` for a stack of blocks (SPEC step
4 in the rotated basis; SOAP's and Shampoo's factor EMAs without weights): the per-block beta
(1 for a block that does not step) and scale in the epilogue, so the old factor is read once
and written once. X (B, d, K) is addressed by strides (so ``Gr`` and ``Gr^T`` are the same
buffer); w (B, K) (``1 / lam`` of the other side for KL-Shampoo/KL-SOAP) is applied to the X
tiles in fp32 as they are loaded; ``s`` is ``spike_threshold``'s factor of the block's gradient.
Only tiles on and below the diagonal are computed (SYRK shape); each off-diagonal tile is
written to its place and its mirror, so the result is exactly symmetric outside the diagonal
tiles. The product's arithmetic follows ``precision`` (_product.py). Torch reference:
:func:`reference_factor_ema`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import STATE_DTYPES, Traffic, aligned, check_stack, dot_constexprs, launch, nbytes, pick_tiles, run_tiles
from ._product import tile_product
from .product import check_device, in_chunks


@triton.jit
def _factor_ema_kernel(
    R, X, W, BETA, SCALE, KEEP, PAIRS, d, K,
    s_rb, s_rm, s_rn, s_xb, s_xd, s_xk, s_wb,
    alpha,
    HAS_W: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_KEEP: tl.constexpr, DOT: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if HAS_KEEP:
        if not tl.load(KEEP + b):  # a block that does not step: its factor is not touched
            return
    ti = tl.load(PAIRS + 2 * pid)
    tj = tl.load(PAIRS + 2 * pid + 1)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    acc = tile_product(X + b * s_xb, X + b * s_xb, W + b * s_wb, rows, cols, d, d, K, s_xd, s_xk, s_xk, s_xd,
                       HAS_W, DOT, EMULATE, BLOCK, BLOCK, BLOCK_K)
    weight = alpha
    if HAS_SCALE:
        s = tl.load(SCALE + b)
        weight = alpha * s * s
    mask = (rows < d)[:, None] & (cols < d)[None, :]
    lower = R + b * s_rb + rows[:, None] * s_rm + cols[None, :] * s_rn
    old = tl.load(lower, mask=mask, other=0.0).to(tl.float32)
    new = (tl.load(BETA + b) * old + weight * acc).to(R.dtype.element_ty)
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
    return dots, pick_tiles("factor_ema", dots["DOT"], d, is_aligned, R.device), is_aligned


def tile_width(R: torch.Tensor, X: torch.Tensor, weights: torch.Tensor | None = None, transpose_x: bool = False,
               precision: str = "highest") -> int:
    """Rows (and columns) per tile of the :func:`factor_ema_` call with these arguments: entries
    whose row and column tiles differ are written exactly symmetric."""
    Xd = X.transpose(1, 2) if transpose_x else X
    return run_tiles(_plan(R, Xd, weights, precision)[1])["BLOCK"]


def factor_ema_(R: torch.Tensor, X: torch.Tensor, weights: torch.Tensor | None, beta, alpha: float,
                scale: torch.Tensor | None = None, keep: torch.Tensor | None = None, transpose_x: bool = False,
                precision: str = "highest") -> torch.Tensor:
    """In place: ``R[b] <- beta[b] R[b] + alpha scale[b]^2 X[b] diag(weights[b]) X[b]^T``.

    R: (B, d, d) float32 or bfloat16 (symmetric); X: (B, d, K) (or (B, K, d) with
    ``transpose_x``: then ``X^T diag(w) X``), float32/bfloat16/float16; weights: (B, K) float32
    or None; beta: (B,) float32 (per block; a float is broadcast); alpha: float; scale: (B,)
    float32 or None (1); keep: (B,) bool or None: a block with False is left exactly as it was
    (not even mirrored); ``precision``: the product's arithmetic ("highest", "high", "medium").
    """
    Xd = X.transpose(1, 2) if transpose_x else X
    if R.dim() != 3 or Xd.dim() != 3 or R.shape[0] != Xd.shape[0] or R.shape[1] != R.shape[2] \
            or R.shape[1] != Xd.shape[1]:
        raise ValueError(f"factor_ema_: R {tuple(R.shape)} does not match X {tuple(Xd.shape)}")
    batch, d, K = Xd.shape
    check_stack("R", R, (batch, d, d), STATE_DTYPES)
    if weights is not None:
        check_stack("weights", weights, (batch, K))
    if not isinstance(beta, torch.Tensor):
        beta = torch.full((batch,), float(beta), dtype=torch.float32, device=R.device)
    check_stack("beta", beta, (batch,))
    if scale is not None:
        check_stack("scale", scale, (batch,))
    if keep is not None:
        check_stack("keep", keep, (batch,), (torch.bool,))
    check_device(R.device, X=X, weights=weights, beta=beta, scale=scale, keep=keep)
    dots, cfg, is_aligned = _plan(R, Xd, weights, precision)
    tiles = triton.cdiv(d, run_tiles(cfg)["BLOCK"])
    pairs = _tile_pairs(tiles, R.device)

    def run(part):
        r, x, w = part(R), part(Xd), part(weights)
        args = (r, x, w if w is not None else x, part(beta), part(scale) if scale is not None else part(beta),
                part(keep) if keep is not None else part(beta), pairs, d, K, *r.stride(), *x.stride(),
                w.stride(0) if w is not None else 0, float(alpha))
        # the product: X once, R written; besides it the lower triangle of the old R, the weights
        lower = (d * (d + 1) // 2) * R.element_size() * part.size
        traffic = Traffic(product=nbytes(x, r), extra=lower + nbytes(w, part(beta)))
        launch(_factor_ema_kernel, (tiles * (tiles + 1) // 2, part.size), args,
               dict(HAS_W=w is not None, HAS_SCALE=scale is not None, HAS_KEEP=keep is not None, **dots), cfg,
               "factor_ema", is_aligned, traffic)

    in_chunks(batch, run)
    return R


def reference_factor_ema(R, X, weights, beta, alpha, scale=None, keep=None, transpose_x=False, precision="highest"):
    """:func:`factor_ema_` in torch (the product at ``precision``), in place."""
    from klkern.runtime._precision import bmm

    Xd = X.transpose(1, 2) if transpose_x else X
    L = Xd.float() if weights is None else Xd.float() * weights[:, None, :]
    batch = R.shape[0]
    beta = beta if isinstance(beta, torch.Tensor) else torch.full((batch,), float(beta), device=R.device)
    weight = alpha * (scale * scale if scale is not None else torch.ones(batch, device=R.device))
    new = beta.view(-1, 1, 1) * R.float() + weight.view(-1, 1, 1) * bmm(L, Xd.float().mT, precision)
    if keep is not None:
        new = torch.where(keep.view(-1, 1, 1), new, R.float())
    R.copy_(new)
    return R
