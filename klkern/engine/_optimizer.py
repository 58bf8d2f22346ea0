"""The torch.optim surface of the four optimizers: groups, copies, counters, diagnostics.

The optimizer classes are thin (see optimizers.py). ``step()`` hands its work to
klkern/engine/_engine.py (which parameters start, the plan of the steady step, running it); the
checkpoint format (``state_dict``/``load_state_dict`` with their hooks, the keys of blocks
across ranks, ``init_state``) is klkern/engine/_checkpoint.py's base class; this module keeps the rest
of what a torch.optim user touches: ``param_groups``, ``state``, ``add_param_group``, copies and
pickling, ``nonfinite_skipped``, ``diagnostics()``.

State layout, per parameter: ``{"step": t, "blocks": [block_state, ...]}`` (a state dict keys the
blocks by their index instead, klkern/engine/_checkpoint.py) where each block
state maps names (``exp_avg``, ``Q0``, ``R0``, ``lam0``...) to tensors. Blocks that step
together are views into one stacked buffer per name (kept between steps; the KL variants'
``lam`` of every block of a device are views into one flat buffer), so a step reads and writes
its state without copies; after ``load_state_dict`` or a change in which blocks step together
the buffers are rebuilt once.
"""

from __future__ import annotations

import os
import sys
import types
import warnings

import torch

from ..algorithms._blocking import PLAN_OPTIONS
from ..algorithms._options import build_defaults, validate_group
from ..distributed import _distributed
from ..runtime import _backend, _precision
from . import _guard, _layout
from ._checkpoint import CheckpointedOptimizer
from ._engine import StepEngine
from ._graph import StepGraphs

__all__ = ["ShampooFamilyOptimizer", "tensor_bytes"]

# klkern's own files (every subpackage) and torch's: a warning points at the first frame outside them
_INTERNAL_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                  os.path.dirname(os.path.abspath(torch.__file__)))



def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except (RuntimeError, AssertionError):  # a CUDA that reports itself but cannot be used
        return False


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


