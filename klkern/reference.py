"""The literal transcription of docs/spec.md: the oracle of every test and benchmark.

One small function per step of the specification, named after the step, on a
single block ``G`` of any number of modes (a 2-D block is the ``m x n`` case of
SPEC; ``Qs[k]``/``lams[k]``/factors are ``None`` for a mode that is not
preconditioned, which acts as an identity factor with unit eigenvalues).
Nothing here is optimised: Kronecker factors live in the original basis,
inverse factors are formed explicitly, every step recomputes what it needs.
Where the SPEC leaves an eigenbasis free (directions without energy), klkern's
convention (docs/conventions.md) is transcribed here on its own, literally
(``canonical_null``, ``canonical_qr``, ``idle_directions``, ``inverse_root``),
not shared with the fast path.

klkern's own options (``init_factor`` rules, ``spike_threshold``, ``mask_unseen``,
``staleness_threshold``, ``stagger_refresh``, ...) are transcribed here too, each where it acts,
so that every fast path is tested against one oracle; at their SPEC settings the steps are the
SPEC's.

The step functions live in klkern/_reference_steps.py and are public here; the
``Reference*`` optimizer classes below apply them
parameter by parameter and block by block. They are slow on purpose and are
used by the tests and benchmarks only; use :mod:`klkern`'s optimizers for
training.
"""

from __future__ import annotations

import torch

from ._reference_steps import (
    adam_bias_scale,
    adam_direction,
    adam_moments,
    apply_update,
    broadcast_along,
    canonical_null,
    canonical_qr,
    carries_scale,
    carry_rotated,
    eigenvalue_projection,
    eigenvalue_update,
    eigenvalue_weight,
    eigval_floor,
    exact_eigen,
    factor_ema,
    floor_anchor,
    floor_scale,
    gradient_scale,
    graft,
    idle_directions,
    init_eigenbasis,
    init_eigenvalues,
    inverse_root,
    kl_factor_update,
    kl_init_factors,
    kl_objective,
    kl_scaling,
    lam_product,
    mask_unseen,
    matrix_from_eig,
    mode_product,
    momentum_update,
    normalize_update,
    refresh_eigenbasis,
    refresh_wanted,
    rotate,
    rotate_back,
    rotated_precondition,
    shampoo_precondition,
    soap_refresh,
    spike_scale,
    unfold,
    update_seen,
)
from .algorithms._blocking import plan_for
from .algorithms._options import build_defaults, factor_beta, validate_group
from .engine._schedule import refresh_offsets
from .linalg import EighFailure

__all__ = [
    "ReferenceKLShampoo",
    "ReferenceKLSOAP",
    "ReferenceSOAP",
    "ReferenceShampoo",
    "unfold",
    "mode_product",
    "rotate",
    "rotate_back",
    "broadcast_along",
    "update_seen",
    "mask_unseen",
    "lam_product",
    "matrix_from_eig",
    "carries_scale",
    "momentum_update",
    "adam_moments",
    "adam_bias_scale",
    "adam_direction",
    "normalize_update",
    "apply_update",
    "init_eigenbasis",
    "canonical_null",
    "canonical_qr",
    "idle_directions",
    "refresh_eigenbasis",
    "refresh_wanted",
    "carry_rotated",
    "kl_init_factors",
    "floor_anchor",
    "gradient_scale",
    "floor_scale",
    "init_eigenvalues",
    "eigenvalue_weight",
    "kl_scaling",
    "rotated_precondition",
    "kl_factor_update",
    "eigenvalue_projection",
    "eigenvalue_update",
    "spike_scale",
    "eigval_floor",
    "exact_eigen",
    "kl_objective",
    "factor_ema",
    "soap_refresh",
    "inverse_root",
    "shampoo_precondition",
    "graft",
]


# --------------------------------------------------------------------------
# Reference optimizers (slow, literal)


