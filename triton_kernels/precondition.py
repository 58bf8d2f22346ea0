"""Fused operation 3: two-sided rotated preconditioning and the parameter update.

``U = Q_a [ P(X) ] Q_b^T`` for a stack of blocks in two launches: the first
applies the diagonal scaling while loading X (``P(X) = X * D`` with
``D_ij = 1 / (sqrt(lam_a_i lam_b_j) + eps)`` for KL-Shampoo, or
``P(X) = X / (sqrt(v) + eps)`` for SOAP and KL-SOAP) and multiplies by
``Q_b^T``; the second multiplies by ``Q_a`` and either stores U or, given a
:class:`~.gemm.ParamTable`, applies ``W <- (W - step * U) * decay`` (step =
lr times the algorithm's scale, decay = 1 - lr * weight_decay: SPEC step 8)
directly to the parameters in their own dtype, so U never reaches memory.
"""

from __future__ import annotations

import torch

from ._config import STATE_DTYPES, check_stack, intermediate_dtype
from .gemm import PRO_ADAM, PRO_KL, ParamTable, batched_gemm


def precondition(X: torch.Tensor, Q_a: torch.Tensor, Q_b: torch.Tensor, *, eps: float, lam=None, v=None,
                 params: ParamTable | None = None, step: float = 0.0, decay: float = 1.0,
                 out: torch.Tensor | None = None, precision: str = "highest"):
    """U (or None when written into ``params``). Exactly one of ``lam=(lam_a, lam_b)`` and ``v``;
    ``precision`` ("highest", "high", "medium") sets both products' operands."""
    if X.dim() != 3:
        raise ValueError(f"precondition: X must be a (B, m, n) stack, got shape {tuple(X.shape)}")
    B, m, n = X.shape
    check_stack("X", X, (B, m, n), STATE_DTYPES)
    check_stack("Q_a", Q_a, (B, m, m), STATE_DTYPES)
    check_stack("Q_b", Q_b, (B, n, n), STATE_DTYPES)
    if (lam is None) == (v is None):
        raise ValueError("precondition: pass exactly one of lam=(lam_a, lam_b) (KL-Shampoo) or v (Adam)")
    if lam is not None:
        check_stack("lam_a", lam[0], (B, m))
        check_stack("lam_b", lam[1], (B, n))
        scale = dict(prologue=PRO_KL, lam_a=lam[0], lam_b=lam[1])
    else:
        check_stack("v", v, (B, m, n), STATE_DTYPES)
        scale = dict(prologue=PRO_ADAM, v=v)
    if params is not None:
        if len(params.views) != B or params.shape != (m, n):
            raise ValueError(f"precondition: params table holds {len(params.views)} blocks of shape "
                             f"{params.shape}, expected {B} of {(m, n)}")
        if params.ptrs.device != X.device:
            raise ValueError("precondition: parameters and state are on different devices")
    elif out is None:
        out = torch.empty(B, m, n, dtype=torch.float32, device=X.device)
    T = batched_gemm(X, Q_b, transpose_b=True, eps=eps, precision=precision,
                     out=torch.empty(B, m, n, dtype=intermediate_dtype(precision), device=X.device), **scale)
    batched_gemm(Q_a, T, out=None if params is not None else out, params=params, step=step,
                 decay=decay, precision=precision)
    return None if params is not None else out
