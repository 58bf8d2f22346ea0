"""Shared machinery of the four optimizers: gather, batch, guard, apply.

The optimizer classes are thin (see optimizers.py). One ``step`` does, per
param group:

1. checks the gradients (sparse or complex gradients raise; a gradient with
   NaN/Inf skips that parameter for the step, counted and warned once);
2. cuts every gradient into blocks (``_blocking.make_plan``);
3. groups blocks of the same shape, preconditioned modes, step count, device
   and path, and runs the algorithm's functional step (``_functional``) once
   per group on the stacked blocks;
4. writes each parameter's update back (normalisation, learning rate,
   decoupled weight decay) in the parameter's dtype.

State layout, per parameter: ``{"step": t, "blocks": [block_state, ...]}``
where each block state maps names (``exp_avg``, ``Q0``, ``R0``, ``lam0``...)
to tensors. Blocks that are processed together are views into one stacked
buffer per name (kept between steps), so a batch step reads and writes its
state without copies; after ``load_state_dict`` or a change in which blocks
step together the buffers are rebuilt once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import OrderedDict, defaultdict

import torch

from . import _backend, _distributed, _errors, _guard, _precision
from ._blocking import plan_for, writes_into
from ._functional import ALGORITHMS, column_major, state_names
from ._options import build_defaults, factor_beta, validate_group

__all__ = ["ShampooFamilyOptimizer", "tensor_bytes"]

_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))



def _hyper(algorithm: str, group: dict) -> dict:
    """The scalars a functional step reads, resolved once per group and step."""
    beta1, beta2 = group["betas"]
    hp = dict(group)
    hp.update(
        beta1=float(beta1),
        beta2=float(beta2),
        factor_beta=float(factor_beta(group)),
        correct_bias=group.get("correct_bias", True),
        eigenbasis=group.get("eigenbasis", "qr"),
    )
    return hp


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (dicts, lists, tuples)."""
    seen = set()
    total = 0
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), str(value.device))
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


class _Slot:
    """Stacked buffers of a set of blocks that step together."""

    __slots__ = ("members", "bufs")

    def __init__(self, members: list[dict], bufs: dict):
        self.members = members
        self.bufs = bufs

    def is_current(self, members: list[dict]) -> bool:
        if len(members) != len(self.members) or any(a is not b for a, b in zip(members, self.members)):
            return False
        for name, buf in self.bufs.items():
            for i, block in enumerate(members):
                if block[name].data_ptr() != buf[i].data_ptr():
                    return False
        return True

    @classmethod
    def adopt(cls, members: list[dict], bufs: dict) -> "_Slot":
        """Make every member's state a view into ``bufs``."""
        for i, block in enumerate(members):
            for name, buf in bufs.items():
                block[name] = buf[i]
        return cls(members, bufs)

    @classmethod
    def stack(cls, members: list[dict]) -> "_Slot":
        names = list(members[0].keys())
        bufs = {name: _stacked([block[name] for block in members]) for name in names}
        return cls.adopt(members, bufs)


def _stacked(tensors: list) -> torch.Tensor:
    """torch.stack that keeps a column-major layout (the CPU's bases, _functional.column_major)."""
    if column_major(tensors[0]):
        return torch.stack([t.mT for t in tensors]).mT
    return torch.stack(tensors)


_WRITTEN = object()  # marks a block whose update a kernel applied to the parameter


def _param_table(members: list, pending: dict, group: dict):
    """(ParamTable of the blocks' views into their parameters, lr, wd), or None when some
    parameter has blocks (of this rank) outside this batch or a block is not a view of it."""
    from .triton_kernels import ParamTable

    count: dict[int, int] = defaultdict(int)
    for p, _, _ in members:
        count[id(p)] += 1
    views = []
    for p, i, _ in members:
        _, plan, _, tensor, expected, _ = pending[id(p)]
        if count[id(p)] != len(expected):
            return None
        view = plan.extract(tensor.detach())[i]
        if view.dim() != 2 or not writes_into(view, tensor):
            return None
        views.append(view)
    if any(v.dtype != views[0].dtype for v in views) or views[0].dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        return None
    return ParamTable(views), float(group["lr"]), float(group["weight_decay"])


