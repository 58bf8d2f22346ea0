"""When each block's eigenbasis is refreshed: every T steps together, or staggered.

SPEC step 6 refreshes every basis at ``t % precondition_frequency == 0``: every T-th step does
all the refresh work at once (on a GPU, a step tens of times the others), the rest none. With
``stagger_refresh=True`` each block keeps the period T but gets its own offset s in [0, T) and
is refreshed at the steps where ``(t + s) % T == 0``; the offsets spread the refresh work evenly
over the T steps of a period: blocks are dealt, largest refresh first (the sum of d^3 over its
preconditioned modes), onto the slot with the least work so far (ties: the lower slot), in the
order of the group's parameters and their blocks. The offsets follow from the group's shapes and
options alone, so a resumed run (or another rank) computes the same schedule. Offset 0 for every
block is the SPEC's schedule.
"""

from __future__ import annotations

from ..algorithms._blocking import plan_for
from ..distributed._distributed import assign, local

__all__ = ["refresh_offsets", "due"]

_CACHE: dict = {}


def refresh_offsets(group: dict) -> dict:
    """{(id(param), block index): offset} for the group's preconditioned blocks; {} when the
    group refreshes every basis together (``stagger_refresh`` off)."""
    if not group.get("stagger_refresh"):
        return {}
    period = group["precondition_frequency"]
    params = group["params"]
    key = (id(group), period, tuple(id(p) for p in params),
           tuple(group.get(k) for k in ("merge_dims", "max_precond_dim", "block_size", "precondition_1d",
                                        "data_format", "large_dim_policy")))
    if key in _CACHE:
        return _CACHE[key]
    units, costs = [], []
    for p in params:
        plan = plan_for(local(p).shape, group)
        if plan.adamw:
            continue
        for i, mask in enumerate(plan.masks):
            units.append((id(p), i))
            costs.append(float(sum(d**3 for d, on in zip(plan.block_shape(i), mask) if on)))
    offsets = dict(zip(units, assign(costs, period))) if units else {}
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = offsets
    return offsets


def due(t: int, offset: int, period: int) -> bool:
    """Whether a block with this offset is refreshed at step t."""
    return (t + offset) % period == 0
