"""The preconditioner work split across ranks (``process_group=``), and FSDP2 shards.

Replicated parameters (DDP, ``process_group`` given). Every rank holds every
parameter and, after DDP's all-reduce, the same gradients. Each block (one
Kronecker problem; a whole parameter when its update cannot be written block
by block: ``normalize_grads``, or a block layout that is not a view of the
parameter) is assigned to one rank, once, from the shapes alone: greedy
largest-cost-first onto the least-loaded rank (ties: the lower rank), with
the cost of a block its per-step matrix products plus its amortised refresh
(:func:`block_cost`). A rank allocates state for its own blocks only and
computes their updates, refreshes included; then one ``all_gather`` of a
flat buffer (``communication_dtype``) gives every rank the new values of
every block. In float32 these are the new parameter values themselves, so the
ranks stay bit-identical to each other and equal single-process training to
float32 rounding; in bfloat16 they are the updates (new minus old), which
every rank, the owner included, adds to its parameter, so the ranks stay
identical and only the updates are rounded.

FSDP2 (``fully_shard``): parameters are DTensors sharded on dim 0. Each rank
preconditions its local shard as its own parameter (its own blocks), with no
communication, as Distributed Shampoo's fully-shard distributor does. The
block boundaries then follow the shard boundaries: a (m, n) weight sharded
over W ranks is preconditioned as the row blocks of ``torch.chunk(W, 0)``,
which equals klkern on one process with ``block_size`` = rows per shard when
the other modes are at most that size (and ``normalize_grads`` normalises
each shard's update).
"""

from __future__ import annotations

import math

import torch

from ..algorithms._algorithms import ALGORITHMS
from ..algorithms._blocking import BlockPlan, plan_for