class ShampooFamilyOptimizer(torch.optim.Optimizer):
    """Base class of KLShampoo, KLSOAP, SOAP and Shampoo (see optimizers.py)."""

    algorithm = ""

    def __init__(self, params, lr=None, *, backend: str = "auto", process_group=None,
                 communication_dtype: torch.dtype = torch.float32, **hyperparameters):
        if lr is not None:  # positional, as torch.optim's optimizers take it
            hyperparameters["lr"] = lr
        if backend not in _backend.BACKENDS:
            raise ValueError(f"invalid backend={backend!r}: must be one of {_backend.BACKENDS}")
        if process_group is not None:
            _distributed.check_process_group(process_group)
        if communication_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"invalid communication_dtype={communication_dtype!r}: must be torch.float32 "
                             "(exact) or torch.bfloat16 (the updates are rounded)")
        defaults = build_defaults(self.algorithm, hyperparameters, type(self).__name__,
                                  constructor=("backend", "process_group", "communication_dtype"))
        self.backend = backend
        self.process_group = process_group
        self.communication_dtype = communication_dtype
        # parameter-steps skipped for a NaN/Inf gradient or rolled back (klkern/_guard.py)
        self.nonfinite_skipped = 0
        self._reset_derived()
        super().__init__(params, defaults)

    # What a copy (copy.deepcopy, pickle, torch.save(optimizer)) carries besides torch.optim's
    # defaults, state and param_groups: every constructor option and public counter. Everything
    # else is derived from them and rebuilt (_reset_derived). process_group is a communicator:
    # a deep copy shares it, pickling refuses it (save state_dict() instead).
    _COPIED = ("backend", "process_group", "communication_dtype", "nonfinite_skipped")

    def _reset_derived(self) -> None:
        """Structures derived from the param groups and the state, rebuilt when either changes."""
        self._split: _distributed.ReplicatedSplit | None = None
        self._slots: dict[tuple, _Slot] = {}
        self._warned = set()  # causes already warned about (each once)
        self._kernels_proven: set = set()  # Triton step variants that ran (backend="auto")
        self._kernels_failed: dict = {}  # Triton step variants that failed -> the whole error
        self._unscaled: dict[int, set] = {}  # id(param) -> blocks still waiting for a gradient with scale
        self._unscaled_known = False  # whether _unscaled reflects the state (False after a load or copy)

    def __getstate__(self) -> dict:
        if self.process_group is not None:
            raise TypeError(f"cannot pickle a {type(self).__name__} with a process_group (a torch.distributed "
                            "communicator): save optimizer.state_dict() instead, and pass process_group again "
                            "when constructing the optimizer that loads it")
        return self._getstate()

    def _getstate(self) -> dict:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._COPIED}}

    def __setstate__(self, state: dict) -> None:
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch.optim adds it for its own optimizers; a copy equals its original
            self.defaults.pop("differentiable", None)
        for name, value in (("backend", "auto"), ("process_group", None),
                            ("communication_dtype", torch.float32), ("nonfinite_skipped", 0)):
            self.__dict__.setdefault(name, value)  # pickles made before these existed
        self._fill_defaults(self.param_groups)  # and groups saved before an option existed
        self._reset_derived()

    def _fill_defaults(self, groups: list) -> None:
        """Give every group the options it lacks (saved before they existed) at their defaults."""
        for group in groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def __deepcopy__(self, memo: dict):
        import copy

        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group  # the copy shares the communicator
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._getstate(), memo))
        return new

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's add_param_group, validated; a refused group leaves the optimizer as it was.
        With ``process_group`` the new blocks are assigned to ranks at once (the old keep theirs)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(self.algorithm, group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters "
                                     f"(shape {tuple(p.shape)})")
            if self._split is not None:
                self._split.extend(self.algorithm, [group])
        except Exception:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        used: dict[tuple, _Slot] = {}
        split = self._replicated_split()
        params, at_risk = self._checked_params()
        guard = _guard.StepGuard()
        # Every product runs in true fp32 unless it follows the group's matmul_precision
        # (klkern._precision), whatever torch's global setting is.
        self._global_modes = _precision.snapshot()
        with _precision.optimizer_math():
            if split is not None:
                split.before_step()
            for index, group in enumerate(self.param_groups):
                self._step_group(index, group, used, params[index], at_risk, guard)
            rolled_back = guard.finish(self.state)
            if split is not None:
                split.exchange()  # every rank calls it every step, whatever it skipped
        self._slots = used
        if rolled_back:
            self.nonfinite_skipped += len(rolled_back)
            self._warn_once("rollback", (
                f"{type(self).__name__}: a step made the state or the update of parameters of shape "
                f"{[tuple(p.shape) for p in rolled_back]} non-finite (or above {_guard.STATE_LIMIT:g}); those "
                "blocks were rolled back to their previous state and skipped for this step (counted in "
                "optimizer.nonfinite_skipped; this warning is shown once)"))
        return loss

    def _replicated_split(self) -> _distributed.ReplicatedSplit | None:
        """The block-to-rank assignment (``process_group`` given), built once from the shapes."""
        if self.process_group is None:
            return None
        if self._split is None:
            if any(_distributed.is_dtensor(p) for g in self.param_groups for p in g["params"]):
                raise ValueError("process_group is for replicated (DDP) parameters; these are DTensors (FSDP2), "
                                 "whose shards klkern preconditions locally: pass process_group=None")
            self._split = _distributed.ReplicatedSplit(self.process_group, self.communication_dtype,
                                                       self.algorithm, self.param_groups)
        return self._split

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            # point at the user's line: the first caller outside klkern and torch (step() is wrapped
            # by torch's no_grad and hook machinery, a varying number of frames)
            frame, level = sys._getframe(1), 2
            while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
                frame, level = frame.f_back, level + 1
            warnings.warn(message, RuntimeWarning, stacklevel=level)

    def _checked_params(self) -> tuple[list[list], set]:
        """Per group, the parameters to step (a gradient, finite); and the ids of those whose
        gradient is large enough to guard (klkern/_guard.py). One host sync per device."""
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                        f"{tuple(p.shape)}); use a dense embedding (sparse=False)"
                    )
                if p.grad.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex gradients "
                                       f"(shape {tuple(p.shape)})")
                params.append(p)
        finite, large = _guard.grad_checks([_distributed.local(p.grad) for p in params]) if params else ([], [])
        skipped = [tuple(p.shape) for p, ok in zip(params, finite) if not ok]
        if skipped:
            self.nonfinite_skipped += len(skipped)
            self._warn_once("gradient", (
                f"{type(self).__name__}: gradient with NaN/Inf for parameters of shape {skipped}; "
                "these parameters and their state are left unchanged for this step (counted in "
                "optimizer.nonfinite_skipped; this warning is shown once)"))
        keep = {id(p) for p, ok in zip(params, finite) if ok}
        at_risk = {id(p) for p, big in zip(params, large) if big}
        per_group = [[p for p in group["params"] if id(p) in keep] for group in self.param_groups]
        return per_group, at_risk

    def _step_group(self, index: int, group: dict, used: dict, params: list, at_risk: set,
                    guard: _guard.StepGuard) -> None:
        hp = _hyper(self.algorithm, group)
        init_batches: dict[tuple, list] = defaultdict(list)
        step_batches: dict[tuple, list] = defaultdict(list)
        pending: dict[int, list] = {}
        always = _guard.unbounded(self.algorithm, group)
        split = self._split
        gathered = []
        for p in params:
            tensor = _distributed.local(p)  # a DTensor's local shard; the parameter itself otherwise
            if tensor.numel() == 0:
                continue
            plan = plan_for(tensor.shape, group)
            grads = plan.extract(_distributed.local(p.grad))
            mine = _distributed.owned_blocks(split, p, len(grads))
            if mine:
                gathered.append((p, tensor, plan, grads, mine))
        scaled = self._scaled_blocks(gathered)
        reinit: dict[tuple, list] = defaultdict(list)
        for p, tensor, plan, grads, mine in gathered:
            path = "adamw" if plan.adamw else self.algorithm
            fresh = "step" not in self.state.get(p, {})
            unscaled = self._unscaled.get(id(p), set())
            if fresh and (id(p), mine[0]) in scaled and not any(scaled[(id(p), i)] for i in mine):
                continue  # its first gradient carries no scale: not initialised, not stepped (yet)
            state = self.state[p]
            if fresh:
                state["step"] = 0
                state["blocks"] = [None] * len(grads)
                unscaled = {i for i in mine if not scaled.get((id(p), i), True)}
                if unscaled:
                    self._unscaled[id(p)] = unscaled
            waiting = 0 if fresh else len(unscaled & set(mine))
            pending[id(p)] = [p, plan, {}, tensor, set(mine), len(mine) - waiting]
            for i in mine:
                G = grads[i]
                key = (path, tuple(G.shape), plan.masks[i], G.device, G.dtype, state["step"])
                if not fresh and i in unscaled:
                    # a block that has not seen a gradient with scale does not step; its first such
                    # gradient initialises it (an initialisation-only step, as a first step is)
                    pending[id(p)][2][i] = torch.zeros_like(G, dtype=torch.float32)
                    if scaled[(id(p), i)]:
                        reinit[key[:5]].append((p, i, G))
                    continue
                (init_batches if fresh else step_batches)[key].append((p, i, G))
        for key, members in reinit.items():
            self._initialise_unscaled(index, key, members, hp, used)

        def guarded(members) -> bool:
            return always or any(id(p) in at_risk for p, _, _ in members)

        def places(members) -> list:
            return [(pending[id(p)][3], pending[id(p)][1]) for p, _, _ in members]

        def param_blocks(members) -> list:  # the parameter blocks (views, or copies for a copying layout)
            return [plan.extract(tensor.detach())[i] for (tensor, plan), (_, i, _) in zip(places(members), members)]

        def blocks_of(members) -> dict:  # per parameter, its blocks that step (or initialise) now
            return {id(p): pending[id(p)][5] for p, _, _ in members}

        for key, members in init_batches.items():
            path, mask = key[0], key[2]
            G = torch.stack([G for _, _, G in members]).float()
            bufs = ALGORITHMS[path][0](G, mask, hp)
            blocks = [{} for _ in members]
            for (p, i, _), block in zip(members, blocks):
                self.state[p]["blocks"][i] = block
            slot_key = (index, key[:5]) + tuple(id(b) for b in blocks)
            self._slots[slot_key] = used[slot_key] = _Slot.adopt(blocks, bufs)
            if guarded(members):
                guard.add("init", bufs, None, members, places(members), None, blocks_of(members),
                          _guard.block_flags(bufs, None, None, G.shape[0], G.device))
            if self.algorithm == "shampoo":  # Shampoo has no initialisation-only step
                step_batches[key].extend(members)

        for key, members in step_batches.items():
            path, mask, t = key[0], key[2], key[5] + 1
            blocks = [self.state[p]["blocks"][i] for p, i, _ in members]
            slot_key = (index, key[:5]) + tuple(id(b) for b in blocks)
            slot = self._slots.get(slot_key)
            if slot is None or not slot.is_current(blocks):
                slot = _Slot.stack(blocks)
            used[slot_key] = slot
            G = torch.stack([G for _, _, G in members]).float()
            before = saved = None
            if guarded(members):
                before = guard.copy_bufs(slot.bufs)
                saved = [b.clone() for b in param_blocks(members)]
            U, scale = self._run_step(path, slot.bufs, G, mask, hp, t, members, pending, group)
            if before is not None:
                guard.add("step", slot.bufs, before, members, places(members), saved, blocks_of(members),
                          _guard.block_flags(slot.bufs, U, None if U is not None else param_blocks(members),
                                             G.shape[0], G.device))
            for b, (p, i, _) in enumerate(members):
                entry = pending[id(p)]
                entry[2][i] = _WRITTEN if U is None else U[b]
                if len(entry[2]) == len(entry[4]):
                    if U is not None:
                        self._apply(entry[3], entry[1], entry[2], scale, group)
                    self.state[p]["step"] = t

    # Algorithms whose initialisation is computed from the first gradient (its factors, bases
    # and, for the KL variants, scale-free eigenvalue estimates): a block starts from its first
    # gradient that carries scale (a nonzero sum of squares in float32). Shampoo and the AdamW
    # path start from zeros whatever the gradient.
    SCALE_STARTED = ("klshampoo", "klsoap", "soap")

    def _scaled_blocks(self, gathered: list) -> dict:
        """(id(param), block) -> whether its gradient carries scale, for the blocks whose start
        depends on it: every block of a parameter not yet initialised, and the blocks still
        waiting for scale (one host synchronisation, only on steps that have such blocks)."""
        if self.algorithm not in self.SCALE_STARTED:
            return {}
        if not self._unscaled_known:
            self._find_unscaled()
        keys, sums = [], []
        for p, _, plan, grads, mine in gathered:
            if plan.adamw:
                continue
            if p not in self.state or "step" not in self.state[p]:
                wanted = mine
            else:
                wanted = [i for i in mine if i in self._unscaled.get(id(p), ())]
            for i in wanted:
                keys.append((id(p), i))
                sums.append(grads[i].float().pow(2).sum())
        if not keys:
            return {}
        return dict(zip(keys, (value > 0 for value in _guard.host_values(sums))))

    def _find_unscaled(self) -> None:
        """After a load or a copy: the blocks whose factors are all zero have not seen scale."""
        self._unscaled_known = True
        checks = []
        for p, st in self.state.items():
            for i, block in enumerate(st.get("blocks", [])):
                if block is not None and any(name.startswith("R") for name in block):
                    checks.append((id(p), i, sum(block[n].float().abs().sum() for n in block if n.startswith("R"))))
        if checks:
            for (pid, i, _), total in zip(checks, _guard.host_values([c for _, _, c in checks])):
                if total == 0:
                    self._unscaled.setdefault(pid, set()).add(i)

    def _initialise_unscaled(self, index: int, key: tuple, members: list, hp: dict, used: dict) -> None:
        """Initialise blocks that waited for scale from their first gradient with it (their update
        this step is zero, as on a first step); a block whose new state is not finite waits on."""
        path, mask = key[0], key[2]
        G = torch.stack([G for _, _, G in members]).float()
        bufs = ALGORITHMS[path][0](G, mask, hp)
        flags = _guard.block_flags(bufs, None, None, G.shape[0], G.device).cpu().tolist()
        keep = [b for b, ok in enumerate(flags) if ok]
        if not keep:
            return
        bufs = {name: buf[keep] for name, buf in bufs.items()}
        blocks = [{} for _ in keep]
        for b, block in zip(keep, blocks):
            p, i, _ = members[b]
            self.state[p]["blocks"][i] = block
            self._unscaled[id(p)].discard(i)
            if not self._unscaled[id(p)]:
                del self._unscaled[id(p)]
        slot_key = (index, key) + tuple(id(b) for b in blocks)
        self._slots[slot_key] = used[slot_key] = _Slot.adopt(blocks, bufs)

    def _run_step(self, path, bufs, G, mask, hp, t, members, pending, group):
        """The single dispatch point: Triton kernels or the torch functional step.

        Returns (U, scale), or (None, scale) when the kernels already wrote the
        parameters (every block of every member parameter is in this batch and
        no global normalisation of U is needed)."""
        mode = _precision.resolve(group["matmul_precision"], G.device, self._global_modes)
        # Shampoo inverts its factors' eigenvalues: its factor products stay fp32.
        hp = dict(hp, rotation_mode=mode, factor_mode="highest" if path == "shampoo" else mode)
        if path != "adamw" and _backend.resolve(self.backend, G.device, mode) == "triton":
            from . import _triton_path

            if _triton_path.supports(path, tuple(G.shape[1:]), mask):
                write = None
                if path in _triton_path.WRITES and not group["normalize_grads"]:
                    write = _param_table(members, pending, group)
                step = _triton_path.STEPS[path]
                if _backend.requested(self.backend) != "auto":
                    return step(bufs, G, mask, hp, t, write=write)
                variant = (path, tuple(G.shape[1:]), mask, G.device, mode, hp["state_dtype"],
                           write[0].dtype if write else None, path == "shampoo" and t >= hp["precondition_frequency"])
                if variant in self._kernels_proven:
                    return step(bufs, G, mask, hp, t, write=write)
                if variant not in self._kernels_failed:
                    result = self._first_kernel_step(variant, step, bufs, G, mask, hp, t, write)
                    if result is not None:
                        return result
        return ALGORITHMS[path][1](bufs, G, mask, hp, t)

    def _first_kernel_step(self, variant, step, bufs, G, mask, hp, t, write):
        """A Triton step variant's first run under backend="auto": on any failure (compilation,
        launch, shared memory, driver) restore what it touched, warn once naming the cause, and
        return None so that this batch, and this variant from then on, use the torch path."""
        before = {name: buf.clone() for name, buf in bufs.items()}
        written = [(view, view.clone()) for view in write[0].views] if write else []
        try:
            result = step(bufs, G, mask, hp, t, write=write)
        except Exception as err:  # noqa: BLE001 - any kernel failure: the torch path takes over
            for name, buf in bufs.items():
                buf.copy_(before[name])
            for view, saved in written:
                view.copy_(saved)
            reason = _errors.summary(err)
            self._kernels_failed[variant] = _errors.describe(err)
            self._warn_once(f"kernel:{reason}", (
                f"{type(self).__name__}: the Triton kernels failed ({reason}) for {variant[0]} blocks of shape "
                f"{variant[1]} on {variant[3]}; this step and the later ones use the torch path for them "
                "(same math). backend='triton' raises instead; run `python -m klkern.check` to see what fails."))
            return None
        self._kernels_proven.add(variant)
        return result

    @staticmethod
    def _apply(p: torch.Tensor, plan, updates: dict, scale: float, group: dict) -> None:
        """Steps 7-8: optional normalisation, W <- W - lr*scale*U, W <- W - lr*wd*W.

        ``updates`` maps block index -> U for the blocks of ``p`` this rank stepped: all of
        them (the whole parameter at once) or, for a parameter split across ranks, some
        (each written into its view of the parameter)."""
        if len(updates) == len(plan.masks):
            targets = [(p, plan.assemble([updates[i] for i in range(len(plan.masks))]))]
        else:
            views = plan.extract(p.detach())
            targets = [(views[i], U) for i, U in updates.items()]
        lr = float(group["lr"])
        wd = group["weight_decay"]
        for target, U in targets:
            if group["normalize_grads"]:
                U = U / (1e-30 + torch.sqrt(torch.mean(U * U)))
            # float64 parameters take the float32 update without being rounded themselves (the
            # preconditioner's math is float32, SPEC "Precision"); lower precisions go through float32.
            W = target if target.dtype in (torch.float32, torch.float64) else target.float()
            W.add_(U, alpha=-lr * scale)
            if wd != 0:
                W.add_(W, alpha=-lr * wd)
            if W is not target:
                target.copy_(W)

    # ------------------------------------------------------------ state dict

    def _distributed(self) -> bool:
        return self.process_group is not None or any(
            _distributed.is_dtensor(p) for g in self.param_groups for p in g["params"])

    def _block_key_prefix(self, p) -> str:
        """FSDP2: a shard's blocks are keyed by the shard's first row, so that keys are unique
        across ranks and a different sharding cannot be loaded by mistake."""
        return f"{_distributed.shard_offset(p)}:" if _distributed.is_dtensor(p) else ""

    @contextlib.contextmanager
    def _hooks_held(self, *names: str):
        """torch.optim's hooks ``names`` set aside (run by the caller at the right moment)."""
        held = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, OrderedDict())
        try:
            yield held
        finally:
            for name, hooks in held.items():
                setattr(self, name, hooks)

    def state_dict(self) -> dict:
        """torch.optim's state dict. With ``process_group`` or DTensor parameters (FSDP2) it
        holds this rank's blocks only, as ``{"step": tensor, "blocks": {key: state}}`` with keys
        unique across ranks (the block index; for a shard, its first row and the index), which is
        the form torch.distributed.checkpoint saves without duplicates: see :meth:`init_state`.
        State-dict hooks run as torch.optim runs them: pre-hooks first, post-hooks on the final
        dictionary (a post-hook's return value replaces it)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with self._hooks_held("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
            sd = self._state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _state_dict(self) -> dict:
        sd = super().state_dict()
        if not self._distributed():
            return sd
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index, value in sd["state"].items():
            if "blocks" not in value:
                state[index] = value
                continue
            prefix = self._block_key_prefix(params[index])
            state[index] = {"step": torch.tensor(float(value["step"])),
                            "blocks": {f"{prefix}{i}": block for i, block in enumerate(value["blocks"])
                                       if block is not None}}
        return {**sd, "state": state}

    def init_state(self) -> None:
        """Allocate the state of every block this rank steps, as a first step from a zero gradient
        would; for loading a checkpoint into it (torch.distributed.checkpoint loads in place)::

            opt.init_state()
            sd = {"optim": opt.state_dict()}
            torch.distributed.checkpoint.load(sd, checkpoint_id=path)
            opt.load_state_dict(sd["optim"])
        """
        split = self._replicated_split()
        with torch.no_grad(), _precision.optimizer_math():
            for group in self.param_groups:
                hp = dict(_hyper(self.algorithm, group), rotation_mode="highest", factor_mode="highest")
                for p in group["params"]:
                    tensor = _distributed.local(p)
                    if tensor.numel() == 0 or "step" in self.state.get(p, {}):
                        continue
                    plan = plan_for(tensor.shape, group)
                    mine = _distributed.owned_blocks(split, p, len(plan.masks))
                    if not mine:
                        continue
                    blocks = [None] * len(plan.masks)
                    path = "adamw" if plan.adamw else self.algorithm
                    for i in mine:
                        G = torch.zeros((1,) + plan.block_shape(i), device=tensor.device)
                        bufs = ALGORITHMS[path][0](G, plan.masks[i], hp)
                        blocks[i] = {name: buf[0].clone() for name, buf in bufs.items()}
                    self.state[p] = {"step": 0, "blocks": blocks}
        self._slots = {}
        self._unscaled, self._unscaled_known = {}, False  # zero-gradient state: found on the next step

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict` (from any device).

        Unlike torch.optim's default, state tensors keep their saved dtype
        (float32 factors stay float32 for bf16 parameters); they are copied to
        the device of their parameter. A rank keeps the blocks it steps: with
        ``process_group``, a state saved on another number of ranks (or on one
        process) loads, since blocks are keyed by their index; for FSDP2 shards
        the saved blocks must belong to this rank's shard (same sharding).

        A group saved before an option existed gets the option's default (as torch.optim does),
        and every loaded group is validated. Load-state-dict hooks run as torch.optim runs them:
        pre-hooks on the whole dictionary (what one returns is loaded), post-hooks once it is
        loaded.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        before = (self.param_groups, self.state, self._split)
        with self._hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks") as held:
            try:
                self._load_state_dict(state_dict)
            except Exception:  # a refused state dict leaves the optimizer as it was
                self.param_groups, self.state, self._split = before
                self._slots = {}
                raise
        for hook in held["_optimizer_load_state_dict_post_hooks"].values():
            hook(self)

    def _load_state_dict(self, state_dict: dict) -> None:
        saved_state = state_dict["state"]
        groups = [dict(g) for g in state_dict["param_groups"]]
        self._fill_defaults(groups)
        for group in groups:
            validate_group(self.algorithm, group)
        super().load_state_dict({**state_dict, "param_groups": groups, "state": {}})
        self._reset_derived()  # the loaded groups' options decide the block-to-rank assignment, and more
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        split = self._replicated_split()

        def to_device(value, device):
            if isinstance(value, torch.Tensor):
                return value.to(device=device, copy=True)
            if isinstance(value, dict):
                return {k: to_device(v, device) for k, v in value.items()}
            if isinstance(value, list):
                return [to_device(v, device) for v in value]
            return value

        for key, value in saved_state.items():
            if key not in id_map:
                raise ValueError(f"loaded state dict has state for unknown parameter id {key}")
            param = id_map[key]
            value = to_device(value, _distributed.local(param).device)
            if "blocks" in value:
                value = self._own_blocks(param, value, split)
                if value is None:
                    continue
            self._check_loaded(key, param, value)
            self.state[param] = value

    def _own_blocks(self, param, value: dict, split) -> dict | None:
        """A loaded parameter state reduced to the blocks this rank steps (list form, step an int)."""
        step = value["step"]
        step = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
        blocks = value["blocks"]
        if isinstance(blocks, dict):
            prefix = self._block_key_prefix(param)
            by_index = {}
            for k, block in blocks.items():
                if not str(k).startswith(prefix):
                    raise ValueError(
                        f"loaded state dict: block {k!r} of a parameter of shape {tuple(param.shape)} belongs to "
                        f"another shard (this rank's blocks start with {prefix!r}): FSDP2 shards are "
                        "preconditioned locally, so a checkpoint loads only with the same sharding (world size)")
                by_index[int(str(k)[len(prefix):])] = block
            plan_len = len(plan_for(_distributed.local(param).shape, self._group_of(param)).masks)
            blocks = [by_index.get(i) for i in range(plan_len)]
        mine = _distributed.owned_blocks(split, param, len(blocks))
        if not mine:
            return None
        missing = [i for i in mine if blocks[i] is None]
        if missing:
            raise ValueError(f"loaded state dict has no state for blocks {missing} of a parameter of shape "
                             f"{tuple(param.shape)} that this rank steps")
        return {**value, "step": step, "blocks": [b if i in mine else None for i, b in enumerate(blocks)]}

    def _check_loaded(self, key, param, value: dict) -> None:
        """A loaded parameter state must be this optimizer's, for this parameter's shape (else
        the first step would fail on a missing name or a shape mismatch, far from the cause)."""
        if not value:  # no state yet (a parameter that never stepped)
            return
        tensor = _distributed.local(param)
        where = f"loaded state dict: the state of parameter {key} (shape {tuple(tensor.shape)})"
        hint = "; was it saved by another optimizer, or for another model or option (block_size, max_precond_dim)?"
        if "blocks" not in value or "step" not in value:
            raise ValueError(f"{where} is not a {type(self).__name__} state (no 'blocks'/'step'){hint}")
        plan = plan_for(tensor.shape, self._group_of(param))
        if len(value["blocks"]) != len(plan.masks):
            raise ValueError(f"{where} has {len(value['blocks'])} blocks, this parameter has "
                             f"{len(plan.masks)}{hint}")
        path = "adamw" if plan.adamw else self.algorithm
        for i, block in enumerate(value["blocks"]):
            if block is None:
                continue
            wanted = state_names(path, plan.masks[i])
            missing, foreign = wanted - set(block), set(block) - wanted
            if missing:
                raise ValueError(f"{where}, block {i}, lacks {sorted(missing)}{hint}")
            if foreign:  # e.g. KL-SOAP's exp_avg_sq and lam* in a KL-Shampoo or SOAP load
                raise ValueError(f"{where}, block {i}, holds {sorted(foreign)}, which a {type(self).__name__} "
                                 f"block does not{hint}")
            if tuple(block["exp_avg"].shape) != plan.block_shape(i):
                raise ValueError(f"{where}, block {i}, holds moments of shape {tuple(block['exp_avg'].shape)}, "
                                 f"the block is {plan.block_shape(i)}{hint}")

    def _group_of(self, param) -> dict:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))

    def diagnostics(self, named_parameters=None) -> dict:
        """Per parameter (keyed by its index, or by name given ``model.named_parameters()``):
        ``kl`` (EMA of the per-entry KL objective of its covariance estimate relative to an
        isotropic one; 0: no better than the identity, lower fits better), ``eig_min``/``eig_max``
        (its eigenvalue estimates), ``staleness`` (off-diagonal energy of Q^T S Q relative to its
        diagonal) and ``update_rms``; AdamW-path parameters have ``update_rms`` only. One host
        synchronisation per device (klkern/_diagnostics.py). Cheap for KL-Shampoo, KL-SOAP and
        SOAP (a fraction of a step); for Shampoo, whose state keeps no eigenbasis, a call
        eigendecomposes every factor and root, about the cost of one root refresh."""
        from . import _diagnostics

        return _diagnostics.collect(self, named_parameters)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (stacked buffers counted once)."""
        return tensor_bytes(self.state)
