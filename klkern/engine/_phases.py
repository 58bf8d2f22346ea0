"""Which path runs a stack's phases: klkern/algorithms/_steps.py's torch steps, or the Triton kernels
(klkern/algorithms/_triton_path.py) when klkern/runtime/_backend.py resolves the backend to Triton for the stack's
device and precision and its block shape is supported. Under ``backend="auto"`` a kernel variant
runs on trial until it has run every phase once; a variant that fails is undone (the stack's
state restored from the copy taken before), recorded, warned about once and replaced by the torch
path for the rest of the run (the same math); ``backend="triton"`` raises instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..algorithms import _steps
from ..algorithms._hyper import StepHyperparameters
from ..runtime import _backend, _errors
from . import _guard
from ._stack import Stack

__all__ = ["KernelVariant", "kernel_steps", "run_phase", "masks_gradient"]


class KernelVariant(NamedTuple):
    """What decides whether a stack's Triton step compiles and runs (proven or failed once per
    variant under backend="auto")."""

    path: str
    shape: tuple
    mask: tuple
    device: torch.device
    rotation_mode: str
    state_dtype: torch.dtype
    roots: bool  # Shampoo's steps with inverse roots


def kernel_steps(opt, st: Stack, hp: StepHyperparameters):
    """The Triton step of the stack when the backend picks the kernels for it, else None."""
    if _backend.resolve(opt.backend, st.device, hp.rotation_mode) != "triton":
        return None
    from ..algorithms import _triton_path

    if not _triton_path.supports(st.path, st.shape, st.mask, hp):
        return None
    variant = KernelVariant(st.path, st.shape, st.mask, st.device, hp.rotation_mode, hp.state_dtype,
                            st.algorithm.inverse_root and st.t >= hp.precondition_frequency)
    if _backend.requested(opt.backend) == "auto":
        if variant in opt._kernels_failed:
            return None
        if variant not in opt._kernels_proven:
            st.cache["trial"] = (variant, {name: buf.clone() for name, buf in st.bufs.items()})
    return _triton_path.STEPS[st.path]

def masks_gradient(opt, st: Stack, hp: StepHyperparameters, kernels: dict) -> bool:
    """Whether the stack runs kernels that mask a block that does not step themselves (its
    gradient is then left as it came)."""
    if kernels.get(id(st)) is None:
        return False
    from ..algorithms import _triton_path

    return _triton_path.masks_gradient(st, hp, _guard.unbounded(opt.algorithm, st.group))


def run_phase(opt, st: Stack, hp: StepHyperparameters, kernels: dict, phase: int, carry):
    """Run phase ``phase`` (0 project, 1 update, 2 late) of the stack on its path; a Triton
    variant on trial under backend="auto" that fails is undone and replaced by the torch path
    (one warning); backend="triton" raises."""
    steps = kernels.get(id(st))
    fn = _steps.STEPS[st.path][phase] if steps is None else steps[phase]
    if fn is None:
        return None
    if steps is None:
        return fn(st, hp, carry)
    trial = st.cache.get("trial")
    try:
        result = fn(st, hp, carry)
    except Exception as err:  # noqa: BLE001 - any kernel failure: the torch path takes over
        if trial is None:
            raise
        variant, saved = trial
        for name, buf in st.bufs.items():
            buf.copy_(saved[name])
        reason = _errors.summary(err)
        opt._kernels_failed[variant] = _errors.describe(err)
        opt._warn_once(f"kernel:{reason}", (
            f"{type(opt).__name__}: the Triton kernels failed ({reason}) for {variant.path} blocks of shape "
            f"{variant.shape} on {variant.device}; this step and the later ones use the torch path for them "
            "(same math). backend='triton' raises instead; run `python -m klkern.check` to see what fails."))
        masked = masks_gradient(opt, st, hp, kernels)
        kernels[id(st)] = None
        st.cache.pop("trial", None)
        if masked:  # the torch steps need the skipped blocks' gradients zeroed
            st.zero_skipped()
        project = _steps.STEPS[st.path][0]
        if phase >= 1 and project is not None:
            carry = project(st, hp, None)  # the torch path's own projections
        return run_phase(opt, st, hp, kernels, phase, carry)
    return result
