"""Tile sizes and precision settings shared by klkern's Triton kernels.

One documented table instead of autotuning: ``triton.autotune`` with more
than one config does not run under ``TRITON_INTERPRET=1``, which is how CI
exercises these kernels, and a table keeps launches reproducible.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Factor and eigenvalue math: true fp32 products. TF32 (10-bit mantissa)
# turns small KL eigenvalue estimates negative.
FACTOR_PRECISION = "ieee"


def rotation_precision() -> str:
    """Precision of the rotation products (Q^T G Q and Q (.) Q^T).

    "ieee" (default) or "tf32" through KLKERN_ROTATION_PRECISION=tf32: a
    documented opt-in that trades accuracy of the update direction for speed;
    the factor EMA always stays in ieee.
    """
    value = os.environ.get("KLKERN_ROTATION_PRECISION", "ieee")
    if value not in ("ieee", "tf32"):
        raise ValueError(f"KLKERN_ROTATION_PRECISION={value!r}: must be 'ieee' or 'tf32'")
    return value


def gemm_tiles(m: int, n: int, k: int) -> dict:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an (m x k) @ (k x n) product."""
    if INTERPRET:  # few, large programs: the interpreter costs ~1.5 ms per program
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if min(m, n) >= 1024:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)


def syrk_tiles(d: int, k: int) -> dict:
    if INTERPRET:
        return dict(BLOCK=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if d >= 1024:
        return dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK=64, BLOCK_K=32, num_warps=4, num_stages=3)


# dtypes of state the kernels read and write (bases, factors, moments); lam is float32.
STATE_DTYPES = (torch.float32, torch.bfloat16)


def check_stack(name: str, t: torch.Tensor, shape: tuple, dtypes=(torch.float32,)) -> None:
    """Launcher input check: a (B, ...) stack of the expected shape and dtype on one device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of {list(dtypes)}")
