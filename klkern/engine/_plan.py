"""The step plan: what a steady step does, built once and re-used until something changes.

A steady step (every parameter with a gradient initialised, its blocks stacked as before) is a
fixed sequence of batched operations whose number does not grow with the model's depth, and it
never reads a value back to the host. The plan holds, per device:

* the **stacks**: blocks of one algorithm path, shape, preconditioned modes, param group and step
  count, with their state in stacked buffers (each block's state dict holds views into them), a
  persistent gradient buffer ``G`` (filled by one ``torch._foreach_copy_`` for every stack) that
  also holds the parameters while their update is written, and the views both copies use;
* per-block tables, one column per block of every stack: ``keep`` (the block steps), ``coef``
  (its betas and update coefficients, masked), the gradient norms that decide ``keep``;
* for KL-Shampoo and KL-SOAP, every eigenvalue estimate ``lam`` of every block in one flat
  buffer (the blocks' ``lam{k}`` are views into it), with the projections of SPEC step 5 beside
  it, so the eigenvalue EMA, its floor and ``spike_threshold``'s test run once for all stacks.

What the guard decides (klkern/engine/_guard.py) is decided on the device: a block whose parameter's
gradient has a NaN/Inf, or whose gradient is too large for the state to stay bounded, gets
``keep = False``; its gradient is zeroed, its betas are 1 and its update and weight decay 0, so it
leaves its state and its parameter exactly as they were. The counts behind
``optimizer.nonfinite_skipped`` accumulate on the device and are read when the user reads them,
at refresh steps and when the plan is rebuilt.

The plan is rebuilt when the parameters with a gradient, the param groups' structural options,
the state's tensors (a load, an initialisation, a user's assignment) or a parameter's dtype or
device change (each step compares identities: no tensor operation); a new storage of the same
shape, dtype and device (``p.data = ...``, as SAM does) only re-points the write-back.
"""

from __future__ import annotations

import math

import torch

from ..distributed import _distributed
from . import _guard
from ._stack import Stack

__all__ = ["DevicePlan", "Stack", "ROWS"]

INF = float("inf")

# Rows of the per-block coefficient table, and what a masked block (keep = False) gets in each.
ROWS = ("b1", "b2", "fb", "lam_keep", "lam_w", "update", "decay", "threshold", "bias")
MASKED = (1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, INF, 1.0)
ROW = {name: i for i, name in enumerate(ROWS)}