class _ReferenceOptimizer(torch.optim.Optimizer):
    algorithm = ""

    def __init__(self, params, **kwargs):
        super().__init__(params, build_defaults(self.algorithm, kwargs, type(self).__name__))
        for group in self.param_groups:
            validate_group(self.algorithm, group)

    def _init_preconditioned(self, G, mask, group) -> dict:
        """The state of a preconditioned block initialised from gradient G (each algorithm's)."""
        raise NotImplementedError

    def _block_step(self, b, G, mask, group, t) -> tuple:
        """(update, scale) of one preconditioned block at step t (each algorithm's)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p, group):
        plan = plan_for(p.shape, group)
        grads = plan.extract(p.grad.float())
        state = self.state[p]
        # A block of KL-Shampoo, KL-SOAP or SOAP starts from its first gradient that carries scale
        # (its initialisation is computed from that gradient); until then it does not step. A
        # parameter none of whose blocks has scale yet is not initialised at all.
        scale_started = self.algorithm in ("klshampoo", "klsoap", "soap") and not plan.adamw
        if "step" not in state:
            scaled = [carries_scale(G) or not scale_started for G in grads]
            if not any(scaled):
                del self.state[p]
                return
            state["step"] = 0
            state["blocks"] = [
                dict(self._init_block(G, plan.masks[i], group, plan.adamw), **({} if ok else {"waiting": True}))
                for i, (G, ok) in enumerate(zip(grads, scaled))
            ]
            if self.algorithm != "shampoo":
                return  # t = 0: initialisation only, the parameter is not changed
        state["step"] += 1
        t = state["step"]
        updates, scale, stepped = [], 1.0, False
        for i, G in enumerate(grads):
            block = state["blocks"][i]
            if block.get("waiting"):
                if carries_scale(G):  # this gradient initialises the block (an initialisation-only step)
                    state["blocks"][i] = self._init_block(G, plan.masks[i], group, plan.adamw)
                updates.append(torch.zeros_like(G))
                continue
            stepped = True
            if plan.adamw:
                U, scale = self._adamw_block(block, G, group, t)
            else:
                # stagger_refresh (klkern/engine/_schedule.py): the block's refreshes follow its own clock
                clock = t + refresh_offsets(group).get((id(p), i), 0)
                U, scale = self._block_step(block, G, plan.masks[i], dict(group, refresh_clock=clock), t)
            updates.append(U)
        if not stepped:  # every block waited or initialised: the parameter did not step
            state["step"] -= 1
            return
        U = plan.assemble(updates)
        if group["normalize_grads"]:
            U = normalize_update(U)
        lr = float(group["lr"])
        W = apply_update(p.float(), U, lr * scale, lr, group["weight_decay"])
        p.copy_(W)

    def _adamw_block(self, block, G, group, t):
        beta1, beta2 = group["betas"]
        block["exp_avg"], block["exp_avg_sq"] = adam_moments(block["exp_avg"], block["exp_avg_sq"], G, beta1, beta2)
        scale = adam_bias_scale(t, beta1, beta2) if group.get("correct_bias", True) else 1.0
        return adam_direction(block["exp_avg"], block["exp_avg_sq"], group["eps"]), scale

    def _init_block(self, G, mask, group, adamw):
        if adamw:
            return {"exp_avg": torch.zeros_like(G), "exp_avg_sq": torch.zeros_like(G)}
        block = self._init_preconditioned(G, mask, group)
        block["seen"] = update_seen([G.new_zeros(d) if on else None for d, on in zip(G.shape, mask)], G)
        return block

    @staticmethod
    def _see(b, G) -> None:
        b["seen"] = update_seen(b["seen"], G)

    @staticmethod
    def _masked(U, b, group):
        return mask_unseen(U, b["seen"]) if group.get("mask_unseen", True) else U


class ReferenceKLShampoo(_ReferenceOptimizer):
    """KL-Shampoo exactly as docs/spec.md writes it (see module docstring)."""

    algorithm = "klshampoo"

    def _init_preconditioned(self, G, mask, group):
        beta2 = factor_beta(group)
        S = kl_init_factors(G.double(), mask, beta2)  # float64: init_eigenbasis
        anchor = floor_anchor(G, mask, group.get("eigval_floor", "absolute"))
        scale = floor_scale(anchor)
        if group.get("eigenbasis", "qr") == "eigh":
            eig = [exact_eigen(s, group["eigval_clamp"], scale) if s is not None else (None, None) for s in S]
            lams, Qs = [e[0] for e in eig], [e[1] for e in eig]
        else:
            Qs = [init_eigenbasis(s) if s is not None else None for s in S]
            lams = init_eigenvalues(G, mask, group["init_factor"], group["eigval_clamp"], scale)
        S = [s.float() if s is not None else None for s in S]
        return {"exp_avg": torch.zeros_like(G), "S": S, "Q": Qs, "lam": lams, "anchor": anchor}

    def _block_step(self, b, G, mask, group, t):
        beta1, beta2 = group["betas"][0], factor_beta(group)
        # an outlier, scaled down; not at t = 1, whose projection sets a constant start's scale
        self._see(b, G)
        scale = floor_scale(b["anchor"])
        G = G * spike_scale(b["lam"], G, b["Q"], group.get("spike_threshold"), t)
        b["exp_avg"] = momentum_update(b["exp_avg"], G, beta1)  # step 1
        first = group.get("eigenvalues_first", False)  # steps 4-5 before 2-3 (Adam's order)
        if not first:
            D = kl_scaling(b["lam"], G.dim(), group["eps"])  # step 2
            U = self._masked(rotated_precondition(b["exp_avg"], b["Q"], D), b, group)  # step 3
        S = kl_factor_update(b["S"], G, b["Q"], b["lam"], beta2)  # step 4
        idealized = group["eigenbasis"] == "eigh"
        if not idealized:  # step 5
            lams = eigenvalue_update(b["lam"], G, b["Q"], beta2, eigenvalue_weight(beta2, t, group["init_factor"]))
            b["lam"] = [eigval_floor(lam, group["eigval_clamp"], scale) if lam is not None else None for lam in lams]
        if first:
            U = self._masked(rotated_precondition(b["exp_avg"], b["Q"], kl_scaling(b["lam"], G.dim(), group["eps"])),
                             b, group)
        b["S"] = S
        clock = group.get("refresh_clock", t)
        if clock % group["precondition_frequency"] == 0:  # step 6
            for k, s in enumerate(S):
                if s is None:
                    continue
                if idealized:
                    try:
                        b["lam"][k], b["Q"][k] = exact_eigen(s, group["eigval_clamp"], scale, b["Q"][k])
                    except EighFailure:  # pragma: no cover - keep the previous basis
                        pass
                elif refresh_wanted(s, b["Q"][k], group, clock):
                    b["Q"][k] = refresh_eigenbasis(s, b["Q"][k])
        return U, 1.0


class ReferenceKLSOAP(_ReferenceOptimizer):
    """KL-SOAP exactly as docs/spec.md writes it."""

    algorithm = "klsoap"

    def _init_preconditioned(self, G, mask, group):
        S = kl_init_factors(G.double(), mask, factor_beta(group))  # float64: init_eigenbasis
        Qs = [init_eigenbasis(s) if s is not None else None for s in S]
        S = [s.float() if s is not None else None for s in S]
        anchor = floor_anchor(G, mask, group.get("eigval_floor", "absolute"))
        lams = init_eigenvalues(G, mask, group["init_factor"], group["eigval_clamp"], floor_scale(anchor))
        return {"exp_avg": torch.zeros_like(G), "exp_avg_sq": torch.zeros_like(G), "S": S, "Q": Qs, "lam": lams,
                "anchor": anchor}

    def _block_step(self, b, G, mask, group, t):
        beta1, adam_beta2 = group["betas"]
        beta2 = factor_beta(group)
        # an outlier, scaled down; not at t = 1, whose projection sets a constant start's scale
        self._see(b, G)
        scale = floor_scale(b["anchor"])
        G = G * spike_scale(b["lam"], G, b["Q"], group.get("spike_threshold"), t)
        Gr = rotate(G, b["Q"])
        b["exp_avg"], b["exp_avg_sq"] = adam_moments(b["exp_avg"], b["exp_avg_sq"], Gr, beta1, adam_beta2)
        U = self._masked(rotate_back(adam_direction(b["exp_avg"], b["exp_avg_sq"], group["eps"]), b["Q"]), b, group)
        S = kl_factor_update(b["S"], G, b["Q"], b["lam"], beta2)
        lams = eigenvalue_update(b["lam"], G, b["Q"], beta2, eigenvalue_weight(beta2, t, group["init_factor"]))
        b["lam"] = [eigval_floor(lam, group["eigval_clamp"], scale) if lam is not None else None for lam in lams]
        b["S"] = S
        clock = group.get("refresh_clock", t)
        if clock % group["precondition_frequency"] == 0:
            old = b["Q"]
            b["Q"] = [refresh_eigenbasis(s, Q) if s is not None and refresh_wanted(s, Q, group, clock) else Q
                      for s, Q in zip(S, old)]
            b["exp_avg"] = carry_rotated(b["exp_avg"], old, b["Q"])  # v is not rotated
        return U, 1.0


class ReferenceSOAP(_ReferenceOptimizer):
    """SOAP (public release semantics) exactly as docs/spec.md writes it."""

    algorithm = "soap"

    def _init_preconditioned(self, G, mask, group):
        zeros = [G.new_zeros(d, d, dtype=torch.float64) if on else None for d, on in zip(G.shape, mask)]
        GG = factor_ema(zeros, G.double(), factor_beta(group))  # float64: init_eigenbasis
        Qs = [init_eigenbasis(s) if s is not None else None for s in GG]
        GG = [s.float() if s is not None else None for s in GG]
        return {"exp_avg": torch.zeros_like(G), "exp_avg_sq": torch.zeros_like(G), "GG": GG, "Q": Qs}

    def _block_step(self, b, G, mask, group, t):
        beta1, adam_beta2 = group["betas"]
        self._see(b, G)
        Gr = rotate(G, b["Q"])
        b["exp_avg"], b["exp_avg_sq"] = adam_moments(b["exp_avg"], b["exp_avg_sq"], Gr, beta1, adam_beta2)
        U = self._masked(rotate_back(adam_direction(b["exp_avg"], b["exp_avg_sq"], group["eps"]), b["Q"]), b, group)
        scale = adam_bias_scale(t, beta1, adam_beta2) if group["correct_bias"] else 1.0
        b["GG"] = factor_ema(b["GG"], G, factor_beta(group))
        clock = group.get("refresh_clock", t)
        if clock % group["precondition_frequency"] == 0:
            old = b["Q"]
            b["Q"], b["exp_avg_sq"] = soap_refresh(b["GG"], old, b["exp_avg_sq"],
                                                   lambda k: refresh_wanted(b["GG"][k], old[k], group, clock))
            b["exp_avg"] = carry_rotated(b["exp_avg"], old, b["Q"])
        return U, scale


class ReferenceShampoo(_ReferenceOptimizer):
    """Shampoo with Adam grafting exactly as docs/spec.md writes it."""

    algorithm = "shampoo"

    def _init_preconditioned(self, G, mask, group):
        mats = [G.new_zeros(d, d) if on else None for d, on in zip(G.shape, mask)]
        return {"exp_avg": torch.zeros_like(G), "exp_avg_sq": torch.zeros_like(G), "L": mats, "root": list(mats)}

    def _block_step(self, b, G, mask, group, t):
        beta1, adam_beta2 = group["betas"]
        self._see(b, G)
        b["L"] = factor_ema(b["L"], G, factor_beta(group))
        if t % group["precondition_frequency"] == 0:
            for k, L in enumerate(b["L"]):
                if L is not None:
                    try:
                        b["root"][k] = inverse_root(L, group["eps"], group["exponent"])
                    except EighFailure:  # pragma: no cover - keep the previous root
                        pass
        b["exp_avg"], b["exp_avg_sq"] = adam_moments(b["exp_avg"], b["exp_avg_sq"], G, beta1, adam_beta2)
        A = adam_bias_scale(t, beta1, adam_beta2) * adam_direction(b["exp_avg"], b["exp_avg_sq"], group["eps"])
        if t < group["precondition_frequency"]:
            return A, 1.0  # no root yet
        P = self._masked(shampoo_precondition(b["exp_avg"], b["root"]), b, group)  # before the graft
        return (graft(P, A) if group["grafting"] == "adam" else P), 1.0
