"""Directions without energy: the canonical basis where the math leaves an eigenbasis free.

An eigendecomposition determines the subspace of a cluster of equal eigenvalues but not a basis
inside it; a power step ``qr(S Q)`` determines no basis for a column that adds nothing to the
columns before it. Where S has no energy (a rank-deficient gradient: the larger factor of every
non-square block at its first step), the solver's rounding picks those vectors, and the
element-wise operations of the rotated basis (Adam's m / sqrt(v), the per-coordinate estimates)
carry that choice into the step: a relative change of 1e-7 in a gradient moved SOAP's parameters
by 0.27 after 10 steps (tests/test_continuity.py). Here they get a canonical basis instead:
the candidates (the identity's columns, or the previous basis's) that the determined vectors
cover least, in index order, orthonormalised against them. docs/conventions.md states the
convention; klkern/_reference_steps.py transcribes it on its own.
"""

from __future__ import annotations

import math

import torch

__all__ = ["complete_columns", "complete_null", "idle_columns", "null_rtol", "undetermined"]

# A float32 number resolves about eps = 2^-23 of its size. A factor held in float32 state (sums
# of d products, rounded entry by entry and accumulated over steps) carries rounding of about
# sqrt(d) eps of its largest eigenvalue (measured: the noise eigenvalues of a rank-deficient
# 48 x 48 KL factor reached 1e-6 of the largest, 1.2 sqrt(48) eps); a direction whose energy,
# or whose new column in a QR, is at most STATE_RESOLUTION times that is rounding. A larger
# multiple would also settle the directions just above the rounding (at 10, a 1e-7 change of
# the gradients moved a refresh of rank-deficient factors by at most 2.3e-4 instead of 9.0e-4,
# tests/test_continuity.py), but their QR columns then keep their old vectors: 12.5 % of the
# main job's refresh columns at 10, 7 % at 1, and SOAP's final loss over seeds 0-2 rose by 0.029
# at 10, 0.019 at 3 and 0.006 at 1 (within the seeds' spread, 0.025). The Gram X X^T of float32
# data formed in float64 resolves the data's own resolution squared, (d eps)^2 of its largest.
_EPS32 = torch.finfo(torch.float32).eps
STATE_RESOLUTION = 1.0


def null_rtol(d: int, gram: bool = False) -> float:
    """The eigenvalue (or QR column), relative to the largest, at or below which a direction of a
    d x d factor counts as without energy: STATE_RESOLUTION sqrt(d) eps for float32 state,
    (d eps)^2 for the float64 Gram of float32 data (``gram``); eps = float32's machine epsilon."""
    return (d * _EPS32) ** 2 if gram else STATE_RESOLUTION * math.sqrt(d) * _EPS32


def undetermined(values: torch.Tensor, rtol: float) -> torch.Tensor:
    """(..., d) bool: the entries of ``values`` (..., d) (non-negative: eigenvalues, energies,
    |T_jj| of a QR) at most ``rtol`` times the largest of their row (0 where that is not
    positive). NaN is never marked."""
    return values <= values.amax(-1, keepdim=True).clamp(min=0) * rtol


def idle_columns(R: torch.Tensor, rtol: float) -> torch.Tensor:
    """(..., d) bool: the directions of a factor R = Q^T S Q (..., d, d) held in a basis Q whose
    energy R_jj is at most ``rtol`` times the largest (SOAP's sort puts them last, in order)."""
    return undetermined(torch.diagonal(R, dim1=-2, dim2=-1), rtol)


def complete_columns(V: torch.Tensor, missing: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """V (..., d, d) orthonormal with the columns marked ``missing`` (..., d) replaced canonically.

    The kept columns U stay. The candidates (the columns of ``candidates``, default the
    identity's) that U covers least, ||U^T c_i||^2 ascending with ties by index, one per missing
    column, are taken in index order, orthonormalised against U and each other (Gram-Schmidt:
    the QR of [U | C_chosen] with diag(R) >= 0) and placed at the missing positions in order.
    Continuous in V wherever the marks do not change and no candidate ties for the last place.
    One host read (whether any column is missing).
    """
    d = V.shape[-1]
    if d == 0 or not bool(missing.any()):
        return V
    from . import _torch_qr  # the package's QR (diag(R) >= 0), imported when first needed

    C = torch.eye(d, dtype=V.dtype, device=V.device).expand(V.shape) if candidates is None else candidates.to(V.dtype)
    U = V * (~missing).unsqueeze(-2).to(V.dtype)
    cover = (U.mT @ C).pow(2).sum(-2)  # (..., d): ||U^T c_i||^2
    k = missing.sum(-1, keepdim=True)
    index = torch.arange(d, device=V.device)
    place = torch.argsort(torch.argsort(cover, dim=-1, stable=True), dim=-1, stable=True)  # 0: least covered
    chosen = torch.argsort((place >= k).to(torch.int64), dim=-1, stable=True)  # chosen candidates first, by index
    slots = torch.argsort(missing.to(torch.int64), dim=-1, stable=True)  # kept positions first, then missing ones
    tail = index >= d - k  # columns d - k ... of Z: the chosen candidates
    kept = V.gather(-1, slots.unsqueeze(-2).expand(V.shape))
    picked = C.gather(-1, chosen.gather(-1, (index - (d - k)).clamp(min=0)).unsqueeze(-2).expand(V.shape))
    Z = _torch_qr(torch.where(tail.unsqueeze(-2), picked, kept))
    return torch.empty_like(V).scatter_(-1, slots.unsqueeze(-2).expand(V.shape), Z)


def complete_null(evals: torch.Tensor, Q: torch.Tensor, rtol: float,
                  reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical basis of the directions without energy of a descending eigendecomposition:
    ``evals`` (..., d) descending and ``Q`` (..., d, d) its eigenvectors; the eigenvalues at most
    ``rtol`` times the largest become 0 and their vectors :func:`complete_columns`' (candidates:
    the columns of ``reference``, default the identity's). The eigenvectors of a cluster of such
    eigenvalues are whatever the solver's rounding makes them; their span is not."""
    null = undetermined(evals, rtol)
    if evals.shape[-1] == 0 or not bool(null.any()):
        return evals, Q
    return evals.masked_fill(null, 0.0), complete_columns(Q, null, reference)
