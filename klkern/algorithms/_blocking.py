"""How a parameter is cut into preconditioned blocks (shared by every optimizer).

A parameter of shape ``shape`` is seen as follows (SPEC "Parameters that are
not matrices" and the SOAP options):

1. ``data_format="channels_last"`` on a 4-D tensor permutes it (0, 3, 1, 2)
   (an (O, H, W, I) weight is treated as (O, I, H, W)).
2. ``merge_dims`` merges consecutive modes while their product stays at most
   ``max_precond_dim`` (the public SOAP release's rule).
3. A tensor that is then 0-D or 1-D (and ``precondition_1d`` is off) takes the
   AdamW path as one block.
4. ``block_size`` cuts every mode into chunks of at most that size; each block
   is an independent Kronecker problem (the last chunk may be smaller).
5. In each block a mode is preconditioned when its size is at most
   ``max_precond_dim``. A larger mode sends the whole parameter to the AdamW
   path (``large_dim_policy="adamw"``) or is left unrotated, with an identity
   factor and unit eigenvalues (``large_dim_policy="identity"``). A block with
   no preconditioned mode at all takes the AdamW path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["BlockPlan", "PLAN_OPTIONS", "make_plan", "merge_shape", "plan_for"]

_CHANNELS_LAST_PERM = (0, 3, 1, 2)
_CHANNELS_LAST_INV = (0, 2, 3, 1)


def merge_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """Merge consecutive modes while their product is at most ``max_precond_dim``."""
    merged: list[int] = []
    current = 1
    for size in shape:
        product = current * size
        if product > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current = product
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of one parameter.

    ``view_shape`` is the shape the blocks are cut from (after permutation and
    merging); ``blocks[i]`` is a tuple of ``(start, stop)`` per mode of that
    view and ``masks[i]`` says which of its modes are preconditioned.
    ``adamw`` plans have one block covering the flattened parameter.
    """

    shape: tuple[int, ...]
    permute: bool
    view_shape: tuple[int, ...]
    blocks: tuple[tuple[tuple[int, int], ...], ...]
    masks: tuple[tuple[bool, ...], ...]
    adamw: bool

    @property
    def trivial(self) -> bool:
        """One block that is the parameter itself up to a reshape."""
        return not self.permute and len(self.blocks) == 1

    def block_shape(self, i: int) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.blocks[i])

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (parameter-shaped) seen in the block layout (a copy only if needed)."""
        if self.permute:
            tensor = tensor.permute(_CHANNELS_LAST_PERM)
        return tensor.reshape(self.view_shape)

    def extract(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of a parameter-shaped tensor, in plan order."""
        view = self.view(tensor)
        return [view[tuple(slice(a, b) for a, b in block)] for block in self.blocks]

    def blocks_are_views(self, tensor: torch.Tensor) -> bool:
        """Whether every block of ``extract(tensor)`` writes into ``tensor`` (no copy in the layout)."""
        return self.trivial or all(writes_into(b, tensor) for b in self.extract(tensor))

    def assemble(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`extract`: a parameter-shaped tensor from its blocks."""
        if self.trivial:
            return blocks[0].reshape(self.shape)
        view = blocks[0].new_empty(self.view_shape)
        for block, piece in zip(self.blocks, blocks):
            view[tuple(slice(a, b) for a, b in block)] = piece
        if self.permute:
            permuted = tuple(self.shape[i] for i in _CHANNELS_LAST_PERM)
            return view.reshape(permuted).permute(_CHANNELS_LAST_INV)
        return view.reshape(self.shape)


def writes_into(block: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether ``block`` (one of ``plan.extract(tensor)``) shares ``tensor``'s storage, so that
    writing the block writes the tensor (False where the block layout made a copy)."""
    return block.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()


def _chunks(size: int, block_size: int | None) -> list[tuple[int, int]]:
    if block_size is None or size <= block_size:
        return [(0, size)]
    return [(start, min(start + block_size, size)) for start in range(0, size, block_size)]


@functools.lru_cache(maxsize=4096)
def make_plan(
    shape: tuple[int, ...],
    *,
    merge_dims: bool,
    max_precond_dim: int,
    block_size: int | None,
    precondition_1d: bool,
    data_format: str,
    large_dim_policy: str,
) -> BlockPlan:
    """The block plan of a parameter of shape ``shape`` (see module docstring)."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    adamw_plan = BlockPlan(shape, False, (numel,), (((0, numel),),), ((False,),), True)
    permute = data_format == "channels_last" and len(shape) == 4
    view_shape = tuple(shape[i] for i in _CHANNELS_LAST_PERM) if permute else shape
    if merge_dims:
        view_shape = merge_shape(view_shape, max_precond_dim)
    if len(view_shape) == 0 or (len(view_shape) == 1 and not precondition_1d) or numel == 0:
        return adamw_plan
    grids = [_chunks(size, block_size) for size in view_shape]
    blocks: list[tuple[tuple[int, int], ...]] = [()]
    for grid in grids:
        blocks = [prev + (chunk,) for prev in blocks for chunk in grid]
    masks = []
    for block in blocks:
        mask = tuple(stop - start <= max_precond_dim for start, stop in block)
        if not any(mask) or (large_dim_policy == "adamw" and not all(mask)):
            return adamw_plan
        masks.append(mask)
    return BlockPlan(shape, permute, view_shape, tuple(blocks), tuple(masks), False)


# The param group options a block plan follows (every argument of make_plan but the shape).
PLAN_OPTIONS = ("merge_dims", "max_precond_dim", "block_size", "precondition_1d", "data_format", "large_dim_policy")


def plan_for(shape, group: dict) -> BlockPlan:
    """The block plan of a parameter of shape ``shape`` under a param group's options."""
    return make_plan(
        tuple(shape),
        merge_dims=group["merge_dims"],
        max_precond_dim=group["max_precond_dim"],
        block_size=group["block_size"],
        precondition_1d=group["precondition_1d"],
        data_format=group["data_format"],
        large_dim_policy=group["large_dim_policy"],
    )
