"""The eigenbasis refreshes due at a step (SPEC step 6), run on the stacks of a device plan after
the update is written: every basis at ``t % precondition_frequency == 0``, or with
``stagger_refresh`` the blocks whose own schedule (klkern/engine/_schedule.py) falls on the step. The
refresh of a block is klkern/algorithms/_functional.py's ``refresh_`` (or the idealized mode's exact one).
"""

from __future__ import annotations

import torch

from ..algorithms import _functional as F
from ..algorithms import _stacked
from ..runtime import _precision
from ._plan import DevicePlan

__all__ = ["refresh"]


# Refreshes choose their blocks with a host read of keep where it costs nothing (the CPU: the
# refresh then runs in place on the stacked state when every block stepped); on a GPU every
# due block is refreshed on a copy and the result kept only where the block stepped.
SELECT_ON_DEVICE = ("cuda",)


def refresh(plan: DevicePlan, hps: dict, kernels: dict | None = None) -> bool:
    """The eigenbasis refreshes due at this step (Shampoo's roots were refreshed inside its
    update), on the blocks that stepped; with stagger_refresh only the blocks whose own
    schedule falls on this step, each with its own clock (t + offset) for the periodic QR.
    A stack that runs on the kernels (``kernels[id(st)]``) does its refresh's float32-accurate
    products with them (3xTF32 on tensor cores)."""
    due = [st for st in plan.stacks if st.refresh and st.algorithm.eigenbasis]
    if not due:
        return False
    on_device = plan.device.type in SELECT_ON_DEVICE
    keeps = None if on_device else torch.cat([st.keep for st in due]).tolist()
    offset = 0
    for st in due:
        hp, period = hps[id(st)], hps[id(st)].precondition_frequency
        if st.offsets is None:
            clocks = {st.t: list(range(st.B))}
        else:
            clocks = {}
            for b in st.due:  # blocks that share (t + offset) // T share the periodic QR's turn
                clocks.setdefault(st.t + st.offsets[b], []).append(b)
        kept = None if keeps is None else keeps[offset: offset + st.B]
        offset += st.B
        for clock, blocks in clocks.items():
            chosen = blocks if kept is None else [b for b in blocks if kept[b]]
            if not chosen:
                continue
            index = None if len(chosen) == st.B else torch.tensor(chosen, dtype=torch.long, device=plan.device)
            if st.algorithm.exact_mode(hp):
                direct = (clock // period) % F.REORTHOGONALIZE_EVERY == 0

                def fn(bufs, st=st, hp=hp, direct=direct):
                    F._refresh_exact(bufs, st.mask, _stacked._bases(bufs, st.mask), hp.eigval_clamp,
                                     direct=direct)
            else:
                def fn(bufs, st=st, hp=hp, clock=clock):
                    F.refresh_(bufs, st.mask, hp, clock, sort_v=st.algorithm.sorts_basis)
            keep = st.keep if on_device else None
            if kernels and kernels.get(id(st)) is not None:
                from ..algorithms import _triton_path

                with _precision.exact_products(_triton_path.exact_product):
                    F.on_blocks_(st.bufs, index, fn, keep=keep)
            else:
                F.on_blocks_(st.bufs, index, fn, keep=keep)
    return True
