"""Small dense linear-algebra helpers shared by every backend.

``batched_qr`` and ``eigh_descending`` pin the conventions that SPEC.md leaves
to the implementation, so results are deterministic and comparable across
backends:

* QR returns the explicit Q with ``diag(R) >= 0`` (each column of Q is flipped
  where LAPACK's R has a negative diagonal entry).
* The symmetric eigendecomposition returns eigenvalues and eigenvector columns
  in DESCENDING eigenvalue order, retrying in float64 when the float32 solver
  fails.
"""

from __future__ import annotations

import torch

__all__ = ["batched_qr", "eigh_descending", "EighFailure"]


class EighFailure(RuntimeError):
    """Raised when the eigendecomposition fails in float32 and in float64."""


def batched_qr(A: torch.Tensor) -> torch.Tensor:
    """Q factor of a Householder QR of ``A`` (..., m, n), m >= n, with diag(R) >= 0.

    Computed in at least float32 and returned in ``A``'s dtype (float32 or
    float64). Column j of Q is multiplied by sign(R_jj) (+1 where R_jj == 0),
    which makes Q unique for full-rank input.
    """
    if A.dim() < 2:
        raise ValueError(f"batched_qr: A must have at least 2 dims, got shape {tuple(A.shape)}")
    m, n = A.shape[-2], A.shape[-1]
    if m < n:
        raise ValueError(f"batched_qr: A must have m >= n, got shape {tuple(A.shape)}")
    work = A if A.dtype in (torch.float32, torch.float64) else A.float()
    Q, R = torch.linalg.qr(work, mode="reduced")
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return Q * sign.unsqueeze(-2)


def eigh_descending(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of symmetric ``S`` (..., d, d), descending order.

    Runs in float32 (or float64 when S is float64); if the solver fails it
    retries in float64 and casts back. Raises :class:`EighFailure` if both fail.
    """
    work = S if S.dtype in (torch.float32, torch.float64) else S.float()
    try:
        evals, evecs = torch.linalg.eigh(work)
    except RuntimeError:
        try:
            evals, evecs = torch.linalg.eigh(work.double())
        except RuntimeError as err:  # pragma: no cover - needs a LAPACK failure in float64
            raise EighFailure(str(err)) from err
        evals, evecs = evals.to(work.dtype), evecs.to(work.dtype)
    return evals.flip(-1), evecs.flip(-1)
