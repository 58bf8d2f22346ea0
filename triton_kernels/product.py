"""The plain batched product ``C[b] = A[b] @ B[b]``, and what every launcher here shares.

:func:`batched_product` is the product with nothing fused: the first half of the rotation and of
the preconditioning (``T = G Q_b``, ``T = X Q_b^T``, whose result only feeds the fused second
half), Shampoo's ``L_root M R_root``, and a fp32-accurate product for the refresh (``"highest"``:
3xTF32 on tensor cores). Its torch reference is :func:`reference_product`.

Also here: :class:`ParamTable` (where a fused epilogue writes the parameters), the chunking of
stacks larger than a grid's y dimension, and the operand checks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import Traffic, aligned, dot_constexprs, launch, nbytes, pick_tiles, run_tiles
from ._product import tile_of, tile_product

# CUDA's limit on a grid's y dimension, which indexes the blocks of a stack: larger stacks are
# launched in chunks of this many blocks.
MAX_GRID_Y = 65535

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _product_kernel(A, B, C, M, N, K, s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
                    DOT: tl.constexpr, EMULATE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows, cols = tile_of(tl.program_id(0), N, BLOCK_M, BLOCK_N)
    acc = tile_product(A + b * s_ab, B + b * s_bb, A, rows, cols, M, N, K, s_am, s_ak, s_bk, s_bn,
                       False, DOT, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(C + b * s_cb + rows[:, None] * s_cm + cols[None, :] * s_cn, acc.to(C.dtype.element_ty), mask=mask)


def strides3(t: torch.Tensor) -> tuple:
    return (t.stride(0), t.stride(1), t.stride(2))


def product_tiles(M: int, N: int, K: int, precision: str, *tensors, table: str = "product"):
    """(DOT/EMULATE constexprs, GPU tile config, aligned, tiles_m, tiles_n) of a product launch."""
    dots = dot_constexprs(precision)
    is_aligned = aligned(M, N, K, *(s for t in tensors if t is not None for s in t.stride()))
    cfg = pick_tiles(table, dots["DOT"], min(M, N), is_aligned, tensors[0].device)
    run = run_tiles(cfg)
    return dots, cfg, is_aligned, triton.cdiv(M, run["BLOCK_M"]), triton.cdiv(N, run["BLOCK_N"])


class Chunk:
    """Blocks ``lo:hi`` of a stack of ``batch``; calling it on a stack gives its part (the stack
    itself when the chunk is all of it: no view is dispatched)."""

    def __init__(self, lo: int, hi: int, batch: int):
        self.lo, self.hi, self.batch = lo, hi, batch

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def __call__(self, t):
        if t is None or (self.lo == 0 and self.hi == self.batch):
            return t
        return t[self.lo:self.hi]


def in_chunks(batch: int, fn) -> None:
    """``fn(chunk)`` over the stack in pieces of at most MAX_GRID_Y blocks (one in practice)."""
    for lo in range(0, batch, MAX_GRID_Y):
        fn(Chunk(lo, min(lo + MAX_GRID_Y, batch), batch))


def batched_product(A: torch.Tensor, B: torch.Tensor, *, out: torch.Tensor | None = None,
                    transpose_a: bool = False, transpose_b: bool = False, precision: str = "highest",
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``C[b] = A[b] @ B[b]`` (``A^T``/``B^T`` with ``transpose_a``/``transpose_b``, free: strides).

    A: (Bt, M, K), B: (Bt, K, N), float32/bfloat16/float16; returns C (Bt, M, N) in ``out`` or a
    new tensor of ``out_dtype``. ``precision`` ("highest": fp32-accurate; "high": TF32 operands;
    "medium": bf16 operands) sets the product's arithmetic; accumulation is fp32.
    """
    At = A.transpose(1, 2) if transpose_a else A
    Bm = B.transpose(1, 2) if transpose_b else B
    if At.dim() != 3 or Bm.dim() != 3 or Bm.shape[0] != At.shape[0] or Bm.shape[1] != At.shape[2]:
        raise ValueError(f"batched_product: shapes {tuple(At.shape)} @ {tuple(Bm.shape)} do not match")
    batch, M, K = At.shape
    N = Bm.shape[2]
    if out is None:
        out = torch.empty(batch, M, N, dtype=out_dtype, device=A.device)
    elif tuple(out.shape) != (batch, M, N):
        raise ValueError(f"batched_product: out has shape {tuple(out.shape)}, expected {(batch, M, N)}")
    dots, cfg, is_aligned, tiles_m, tiles_n = product_tiles(M, N, K, precision, At, Bm, out)

    def run(part):
        a, b, c = part(At), part(Bm), part(out)
        launch(_product_kernel, (tiles_m * tiles_n, part.size),
               (a, b, c, M, N, K, *strides3(a), *strides3(b), *strides3(c)), dots, cfg, "product", is_aligned,
               Traffic(product=nbytes(a, b, c)))

    in_chunks(batch, run)
    return out


def reference_product(A, B, *, transpose_a=False, transpose_b=False, precision="highest",
                      out_dtype=torch.float32) -> torch.Tensor:
    """:func:`batched_product` in torch (the products at ``precision`` as klkern's torch path runs them)."""
    from klkern.runtime._precision import bmm

    At = A.transpose(1, 2) if transpose_a else A
    Bm = B.transpose(1, 2) if transpose_b else B
    return bmm(At, Bm, precision).to(out_dtype)


class ParamTable:
    """Where a fused epilogue writes the update: one 2-D view of a parameter per block.

    ``views`` are views (not copies) of the parameters, all of one shape and dtype (float32,
    bfloat16 or float16), on one device. The kernel writes ``W + u U`` and then adds ``d`` times
    that (SPEC step 8) into them, in their dtype; the pointer table keeps the parameters alive
    only as long as this object (the caller holds the parameters anyway).
    """

    def __init__(self, views: list):
        first = views[0]
        if first.dim() != 2 or any(v.shape != first.shape or v.dtype != first.dtype for v in views):
            raise ValueError("ParamTable: views must be 2-D and share shape and dtype")
        if first.dtype not in TL_DTYPES:
            raise ValueError(f"ParamTable: parameter dtype {first.dtype} not supported")
        if any(v.device != first.device for v in views):
            raise ValueError("ParamTable: views must be on one device")
        self.views = views
        self.shape = tuple(first.shape)
        self.dtype = first.dtype
        self.device = first.device
        self.ptrs, self.strides = _pointer_table(first.device, tuple(v.data_ptr() for v in views),
                                                 tuple(s for v in views for s in v.stride()))

    def __len__(self) -> int:
        return len(self.views)

    def part(self, chunk) -> "ParamTable":
        return self if (chunk.lo, chunk.hi) == (0, len(self.views)) else ParamTable(self.views[chunk.lo:chunk.hi])

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.views)


# Device copies of pointer tables, keyed by their contents: a plan builds the same tables every
# time (parameters do not move), and building one on the device is a host-to-device copy. A hit
# is always right (the key is the table); bounded in size.
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


def check_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, the stack on {device}: pass every tensor on one device")
