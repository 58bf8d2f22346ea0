"""Products and state access over a stack of same-shape blocks, shared by the torch path's
building blocks (klkern/algorithms/_functional.py), its steady steps (klkern/algorithms/_steps.py) and the diagnostics.

A stack ``X`` is (B, d_0, ..., d_{n-1}); a list ``Qs`` holds one (B, d_k, d_k) basis per mode or
None for a mode without one; every product runs at the precision ``mode`` names
(klkern/runtime/_precision.py).
"""

from __future__ import annotations

import torch

from ..runtime import _precision


def _mode_mul(X: torch.Tensor, A: torch.Tensor, k: int, mode: str = "highest") -> torch.Tensor:
    """Per batch element b: X[b] x_k A[b] (mode k of X[b] multiplied by A[b]), the product
    at precision ``mode`` (klkern.runtime._precision)."""
    B, shape = X.shape[0], X.shape[1:]
    nd = len(shape)
    r = A.shape[-2]
    mm = _precision.bmm
    if nd == 1:
        return mm(A, X.unsqueeze(-1), mode).squeeze(-1)
    if k == 0:
        return mm(A, X.reshape(B, shape[0], -1), mode).reshape(B, r, *shape[1:])
    if k == nd - 1:
        return mm(X.reshape(B, -1, shape[-1]), A.mT, mode).reshape(B, *shape[:-1], r)
    moved = X.movedim(k + 1, -1)
    out = mm(moved.reshape(B, -1, shape[k]), A.mT, mode)
    return out.reshape(*moved.shape[:-1], r).movedim(-1, k + 1)


def _rotate(X: torch.Tensor, Qs: list, mode: str = "highest") -> torch.Tensor:
    """X x_k Q_k^T for every mode with a basis (Q_a^T X Q_b in 2-D). The last mode goes
    first, as in the kernels ((X Q_b) first), so both paths round the same intermediates."""
    for k in reversed(range(len(Qs))):
        if Qs[k] is not None:
            X = _mode_mul(X, Qs[k].mT, k, mode)
    return X


def _rotate_back(X: torch.Tensor, Qs: list, mode: str = "highest") -> torch.Tensor:
    for k in reversed(range(len(Qs))):
        if Qs[k] is not None:
            X = _mode_mul(X, Qs[k], k, mode)
    return X


def _unfold(X: torch.Tensor, k: int) -> torch.Tensor:
    """(B, d_k, N / d_k) mode-k unfoldings of a stack."""
    return X.movedim(k + 1, 1).reshape(X.shape[0], X.shape[k + 1], -1)


def _gram_(R: torch.Tensor, X: torch.Tensor, k: int, beta: float, alpha: float,
           mode: str = "highest", left: torch.Tensor | None = None) -> torch.Tensor:
    """R <- beta R + alpha L_(k) X_(k)^T in place, L = ``left`` (default X; KL's weighted
    gradient), without copying X for the first/last mode; the product at precision ``mode``."""
    L = X if left is None else left
    B, shape = X.shape[0], X.shape[1:]
    if k == 0:
        return _precision.baddbmm_(R, L.reshape(B, shape[0], -1), X.reshape(B, shape[0], -1).mT, beta, alpha, mode)
    if k == len(shape) - 1:
        return _precision.baddbmm_(R, L.reshape(B, -1, shape[-1]).mT, X.reshape(B, -1, shape[-1]), beta, alpha,
                                   mode)
    return _precision.baddbmm_(R, _unfold(L, k), _unfold(X, k).mT, beta, alpha, mode)


def _along(vec: torch.Tensor, k: int, nd: int) -> torch.Tensor:
    """(B, d_k) shaped to broadcast along mode k of a (B, ...) stack."""
    shape = [vec.shape[0]] + [1] * nd
    shape[k + 1] = vec.shape[1]
    return vec.reshape(shape)


def _lam_product(lams: list, nd: int, skip: int | None = None):
    out = None
    for j, lam in enumerate(lams):
        if lam is not None and j != skip:
            term = _along(lam, j, nd)
            out = term if out is None else out * term
    return out


def _load(bufs: dict, name: str) -> torch.Tensor:
    """State tensor in float32 (the buffer itself when it is float32)."""
    return bufs[name].float()


def _store(bufs: dict, name: str, value: torch.Tensor) -> None:
    if bufs[name] is not value:
        bufs[name].copy_(value)


def _modes(mask) -> list[int]:
    return [k for k, on in enumerate(mask) if on]


def _bases(bufs: dict, mask, prefix: str = "Q") -> list:
    return [_load(bufs, f"{prefix}{k}") if on else None for k, on in enumerate(mask)]


# State kept in float32 whatever state_dtype says (docs/conventions.md: what is inverted or divides
# stays float32): KL eigenvalue estimates (lam*), Adam second moments (exp_avg_sq: their square
# root divides), Shampoo's factors (L*: their eigenvalues are inverted) and roots (root*), and the
# KL diagnostic (kl*), which directions have seen a gradient (seen*, mask_unseen) and the
# eigenvalue floor's scale (floor_scale, eigval_floor). An algorithm adds its own names
# (Algorithm.float32_names: Shampoo's momentum, which its inverse roots multiply). state_dtype
# stores the rest: bases Q*, rotated factors R*, momenta exp_avg kept in the eigenbasis.
FLOAT32_STATE = ("lam", "kl", "exp_avg_sq", "L", "root", "seen", "floor_scale")


def _new_state(G: torch.Tensor, names_shapes: dict, state_dtype, float32: tuple = ()) -> dict:
    """Zero-filled state: FLOAT32_STATE names and the names in ``float32`` in float32, the others
    in ``state_dtype``."""
    return {
        name: torch.zeros(shape, device=G.device,
                          dtype=torch.float32 if name in float32 or name.startswith(FLOAT32_STATE) else state_dtype)
        for name, shape in names_shapes.items()
    }
