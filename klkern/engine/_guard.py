"""No step poisons the optimizer state, and the step decides so on the device.

A gradient with a NaN or Inf would spread through the state to every later step, and a finite
gradient can still overflow float32 in a step (its squares and outer products from entries of
~1e19 up). klkern skips such steps block by block, without reading anything back to the host
(the ``found_inf`` pattern of torch's fused optimizers, per block):

* a parameter whose gradient has a NaN/Inf anywhere skips every block it has;
* a block whose gradient's Frobenius norm exceeds its **gradient limit** skips: the limit is the
  largest norm for which every term the step adds to the state stays at most ``STATE_LIMIT``
  (1e30) and the update stays finite (below).

A skipped block steps with a zero gradient, betas of 1 and an update and weight decay of 0
(klkern/engine/_plan.py, klkern/algorithms/_steps.py): its state and its slice of the parameter are left exactly as
they were. Its step count advances with the others (it schedules the refreshes and the bias
corrections of a parameter that keeps its place in its batch). The optimizer counts the
parameters affected in ``nonfinite_skipped`` (a device counter, read when the user reads it and
at refresh steps) and warns once per cause.

Why the limit bounds the step. With every term of every EMA at most ``STATE_LIMIT``, every state
(a convex combination of such terms and its own previous value) stays at most ``STATE_LIMIT`` by
induction. For a block of N entries with ``||G||_F <= g``: ``|Gr| <= ||Gr||_F = ||G||_F <= g``
(the rotation is orthogonal), so momenta and first moments stay <= g and second moments <= g^2;
SOAP's and Shampoo's Gram terms ``Gr_(k) Gr_(k)^T`` are positive semi-definite with their largest
entry on the diagonal, a row sum of squares <= g^2; KL's terms ``Gr diag(1 / lam) Gr^T`` and its
projections are <= g^2 prod_{j != k} c_j^2 / s (``lam_j >= s / c_j^2``, SPEC step 5's floor, s
the block's floor scale: 1 for ``eigval_floor="absolute"``, the block's first nonzero gradient's
mean(G^2)^(1/K) for "relative"). So ``g = sqrt(STATE_LIMIT / kappa)`` with ``kappa`` = 1, or for
the KL variants the largest ``prod_{j != k} c_j^2 / s`` (:func:`gradient_limit` for s = 1; the
plan multiplies it by ``s^((K-1)/2)`` on the device, klkern/engine/_plan.py ``scaled_floor``). The
update is then finite: KL-Shampoo's ``|U| <= sqrt(N) g c_a c_b``
(<= 1e4 * 1e15 * 1.6e7 at the largest sizes), an Adam direction's ``<= sqrt(N) g / eps`` with
``eps >= 1e-16``, Shampoo's ``P`` ``<= sqrt(N) g eps^-2p`` with ``eps^-2p <= 1e16``.

Hyperparameters outside these bounds (``eps < 1e-16``; for Shampoo ``eps^-2p > 1e16``) leave the
update unbounded: those groups' stacks are **checked after the step** instead: their state is
copied before it, and each block whose new state exceeds ``STATE_LIMIT`` or whose update is not
finite is restored from the copy on the device.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..algorithms._algorithms import ALGORITHMS

__all__ = ["STATE_LIMIT", "host_values", "unbounded", "block_flags", "gradient_limit", "GRAD_SAFE"]

STATE_LIMIT = 1e30

# The gradient entry below which no 2-D block of at most max_precond_dim = 1e4 rows and columns
# reaches its gradient limit (||G||_F <= 1e4 * GRAD_SAFE = 1e9 <= sqrt(STATE_LIMIT / 4000^2)):
# a gradient that small never skips (tests/test_guard.py), for the KL variants while their floor
# scale s is at least 1 (else GRAD_SAFE * s^((K-1)/2), K the preconditioned modes).
GRAD_SAFE = 1e5


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


def unbounded(algorithm: str, group: dict) -> bool:
    """Whether the group's hyperparameters leave the update unbounded (its stacks are checked
    after the step, with a copy of their state to restore)."""
    eps = group["eps"]
    if eps < 1e-16:
        return True
    return ALGORITHMS[algorithm].inverse_root and eps ** (-2 * group["exponent"]) > 1e16


def gradient_limit(path: str, group: dict, shape: tuple, mask: tuple) -> float:
    """The largest Frobenius norm of a block's gradient that steps (module docstring)."""
    return math.sqrt(STATE_LIMIT / ALGORITHMS[path].gradient_condition(group, shape, mask))


# State that no update reads: the KL diagnostic's EMAs (optimizer.diagnostics()). They never
# decide whether a step is applied.
DIAGNOSTIC_STATE = ("kl", "kl_weight")


def block_flags(bufs: dict, U, written: list | None, batch: int, device) -> torch.Tensor:
    """(batch,) bool: the block's state that updates read is finite and <= STATE_LIMIT, its update
    finite, and the parameter views ``written`` finite."""
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