class DevicePlan:
    """The stacks and per-block tables of one device (see the module docstring)."""

    lam: torch.Tensor  # every KL block's eigenvalue estimates, flat (None when there is none)
    idle: set  # ids of parameters whose stacks this plan holds but that do not step now (_engine)

    def __init__(self, opt, device: torch.device, stacks: list, params: list):
        self.device = device
        self.stacks = stacks
        self.params = params  # every parameter with a block here, in a fixed order
        self.algorithm = opt.algorithm
        # per-block bookkeeping, blocks in stack order (KL stacks first: their blocks are 0..nkb-1)
        self.stacks.sort(key=lambda s: (not s.kl, s.adamw))
        col = 0
        block_param, block_stack, glim = [], [], []
        index_of = {id(p): j for j, p in enumerate(params)}
        for s_index, st in enumerate(self.stacks):
            st.lo, st.hi = col, col + st.B
            col += st.B
            for p, i in st.members:
                block_param.append(index_of[id(p)])
                block_stack.append(s_index)
            glim.extend([_guard.gradient_limit(st.path, st.group, st.shape, st.mask)] * st.B)
        self.nb = col
        dev = device
        self.nkb = sum(st.B for st in self.stacks if st.kl)
        self.block_stack = torch.tensor(block_stack, dtype=torch.long, device=dev)
        self.single_block_params = len(set(block_param)) == len(block_param) and len(block_param) == len(params)
        self.block_param = torch.tensor(block_param, dtype=torch.long, device=dev)
        self.glim = torch.tensor(glim, dtype=torch.float32, device=dev)
        self.keep = torch.ones(self.nb, dtype=torch.bool, device=dev)
        self.norms = torch.zeros(2, self.nb, dtype=torch.float32, device=dev)  # inf-norm, 2-norm
        self.inf_norms, self.two_norms = self.norms.unbind(0)
        self.coef = torch.ones(len(ROWS), self.nb, dtype=torch.float32, device=dev)
        self.masked = torch.tensor(MASKED, dtype=torch.float32, device=dev).unsqueeze(1)
        # each stack's coefficients (uploaded every step) and the same per block
        self.stack_rows = torch.zeros(len(ROWS), len(self.stacks), dtype=torch.float32, device=dev)
        self.rows = torch.zeros(len(ROWS), self.nb, dtype=torch.float32, device=dev)
        self.waiting = torch.zeros(self.nb, dtype=torch.bool, device=dev)
        self.decay_keep = torch.ones(self.nb, dtype=torch.bool, device=dev)
        self.has_waiting = False
        self.zero = torch.zeros((), dtype=torch.float32, device=dev)
        self.one = torch.ones((), dtype=torch.float32, device=dev)
        # device-side counters of optimizer.nonfinite_skipped: [non-finite gradient, rolled back]
        # parameter-steps since the last read, and which parameters ever were (for the warning)
        self.counts = torch.zeros(2, dtype=torch.int64, device=dev)
        self.flags = torch.zeros(2, len(params), dtype=torch.bool, device=dev)
        self.bad, self.big = self.flags.unbind(0)  # this step: non-finite gradient, rolled back
        self.ever = torch.zeros(2, len(params), dtype=torch.bool, device=dev)
        self.decay_row = self.coef[ROW["decay"]]
        self._kl_tables()
        self._seen_tables()
        for st in self.stacks:
            rows = self.coef[:, st.lo:st.hi]
            st.cache["zero"] = self.zero
            if st.adamw:
                st.cache["keep"] = self.keep[st.lo:st.hi]
                st.cache["sizes"] = torch.tensor(st.sizes, dtype=torch.long, device=dev)
                st.cache["update"] = self.rows[ROW["update"], st.lo]
                st.cache["decay"] = self.rows[ROW["decay"], st.lo]
            else:
                for name, r in ROW.items():
                    st.cache[name] = st.broadcast(rows[r])
                    st.cache[name + ":mat"] = rows[r].view(st.B, 1, 1)
                    st.cache[name + ":vec"] = rows[r]  # (B,), what a kernel reads
                st.keep = self.keep[st.lo:st.hi]
                st.keep_b = st.broadcast(st.keep)
        self.g_dst = [v for st in self.stacks for v in st.g_dst]
        self.g_blocks = [v for st in self.stacks for v in st.g_blocks]
        self.epoch = 0  # bumped when the write-back's targets are re-pointed (a captured step is stale)
        self._param_copies: dict = {}  # the write-back's gather and scatter lists, per set of stacks
        self.copying = [(st, b) for st in self.stacks for b, t in enumerate(st.targets) if t is None]

    # ------------------------------------------------------------------ KL tables

    def _kl_tables(self) -> None:
        """One flat buffer for every lam of every KL block (state), its projections, floors and
        the segment structure the spike test and the EMA reduce over."""
        kl = [st for st in self.stacks if st.kl]
        self.kl_stacks = kl
        if not kl:
            self.lam = None  # type: ignore[assignment]  # no KL block: no phase reads it
            return
        dev = self.device
        sizes: list[int] = []
        floors: list[float] = []
        seg_len: list[int] = []
        seg_block: list[int] = []
        entry_block: list[int] = []
        first_seg: list[int] = []
        inv_first: list[float] = []
        inv_d: list[float] = []
        half_k1 = []
        for st in kl:
            modes = [k for k, on in enumerate(st.mask) if on]
            clamp = float(st.group["eigval_clamp"])
            half_k1.extend([(len(modes) - 1) / 2.0] * st.B)
            for k in modes:
                d = st.shape[k]
                c = max(10.0, min(float(d), clamp))
                sizes.append(st.B * d)
                floors.extend([1.0 / (c * c)] * (st.B * d))
                inv_d.extend([1.0 / d] * (st.B * d))
                for b in range(st.B):
                    if k == modes[0]:
                        first_seg.append(len(seg_len))
                        inv_first.append(1.0 / d)
                    seg_len.append(d)
                    seg_block.append(st.lo + b)
                    entry_block.extend([st.lo + b] * d)
        total = sum(sizes)
        self.lam = torch.empty(total, dtype=torch.float32, device=dev)
        self.proj = torch.zeros(total, dtype=torch.float32, device=dev)
        self.inv_d = torch.tensor(inv_d, dtype=torch.float32, device=dev)
        # per entry: 1 / (d_k lam) (the projections' weights), sqrt(lam) (the KL direction's
        # scaling) and 1 / lam (the factor EMA's weights)
        self.proj_weight = torch.empty(total, dtype=torch.float32, device=dev)
        self.sqrt_lam = torch.empty(total, dtype=torch.float32, device=dev)
        self.inv_lam = torch.empty(total, dtype=torch.float32, device=dev)
        # eigval_floor: the floor s / c_k^2 of every entry, from 1 / c_k^2 and its block's scale s
        # (scaled_floor), which also scales the block's gradient limit (klkern/engine/_guard.py)
        self.floor_base = torch.tensor(floors, dtype=torch.float32, device=dev)
        self.floor = self.floor_base.clone()
        self.anchor = torch.empty(self.nkb, dtype=torch.float32, device=dev)
        self.half_k1 = torch.tensor(half_k1, dtype=torch.float32, device=dev)
        self.glim_base = self.glim[: self.nkb].clone()
        self.seg_len = torch.tensor(seg_len, dtype=torch.long, device=dev)
        self.seg_block = torch.tensor(seg_block, dtype=torch.long, device=dev)
        self.entry_block = torch.tensor(entry_block, dtype=torch.long, device=dev)
        self.first_seg = torch.tensor(first_seg, dtype=torch.long, device=dev)
        self.inv_first = torch.tensor(inv_first, dtype=torch.float32, device=dev)
        self.spike = torch.ones(self.nkb, dtype=torch.float32, device=dev)
        self.threshold_row = self.coef[ROW["threshold"], : self.nkb]
        self.lam_w_row = self.coef[ROW["lam_w"], : self.nkb]
        self.worst = torch.zeros(self.nkb, dtype=torch.float32, device=dev)
        self.clip, self.growth = (torch.tensor(c, dtype=torch.float32, device=dev) for c in _spike_constants())
        self.lam_rows = self.coef[ROW["lam_keep"]:ROW["lam_w"] + 1, : self.nkb]
        offset = 0
        for st in kl:
            for k, on in enumerate(st.mask):
                if not on:
                    continue
                d = st.shape[k]
                part = slice(offset, offset + st.B * d)
                view = self.lam[part].view(st.B, d)
                view.copy_(st.bufs[f"lam{k}"])
                st.bufs[f"lam{k}"] = view
                st.proj[k] = self.proj[part].view(st.B, d)
                nd = len(st.shape)
                for name, flat in (("proj_weight", self.proj_weight), ("sqrt_lam", self.sqrt_lam),
                                   ("inv_lam", self.inv_lam)):
                    st.cache[f"{name}{k}"] = _along(flat[part].view(st.B, d), k, nd)
                    st.cache[f"{name}_vec{k}"] = flat[part].view(st.B, d)
                if nd == 2 and all(st.mask):  # the projections as bmm outputs: (B, m, 1), (B, 1, n)
                    st.cache[f"proj_mat{k}"] = st.proj[k].view((st.B, d, 1) if k == 0 else (st.B, 1, d))
                    st.cache[f"proj_weight_mat{k}"] = (self.proj_weight[part].view(st.B, d, 1) if k == 1
                                                       else self.proj_weight[part].view(st.B, 1, d))
                offset += st.B * d
            st.cache["spike"] = st.broadcast(self.spike[st.lo:st.hi])
            st.cache["spike_vec"] = self.spike[st.lo:st.hi]
            scale = self.anchor[st.lo:st.hi]
            scale.copy_(st.bufs["floor_scale"])
            st.bufs["floor_scale"] = scale
            for b, block in enumerate(st.blocks):
                block["floor_scale"] = scale[b]
                for k, on in enumerate(st.mask):
                    if on:
                        block[f"lam{k}"] = st.bufs[f"lam{k}"][b]
        self.scaled_floor()

    def _seen_tables(self) -> None:
        """mask_unseen: one flat buffer for every seen{k} of every preconditioned block (state, the
        largest |gradient entry| so far in each slice along mode k), the step's slice maxima, and
        the 0/1 mask of the directions that have seen a gradient (``st.cache["live{k}"]``, shaped
        to broadcast along mode k of the stack)."""
        parts = [(st, k) for st in self.stacks if not st.adamw for k, on in enumerate(st.mask) if on]
        self.seen_parts = parts
        if not parts:
            self.seen = None
            return
        total = sum(st.B * st.shape[k] for st, k in parts)
        dev = self.device
        self.seen = torch.empty(total, dtype=torch.float32, device=dev)
        self.seen_new = torch.empty(total, dtype=torch.float32, device=dev)
        self.live = torch.empty(total, dtype=torch.float32, device=dev)
        # the block of every entry: a block that does not step adds nothing (its gradient may be
        # anything: the kernels' stacks are not zeroed, klkern/engine/_engine.py)
        self.seen_block = torch.tensor([st.lo + b for st, k in parts for b in range(st.B) for _ in range(st.shape[k])],
                                       dtype=torch.long, device=dev)
        offset = 0
        for st, k in parts:
            d = st.shape[k]
            part = slice(offset, offset + st.B * d)
            view = self.seen[part].view(st.B, d)
            view.copy_(st.bufs[f"seen{k}"])
            st.bufs[f"seen{k}"] = view
            for b, block in enumerate(st.blocks):
                block[f"seen{k}"] = view[b]
            st.cache[f"seen_new{k}"] = self.seen_new[part].view(st.B, d)
            st.cache[f"live{k}"] = _along(self.live[part].view(st.B, d), k, len(st.shape))
            st.cache[f"live_vec{k}"] = self.live[part].view(st.B, d)
            offset += st.B * d
        torch.sign(self.seen, out=self.live)

    def see(self) -> None:
        """Every preconditioned block's slice maxima of this step's gradient (zero for a skipped
        block, whatever its gradient held: its seen stays) folded into seen, then the mask of the
        directions that have seen a gradient: per stack one reduction per mode, then four
        operations for all."""
        if self.seen is None:
            return
        for st, k in self.seen_parts:
            dims = [j + 1 for j in range(len(st.shape)) if j != k]
            out = st.cache[f"seen_new{k}"]
            if dims:
                torch.linalg.vector_norm(st.G, ord=math.inf, dim=dims, out=out)
            else:
                torch.abs(st.G, out=out)
        stepping = self.keep.index_select(0, self.seen_block)
        torch.where(stepping, self.seen_new, self.zero, out=self.seen_new)
        torch.maximum(self.seen, self.seen_new, out=self.seen)
        torch.sign(self.seen, out=self.live)  # seen >= 0: 1 where seen, else 0

    # ------------------------------------------------------------------ the step's parts

    def gather(self, sources: list) -> None:
        """Every stack's gradients into its G (one multi-tensor copy)."""
        if self.g_dst:
            torch._foreach_copy_(self.g_dst, sources)

    def upload(self, rows: list) -> None:
        """Each stack's coefficients for this step ((len(ROWS), stacks) floats) to the device: one
        copy from host memory, without waiting for the device."""
        host = torch.tensor(rows, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        self.stack_rows.copy_(host, non_blocking=True)

    def decide(self) -> None:
        """keep and the masked coefficients of every block, from the gradients' norms and the
        uploaded rows; the counters of skipped parameter-steps."""
        torch.stack(torch._foreach_norm(self.g_blocks, INF), out=self.inf_norms)
        torch.stack(torch._foreach_norm(self.g_blocks, 2), out=self.two_norms)
        finite = torch.lt(self.inf_norms, INF)  # False for NaN
        # a block steps when its 2-norm is at most its limit (False for NaN and Inf): its state
        # stays bounded and its update finite (klkern/engine/_guard.py)
        torch.le(self.two_norms, self.glim, out=self.keep)
        bad, big = self.bad, self.big
        if self.single_block_params:
            torch.logical_not(finite, out=bad)
            torch.logical_and(finite, self.keep.logical_not(), out=big)
        else:  # a parameter with a non-finite gradient anywhere skips all its blocks
            nonfinite = torch.zeros(len(self.params), dtype=torch.float32, device=self.device)
            nonfinite.index_add_(0, self.block_param, finite.logical_not().float())
            torch.gt(nonfinite, 0, out=bad)
            self.keep.logical_and_(bad.logical_not().index_select(0, self.block_param))
            rolled = torch.zeros(len(self.params), dtype=torch.float32, device=self.device)
            rolled.index_add_(0, self.block_param, self.keep.logical_not().float())
            torch.logical_and(rolled > 0, bad.logical_not(), out=big)
        self.counts.add_(self.flags.sum(1))
        self.ever.logical_or_(self.flags)
        self.decays = None
        if self.has_waiting:  # a block waiting for scale: no update, the weight decay of its parameter
            self.decays = self.keep & self.waiting.logical_not().logical_or(self.decay_keep)
            self.keep.logical_and_(self.waiting.logical_not())
        torch.index_select(self.stack_rows, 1, self.block_stack, out=self.rows)
        self.remask()

    def remask(self) -> None:
        """The coefficient table from the per-stack rows and keep (again after keep changed)."""
        torch.where(self.keep, self.rows, self.masked, out=self.coef)
        if self.decays is not None:
            torch.where(self.decays & self.keep.logical_or(self.waiting), self.rows[ROW["decay"]], self.zero,
                        out=self.decay_row)

    def project_weights(self) -> None:
        """1 / (d_k lam) of every KL entry, from the old lam (step 5's projections)."""
        torch.div(self.inv_d, self.lam, out=self.proj_weight)

    def factor_weights(self) -> None:
        """1 / lam of every KL entry (the factor EMA's weights, from the old lam)."""
        torch.reciprocal(self.lam, out=self.inv_lam)

    def sqrt_lams(self) -> None:
        torch.sqrt(self.lam, out=self.sqrt_lam)

    def spike_scales(self) -> None:
        """spike_threshold's factor of every KL block (klkern.algorithms._functional.spike_scale), from the
        projections of this gradient against the old lam; 1 where the threshold is off."""
        ratio = self.proj / self.lam
        seg_max = torch.segment_reduce(ratio, "max", lengths=self.seg_len, unsafe=True)
        worst = self.worst.zero_().scatter_reduce_(0, self.seg_block, seg_max, "amax", include_self=False)
        energy = torch.segment_reduce(ratio, "sum", lengths=self.seg_len, unsafe=True).index_select(0, self.first_seg)
        energy.mul_(self.inv_first)
        squared = torch.maximum(torch.div(self.clip, worst), torch.div(self.growth, energy)).clamp_(max=1.0)
        torch.where(energy > self.threshold_row, squared.sqrt_(), self.one, out=self.spike)
        self.lam_w_row.mul_(self.spike).mul_(self.spike)

    def scaled_floor(self) -> None:
        """The floor of every KL entry, s / c_k^2, and each KL block's gradient limit, the
        absolute floor's times s^((K-1)/2), from the blocks' scales s (state ``floor_scale``, set
        at the block's initialisation: 1 for eigval_floor="absolute"), once per build."""
        if self.lam is None:
            return
        s = torch.where(self.anchor > 0, self.anchor, self.one)
        torch.mul(self.floor_base, s.index_select(0, self.entry_block), out=self.floor)
        torch.mul(self.glim_base, s.pow_(self.half_k1), out=self.glim[: self.nkb])

    def lam_ema(self) -> None:
        """SPEC step 5 for every KL block: lam <- keep lam + w proj (masked), then the floor."""
        keep, w = self.lam_rows.index_select(1, self.entry_block).unbind(0)
        self.lam.mul_(keep).addcmul_(self.proj, w)
        torch.maximum(self.lam, self.floor, out=self.lam)

    def param_copies(self, written: frozenset) -> tuple[list, list]:
        """(W views, parameter views) of every block of a stack not in ``written`` (ids of the
        stacks whose kernels wrote their parameters themselves) that is a view of its parameter;
        blocks of a copying layout are gathered by the caller."""
        if written not in self._param_copies:
            pairs = [(d, t) for st in self.stacks if id(st) not in written
                     for d, t in zip(st.w_dst, st.targets) if t is not None]
            self._param_copies[written] = ([d for d, _ in pairs], [t for _, t in pairs])
        return self._param_copies[written]

    def gather_params(self, written: frozenset = frozenset()) -> None:
        """Every parameter (block) into its stack's W (one multi-tensor copy)."""
        dst, targets = self.param_copies(written)
        if dst:
            torch._foreach_copy_(dst, targets)

    def scatter_params(self, written: frozenset = frozenset()) -> None:
        """The new values back into the parameters, in their dtype (one multi-tensor copy)."""
        dst, targets = self.param_copies(written)
        if dst:
            torch._foreach_copy_(targets, dst)

    # ------------------------------------------------------------------ validity

    def snapshot_identity(self, opt) -> None:
        """Remember what the plan's views are views of: each block's state dict and tensors, and
        each parameter's storage."""
        self.identity = []
        for st in self.stacks:
            for (p, i), block in zip(st.members, st.blocks):
                self.identity.append((opt.state[p]["blocks"], i, block, tuple(block.items())))
        self.storages = [(p, p.data_ptr(), p.dtype, p.device) for p in self.params if not _distributed.is_dtensor(p)]
        self.moved: list = []

    def valid(self, opt) -> bool:
        """Whether every view still belongs to the state and every parameter keeps its dtype and
        device (no tensor operation); those with a new storage are listed in ``moved``."""
        for blocks, i, block, items in self.identity:
            if blocks[i] is not block or len(block) != len(items):
                return False
            for name, tensor in items:
                if block.get(name) is not tensor:
                    return False
        self.moved = []
        for p, ptr, dtype, device in self.storages:
            if p.data_ptr() != ptr:
                if p.dtype != dtype or p.device != device:
                    return False  # other stacks (float64 buffers) or another device: a new plan
                self.moved.append(p)
        return True

    def retarget(self, target_of) -> None:
        """The write-back's targets of the ``moved`` parameters at their new storage (``target_of(
        stack, param, block index)``); nothing else of the plan depends on it."""
        moved = {id(p) for p in self.moved}
        for st in self.stacks:
            for b, (p, i) in enumerate(st.members):
                if id(p) in moved:
                    st.targets[b] = target_of(st, p, i)
                    st.targets_version += 1  # the kernels' pointer tables are made again
        self._param_copies = {}
        self.storages = [(p, p.data_ptr(), p.dtype, p.device) for p, _, _, _ in self.storages]
        self.moved = []
        self.epoch += 1

    def read_counts(self) -> tuple[list[int], list]:
        """(counts, per cause the parameters ever affected) read to the host; counts reset."""
        counts = self.counts.tolist()
        ever = self.ever.tolist() if any(counts) else None
        self.counts.zero_()
        affected = [[p for p, hit in zip(self.params, row) if hit] for row in ever] if ever else [[], []]
        return counts, affected


def _along(vec: torch.Tensor, k: int, nd: int) -> torch.Tensor:
    """(B, d_k) shaped to broadcast along mode k of a (B, ...) stack."""
    shape = [vec.shape[0]] + [1] * nd
    shape[k + 1] = vec.shape[1]
    return vec.view(shape)


def _spike_constants() -> tuple[float, float]:
    from ..algorithms._functional import SPIKE_CLIP, SPIKE_GROWTH

    return SPIKE_CLIP, SPIKE_GROWTH
