"""klkern's own CUDA graph of the steady step (``cuda_graph=True``).

A steady step (klkern/engine/_engine.py) reads nothing back to the host and takes every number that
changes from step to step (the learning rate, the bias corrections, the eigenvalue EMA's weight)
from one small buffer uploaded before it. So the part after the gradients are gathered can be
captured once and replayed:

    each step:  gather the gradients      one multi-tensor copy (outside the graph: ``.grad``
                                           tensors need not stay the same from step to step)
                upload the coefficients   one copy from host memory
                replay                    one launch for the whole steady step

What a replay cannot see is checked on the host before each replay, and a step that differs is
run eagerly (and the graph captured again when the new kind of step repeats): a refresh step
(and the first update, which evaluates the KL diagnostic) is always eager; a new plan (a param
group added, a load, parameters or their dtypes changed, a block starting) discards the graph;
a change of any hyperparameter other than the learning rate, of the matmul precision, of the
backend's choice, or of the step's kind (spike_threshold in force, Shampoo's roots ready)
captures again. A graph is never replayed stale.

The first step of a kind runs eagerly (it warms up cuBLAS and compiles the kernels); the second
is captured and replayed, the later ones are replayed.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

__all__ = ["StepGraphs", "graph_factory"]


class _CudaGraph:
    """A captured step on CUDA (torch.cuda.CUDAGraph, with the step's own memory pool)."""

    def __init__(self, fn, device: torch.device):
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.cuda.graph(self.graph, stream=stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)

    def replay(self) -> None:
        self.graph.replay()


class EmulatedGraph:
    """What a captured graph does, on any device, for tests without a GPU: the step's function as
    it was at capture (the hyperparameters it was built with are the ones a graph would have
    baked in) called again at each replay. Capturing runs it once, as capture-then-replay does."""

    def __init__(self, fn, device: torch.device):
        self.fn = fn
        self.replays = 0
        fn()

    def replay(self) -> None:
        self.replays += 1
        self.fn()


def graph_factory(device: torch.device):
    """The graph class for ``device``: a CUDA graph on CUDA (klkern.cuda_graph needs CUDA)."""
    if EMULATE:
        return EmulatedGraph
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the parameters on a CUDA device, got {device}; pass "
                         "cuda_graph=False on the CPU")
    return _CudaGraph


# Tests set this to replay the step's function instead of a CUDA graph (tests/test_graph.py).
EMULATE = False

# Group options that the captured step reads as numbers of its own (not from the uploaded
# coefficients): lr is uploaded every step, and "params" is the group's parameter list.
_UPLOADED = ("lr", "params")


class CapturedStep(NamedTuple):
    """A device plan's captured steady step and what it was captured from."""

    plan: object  # the klkern.engine._plan.DevicePlan it belongs to
    signature: tuple  # StepGraphs.signature at capture
    graph: object  # the replayable graph (_CudaGraph or EmulatedGraph)


class StepGraphs:
    """The captured steady step of each device plan of an optimizer."""

    @property
    def opt(self):
        """The optimizer this belongs to (held weakly)."""
        return self._opt()

    def __init__(self, opt):
        self._opt = weakref.ref(opt)  # no cycle: the optimizer (and its process group) is freed
        # when its last user reference goes, not at a later garbage collection
        self.captured: dict[int, CapturedStep] = {}  # id(plan) -> its captured step
        self.seen: dict = {}  # id(plan) -> the signature of the last eager steady step

    def signature(self, plan, hps: dict, modes: dict) -> tuple | None:
        """What the captured step was built from, or None when this step must run eagerly."""
        opt = self.opt
        if plan.has_waiting or any(st.refresh or st.track_kl or st.cache.get("trial") for st in plan.stacks):
            return None
        parts = []
        for st in plan.stacks:
            hp = hps[id(st)]  # the group's options and the precisions its products run at
            options = (tuple(sorted((k, _frozen(v)) for k, v in st.group.items() if k not in _UPLOADED)),
                       hp.rotation_mode, hp.factor_mode)
            parts.append((id(st), st.spike, getattr(st, "roots", False), options))
        return (plan.epoch, tuple(parts), tuple(sorted(modes.items())), opt.backend,
                tuple(sorted(map(str, opt._kernels_failed))))

    def ready(self, plan, hps: dict):
        """The graph to replay for this step, or None (run it eagerly, maybe capturing)."""
        entry = self.captured.get(id(plan))
        if entry is None or entry.plan is not plan:
            return None
        return entry.graph if entry.signature == self.signature(plan, hps, self.opt._global_modes) else None

    def capture(self, plan, hps: dict, fn) -> None:
        """Run this (eager) step; capture it when the same kind of step ran eagerly before."""
        signature = self.signature(plan, hps, self.opt._global_modes)
        if signature is None or self.seen.get(id(plan)) != signature:
            self.seen[id(plan)] = signature
            fn()
            return
        graph = graph_factory(plan.device)(fn, plan.device)
        self.captured = {key: entry for key, entry in self.captured.items() if entry.plan in self.opt._engine.plans}
        self.captured[id(plan)] = CapturedStep(plan, signature, graph)
        if isinstance(graph, _CudaGraph):
            graph.replay()  # capturing ran nothing: this step is the first replay

    def clear(self) -> None:
        self.captured.clear()
        self.seen.clear()


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return value if isinstance(value, (int, float, str, bool, type(None), torch.dtype)) else repr(value)
