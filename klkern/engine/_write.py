"""The end of a steady step: the guard's check of unbounded groups, ``normalize_grads`` and the
write-back of every stack's update into its parameters (SPEC steps 7 and 8). Called by
klkern/engine/_engine.py's ``StepEngine.steady`` on the device, with no host read.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..algorithms._blocking import plan_for
from ..algorithms._steps import WRITTEN
from ..distributed import _distributed
from . import _guard
from ._plan import DevicePlan

__all__ = ["check_unbounded", "normalize", "write"]


def check_unbounded(plan: DevicePlan) -> None:
    """Stacks of groups whose hyperparameters do not bound the update: each block whose new
    state exceeds STATE_LIMIT or whose update is not finite is restored from the copy taken
    before the step, its update and weight decay masked (klkern/engine/_guard.py)."""
    checked = [st for st in plan.stacks if "before" in st.cache]
    if not checked:
        return
    for st in checked:
        before = st.cache.pop("before")
        if st.adamw:
            sizes = st.cache["sizes"]
            bad_entry = torch.isfinite(st.U).logical_not()
            for name in ("exp_avg", "exp_avg_sq"):
                bad_entry |= st.bufs[name].float().abs() > _guard.STATE_LIMIT
            bad = torch.segment_reduce(bad_entry.float(), "max", lengths=sizes, unsafe=True) > 0
            ok = st.cache["keep"] & bad.logical_not()
            keep_e = torch.repeat_interleave(ok, sizes, output_size=st.shape[0])
            for name, buf in st.bufs.items():
                torch.where(keep_e, buf, before[name], out=buf)
            st.cache["keep"].copy_(ok)
            st.cache["keep_e"] = keep_e
            st.U = torch.where(keep_e, st.U, plan.zero)
        else:
            ok = st.keep & _guard.block_flags(st.bufs, st.U, None, st.B, plan.device)
            ok_b = st.broadcast(ok)
            for name, buf in st.bufs.items():
                restore = ok.view((st.B,) + (1,) * (buf.dim() - 1))
                torch.where(restore, buf, before[name], out=buf)
            st.keep.copy_(ok)
            st.U = torch.where(ok_b, st.U, plan.zero)
        rolled = torch.zeros(len(plan.params), dtype=torch.float32, device=plan.device)
        lost = (st.cache["keep"] if st.adamw else st.keep).logical_not().float()
        rolled.index_add_(0, plan.block_param[st.lo:st.hi], lost)
        newly = (rolled > 0) & plan.flags[1].logical_not() & plan.flags[0].logical_not()
        plan.counts[1].add_(newly.sum())
        plan.ever[1].logical_or_(newly)
        plan.flags[1].logical_or_(newly)
    plan.remask()


def normalize(plan: DevicePlan) -> None:
    """normalize_grads: each parameter's update divided by 1e-30 + its RMS (SPEC step 7)."""
    if not any(st.group["normalize_grads"] for st in plan.stacks):
        return
    sums = torch.zeros(plan.nb, dtype=torch.float32, device=plan.device)
    for st in plan.stacks:
        if not st.group["normalize_grads"]:
            continue
        U = st.U
        if st.adamw:
            sq = torch.segment_reduce(U * U, "sum", lengths=st.cache["sizes"], unsafe=True)
        else:
            sq = (U * U).reshape(st.B, -1).sum(1)
        sums[st.lo:st.hi] = sq
    numel = torch.zeros(plan.nb, dtype=torch.float32, device=plan.device)
    for st in plan.stacks:
        numel[st.lo:st.hi] = torch.tensor(st.sizes if st.adamw else [math.prod(st.shape)] * st.B,
                                          dtype=torch.float32)
    total = torch.zeros(len(plan.params), dtype=torch.float32, device=plan.device)
    total.index_add_(0, plan.block_param, sums)
    count = torch.zeros_like(total).index_add_(0, plan.block_param, numel)
    factor = torch.reciprocal(1e-30 + torch.sqrt(total / count.clamp(min=1))).index_select(0, plan.block_param)
    for st in plan.stacks:
        if not st.group["normalize_grads"]:
            continue
        f = factor[st.lo:st.hi]
        if st.adamw:
            st.U = st.U * torch.repeat_interleave(f, st.cache["sizes"], output_size=st.shape[0])
        else:
            st.U = st.U * st.broadcast(f)


def write(plan: DevicePlan) -> None:
    """SPEC step 8 for every block: W <- W + update U, then W <- W + decay W (update = -lr times
    the algorithm's step-size factor, decay = -lr wd, both 0 for a skipped block), on the
    parameters gathered into each stack's W; copied back in their own dtype. Stacks whose
    kernels wrote their parameters themselves (``U is WRITTEN``) are left out."""
    written = frozenset(id(st) for st in plan.stacks if st.U is WRITTEN)
    _copying_sources(plan)
    plan.gather_params(written)
    for st in plan.stacks:
        W, U = st.W, st.U
        if U is WRITTEN:
            continue
        if st.adamw:  # its coefficients are the same for every member: 0-d views of the plan's rows
            new = torch.addcmul(W, U, st.cache["update"])
            if st.group["weight_decay"] != 0:
                new.addcmul_(new, st.cache["decay"])
            torch.where(st.cache["keep_e"], new, W, out=W)
            continue
        W.addcmul_(U, st.coef("update"))
        if st.group["weight_decay"] != 0 or plan.has_waiting:
            W.addcmul_(W, st.coef("decay"))
    plan.scatter_params(written)
    _write_copying(plan)


def _copying_sources(plan: DevicePlan) -> None:
    """Blocks that are copies of their parameter (a copying layout): gathered one by one."""
    for st, b in plan.copying:
        p, i = st.members[b]
        blocks = plan_for(_distributed.local(p).shape, st.group).extract(_distributed.local(p).detach())
        st.w_dst[b].copy_(blocks[i])


def _write_copying(plan: DevicePlan) -> None:
    if not plan.copying:
        return
    by_param: dict = defaultdict(dict)
    for st, b in plan.copying:
        p, i = st.members[b]
        by_param[id(p)][i] = (p, st, st.w_dst[b])
    for pieces in by_param.values():
        p, st, _ = next(iter(pieces.values()))
        tensor = _distributed.local(p)
        layout = plan_for(tensor.shape, st.group)
        blocks = layout.extract(tensor.detach())
        blocks = [pieces[i][2].to(tensor.dtype) if i in pieces else b.clone() for i, b in enumerate(blocks)]
        tensor.detach().copy_(layout.assemble(blocks))
