"""The hyperparameters a step reads, typed: one frozen record per stack and step.

``hyper(group, ...)`` resolves a param group once per step into a
:class:`StepHyperparameters` (the betas split and the factor EMA's beta resolved, the matmul
precisions of the step's products attached); every step function (klkern/algorithms/_functional.py,
klkern/algorithms/_steps.py, klkern/algorithms/_triton_path.py) reads its fields. An option an algorithm does not have
keeps the field's default, which is that option's neutral value (KL-SOAP, SOAP and Shampoo never
read ``eigenvalues_first``; Shampoo's ``exponent`` is None for the others).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import torch

from ._options import factor_beta

__all__ = ["StepHyperparameters", "hyper"]


@dataclass(frozen=True)
class StepHyperparameters:
    """The scalars of one stack's step (docs/algorithms.md explains each option)."""

    beta1: float  # momentum EMA (betas[0])
    beta2: float  # second-moment EMA (betas[1])
    factor_beta: float  # the factors' EMA: shampoo_beta when given, else betas[1]
    eps: float
    precondition_frequency: int  # T: refresh every T steps
    state_dtype: torch.dtype
    mask_unseen: bool
    rotation_mode: str = "highest"  # matmul precision of the rotations and the update's products
    factor_mode: str = "highest"  # of the factor EMAs (Shampoo's stay "highest": it inverts them)
    # the options only some algorithms have (klkern/algorithms/_options.py's DEFAULTS)
    correct_bias: bool = True  # SOAP
    eigenbasis: str = "qr"  # KL-Shampoo: "qr" or the idealized "eigh"
    eigenvalues_first: bool = False  # KL-Shampoo
    eigval_floor: str = "absolute"  # KL-Shampoo, KL-SOAP
    eigval_clamp: float = 0.0  # KL-Shampoo, KL-SOAP (read only by them)
    init_factor: float | str | None = None  # KL-Shampoo, KL-SOAP
    spike_threshold: float | None = None  # KL-Shampoo, KL-SOAP
    staleness_threshold: float | None = None  # KL-Shampoo, KL-SOAP, SOAP
    exponent: float | None = None  # Shampoo
    grafting: str | None = None  # Shampoo


# the algorithm-specific fields: taken from the group where it has them
_OPTIONAL = tuple(f.name for f in fields(StepHyperparameters)
                  if f.default is not MISSING and f.name not in ("rotation_mode", "factor_mode"))


def hyper(group: dict, rotation_mode: str = "highest", factor_mode: str = "highest") -> StepHyperparameters:
    """The group's step hyperparameters, with the matmul precisions of the step's products."""
    beta1, beta2 = group["betas"]
    return StepHyperparameters(
        beta1=float(beta1), beta2=float(beta2), factor_beta=float(factor_beta(group)), eps=group["eps"],
        precondition_frequency=group["precondition_frequency"], state_dtype=group["state_dtype"],
        mask_unseen=group["mask_unseen"],
        rotation_mode=rotation_mode, factor_mode=factor_mode,
        **{name: group[name] for name in _OPTIONAL if name in group})

