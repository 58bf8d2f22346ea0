"""Fused operation 1: rotate and project.

``Gr = Q_a^T G Q_b`` for a stack of blocks in two launches of the batched
product (``T = G Q_b``, then ``Gr = Q_a^T T``); the second launch's epilogue
updates the rotated moments in place (KL-Shampoo's momentum, or SOAP's and
KL-SOAP's m and v) and reduces the diagonal eigenvalue projection of SPEC
step 5 from the same registers, so Gr is read by nobody twice:

    proj_a_i = mean_j Gr_ij^2 / lam_b_j,   proj_b_j = mean_i Gr_ij^2 / lam_a_i

(from the lam passed in, i.e. the old values).
"""

from __future__ import annotations

import torch

from ._config import STATE_DTYPES, check_stack, intermediate_dtype
from .gemm import batched_gemm


def rotate_project(G: torch.Tensor, Q_a: torch.Tensor, Q_b: torch.Tensor, *, lam=None,
                   momentum=None, beta1: float = 0.0, second_moment=None, beta2: float = 0.0,
                   out: torch.Tensor | None = None, precision: str = "highest"):
    """Returns ``(Gr, proj)``; ``proj`` is ``(proj_a, proj_b)`` when ``lam=(lam_a, lam_b)`` is given.

    G: (B, m, n) float32/bfloat16/float16; Q_a: (B, m, m), Q_b: (B, n, n)
    float32/bfloat16; lam_a (B, m), lam_b (B, n) float32; momentum and
    second_moment (B, m, n) float32/bfloat16, updated in place
    (``beta1 M + (1 - beta1) Gr`` and ``beta2 v + (1 - beta2) Gr^2``).
    ``precision`` ("highest", "high", "medium") sets the products' operands; the
    projection's squares and sums are fp32 in every mode.
    """
    if G.dim() != 3:
        raise ValueError(f"rotate_project: G must be a (B, m, n) stack, got shape {tuple(G.shape)}")
    B, m, n = G.shape
    check_stack("G", G, (B, m, n), (torch.float32, torch.bfloat16, torch.float16))
    check_stack("Q_a", Q_a, (B, m, m), STATE_DTYPES)
    check_stack("Q_b", Q_b, (B, n, n), STATE_DTYPES)
    inv = None
    if lam is not None:
        check_stack("lam_a", lam[0], (B, m))
        check_stack("lam_b", lam[1], (B, n))
        inv = (1.0 / lam[0], 1.0 / lam[1])
    for name, t in (("momentum", momentum), ("second_moment", second_moment)):
        if t is not None:
            check_stack(name, t, (B, m, n), STATE_DTYPES)
    if out is None:
        out = torch.empty(B, m, n, dtype=torch.float32, device=G.device)
    T = batched_gemm(G, Q_b, out=torch.empty(B, m, n, dtype=intermediate_dtype(precision), device=G.device),
                     precision=precision)
    result = batched_gemm(Q_a, T, transpose_a=True, out=out, momentum=momentum, beta1=beta1,
                          second_moment=second_moment, beta2=beta2, proj_inv=inv, precision=precision)
    if lam is None:
        return out, None
    _, (row_sums, col_sums) = result
    return out, (row_sums / n, col_sums / m)
