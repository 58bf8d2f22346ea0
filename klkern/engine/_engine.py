"""One optimizer step: which parameters start, the plan of the steady step, and running it.

``opt.step()`` (klkern/engine/_optimizer.py) hands its work here:

1. **collect**: per param group, the parameters with a gradient (sparse and complex gradients
   raise) and the blocks this rank steps;
2. **start**: a parameter seen for the first time is initialised from its gradient (SPEC's t = 0;
   KL-Shampoo, KL-SOAP and SOAP wait for a gradient that carries scale, block by block), and a
   block still waiting for scale is checked. Both read values back to the host, and happen only
   on the steps that have such parameters;
3. **plan**: the stacks of every device (klkern/engine/_plan.py), re-used while nothing structural
   changed;
4. **run**: the steady step of every stack (klkern/algorithms/_steps.py, or the Triton kernels), masked on
   the device (klkern/engine/_guard.py), the update written into the parameters, refreshes at
   ``t % precondition_frequency == 0``.

A steady step (no parameter starting, no block waiting, no refresh) reads nothing back to the
host and dispatches a number of operations that does not grow with the number of parameters of
the shapes it already has (tests/test_dispatch.py).
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from typing import NamedTuple

import torch

from ..algorithms import _functional as F
from ..algorithms._algorithms import ALGORITHMS
from ..algorithms._blocking import plan_for
from ..algorithms._hyper import StepHyperparameters, hyper
from ..distributed import _distributed
from ..runtime import _precision
from . import _guard, _layout, _phases, _refresh, _schedule, _write
from ._layout import structure_key
from ._plan import ROW, ROWS, DevicePlan
from ._stack import Stack
from ._stacking import block_views, member_target, stack_state

__all__ = ["StepEngine"]


class InitBatch(NamedTuple):
    """Blocks initialised together: one group, path, block shape, mask, device and gradient dtype."""

    group_index: int  # the param group's index
    path: str  # an algorithm's name or "adamw" (klkern/algorithms/_algorithms.py)
    shape: tuple
    mask: tuple
    device: torch.device
    dtype: torch.dtype


class StepEngine:
    """The step machinery of one optimizer; everything here is derived (rebuilt after a load,
    a copy or a change of the param groups)."""

    @property
    def opt(self):
        """The optimizer this belongs to (held weakly)."""
        return self._opt()

    def __init__(self, opt):
        self._opt = weakref.ref(opt)  # no cycle: the optimizer (and its process group) is freed
        # when its last user reference goes, not at a later garbage collection
        self.key = None
        self.plans: list[DevicePlan] = []
        self.version = 0  # bumped whenever the optimizer's state changes structure
        self.grad_views: dict = {}  # id(param) -> (grad tensor, its extracted blocks)

    # ------------------------------------------------------------------ collect

    def collect(self) -> list:
        """[(group index, group, [(param, local tensor, block plan, owned blocks)])]."""
        opt = self.opt
        split = opt._split
        work = []
        for index, group in enumerate(opt.param_groups):
            entries = []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(opt).__name__} does not support sparse gradients (parameter of shape "
                                       f"{tuple(p.shape)}); use a dense embedding (sparse=False)")
                if grad.is_complex():
                    raise RuntimeError(f"{type(opt).__name__} does not support complex gradients "
                                       f"(shape {tuple(p.shape)})")
                tensor = _distributed.local(p)
                if tensor.numel() == 0:
                    continue
                plan = plan_for(tensor.shape, group)
                if "step" in opt.state.get(p, ()):  # never a step on state of another layout
                    _layout.check(opt, p, group, plan, index)
                mine = _distributed.owned_blocks(split, p, len(plan.masks))
                if mine:
                    entries.append((p, tensor, plan, mine))
            work.append((index, group, entries))
        return work

    # ------------------------------------------------------------------ start

    def start(self, work: list) -> tuple[set, list]:
        """Initialise the parameters seen for the first time; find the waiting blocks whose
        gradient now carries scale. Returns (ids of parameters that only initialised this step,
        [(InitBatch, (param, block index, gradient copy))] to initialise after the step)."""
        opt = self.opt
        scale_started = ALGORITHMS[opt.algorithm].initialises_from_gradient
        if scale_started and not opt._unscaled_known:
            opt._find_unscaled()
        fresh, waiting = [], []
        for index, group, entries in work:
            for p, tensor, plan, mine in entries:
                state = opt.state.get(p)
                if not state or "step" not in state:
                    fresh.append((index, group, p, tensor, plan, mine))
                elif id(p) in opt._unscaled and not plan.adamw:
                    blocks = [i for i in mine if i in opt._unscaled[id(p)]]
                    if blocks:
                        waiting.append((index, group, p, plan, blocks))
        if not fresh and not waiting:
            return set(), []
        # one host read for all of them: finiteness and scale of each block's gradient
        checks, values = [], []
        for index, group, p, tensor, plan, mine in fresh:
            grads = plan.extract(_distributed.local(p.grad))
            for i in mine:
                checks.append(("fresh", p, i))
                g = grads[i].float()
                values.append(torch.stack([g.abs().amax() if g.numel() else g.new_zeros(()), g.pow(2).sum()]))
        for index, group, p, plan, blocks in waiting:
            grads = plan.extract(_distributed.local(p.grad))
            for i in blocks:
                checks.append(("waiting", p, i))
                g = grads[i].float()
                values.append(torch.stack([g.abs().amax(), g.pow(2).sum()]))
        read = _guard.host_values([v for pair in values for v in pair])
        amax = {(id(p), i): read[2 * j] for j, (_, p, i) in enumerate(checks)}
        sumsq = {(id(p), i): read[2 * j + 1] for j, (_, p, i) in enumerate(checks)}
        initialised_only, skipped = set(), []
        init_batches: dict = defaultdict(list)
        for index, group, p, tensor, plan, mine in fresh:
            if not all(math.isfinite(amax[(id(p), i)]) for i in mine):
                skipped.append(p)
                continue
            # A block whose first gradient carries no scale is allocated as init_state() does (from
            # that zero gradient) and waits: it starts from its first gradient with scale, so the
            # run equals one that starts at that gradient, while the state has every name and shape
            # (torch.distributed.checkpoint's template is a first step with zero gradients).
            scaled = {i: (sumsq[(id(p), i)] > 0 or plan.adamw or not scale_started) for i in mine}
            state = opt.state[p]
            state["step"] = 0
            state["blocks"] = [None] * len(plan.masks)
            _layout.record(opt, p, group, plan)
            unscaled = {i for i in mine if not scaled[i]}
            if unscaled:
                opt._unscaled[id(p)] = unscaled
            grads = plan.extract(_distributed.local(p.grad))
            path = "adamw" if plan.adamw else opt.algorithm
            for i in mine:
                G = grads[i]
                init_batches[InitBatch(index, path, tuple(G.shape), plan.masks[i], G.device, G.dtype)].append((p, i, G))
            if ALGORITHMS[opt.algorithm].initialises_from_gradient:  # Shampoo: no initialisation-only step
                initialised_only.add(id(p))
        if skipped:
            opt._count_skipped([tuple(p.shape) for p in skipped], [])
        failed = []
        for key, members in init_batches.items():
            failed += self._initialise(key, members, opt.param_groups[key.group_index])
        if failed:  # a parameter whose initialisation is not finite is left uninitialised
            for p in failed:
                opt.state.pop(p, None)
                opt._unscaled.pop(id(p), None)
                initialised_only.discard(id(p))
            opt._count_skipped([], [tuple(p.shape) for p in failed])
        later = []
        for index, group, p, plan, blocks in waiting:
            grads = plan.extract(_distributed.local(p.grad))
            for i in blocks:
                if math.isfinite(amax[(id(p), i)]) and sumsq[(id(p), i)] > 0:
                    G = grads[i]
                    later.append((InitBatch(index, "adamw" if plan.adamw else opt.algorithm, tuple(G.shape),
                                            plan.masks[i], G.device, G.dtype), (p, i, G.float().clone())))
        self.version += 1 if init_batches else 0
        return initialised_only, later

    def _initialise(self, key: InitBatch, members: list, group: dict) -> list:
        """Initialise a batch of blocks from their gradients; returns the parameters whose new
        state is not finite (host read)."""
        opt = self.opt
        path, mask = key.path, key.mask
        hp = hyper(group)
        G = torch.stack([G for _, _, G in members]).float()
        bufs = F.INITS[path](G, mask, hp)
        flags = _guard.block_flags(bufs, None, None, G.shape[0], G.device).tolist()
        failed = []
        for b, (p, i, _) in enumerate(members):
            opt.state[p]["blocks"][i] = {name: buf[b] for name, buf in bufs.items()}
            if not flags[b]:
                failed.append(p)
        return list({id(p): p for p in failed}.values())

    def finish_waiting(self, later: list) -> None:
        """Initialise the blocks that waited for scale from their first gradient with it (their
        update this step was zero, as on a first step); a block whose new state is not finite
        waits on."""
        opt = self.opt
        batches: dict = defaultdict(list)
        for key, member in later:
            batches[key].append(member)
        for key, members in batches.items():
            group, path, mask = opt.param_groups[key.group_index], key.path, key.mask
            hp = hyper(group)
            G = torch.stack([G for _, _, G in members])
            bufs = F.INITS[path](G, mask, hp)
            flags = _guard.block_flags(bufs, None, None, G.shape[0], G.device).tolist()
            for b, (p, i, _) in enumerate(members):
                if not flags[b]:
                    continue
                opt.state[p]["blocks"][i] = {name: buf[b] for name, buf in bufs.items()}
                opt._unscaled[id(p)].discard(i)
                if not opt._unscaled[id(p)]:
                    del opt._unscaled[id(p)]
        if later:
            self.version += 1

    # ------------------------------------------------------------------ plan

    def plans_for(self, work: list, initialised_only: set) -> list:
        """The device plans of this step's stepping parameters (re-used when nothing changed)."""
        opt = self.opt
        stepping = []
        parts: list = [self.version, id(opt.state)]
        for index, group, entries in work:
            chosen = [e for e in entries if id(e[0]) not in initialised_only and "step" in opt.state.get(e[0], {})]
            stepping.append((index, group, chosen))
            parts.append((id(group), structure_key(group), tuple(id(e[0]) for e in chosen)))
        key = tuple(parts)
        if key == self.key and all(plan.valid(opt) for plan in self.plans):
            for plan in self.plans:
                if plan.moved:  # a parameter's storage replaced: re-point, no rebuild
                    plan.retarget(member_target)
            return self.plans
        if self.plans:
            opt._read_counts()  # the old plans' counters, before they go
        self.plans = self._build(stepping)
        self.key = key
        return self.plans

    def _build(self, stepping: list) -> list:
        opt = self.opt
        by_key: dict = defaultdict(list)
        for index, group, entries in stepping:
            for p, tensor, plan, mine in entries:
                state = opt.state[p]
                path = "adamw" if plan.adamw else opt.algorithm
                work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
                for i in mine:
                    block = state["blocks"][i]
                    if block is None:
                        raise RuntimeError(f"{type(opt).__name__}: no state for block {i} of a parameter of shape "
                                           f"{tuple(p.shape)} that this rank steps; was the state loaded for "
                                           "another number of ranks?")
                    dtypes = tuple(sorted((name, str(v.dtype)) for name, v in block.items()))
                    shape = () if plan.adamw else plan.block_shape(i)
                    key = (index, path, shape, plan.masks[i], tensor.device, work_dtype, state["step"], dtypes)
                    by_key[key].append((p, i, block))
        per_device: dict = defaultdict(list)
        params_of: dict = defaultdict(dict)
        for (index, path, shape, mask, device, _, t, _), members in by_key.items():
            group = opt.param_groups[index]
            st = Stack(path, index, group, shape, mask, t, [(p, i) for p, i, _ in members], [b for _, _, b in members])
            st.device = device
            if st.adamw:
                st.sizes = [_distributed.local(p).numel() for p, _, _ in members]
                st.shape = (sum(st.sizes),)
            else:
                offsets = _schedule.refresh_offsets(group)
                st.offsets = [offsets[(id(p), i)] for p, i, _ in members] if offsets else None
            stack_state(st)
            block_views(st, opt)
            per_device[device].append(st)
            for p, _, _ in members:
                params_of[device][id(p)] = p
        plans = []
        for device, stacks in per_device.items():
            plan = DevicePlan(opt, device, stacks, list(params_of[device].values()))
            self._mark_waiting(plan)
            plan.snapshot_identity(opt)
            plans.append(plan)
        return plans

    def _mark_waiting(self, plan: DevicePlan) -> None:
        """Blocks still waiting for scale step with keep = False; they get the weight decay of their
        parameter when another of its blocks steps (klkern.reference has the same rule). A
        parameter all of whose blocks here wait does not step (its step count stays)."""
        opt = self.opt
        plan.idle = set()
        if not opt._unscaled:
            return
        members = [(p, i) for st in plan.stacks for p, i in st.members]
        waiting = [i in opt._unscaled.get(id(p), ()) for p, i in members]
        stepping = {id(p) for (p, _), wait in zip(members, waiting) if not wait}
        plan.idle = {id(p) for p, _ in members} - stepping
        if any(waiting):
            plan.has_waiting = True
            plan.waiting.copy_(torch.tensor(waiting, dtype=torch.bool))
            plan.decay_keep.copy_(torch.tensor([w and id(p) in stepping for (p, _), w in zip(members, waiting)],
                                               dtype=torch.bool))

    # ------------------------------------------------------------------ run

    def run(self, plan: DevicePlan) -> bool:
        """The steady step of every stack of ``plan``. Returns whether a refresh (or the periodic
        read of the counters) happened."""
        opt = self.opt
        plan.gather(self._sources(plan))
        hps = {}
        rows = []
        for st in plan.stacks:
            hp = self._stack_hp(st)
            hps[id(st)] = hp
            rows.append(self._host_row(st, hp))
            period = hp.precondition_frequency
            synchronous = st.t % period == 0
            if st.offsets is None:
                st.refresh = not st.adamw and synchronous
            else:  # stagger_refresh: the blocks whose own schedule falls on this step
                st.due = [b for b, offset in enumerate(st.offsets) if _schedule.due(st.t, offset, period)]
                st.refresh = bool(st.due)
            # the KL diagnostic (no update reads it) is evaluated at the first update and every T steps
            st.track_kl = st.algorithm.tracks_kl and (synchronous or st.t == 1)
            st.spike = st.kl and F.spike_threshold(hp, st.t) is not None
            st.roots = st.algorithm.inverse_root and st.t >= hp.precondition_frequency
        plan.upload(list(zip(*rows)))
        graph = opt._graphs.ready(plan, hps) if opt.cuda_graph else None
        kernels: dict = {}  # a replayed step refreshes nothing (refresh steps run eagerly)
        if graph is not None:
            graph.replay()
        else:
            kernels = {id(st): _phases.kernel_steps(opt, st, hps[id(st)]) for st in plan.stacks}
            if opt.cuda_graph:
                opt._graphs.capture(plan, hps, lambda: self.steady(plan, hps, kernels))
            else:
                self.steady(plan, hps, kernels)
        refreshed = _refresh.refresh(plan, hps, kernels)
        due = False
        for st in plan.stacks:
            st.U = None
            for p, _ in st.members:
                if id(p) not in plan.idle:
                    opt.state[p]["step"] = st.t
            due = due or st.t % hps[id(st)].precondition_frequency == 0
            st.t_prev += 1
        return refreshed or due

    def steady(self, plan: DevicePlan, hps: dict, kernels: dict) -> None:
        """Everything a step does on the device after the gradients are gathered and the
        per-stack coefficients uploaded: what klkern's CUDA graph captures (klkern/engine/_graph.py).
        Reads no host value and takes every per-step number from the plan's buffers."""
        opt = self.opt
        plan.decide()
        for st in plan.stacks:  # a block that does not step: its gradient 0 (kernels mask it themselves)
            if not _phases.masks_gradient(opt, st, hps[id(st)], kernels):
                st.zero_skipped()
        plan.see()  # mask_unseen: which directions have seen a gradient
        for st in plan.stacks:  # hyperparameters that do not bound the update: a copy to restore
            if _guard.unbounded(opt.algorithm, st.group):
                st.cache["before"] = {name: buf.clone() for name, buf in st.bufs.items()}
        carries = {}
        if plan.kl_stacks:
            plan.project_weights()
            plan.sqrt_lams()  # the direction from the old lam (the kernels make it in the projection's epilogue)
        for st in plan.kl_stacks:
            carries[id(st)] = _phases.run_phase(opt, st, hps[id(st)], kernels, 0, None)
        if plan.kl_stacks:
            spiked = any(st.spike for st in plan.kl_stacks)
            if spiked:
                plan.spike_scales()
            plan.factor_weights()
        for st in plan.stacks:
            st.U = _phases.run_phase(opt, st, hps[id(st)], kernels, 1, carries.get(id(st)))
        if plan.kl_stacks:
            plan.lam_ema()
            if any(st.U is None for st in plan.kl_stacks):
                plan.sqrt_lams()  # eigenvalues_first: U from the new lam
        for st in plan.stacks:
            if st.U is None:
                st.U = _phases.run_phase(opt, st, hps[id(st)], kernels, 2, None)
        for st in plan.stacks:  # a Triton variant that ran every phase is proven
            trial = st.cache.pop("trial", None)
            if trial is not None:
                opt._kernels_proven.add(trial[0])
        _write.check_unbounded(plan)
        _write.normalize(plan)
        _write.write(plan)
        for st in plan.stacks:
            st.U = None

    def _sources(self, plan: DevicePlan) -> list:
        """The gradient tensor (or block view) each member copies from."""
        out = []
        for st in plan.stacks:
            for (p, i), kind in zip(st.members, st.sources):
                if kind == "grad":
                    out.append(p.grad)
                elif kind == "local":
                    out.append(_distributed.local(p.grad))
                else:
                    grad = _distributed.local(p.grad)
                    cached = self.grad_views.get(id(p))
                    if cached is None or cached[0] is not grad:
                        cached = (grad, plan_for(_distributed.local(p).shape, st.group).extract(grad))
                        self.grad_views[id(p)] = cached
                    out.append(cached[1][i])
        return out

    def _stack_hp(self, st: Stack) -> StepHyperparameters:
        opt = self.opt
        mode = _precision.resolve(st.group["matmul_precision"], st.device, opt._global_modes)
        # Shampoo inverts its factors' eigenvalues: its factor products stay fp32.
        return hyper(st.group, rotation_mode=mode, factor_mode="highest" if st.algorithm.inverse_root else mode)

    def _host_row(self, st: Stack, hp: StepHyperparameters) -> list:
        """The stack's coefficients (ROWS): the same for all its blocks; masked on the device."""
        t = st.t
        lr = float(st.group["lr"])
        row = [0.0] * len(ROWS)
        row[ROW["b1"]], row[ROW["b2"]], row[ROW["fb"]] = hp.beta1, hp.beta2, hp.factor_beta
        row[ROW["lam_keep"]], row[ROW["lam_w"]] = 1.0, 0.0
        row[ROW["threshold"]] = math.inf
        if st.kl:
            if not st.algorithm.exact_mode(hp):
                w = F.lam_weight(hp, t)
                row[ROW["lam_keep"]], row[ROW["lam_w"]] = 1 - w, w
            threshold = F.spike_threshold(hp, t)
            if threshold is not None:
                row[ROW["threshold"]] = float(threshold)
        scale = F.bias_scale(hp, t) if st.algorithm.bias_corrected_update else 1.0
        row[ROW["update"]] = -lr * scale
        # Shampoo's Adam direction (grafting, and its update before the first roots) is bias-corrected
        row[ROW["bias"]] = math.sqrt(1 - hp.beta2 ** t) / (1 - hp.beta1 ** t)
        row[ROW["decay"]] = -lr * st.group["weight_decay"]
        return row
