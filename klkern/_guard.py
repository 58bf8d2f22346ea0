"""No step poisons the optimizer state: guarded batches, snapshots and rollback.

A finite gradient can still make a step's state or update non-finite (its
squares and outer products overflow float32 from entries of ~1e19 up), and
later steps would spread that to every parameter. klkern therefore
*guards* a batch of blocks when one of its parameters is at risk:

* its gradient's largest magnitude exceeds ``GRAD_SAFE`` (1e5), or
* its group's hyperparameters do not bound the update (``eps < 1e-16``; for
  Shampoo also ``eps ** (-2 * exponent) > 1e16``).

A guarded batch's state and its parameters are copied before the step; after
it, one fused reduction per stacked buffer gives each block a flag: its new
state is finite and at most ``STATE_LIMIT`` (1e30) in magnitude, and its
update (or, when a kernel wrote the parameter, the new parameter values) is
finite. At the end of the step, with one host synchronisation for all
guarded batches, every block that fails is restored: its state, its slice of
the parameter and, when all of a parameter's blocks fail, its step count (a
parameter whose initialisation fails is left uninitialised). The optimizer
counts the affected parameters in ``nonfinite_skipped`` and warns once.

Why unguarded steps need no check: with every gradient entry at most
``GRAD_SAFE`` and the state at most ``STATE_LIMIT``, every term a step adds
is bounded. For a block of m x n <= 1e4 x 1e4 (``max_precond_dim``):
|Gr| <= ||G||_F <= 1e9; KL factor and eigenvalue terms <= |Gr|^2 c^2 <=
1.6e25 (c <= 4000: lam >= 1/c^2); SOAP's and Shampoo's Gram terms <=
n |Gr|^2 <= 1e22; KL's update <= sqrt(mn) |M| c^2 <= 1.6e20; an Adam
direction <= |m| / eps <= 1e25 (eps >= 1e-16); Shampoo's roots <=
eps^-p. EMAs are convex combinations, so the state stays below
``STATE_LIMIT`` and every product of it (refreshes included) is finite.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ._blocking import writes_into

__all__ = ["GRAD_SAFE", "STATE_LIMIT", "host_values", "grad_checks", "unbounded", "block_flags", "StepGuard"]

GRAD_SAFE = 1e5
STATE_LIMIT = 1e30


def host_values(scalars: list) -> list[float]:
    """0-d tensors (on any devices) as floats, with one transfer per device."""
    by_device: dict = defaultdict(list)
    for index, value in enumerate(scalars):
        by_device[value.device].append(index)
    out = [0.0] * len(scalars)
    for indices in by_device.values():
        for index, value in zip(indices, torch.stack([scalars[i] for i in indices]).tolist()):
            out[index] = value
    return out


def grad_checks(grads: list) -> tuple[list[bool], list[bool]]:
    """(finite, large) per gradient: it has no NaN/Inf; its largest magnitude exceeds GRAD_SAFE.
    One fused reduction and one host synchronisation per device."""
    amax = host_values([g.detach().abs().amax().float() if g.numel() else torch.zeros((), device=g.device)
                        for g in grads])
    finite = [math.isfinite(a) for a in amax]
    return finite, [f and a > GRAD_SAFE for f, a in zip(finite, amax)]


def unbounded(algorithm: str, group: dict) -> bool:
    """Whether the group's hyperparameters leave the update unbounded (every batch is guarded)."""
    eps = group["eps"]
    if eps < 1e-16:
        return True
    return algorithm == "shampoo" and eps ** (-2 * group["exponent"]) > 1e16


# State that no update reads: the KL diagnostic's EMAs (optimizer.diagnostics()). They never
# decide whether a step is applied.
DIAGNOSTIC_STATE = ("kl", "kl_weight")


def block_flags(bufs: dict, U, written: list | None, batch: int, device) -> torch.Tensor:
    """(batch,) bool: the block's state that updates read is finite and <= STATE_LIMIT, its update
    finite, and the parameter views a kernel wrote (``written``) finite."""
    parts = [buf.detach().reshape(batch, -1).abs().amax(1).float() for name, buf in bufs.items()
             if buf.is_floating_point() and buf.numel() and name not in DIAGNOSTIC_STATE]
    ok = torch.ones(batch, dtype=torch.bool, device=device)
    if parts:
        ok &= torch.stack(parts).amax(0) <= STATE_LIMIT  # NaN compares False
    if U is not None:
        ok &= torch.isfinite(U.reshape(batch, -1)).all(1)
    if written:
        ok &= torch.stack([torch.isfinite(v).all() for v in written]).to(device)
    return ok


class StepGuard:
    """The guarded batches of one step: their snapshots, flags, and the rollback at the end."""

    def __init__(self):
        self.records: list = []

    @staticmethod
    def copy_bufs(bufs: dict) -> dict:
        return {name: buf.clone() for name, buf in bufs.items()}

    def add(self, kind: str, bufs: dict, before: dict | None, members: list, places: list, saved: list | None,
            blocks_of: dict, flags: torch.Tensor) -> None:
        """``kind`` "init" (the batch's state was just created) or "step"; ``members`` the
        (param, block index, G) of the batch, ``places`` their (tensor, plan) (the tensor the
        update is written to: the parameter or its local shard), ``saved`` copies of their blocks
        taken before the step, ``blocks_of`` id(param) -> its number of blocks stepped on this
        rank; ``flags`` from :func:`block_flags`."""
        self.records.append((kind, bufs, before, members, places, saved, blocks_of, flags))

    @staticmethod
    def restore_block(tensor: torch.Tensor, plan, i: int, saved: torch.Tensor) -> None:
        """Write a saved block back into the parameter (through the block layout when it is a copy)."""
        blocks = plan.extract(tensor.detach())
        if writes_into(blocks[i], tensor):
            blocks[i].copy_(saved)
            return
        blocks = [b.clone() for b in blocks]
        blocks[i] = saved
        tensor.detach().copy_(plan.assemble(blocks))

    def finish(self, state: dict) -> list:
        """Roll back every failing block (one host synchronisation per device); returns the
        parameters affected."""
        if not self.records:
            return []
        by_device: dict = defaultdict(list)
        for r, record in enumerate(self.records):
            by_device[record[7].device].append(r)
        ok: dict[int, list] = {}
        for indices in by_device.values():
            flat = torch.cat([self.records[r][7] for r in indices]).tolist()
            for r in indices:
                n = self.records[r][7].numel()
                ok[r], flat = flat[:n], flat[n:]
        failed: dict[int, list] = {}
        reset: dict[int, torch.Tensor] = {}
        blocks_of: dict[int, int] = {}
        for r, (kind, bufs, before, members, places, saved, counts, _) in enumerate(self.records):
            blocks_of.update(counts)
            for b, (p, _, _) in enumerate(members):
                if ok[r][b]:
                    continue
                if kind == "init":
                    reset[id(p)] = p
                    continue
                failed.setdefault(id(p), [p, 0])[1] += 1
                for name, buf in bufs.items():
                    buf[b].copy_(before[name][b])
                self.restore_block(*places[b], members[b][1], saved[b])
        affected = {}
        for pid, (p, count) in failed.items():
            if count == blocks_of[pid] and pid not in reset:
                state[p]["step"] -= 1
            affected[pid] = p
        for pid, p in reset.items():
            state.pop(p, None)
            affected[pid] = p
        return list(affected.values())
