"""The layout a parameter's state was allocated for, and what a step does when it changed.

A parameter's state follows its block plan (klkern/algorithms/_blocking.py: ``block_size``,
``max_precond_dim``, ``merge_dims``, ``precondition_1d``, ``data_format``, ``large_dim_policy``
and the shape of the parameter) and ``state_dtype``. torch.optim lets a user change a group's
options between steps (``opt.param_groups[i][key] = value``, e.g. after a resume), so each state
remembers the layout it was allocated for (:func:`record`: at its initialisation, ``init_state``
and ``load_state_dict``, carried by copies) and a step compares it with the group's (:func:`check`,
an identity test per parameter on a steady step). When they differ the step never runs on the old
state:

* a different block plan: the parameter's state restarts, as a fresh optimizer with the new
  values would start it: dropped, and initialised from this step's gradient (step count 0);
  warned once per option;
* a different ``state_dtype`` only: the state is converted to it (the names kept in float32
  whatever ``state_dtype`` says stay float32), as the next write would round it.

With ``process_group`` the block-to-rank assignment follows the plans and ``normalize_grads`` (a
parameter whose blocks are assigned as a whole): :func:`check_split` re-assigns a parameter whose
assignment changed, its state restarted (a new plan) or moved to the new owners.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..algorithms._blocking import PLAN_OPTIONS, BlockPlan, plan_for
from ..algorithms._algorithms import ALGORITHMS
from ..distributed import _distributed

__all__ = ["Layout", "STRUCTURAL", "check", "check_all", "check_split", "record", "structure_key"]

# Group options that decide how parameters are cut into blocks and stored, or the plan's tables: a
# change rebuilds the step plan (klkern/engine/_plan.py). The others (lr, betas, eps, ...) are read
# at every step.
STRUCTURAL = PLAN_OPTIONS + ("state_dtype", "eigval_clamp", "eigenbasis", "exponent", "stagger_refresh",
                             "precondition_frequency")


def structure_key(group: dict) -> tuple:
    return tuple(group.get(name) for name in STRUCTURAL)


class Layout(NamedTuple):
    """What a parameter's state was allocated for."""

    plan: BlockPlan
    options: tuple  # the group's PLAN_OPTIONS values
    state_dtype: torch.dtype


def record(opt, p, group: dict, plan: BlockPlan | None = None) -> None:
    """Remember the layout ``p``'s state is allocated for (the group's current options)."""
    if plan is None:
        plan = plan_for(_distributed.local(p).shape, group)
    opt._layouts[id(p)] = Layout(plan, tuple(group[k] for k in PLAN_OPTIONS), group["state_dtype"])


def check(opt, p, group: dict, plan: BlockPlan, index: int) -> None:
    """Before ``p`` steps (it has state): restart or convert its state when the layout changed."""
    known = opt._layouts.get(id(p))
    if known is not None and known.plan is plan and known.state_dtype is group["state_dtype"]:
        return  # the steady case: one identity test
    if known is None:  # state assigned by hand, or a copy made before layouts were recorded
        record(opt, p, group, plan)
        return
    if known.plan != plan:
        changes = [f"{name}={old!r} -> {group[name]!r}" for name, old in zip(PLAN_OPTIONS, known.options)
                   if old != group[name]]
        if known.plan.shape != plan.shape:
            changes.append(f"the parameter's shape {known.plan.shape} -> {plan.shape}")
        restart(opt, p, group, index, changes)
        return
    if known.state_dtype != group["state_dtype"]:
        _convert(opt, p, group["state_dtype"], ALGORITHMS["adamw" if plan.adamw else opt.algorithm])
    record(opt, p, group, plan)


def check_all(opt) -> None:
    """:func:`check` for every parameter with state (before a state dict is taken or the state
    allocated, so that neither holds state of another layout)."""
    for index, group in enumerate(opt.param_groups):
        for p in group["params"]:
            if "step" in opt.state.get(p, {}):
                check(opt, p, group, plan_for(_distributed.local(p).shape, group), index)


def check_split(opt, split) -> None:
    """With ``process_group``: re-assign the parameters whose blocks' assignment changed. A new
    plan restarts their state (as on one process); ``normalize_grads`` changed for a parameter of
    several blocks (assigned as a whole or block by block) moves each block's state to its new
    owner, so the run goes on as on one process (a collective: every rank calls it)."""
    for group, p, index, old_owner in split.update(opt.algorithm, opt.param_groups):
        if old_owner is None:  # a new plan: restarted, naming the options that changed it
            if "step" in opt.state.get(p, {}):
                check(opt, p, group, plan_for(_distributed.local(p).shape, group), index)
            continue
        state = split.move(p, old_owner, opt.state.pop(p, None) or None)
        if state is not None:
            opt.state[p] = state
            record(opt, p, group)
        else:
            opt._layouts.pop(id(p), None)
        opt._unscaled.pop(id(p), None)
        opt._unscaled_known = False  # the moved blocks' waiting, found again from the state
        opt._engine.version += 1


def restart(opt, p, group: dict, index: int, changes: list) -> None:
    """Drop ``p``'s state: its next gradient initialises it, as in a fresh optimizer."""
    opt.state.pop(p, None)
    opt._unscaled.pop(id(p), None)
    opt._layouts.pop(id(p), None)
    opt._engine.grad_views.pop(id(p), None)
    opt._engine.version += 1
    opt._warn_once(f"layout:{','.join(c.split('=')[0] for c in changes)}", (
        f"{type(opt).__name__}: param group {index} changed after its state was allocated ({'; '.join(changes)}), "
        "which changes its blocks: the state of such parameters restarts from their next gradient, as in a fresh "
        "optimizer with the new values (docs/algorithms.md, 'Changing options between steps'; this warning is "
        "shown once)"))


def _convert(opt, p, dtype: torch.dtype, algorithm) -> None:
    """``p``'s state in ``dtype`` (what ``algorithm`` keeps float32 stays float32)."""
    for block in opt.state[p]["blocks"]:
        if block is None:
            continue
        for name, value in block.items():
            if not algorithm.keeps_float32(name) and value.dtype != dtype:
                block[name] = value.to(dtype)
    opt._engine.version += 1