class ShampooFamilyOptimizer(CheckpointedOptimizer):
    """Base class of KLShampoo, KLSOAP, SOAP and Shampoo (see optimizers.py)."""

    algorithm = ""
    _engine: StepEngine  # built by _reset_derived (None until then)

    def __init__(self, params, lr=None, *, backend: str = "auto", process_group=None,
                 communication_dtype: torch.dtype = torch.float32, cuda_graph: bool = False, **hyperparameters):
        if lr is not None:  # positional, as torch.optim's optimizers take it
            hyperparameters["lr"] = lr
        if backend not in _backend.BACKENDS:
            raise ValueError(f"invalid backend={backend!r}: must be one of {_backend.BACKENDS}")
        if process_group is not None:
            _distributed.check_process_group(process_group)
        if communication_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"invalid communication_dtype={communication_dtype!r}: must be torch.float32 "
                             "(exact) or torch.bfloat16 (the updates are rounded)")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"invalid cuda_graph={cuda_graph!r}: must be True (capture the steady step in a CUDA "
                             "graph and replay it) or False")
        defaults = build_defaults(self.algorithm, hyperparameters, type(self).__name__,
                                  constructor=("backend", "process_group", "communication_dtype", "cuda_graph"))
        self.backend = backend
        self.cuda_graph = cuda_graph
        self.process_group = process_group
        self.communication_dtype = communication_dtype
        self._engine = None  # type: ignore[assignment]
        # parameter-steps skipped for a NaN/Inf gradient or rolled back (klkern/engine/_guard.py): the part
        # read back to the host; the rest is on the device until nonfinite_skipped is read
        self._nonfinite = 0
        self._layouts: dict = {}  # id(param) -> the _layout.Layout its state was allocated for
        self._reset_derived()
        super().__init__(params, defaults)

    # What a copy (copy.deepcopy, pickle, torch.save(optimizer)) carries besides torch.optim's
    # defaults, state and param_groups: every constructor option and public counter. Everything
    # else is derived from them and rebuilt (_reset_derived). process_group is a communicator:
    # a deep copy shares it, pickling refuses it (save state_dict() instead).
    _COPIED = ("backend", "process_group", "communication_dtype", "cuda_graph", "nonfinite_skipped")

    def _reset_derived(self) -> None:
        """Structures derived from the param groups and the state, rebuilt when either changes."""
        if getattr(self, "_engine", None) is not None:
            self._read_counts()  # what the old plans counted on the device
        self._split: _distributed.ReplicatedSplit | None = None
        self._split_key: tuple | None = None  # the group options the split was last checked against
        self._engine = StepEngine(self)
        self._graphs = StepGraphs(self)
        self._warned: set[str] = set()  # causes already warned about (each once)
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
        params = [p for g in self.param_groups for p in g["params"]]
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._COPIED},
                "layouts": [self._layouts.get(id(p)) for p in params]}

    def __setstate__(self, state: dict) -> None:
        had_differentiable = "differentiable" in state.get("defaults", {})
        state = dict(state)
        self._engine = None  # type: ignore[assignment]
        self._nonfinite = int(state.pop("nonfinite_skipped", 0))
        layouts = state.pop("layouts", [])
        super().__setstate__(state)
        params = [p for g in self.param_groups for p in g["params"]]
        self._layouts = {id(p): layout for p, layout in zip(params, layouts) if layout is not None}
        if not had_differentiable:  # torch.optim adds it for its own optimizers; a copy equals its original
            self.defaults.pop("differentiable", None)
        for name, value in (("backend", "auto"), ("process_group", None), ("communication_dtype", torch.float32),
                            ("cuda_graph", False)):
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
        """Perform one optimisation step (``closure`` re-evaluates the loss).

        A steady step (klkern/engine/_engine.py) reads nothing back to the host: a NaN/Inf gradient or
        an overflowing block is skipped on the device, and counted and warned about when
        ``nonfinite_skipped`` is read or at the next refresh step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            _untraced_step()(self)
        else:
            self._step()
        return loss

    def _step(self) -> None:
        if _capturing():
            raise RuntimeError(
                f"{type(self).__name__}.step() is being captured in a CUDA graph: its refreshes are scheduled on "
                "the host, so a replayed capture would never refresh; pass cuda_graph=True instead (klkern "
                "captures the steady step itself and runs refresh steps eagerly)")
        split = self._replicated_split()
        engine = self._engine
        # Every product is fp32-accurate unless it follows the group's matmul_precision
        # (klkern.runtime._precision), whatever torch's global setting is; that setting is read
        # here and by optimizer_math, never written (it is process-wide).
        self._global_modes = _precision.snapshot()
        due = False
        with _precision.optimizer_math():
            if split is not None:
                split.before_step()
            work = engine.collect()
            initialised_only, later = engine.start(work)
            for plan in engine.plans_for(work, initialised_only):
                due = engine.run(plan) or due
            engine.finish_waiting(later)
            if split is not None:
                split.exchange()  # every rank calls it every step, whatever it skipped
        if due:
            self._read_counts()

    @property
    def nonfinite_skipped(self) -> int:
        """Parameter-steps skipped for a NaN/Inf gradient or rolled back (klkern/engine/_guard.py).
        Reading it reads the device's counters (a host synchronisation) and warns once per cause."""
        self._read_counts()
        return self._nonfinite

    @nonfinite_skipped.setter
    def nonfinite_skipped(self, value: int) -> None:
        self._read_counts()
        self._nonfinite = int(value)

    def _read_counts(self) -> None:
        """Fold the device's skip counters into nonfinite_skipped and warn (once per cause)."""
        engine = getattr(self, "_engine", None)
        if engine is None:
            return
        gradient, rolled = [], []
        for plan in engine.plans:
            counts, affected = plan.read_counts()
            self._nonfinite += counts[0] + counts[1]
            if counts[0]:
                gradient += [tuple(p.shape) for p in affected[0]]
            if counts[1]:
                rolled += [tuple(p.shape) for p in affected[1]]
        self._warn_skipped(gradient, rolled)

    def _count_skipped(self, gradient: list, rolled: list) -> None:
        """Skips the host already knows of (shapes of the parameters): counted and warned now."""
        self._nonfinite += len(gradient) + len(rolled)
        self._warn_skipped(gradient, rolled)

    def _warn_skipped(self, gradient: list, rolled: list) -> None:
        if gradient:
            self._warn_once("gradient", (
                f"{type(self).__name__}: gradient with NaN/Inf for parameters of shape {gradient}; "
                "these parameters and their state were left unchanged for those steps (counted in "
                "optimizer.nonfinite_skipped; this warning is shown once)"))
        if rolled:
            self._warn_once("rollback", (
                f"{type(self).__name__}: a step would have taken the state or the update of parameters of "
                f"shape {rolled} beyond {_guard.STATE_LIMIT:g} or non-finite; those blocks were rolled back to "
                "their previous state and skipped for that step (counted in optimizer.nonfinite_skipped; this "
                "warning is shown once)"))

    def _replicated_split(self, update: bool = True) -> _distributed.ReplicatedSplit | None:
        """The block-to-rank assignment (``process_group`` given), built once from the shapes and
        updated when a group's option changes it (``update``: every rank calls it; a state dict,
        which one rank may take alone, leaves that to the next step)."""
        if self.process_group is None:
            return None
        if self._split is None:
            if any(_distributed.is_dtensor(p) for g in self.param_groups for p in g["params"]):
                raise ValueError("process_group is for replicated (DDP) parameters; these are DTensors (FSDP2), "
                                 "whose shards klkern preconditions locally: pass process_group=None")
            self._split = _distributed.ReplicatedSplit(self.process_group, self.communication_dtype,
                                                       self.algorithm, self.param_groups)
        # what the assignment follows; re-checked (and parameters re-assigned) when it changes
        key = tuple((tuple(g[k] for k in PLAN_OPTIONS), g["normalize_grads"], tuple(p.shape for p in g["params"]))
                    for g in self.param_groups)
        if update and key != self._split_key:
            _layout.check_split(self, self._split)
            self._split_key = key
        return self._split

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            # point at the user's line: the first caller outside klkern and torch (step() is wrapped
            # by torch's no_grad and hook machinery, a varying number of frames)
            frame: types.FrameType | None = sys._getframe(1)
            level = 2
            while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
                frame, level = frame.f_back, level + 1
            warnings.warn(message, RuntimeWarning, stacklevel=level)

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

    # ------------------------------------------------------------ state dict

    def diagnostics(self, named_parameters=None) -> dict:
        """Per parameter (keyed by its index, or by name given ``model.named_parameters()``):
        ``kl`` (EMA of the per-entry KL objective of its covariance estimate relative to an
        isotropic one; 0: no better than the identity, lower fits better), ``eig_min``/``eig_max``
        (its eigenvalue estimates), ``staleness`` (off-diagonal energy of Q^T S Q relative to its
        diagonal) and ``update_rms``; AdamW-path parameters have ``update_rms`` only. One host
        synchronisation per device (klkern/tools/_diagnostics.py). Cheap for KL-Shampoo, KL-SOAP and
        SOAP (a fraction of a step); for Shampoo, whose state keeps no eigenbasis, a call
        eigendecomposes every factor and root, about the cost of one root refresh."""
        from ..tools import _diagnostics

        return _diagnostics.collect(self, named_parameters)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (stacked buffers counted once)."""
        return tensor_bytes(self.state)


# torch.compile(opt.step) (PyTorch's recipe for compiled optimizers) runs klkern's step as it is,
# never traced: the step plan, its host-side schedule (refreshes, the plan's validity) and its own
# CUDA graph (cuda_graph=True) are Python that a trace would specialise on every step count. A
# compiled step therefore equals the eager one exactly (tests/test_graph.py). The wrapper is made
# on first use, by a trace (importing torch._dynamo at klkern's import would import triton before
# a test can set TRITON_INTERPRET), and the eager step does not go through it.
_UNTRACED: list = []


def _untraced_step():
    if not _UNTRACED:
        _UNTRACED.append(torch.compiler.disable(ShampooFamilyOptimizer._step))
    return _UNTRACED[0]
