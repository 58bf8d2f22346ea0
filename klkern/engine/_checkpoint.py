"""Checkpoints of the four optimizers: torch.optim's ``state_dict``/``load_state_dict`` with their
hooks, the keys of blocks across ranks (``process_group``, FSDP2 shards), what
torch.distributed.checkpoint's state-dict API needs, ``init_state``, and the checks that refuse a
state saved by another optimizer, model or option.

Form of a saved parameter state: ``{"step": t, "blocks": {key: block_state}}`` (klkern/engine/_optimizer.py
describes the block states; the live state holds them in a list). The key is the block's index as
a string, so that ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` (which takes
tensors, numbers and dicts, never a list) flattens it to ``state.<name>.blocks.<key>.<state>``; a
group's ``state_dtype`` is saved by name ("bfloat16"). With a ``process_group`` or DTensor parameters
a rank saves only the blocks it steps, with ``step`` a tensor; for an FSDP2 shard the key is
prefixed by the shard's first row, so keys are unique across ranks and torch.distributed.checkpoint
saves each block once; a parameter a rank keeps no block of is ``{"blocks": {}}``. A state saved on
another number of ranks (``process_group``) loads, since each rank picks the blocks it steps by
index. The list form of earlier releases loads too.

torch's resume (``set_optimizer_state_dict``) fills a template that a first step with zero
gradients at lr 0 allocates: every block gets its state then (a block whose gradient carries no
scale waits, klkern/engine/_engine.py), so the template has every name, shape and dtype.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from ..algorithms._algorithms import ALGORITHMS
from ..algorithms._blocking import plan_for
from ..algorithms._functional import INITS
from ..algorithms._hyper import hyper
from ..algorithms._options import loaded_group, saved_group, validate_group
from ..distributed import _distributed
from ..runtime import _precision
from . import _layout
from ._engine import StepEngine

__all__ = ["CheckpointedOptimizer"]


class CheckpointedOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer with klkern's checkpoint format (the base of ShampooFamilyOptimizer,
    which provides what is declared here)."""

    algorithm: str
    process_group: object
    _split: _distributed.ReplicatedSplit | None
    _engine: StepEngine
    _unscaled: dict
    _unscaled_known: bool
    _layouts: dict

    def _reset_derived(self) -> None:
        raise NotImplementedError

    def _replicated_split(self, update: bool = True) -> _distributed.ReplicatedSplit | None:
        raise NotImplementedError

    def _fill_defaults(self, groups: list) -> None:
        raise NotImplementedError

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
        """torch.optim's state dict, a parameter's blocks keyed by their index (``"0"``, ``"1"``,
        ...: see the module docstring). With ``process_group`` or DTensor parameters (FSDP2) it
        holds this rank's blocks only, as ``{"step": tensor, "blocks": {key: state}}`` with keys
        unique across ranks (the block index; for a shard, its first row and the index), which is
        the form torch.distributed.checkpoint saves without duplicates.
        State-dict hooks run as torch.optim runs them: pre-hooks first, post-hooks on the final
        dictionary (a post-hook's return value replaces it)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with self._hooks_held("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
            sd = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _state_dict(self) -> dict:
        _layout.check_all(self)  # no state of another layout is saved (a group's option changed since)
        sd = super().state_dict()
        distributed = self._distributed()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index, value in sd["state"].items():
            if not value:
                continue  # no state (an entry torch's flatten path made): as below
            if "blocks" not in value:
                state[index] = value
                continue
            # blocks keyed by str (never a list: torch.distributed.checkpoint's
            # flatten_optimizer_state_dict takes tensors, numbers and dicts only)
            prefix = self._block_key_prefix(params[index])
            blocks = {f"{prefix}{i}": block for i, block in enumerate(value["blocks"]) if block is not None}
            step = torch.tensor(float(value["step"])) if distributed else value["step"]
            state[index] = {**value, "step": step, "blocks": blocks}
        # A parameter this rank keeps no block of (another rank's under process_group, an empty FSDP2
        # shard, an empty tensor) is there with no blocks: torch.distributed.checkpoint's
        # set_optimizer_state_dict requires state for every parameter that requires a gradient.
        split = self._replicated_split(update=False)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if index not in state and p.requires_grad and not (_distributed.local(p).numel() and (
                        split is None or split.holds(p))):
                    state[index] = {"blocks": {}}
                index += 1
        return {**sd, "state": state, "param_groups": [saved_group(g) for g in sd["param_groups"]]}

    def init_state(self) -> None:
        """Allocate the state of every block this rank steps, as a first step from a zero gradient
        would, without touching the parameters; for loading a checkpoint into it
        (torch.distributed.checkpoint loads in place)::

            opt.init_state()
            sd = {"optim": opt.state_dict()}
            torch.distributed.checkpoint.load(sd, checkpoint_id=path)
            opt.load_state_dict(sd["optim"])

        torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` need no such call (they
        allocate by a step with zero gradients, docs/distributed.md)."""
        split = self._replicated_split()
        _layout.check_all(self)
        with torch.no_grad(), _precision.optimizer_math():
            for group in self.param_groups:
                hp = hyper(group)
                for p in group["params"]:
                    tensor = _distributed.local(p)
                    if tensor.numel() == 0 or "step" in self.state.get(p, {}):
                        continue
                    plan = plan_for(tensor.shape, group)
                    mine = _distributed.owned_blocks(split, p, len(plan.masks))
                    if not mine:
                        continue
                    blocks: list[dict | None] = [None] * len(plan.masks)
                    path = "adamw" if plan.adamw else self.algorithm
                    for i in mine:
                        G = torch.zeros((1,) + plan.block_shape(i), device=tensor.device)
                        bufs = INITS[path](G, plan.masks[i], hp)
                        blocks[i] = {name: buf[0].clone() for name, buf in bufs.items()}
                    self.state[p] = {"step": 0, "blocks": blocks}
                    _layout.record(self, p, group, plan)
        self._engine.version += 1
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
        before = (self.param_groups, self.state, self._split, self._layouts)
        self._layouts = {}
        with self._hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks") as held:
            try:
                self._load_state_dict(state_dict)
            except Exception:  # a refused state dict leaves the optimizer as it was
                self.param_groups, self.state, self._split, self._layouts = before
                self._engine.version += 1
                raise
        for hook in held["_optimizer_load_state_dict_post_hooks"].values():
            hook(self)

    def _load_state_dict(self, state_dict: dict) -> None:
        saved_state = state_dict["state"]
        groups = [loaded_group(dict(g)) for g in state_dict["param_groups"]]
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
            if not value:
                continue  # no state (torch's unflatten makes one for a parameter that has none)
            if "blocks" in value:
                value = self._own_blocks(param, value, split)
                if value is None:
                    continue
            self._check_loaded(key, param, value)
            self.state[param] = value
            _layout.record(self, param, self._group_of(param))  # the loaded groups' options

    def _own_blocks(self, param, value: dict, split) -> dict | None:
        """A loaded parameter state reduced to the blocks this rank steps (list form, step an int)."""
        if "step" not in value and not value["blocks"]:
            return None  # a parameter the saving rank kept no block of (see _state_dict)
        step = value["step"]
        step = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
        blocks = value["blocks"]
        if isinstance(blocks, dict):
            prefix = self._block_key_prefix(param)
            plan_len = len(plan_for(_distributed.local(param).shape, self._group_of(param)).masks)
            by_index, unknown = {}, []
            for k, block in blocks.items():
                if not str(k).startswith(prefix):
                    raise ValueError(
                        f"loaded state dict: block {k!r} of a parameter of shape {tuple(param.shape)} belongs to "
                        f"another shard (this rank's blocks start with {prefix!r}): FSDP2 shards are "
                        "preconditioned locally, so a checkpoint loads only with the same sharding (world size), "
                        "from a sharded state dict (full_state_dict=False: a full one holds one rank's shards)")
                index = str(k)[len(prefix):]
                if index.isdigit() and int(index) < plan_len:
                    by_index[int(index)] = block
                else:
                    unknown.append(str(k))
            if unknown:
                raise ValueError(
                    f"loaded state dict: blocks {sorted(unknown)} of a parameter of shape {tuple(param.shape)}, which "
                    f"has {plan_len} blocks (keys {prefix}0 to {prefix}{plan_len - 1}); was it saved for another "
                    "model or option (block_size, max_precond_dim)?")
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
        algorithm = ALGORITHMS["adamw" if plan.adamw else self.algorithm]
        for i, block in enumerate(value["blocks"]):
            if block is None:
                continue
            if algorithm.preconditioned and "exp_avg" in block:  # saved before mask_unseen existed: every
                # direction counts as seen, so the loaded run steps as it did
                for k, on in enumerate(plan.masks[i]):
                    if on and f"seen{k}" not in block:
                        block[f"seen{k}"] = torch.ones(plan.block_shape(i)[k], dtype=torch.float32,
                                                       device=block["exp_avg"].device)
            if algorithm.kl_estimate and "exp_avg" in block and "floor_scale" not in block:
                # saved before eigval_floor existed: the absolute floor it stepped with
                block["floor_scale"] = torch.ones((), dtype=torch.float32, device=block["exp_avg"].device)
            wanted = algorithm.state_names(plan.masks[i])
            missing, foreign = wanted - set(block), set(block) - wanted
            if missing:
                raise ValueError(f"{where}, block {i}, lacks {sorted(missing)}{hint}")
            if foreign:  # e.g. KL-SOAP's exp_avg_sq and lam* in a KL-Shampoo or SOAP load
                raise ValueError(f"{where}, block {i}, holds {sorted(foreign)}, which a {type(self).__name__} "
                                 f"block does not{hint}")
            if tuple(block["exp_avg"].shape) != plan.block_shape(i):
                raise ValueError(f"{where}, block {i}, holds moments of shape {tuple(block['exp_avg'].shape)}, "
                                 f"the block is {plan.block_shape(i)}{hint}")
            for name, tensor in block.items():  # saved in bf16 before the algorithm kept it float32
                if algorithm.keeps_float32(name) and tensor.is_floating_point() and tensor.dtype != torch.float32:
                    block[name] = tensor.float()

    def _group_of(self, param) -> dict:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))