__all__ = ["ReplicatedSplit", "block_cost", "assign", "is_dtensor", "local", "shard_offset", "check_process_group"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a rank computes on: a DTensor's local shard (sharing its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]  # a DTensor there


def shard_offset(t) -> int:
    """The first row (dim 0) of a DTensor's local shard in the global tensor."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        return int(compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1][0])
    except (ImportError, AttributeError, TypeError):  # the torch.chunk rule FSDP2 shards with
        import torch.distributed as dist

        rows = -(-t.shape[0] // dist.get_world_size())
        return min(dist.get_rank() * rows, t.shape[0])


def check_process_group(process_group) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first (or pass process_group=None)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"invalid process_group={process_group!r}: must be a torch.distributed.ProcessGroup, "
                         "e.g. torch.distributed.group.WORLD, or None")


def block_cost(path: str, shape: tuple, mask: tuple, frequency: int) -> float:
    """Work of one block of ``path`` (an algorithm's name, or "adamw") per step:
    :meth:`klkern.algorithms._algorithms.Algorithm.step_cost`."""
    return ALGORITHMS[path].step_cost(shape, mask, frequency)


def assign(costs: list[float], world: int, load: list[float] | None = None) -> list[int]:
    """Owner rank of each unit: greedy, largest cost first, onto the least-loaded rank (ties by
    index and by rank, so every rank computes the same assignment), starting from ``load`` (the
    ranks' current loads; zero by default; not modified)."""
    load = list(load) if load is not None else [0.0] * world
    owner = [0] * len(costs)
    for u in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[u] = r
        load[r] += costs[u]
    return owner


class ReplicatedSplit:
    """Which rank steps which block of replicated parameters, and the exchange of new values."""

    def __init__(self, process_group, communication_dtype: torch.dtype, algorithm: str, param_groups: list):
        import torch.distributed as dist

        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        self.dtype = communication_dtype
        self.whole: set[int] = set()  # parameters assigned (and exchanged) as a whole
        self.plans: dict[int, BlockPlan] = {}
        self.params: list = []
        self.owner: dict[tuple, int] = {}
        self.costs: dict[tuple, float] = {}  # (id(param), block index) -> its cost
        self.load = [0.0] * self.world
        self.old: list | None = None
        self.extend(algorithm, param_groups)

    def extend(self, algorithm: str, param_groups: list) -> None:
        """Assign the blocks of ``param_groups`` (new parameters) to ranks, onto the current loads,
        leaving every earlier assignment as it was (``add_param_group`` after steps)."""
        units, costs = [], []  # a unit: [(param, block index), ...] assigned together
        for group in param_groups:
            for p in group["params"]:
                plan = plan_for(p.shape, group)
                self.plans[id(p)] = plan
                self.params.append(p)
                path = "adamw" if plan.adamw else algorithm
                cost = [block_cost(path, plan.block_shape(i), plan.masks[i], group["precondition_frequency"])
                        for i in range(len(plan.masks))]
                self.costs.update({(id(p), i): c for i, c in enumerate(cost)})
                if _whole(group, plan, p):
                    units.append([(p, i) for i in range(len(plan.masks))])
                    costs.append(sum(cost))
                    self.whole.add(id(p))
                else:
                    for i, c in enumerate(cost):
                        units.append([(p, i)])
                        costs.append(c)
        owners = assign(costs, self.world, self.load)
        for unit, r, c in zip(units, owners, costs):
            for p, i in unit:
                self.owner[(id(p), i)] = r
            self.load[r] += c
        # per rank, what it sends, in a fixed order: (param, block index or None for the whole
        # parameter, numel)
        self.layout: list[list] = [[] for _ in range(self.world)]
        for p in self.params:
            plan = self.plans[id(p)]
            if id(p) in self.whole:
                self.layout[self.owner[(id(p), 0)]].append((p, None, p.numel()))
                continue
            for i in range(len(plan.masks)):
                self.layout[self.owner[(id(p), i)]].append((p, i, math.prod(plan.block_shape(i))))
        self.sizes = [sum(n for _, _, n in blocks) for blocks in self.layout]
        self.padded = max(self.sizes) if self.sizes else 0
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"process_group: all parameters must be on one device, got {sorted(map(str, devices))}")
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        # The float32 exchange sends new values exactly: float64 parameters need a float64 buffer.
        self.buffer_dtype = (torch.float64 if self.dtype == torch.float32
                             and any(p.dtype == torch.float64 for p in self.params) else self.dtype)

    def update(self, algorithm: str, param_groups: list) -> list:
        """Re-assign the parameters whose assignment no longer fits their group (a changed block
        plan, or ``normalize_grads`` changed for a parameter of several blocks), onto the other
        parameters' loads; every rank computes the same. Returns [(group, param, group index,
        None for a new plan, else {block index: its previous owner})] of those re-assigned."""
        changed: list = []
        for index, group in enumerate(param_groups):
            for p in group["params"]:
                old = self.plans.get(id(p))
                if old is None:
                    continue
                plan = plan_for(p.shape, group)
                if plan != old:
                    changed.append((group, p, index, None))
                elif len(plan.masks) > 1 and _whole(group, plan, p) != (id(p) in self.whole):
                    changed.append((group, p, index, {}))
        if not changed:
            return []
        for _, p, _, owners in changed:
            for i in range(len(self.plans[id(p)].masks)):
                r = self.owner.pop((id(p), i))
                self.load[r] -= self.costs.pop((id(p), i))
                if owners is not None:
                    owners[i] = r
            self.whole.discard(id(p))
            del self.plans[id(p)]
            self.params = [q for q in self.params if q is not p]
        self.extend(algorithm, [{**group, "params": [p]} for group, p, _, _ in changed])
        return changed

    def move(self, p, old_owner: dict, state: dict | None) -> dict | None:
        """After :meth:`update` re-assigned ``p``'s blocks (same plan): each block's state sent from
        its old owner to its new one (one broadcast per block that moves; every rank calls it).
        ``state`` is this rank's state of ``p``; returns its new one (None: no block here)."""
        import torch.distributed as dist

        blocks = list(state["blocks"]) if state else [None] * len(old_owner)
        step = state["step"] if state else None
        for i, src in sorted(old_owner.items()):
            dst = self.owner[(id(p), i)]
            if src == dst:
                continue
            sent = blocks[i] if self.rank == src else None
            payload = [None if sent is None else {k: v.cpu() for k, v in sent.items()}, step]
            dist.broadcast_object_list(payload, src=dist.get_global_rank(self.group, src), group=self.group)
            if self.rank == dst and payload[0] is not None:
                blocks[i] = {k: v.to(p.device) for k, v in payload[0].items()}
                step = payload[1]
            elif self.rank == src:
                blocks[i] = None
        if step is None or not any(blocks[i] is not None for i in old_owner if self.owns(p, i)):
            return None
        return {"step": step, "blocks": blocks}

    def holds(self, p) -> bool:
        """Whether this rank steps any block of ``p`` (as the assignment stands)."""
        plan = self.plans.get(id(p))
        return plan is not None and any(self.owns(p, i) for i in range(len(plan.masks)))

    def owns(self, p, i: int) -> bool:
        return self.owner[(id(p), i)] == self.rank

    def _views(self, rank: int) -> list[torch.Tensor]:
        """What ``rank`` sends: views of its blocks in the parameters, or whole parameters."""
        return [p.detach() if i is None else self.plans[id(p)].extract(p.detach())[i]
                for p, i, _ in self.layout[rank]]

    def before_step(self) -> None:
        """bfloat16 exchange: remember this rank's blocks, to send their updates."""
        if self.dtype != torch.float32:
            self.old = [v.detach().to(_work_dtype(v), copy=True) for v in self._views(self.rank)]

    def bytes_per_step(self) -> int:
        """Bytes each rank receives per step (the all-gather of the padded buffers)."""
        return (self.world - 1) * self.padded * torch.empty((), dtype=self.buffer_dtype).element_size()

    def exchange(self) -> None:
        """One all_gather: every rank gets the new values (float32) or updates (bfloat16) of every block."""
        import torch.distributed as dist

        if self.world == 1 or self.padded == 0:
            return
        mine = self._views(self.rank)
        send = torch.zeros(self.padded, dtype=self.buffer_dtype, device=self.device)
        if mine:
            values = [v.reshape(-1).to(_work_dtype(v)) for v in mine]
            if self.dtype != torch.float32:
                assert self.old is not None, "before_step() keeps the old values of a bfloat16 exchange"
                values = [v - o.reshape(-1) for v, o in zip(values, self.old)]
            send[: self.sizes[self.rank]].copy_(torch.cat([v.to(self.buffer_dtype) for v in values]))
        received = torch.empty(self.world * self.padded, dtype=self.buffer_dtype, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # name by torch version
        gather(received, send, group=self.group)
        for r in range(self.world):
            if r == self.rank and self.dtype == torch.float32:
                continue  # the owner already holds exactly these values
            offset = r * self.padded
            views = self._views(r)
            old = self.old if r == self.rank else None
            for k, (view, (_, _, n)) in enumerate(zip(views, self.layout[r])):
                piece = received[offset: offset + n].view(view.shape).to(_work_dtype(view))
                offset += n
                if self.dtype == torch.float32:
                    view.copy_(piece)
                elif old is not None:  # the owner: its old value plus the rounded update
                    view.copy_(old[k].view(view.shape) + piece)
                else:
                    view.copy_(view.to(_work_dtype(view)) + piece)
        self.old = None


def _whole(group: dict, plan: BlockPlan, p) -> bool:
    """Whether ``p``'s blocks are assigned (and exchanged) as one unit: its update is normalised
    as a whole, or its blocks are not views of it."""
    return group["normalize_grads"] or not plan.blocks_are_views(p.detach())


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 parameters (never rounded), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def owned_blocks(split: ReplicatedSplit | None, p, count: int) -> list[int]:
    """The indices of ``p``'s ``count`` blocks this rank steps (all of them without a split)."""
    return [i for i in range(count) if split is None or split.owns(p, i)]
