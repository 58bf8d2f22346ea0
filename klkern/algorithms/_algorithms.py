"""One object per algorithm of the family: what is specific to it, in one place.

KL-Shampoo, KL-SOAP, SOAP, Shampoo and the AdamW path (1-D parameters and the
modes above ``max_precond_dim``) share one step machinery (klkern/engine/_engine.py,
klkern/engine/_plan.py) and one state layout of stacked blocks. Where they differ,
the machinery asks the block's :class:`Algorithm` (``ALGORITHMS[path]``)
instead of comparing names: which state it keeps, whether its eigenvalues are
KL estimates, whether its update is bias-corrected, how its refresh sorts the
basis, what a step costs. Adding an algorithm means adding one object here,
its defaults (klkern/algorithms/_options.py) and its steps (klkern/algorithms/_functional.py,
klkern/algorithms/_steps.py).

No module of klkern compares algorithm names outside this one
(tests/test_layout.py checks it), with one exception on purpose:
klkern/reference.py, the literal transcription of the SPEC that every path is
checked against, keeps its own comparisons, so that it cannot share a mistake
with what it checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._stacked import FLOAT32_STATE

if TYPE_CHECKING:
    from ._hyper import StepHyperparameters

__all__ = ["ALGORITHMS", "ADAMW", "Algorithm"]


@dataclass(frozen=True)
class Algorithm:
    """The traits of one algorithm (or of the AdamW path) that the shared machinery reads.

    Source: Lin et al., "Understanding and Improving the Shampoo Optimizer via KL Minimization"
    (KL-Shampoo, KL-SOAP: Algorithms 1 and 2; SOAP and Shampoo as their baselines)."""

    name: str  # the key of its defaults, state and steps: "klshampoo", "klsoap", "soap", "shampoo", "adamw"
    title: str  # as the papers write it
    preconditioned: bool = True  # False: the AdamW path (elementwise second moment only)
    kl_estimate: bool = False  # eigenvalue estimates lam_k updated by the KL rule (state lam_k, floor_scale)
    second_moment: bool = True  # an Adam second moment exp_avg_sq (KL-Shampoo has none)
    eigenbasis: bool = True  # eigenbasis state Q_k, R_k; False for Shampoo's factors and roots L_k, root_k
    bias_corrected_update: bool = False  # the update scaled by Adam's bias correction (SOAP, AdamW)
    sorts_basis: bool = False  # the refresh orders the basis by the factor's diagonal (the SOAP release)
    exact_eigenbasis: bool = False  # takes eigenbasis="eigh", the idealized mode (KL-Shampoo)
    products_per_mode: float = 6.0  # matrix products of 2 N d flops per preconditioned mode and step
    # State it keeps in float32 whatever state_dtype says, besides what every algorithm keeps so
    # (klkern/algorithms/_stacked.py FLOAT32_STATE: what is inverted or divides). Shampoo's momentum
    # lies in the parameter basis and is multiplied by the inverse roots, which amplify its
    # rounding: bf16's 2^-9 of the largest entries lands on the directions of small eigenvalues
    # and is multiplied there by up to (lam_max / lam_min)^(1/4) per side (a least-squares problem
    # of input covariance 1 ... 1e-4 stalled at loss 2.2 against 6.5e-4 in float32,
    # tests/test_dtypes.py). The eigenbasis methods keep their momenta in the rotated basis, where
    # each entry is divided by its own estimate, so bf16's relative rounding stays relative.
    float32_names: tuple = ()

    @property
    def inverse_root(self) -> bool:
        """Whether it preconditions by inverse roots of its factors (Shampoo): its factor products
        stay float32 whatever the matmul precision, its roots replace the eigenbasis."""
        return self.preconditioned and not self.eigenbasis

    @property
    def initialises_from_gradient(self) -> bool:
        """Whether its state is initialised from a block's first gradient (its factors, bases and,
        for the KL variants, scale-free eigenvalue estimates; every eigenbasis method, SPEC
        "Initialisation"): that step only initialises, and a block starts from its first gradient
        that carries scale (a nonzero sum of squares in float32). Shampoo and the AdamW path start
        from zeros whatever the gradient and update from their first step."""
        return self.preconditioned and self.eigenbasis

    @property
    def tracks_kl(self) -> bool:
        """Whether it keeps the KL diagnostic's EMAs (optimizer.diagnostics()['kl'])."""
        return self.preconditioned

    def exact_mode(self, hp: StepHyperparameters) -> bool:
        """Whether this group steps in the idealized mode (exact eigendecomposition)."""
        return self.exact_eigenbasis and hp.eigenbasis == "eigh"

    def keeps_float32(self, name: str) -> bool:
        """Whether state ``name`` is float32 whatever ``state_dtype`` says (what its init creates)."""
        return name in self.float32_names or name.startswith(FLOAT32_STATE)

    def state_names(self, mask) -> set:
        """The state names a block with preconditioned modes ``mask`` holds (what its init
        creates): used to check a loaded state dict before a step trips over it."""
        if not self.preconditioned:
            return {"exp_avg", "exp_avg_sq"}
        names = {"exp_avg", "kl", "kl_weight"}
        if self.second_moment:
            names.add("exp_avg_sq")
        for k, on in enumerate(mask):
            if not on:
                continue
            names |= {f"seen{k}", *((f"Q{k}", f"R{k}") if self.eigenbasis else (f"L{k}", f"root{k}"))}
            if self.kl_estimate:
                names.add(f"lam{k}")
        if self.kl_estimate:
            names.add("floor_scale")
        return names

    def step_cost(self, shape: tuple, mask, frequency: int) -> float:
        """Work of one block per step (flops, roughly): its matrix products (2 N d per product
        and preconditioned mode of size d) plus its refresh (about 10 d^3: QR or
        eigendecomposition and the products around it) every ``frequency`` steps; an AdamW block
        costs a few operations per entry."""
        n = math.prod(shape)
        if not self.preconditioned:
            return 10.0 * n
        dims = [d for d, on in zip(shape, mask) if on]
        return sum(self.products_per_mode * n * d + 10.0 * d**3 / frequency for d in dims) + 10.0 * n

    def gradient_condition(self, group: dict, shape: tuple, mask) -> float:
        """The largest ratio of eigenvalue estimates the step can amplify a gradient by (the
        guard's kappa, klkern/engine/_guard.py): bounded by the eigenvalue clamp for the KL estimates,
        1 where no estimate is clamped."""
        if not self.kl_estimate:
            return 1.0
        clamp = float(group["eigval_clamp"])
        squares = [max(10.0, min(float(d), clamp)) ** 2 for d, on in zip(shape, mask) if on]
        total = math.prod(squares)
        return max(total / s for s in squares) if squares else 1.0


KL_SHAMPOO = Algorithm("klshampoo", "KL-Shampoo", kl_estimate=True, second_moment=False, exact_eigenbasis=True)
KL_SOAP = Algorithm("klsoap", "KL-SOAP", kl_estimate=True)
SOAP = Algorithm("soap", "SOAP", bias_corrected_update=True, sorts_basis=True)
SHAMPOO = Algorithm("shampoo", "Shampoo", eigenbasis=False, products_per_mode=4.0, float32_names=("exp_avg",))
ADAMW = Algorithm("adamw", "AdamW", preconditioned=False, eigenbasis=False, bias_corrected_update=True)

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (KL_SHAMPOO, KL_SOAP, SOAP, SHAMPOO, ADAMW)}
