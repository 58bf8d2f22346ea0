"""Test helpers: run fast and reference optimizers side by side, convert state."""

from __future__ import annotations

import copy

import torch

import klkern
from klkern import reference as R

PAIRS = {
    "klshampoo": (klkern.KLShampoo, R.ReferenceKLShampoo),
    "klsoap": (klkern.KLSOAP, R.ReferenceKLSOAP),
    "soap": (klkern.SOAP, R.ReferenceSOAP),
    "shampoo": (klkern.Shampoo, R.ReferenceShampoo),
}


def mlp(seed: int = 0) -> torch.nn.Module:
    """Three square 16 x 16 layers: with a fresh batch of 64 per step every weight gradient has
    full rank. (Rank-deficient blocks, whose directions without energy get canonical bases, are
    tests/test_continuity.py's and bench/ddp_agreement.py's.)"""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 16))


def kernel_device() -> torch.device | None:
    """Where this test process runs the Triton kernels: CUDA on a GPU machine (the interpreter is
    off there), the CPU under the interpreter (conftest.py sets it without a GPU), else None."""
    from klkern.runtime import _backend

    if _backend.triton_import_error() is not None:
        return None
    if _backend.interpreting():
        return None if _backend.interpreter_problem() else torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else None


def kernel_skip_reason() -> str:
    """Why :func:`kernel_device` is None (for skip marks)."""
    from klkern.runtime import _backend

    if _backend.triton_import_error() is not None:
        return f"triton not importable: {_backend.triton_import_error()}"
    if _backend.interpreter_problem():
        return f"needs a GPU; Triton's interpreter cannot run here: {_backend.interpreter_problem()}"
    return "needs a GPU or TRITON_INTERPRET=1"


def kept_float32(name: str, block: dict, key: str) -> bool:
    """Whether state ``key`` of a ``block`` of optimizer ``name`` ("klshampoo", ...) is float32
    whatever state_dtype says (a block holding only Adam moments is the AdamW path's)."""
    from klkern.algorithms._algorithms import ALGORITHMS

    return ALGORITHMS["adamw" if set(block) <= {"exp_avg", "exp_avg_sq"} else name].keeps_float32(key)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): a relative error on the tensor's scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def moved_err(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> float:
    """max |a - b| / max |b - start|: an error on the scale of how far ``b`` moved from ``start``
    (a tolerance on the parameters' own scale lets a path that barely moves them pass)."""
    a, b, start = a.detach().double(), b.detach().double(), start.detach().double()
    return float((a - b).abs().max() / (b - start).abs().max().clamp(min=1e-30))


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]


def quadratic_grads(params, targets, step, noise=0.05, seed=1):
    """Gradient of 0.5 * sum ||A (W - T)||^2-like loss plus deterministic noise.

    Depends on the current parameters (so trajectories are real optimisation
    runs) and on the step only through the seeded noise.
    """
    g = torch.Generator().manual_seed(seed * 100003 + step)
    for p, t in zip(params, targets):
        diff = p.detach().float() - t
        grad = diff * (1.0 + diff.abs()) + noise * torch.randn(p.shape, generator=g)
        p.grad = grad.to(p.dtype)


def fast_block_to_reference(algorithm: str, block: dict, mask, adamw: bool) -> dict:
    """A fast-path block state in the reference's (SPEC's) representation."""
    f = {k: v.float().clone() for k, v in block.items()}
    if adamw:
        return {"exp_avg": f["exp_avg"], "exp_avg_sq": f["exp_avg_sq"]}
    modes = range(len(mask))
    seen = [f[f"seen{k}"] if mask[k] else None for k in modes]
    if algorithm == "shampoo":
        return {
            "exp_avg": f["exp_avg"],
            "exp_avg_sq": f["exp_avg_sq"],
            "L": [f[f"L{k}"] if mask[k] else None for k in modes],
            "root": [f[f"root{k}"] if mask[k] else None for k in modes],
            "seen": seen,
        }
    Qs = [f[f"Q{k}"] if mask[k] else None for k in modes]
    factors = [Qs[k] @ f[f"R{k}"] @ Qs[k].T if mask[k] else None for k in modes]
    out = {"Q": Qs, "seen": seen}
    if algorithm == "soap":
        out.update(GG=factors, exp_avg=f["exp_avg"], exp_avg_sq=f["exp_avg_sq"])
        return out
    out.update(S=factors, lam=[f[f"lam{k}"] if mask[k] else None for k in modes], anchor=float(f["floor_scale"]))
    if algorithm == "klshampoo":
        out["exp_avg"] = R.rotate_back(f["exp_avg"], Qs)  # fast keeps momentum rotated
    else:
        out.update(exp_avg=f["exp_avg"], exp_avg_sq=f["exp_avg_sq"])
    return out


def reference_state_from_fast(fast, ref) -> None:
    """Overwrite ``ref``'s state (and parameters) with ``fast``'s, converted."""
    ref.state.clear()
    for gf, gr in zip(fast.param_groups, ref.param_groups):
        for pf, pr in zip(gf["params"], gr["params"]):
            pr.data.copy_(pf.data)
            if pf not in fast.state:
                continue
            st = fast.state[pf]
            plan = R.plan_for(pf.shape, gf)
            ref.state[pr] = {
                "step": st["step"],
                "blocks": [
                    fast_block_to_reference(fast.algorithm, b, plan.masks[i], plan.adamw)
                    for i, b in enumerate(st["blocks"])
                ],
            }


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def deepcopy_state(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    """Two (nested) state dicts hold the same keys, and tensors equal to the bit in the same dtype."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
