"""Building a stack (klkern/engine/_plan.py's ``Stack``): its gradient and parameter buffers, the views
the gather and the write-back use, and its members' state stacked into one tensor per name
(a view where the members' state lies consecutive in memory, else a copy kept in step).
"""

from __future__ import annotations

import torch

from ..algorithms._blocking import plan_for, writes_into
from ..algorithms._functional import column_major
from ..distributed import _distributed
from ._stack import Stack

__all__ = ["block_views", "member_target", "stack_state"]


def block_views(stack: Stack, opt) -> None:
    """The stack's G and W buffers and the views the gather and the write-back use."""
    dev = stack.device
    if stack.adamw:
        total = sum(stack.sizes)
        stack.G = torch.zeros(total, dtype=torch.float32, device=dev)
        offsets = [0]
        for n in stack.sizes:
            offsets.append(offsets[-1] + n)
        pieces = [stack.G[a:b] for a, b in zip(offsets, offsets[1:])]
    else:
        stack.G = torch.zeros((stack.B,) + stack.shape, dtype=torch.float32, device=dev)
        pieces = list(stack.G.unbind(0))
    float64 = any(p.dtype == torch.float64 for p, _ in stack.members)
    if float64:  # float64 parameters are not rounded through float32 (SPEC "Precision")
        stack.W = torch.zeros_like(stack.G, dtype=torch.float64)
        w_pieces = (list(stack.W.unbind(0)) if not stack.adamw
                    else [stack.W[a:b] for a, b in zip(offsets, offsets[1:])])
    else:
        stack.W = stack.G
        w_pieces = pieces
    for (p, i), piece, w_piece in zip(stack.members, pieces, w_pieces):
        tensor = _distributed.local(p)
        trivial = plan_for(tensor.shape, stack.group).trivial or stack.adamw
        if trivial:
            stack.g_dst.append(piece.view(tensor.shape))
            stack.sources.append("local" if _distributed.is_dtensor(p) else "grad")
            stack.w_dst.append(w_piece.view(tensor.shape))
        else:
            stack.g_dst.append(piece)
            stack.sources.append("extract")
            stack.w_dst.append(w_piece)
        stack.targets.append(member_target(stack, p, i))
        stack.g_blocks.append(piece)


def member_target(stack: Stack, p, i: int):
    """What the write-back writes block ``i`` of ``p`` into: the parameter, or its block as a
    view of it; None where the block layout copies (the write-back assembles the parameter)."""
    tensor = _distributed.local(p)
    plan = plan_for(tensor.shape, stack.group)
    if plan.trivial or stack.adamw:
        return tensor.detach()
    view = plan.extract(tensor.detach())[i]
    return view if writes_into(view, tensor) else None


def stack_state(stack: Stack) -> None:
    """The members' state in stacked buffers, each block's tensors views into them (kept as they
    are when they already are such views, in this order)."""
    blocks = stack.blocks
    if stack.adamw:
        bufs = {}
        for name in blocks[0]:
            parts = [b[name] for b in blocks]
            flat = torch.cat([t.reshape(-1) for t in parts])
            bufs[name] = flat
            offset = 0
            for b, n in zip(blocks, stack.sizes):
                b[name] = flat[offset: offset + n]
                offset += n
        stack.bufs = bufs
        return
    bufs = {}
    for name in blocks[0]:
        parts = [b[name] for b in blocks]
        base = parts[0]
        shared = (base.dim() >= 1 and all(
            t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for t in parts))
        if shared and _consecutive(parts):
            stacked = _as_stack(parts)
        else:
            stacked = None
        if stacked is None:
            stacked = _stacked(parts)
            for b, view in zip(blocks, stacked.unbind(0)):
                b[name] = view
        bufs[name] = stacked
    stack.bufs = bufs


def _consecutive(parts: list) -> bool:
    """Whether ``parts`` are the consecutive slices [0], [1], ... of one stacked buffer."""
    if not parts:
        return False
    step = parts[0].numel()
    offset = parts[0].storage_offset()
    return all(t.storage_offset() == offset + b * step and t.shape == parts[0].shape and t.stride() == parts[0].stride()
               for b, t in enumerate(parts))


def _as_stack(parts: list) -> torch.Tensor | None:
    """The stacked buffer whose consecutive slices are ``parts`` (a view of their storage)."""
    first = parts[0]
    try:
        whole = torch.empty(0, dtype=first.dtype, device=first.device).set_(
            first.untyped_storage(), first.storage_offset(), (len(parts),) + tuple(first.shape),
            (first.numel(),) + tuple(first.stride()))
    except RuntimeError:
        return None
    return whole


def _stacked(tensors: list) -> torch.Tensor:
    """torch.stack that keeps a column-major layout (the CPU's bases, _functional.column_major)."""
    if column_major(tensors[0]):
        return torch.stack([t.mT for t in tensors]).mT
    return torch.stack(tensors)
