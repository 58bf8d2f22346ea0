"""Fused operation: the AdamW path of every member of a stack, one launch, each element touched once.

The parameters that take the AdamW path (1-D parameters, modes above ``max_precond_dim``; SPEC
"Parameters that are not matrices") step as one flat vector: their gradients ``G`` gathered, their
moments ``m``, ``v`` flat state. Per element, with ``keep`` per member (False: the member does not
step and nothing of it is written):

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
    W <- W + u m / (sqrt(v) + eps);  W <- W + d W

(``u = -lr`` times the algorithm's step factor, ``d = -lr * weight_decay``: 0-d float32 tensors
on the device), written into the parameters themselves through a pointer table (one entry per
member), so the parameters are neither gathered into a buffer nor copied back. Torch reference:
:func:`reference_adamw`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import STATE_DTYPES, Traffic, check_stack, launch, nbytes, pick_tiles, run_tiles
from .product import TL_DTYPES, _pointer_table, check_device


@triton.jit
def _adamw_kernel(G, MOM, V, KEEP, CHUNKS, PTRS, STARTS, UPDATE, DECAY, beta1, beta2, eps,
                  DECAYS: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    member = tl.load(CHUNKS + 2 * pid)
    offset = tl.load(CHUNKS + 2 * pid + 1).to(tl.int64)  # within the member
    start = tl.load(STARTS + member)  # the member's first entry in the flat vector
    size = tl.load(STARTS + member + 1) - start
    idx = offset + tl.arange(0, BLOCK_E)
    ok = idx < size
    if tl.load(KEEP + member):
        flat = start + idx
        g = tl.load(G + flat, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(MOM + flat, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(V + flat, mask=ok, other=0.0).to(tl.float32)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        tl.store(MOM + flat, m.to(MOM.dtype.element_ty), mask=ok)
        tl.store(V + flat, v.to(V.dtype.element_ty), mask=ok)
        w_ptrs = tl.load(PTRS + member).to(tl.pointer_type(W_DTYPE)) + idx
        w = tl.load(w_ptrs, mask=ok, other=0.0).to(tl.float32)
        w = w + tl.load(UPDATE) * (m / (tl.sqrt(v) + eps))
        if DECAYS:
            w = w + tl.load(DECAY) * w
        tl.store(w_ptrs, w.to(W_DTYPE), mask=ok)


class FlatMembers:
    """The members of a flat AdamW stack: their parameters (contiguous, one dtype) and where each
    starts in the flat vector, with the chunk table of a launch (made once per plan)."""

    def __init__(self, params: list):
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device or not p.is_contiguous() for p in params):
            raise ValueError("FlatMembers: parameters must be contiguous and share dtype and device")
        if first.dtype not in TL_DTYPES:
            raise ValueError(f"FlatMembers: parameter dtype {first.dtype} not supported")
        self.params = params
        self.dtype = first.dtype
        self.device = first.device
        sizes = [p.numel() for p in params]
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        self.numel = starts[-1]
        self.ptrs, _ = _pointer_table(first.device, tuple(p.data_ptr() for p in params), ())
        self.starts = torch.tensor(starts, dtype=torch.int64, device=first.device)
        self._chunks: dict = {}
        self._sizes = sizes

    def chunks(self, block: int) -> torch.Tensor:
        """(member, offset) of every chunk of ``block`` entries, flattened int64."""
        if block not in self._chunks:
            pairs = [(j, o) for j, n in enumerate(self._sizes) for o in range(0, n, block)]
            self._chunks[block] = torch.tensor(pairs, dtype=torch.int64, device=self.device).reshape(-1)
        return self._chunks[block]

    @property
    def nbytes(self) -> int:
        return self.numel * self.params[0].element_size()


def adamw_(G: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, keep: torch.Tensor,
           members: FlatMembers, *, beta1: float, beta2: float, eps: float, update: torch.Tensor,
           decay: torch.Tensor | None) -> None:
    """In place: the AdamW step of every member (module doc).

    G: (N,) float32 (the members' gradients, flat); exp_avg, exp_avg_sq: (N,) float32/bfloat16;
    keep: (members,) bool; members: the parameters (their sizes summing to N); update, decay:
    0-d float32 tensors (decay None: no weight decay).
    """
    N = members.numel
    check_stack("G", G, (N,))
    check_stack("exp_avg", exp_avg, (N,), STATE_DTYPES)
    check_stack("exp_avg_sq", exp_avg_sq, (N,), STATE_DTYPES)
    check_stack("keep", keep, (len(members.params),), (torch.bool,))
    check_device(members.device, G=G, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, keep=keep, update=update,
                 decay=decay)
    cfg = pick_tiles("adamw", "ieee", N, True)
    chunks = members.chunks(run_tiles(cfg)["BLOCK_E"])
    args = (G, exp_avg, exp_avg_sq, keep, chunks, members.ptrs, members.starts, update,
            decay if decay is not None else update, float(beta1), float(beta2), float(eps))
    traffic = Traffic(extra=nbytes(G) + 2 * nbytes(exp_avg, exp_avg_sq) + 2 * members.nbytes
                      + nbytes(keep, chunks, members.ptrs, members.starts))
    launch(_adamw_kernel, (chunks.numel() // 2,), args,
           dict(DECAYS=decay is not None, W_DTYPE=TL_DTYPES[members.dtype]), cfg, "adamw", True, traffic)


def reference_adamw(G, exp_avg, exp_avg_sq, keep, members: FlatMembers, *, beta1, beta2, eps, update, decay) -> None:
    """:func:`adamw_` in torch."""
    offset = 0
    for j, p in enumerate(members.params):
        n = p.numel()
        if bool(keep[j]):
            part = slice(offset, offset + n)
            g = G[part].float()
            m = beta1 * exp_avg[part].float() + (1 - beta1) * g
            v = beta2 * exp_avg_sq[part].float() + (1 - beta2) * g * g
            exp_avg[part] = m
            exp_avg_sq[part] = v
            w = p.detach().reshape(-1).float() + update * (m / (v.sqrt() + eps))
            if decay is not None:
                w = w + decay * w
            p.detach().copy_(w.view(p.shape))
        offset += n
