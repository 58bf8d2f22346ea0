"""Small dense linear-algebra helpers shared by every backend.

``batched_qr`` and ``eigh_descending`` pin the conventions that SPEC.md leaves
to the implementation, so results are deterministic and comparable across
backends:

* QR returns the explicit Q with ``diag(R) >= 0`` (each column of Q is flipped
  where LAPACK's R has a negative diagonal entry). On CUDA it runs the batched
  kernels of csrc/ (``klkern._C``, see klkern/_ext.py) when available.
* The symmetric eigendecomposition returns eigenvalues and eigenvector columns
  in DESCENDING eigenvalue order, retrying in float64 when the float32 solver
  fails.
"""

from __future__ import annotations

import torch

from ._ext import qr_extension

__all__ = ["batched_qr", "eigh_descending", "EighFailure"]


class EighFailure(RuntimeError):
    """Raised when the eigendecomposition fails in float32 and in float64."""


def batched_qr(A: torch.Tensor) -> torch.Tensor:
    """Q factor of a Householder QR of ``A`` (..., m, n), m >= n, with diag(R) >= 0.

    Computed in at least float32 and returned in ``A``'s dtype (float32 or
    float64). Column j of Q is multiplied by sign(R_jj) (+1 where R_jj == 0),
    which makes Q unique for full-rank input.

    Backends: a CUDA tensor uses the CUDA extension (one batched Householder
    QR for the whole stack, csrc/batched_qr_kernels.cu) when it is built or
    can be JIT-built, unless ``KLKERN_NO_EXT=1`` or autograd needs to track
    ``A``; everything else uses ``torch.linalg.qr`` plus the sign fix. The
    two agree to rounding on full-rank input.

    Non-finite input: a matrix of the batch that holds a NaN or Inf (or whose
    R gets a non-finite diagonal) returns an all-NaN Q; the other matrices of
    the batch are computed as if it were absent. Rank-deficient input is fine
    (Q stays orthonormal; a zero column gives R_jj = 0 and a positive sign).
    """
    if A.dim() < 2:
        raise ValueError(f"batched_qr: A must have at least 2 dims, got shape {tuple(A.shape)}")
    m, n = A.shape[-2], A.shape[-1]
    if m < n:
        raise ValueError(f"batched_qr: A must have m >= n, got shape {tuple(A.shape)}")
    work = A if A.dtype in (torch.float32, torch.float64) else A.float()
    if work.is_cuda and work.numel() > 0 and not (work.requires_grad and torch.is_grad_enabled()):
        op = qr_extension()
        if op is not None:
            return op(work.reshape(-1, m, n)).reshape(work.shape)
    return _torch_qr(work)


def _torch_qr(work: torch.Tensor) -> torch.Tensor:
    """The torch fallback: torch.linalg.qr, sign fix, NaN rule (same contract as the kernels)."""
    Q, R = torch.linalg.qr(work, mode="reduced")
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    Q = Q * torch.where(diag < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(-2)
    finite = torch.isfinite(diag).all(-1) & torch.isfinite(work).flatten(-2).all(-1)
    return Q.masked_fill(~finite[..., None, None], float("nan"))


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
