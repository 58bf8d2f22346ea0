"""Small dense linear-algebra helpers shared by every backend.

``batched_qr`` and ``eigh_descending`` pin the conventions that docs/spec.md leaves
to the implementation, so results are deterministic and comparable across
backends:

* QR returns the explicit Q with ``diag(R) >= 0`` (each column of Q is flipped
  where LAPACK's R has a negative diagonal entry). On CUDA it runs the batched
  kernels of csrc/ (``klkern._C``, see klkern/linalg/_ext.py) when available.
* The symmetric eigendecomposition returns eigenvalues and eigenvector columns
  in DESCENDING eigenvalue order, retrying in float64 when the float32 solver
  fails. With ``rtol`` the directions without energy (eigenvalues at most
  ``rtol`` times the largest) get eigenvalue 0 and a canonical basis
  (:func:`complete_null`, klkern/linalg/_canonical.py): the math leaves their
  basis free, and the solver's rounding would otherwise choose it; the power
  step (:func:`power_step`) does the same for the columns its QR cannot
  determine (docs/conventions.md, "Directions without energy").
"""

from __future__ import annotations

import torch

from ..runtime import _decisions
from ..runtime._precision import exact_matmul
from ._canonical import complete_columns, complete_null, idle_columns, null_rtol, undetermined
from ._ext import qr_extension

__all__ = ["batched_qr", "cholqr2", "shifted_cholqr3", "eigh_descending", "EighFailure", "QR_METHODS",
           "BasisChange", "power_step", "preferred_qr_method", "qr_fallbacks", "complete_null", "complete_columns",
           "null_rtol", "idle_columns", "undetermined"]


class EighFailure(RuntimeError):
    """Raised when the eigendecomposition fails in float32 and in float64."""


QR_METHODS = ("auto", "extension", "torch", "cholqr2", "shifted_cholqr3")

# What method="auto" runs on a CUDA device that no GPU result speaks for (runtime/_decisions.py:
# a device's own results, or those of its compute capability, decide otherwise): the extension up
# to this width, torch.linalg.qr above. From the first GPU run (NVIDIA H200, float32, random
# stacks; bench/results/gpu_nvidia-h200/qr/qr_nvidia_h200.md): the extension 7.8x torch at
# (24, 768, 768), 10.7x at (48, 1024, 1024), 1.37x at (12, 3072, 3072), 0.82x at (8, 4096, 4096).
# CholeskyQR2 falls back to Householder on ill-conditioned input (a factor of low-rank gradients),
# so "auto" never picks it.
AUTO_EXTENSION_MAX_N = 3072


def auto_method(device_type: str, n: int, extension_available: bool, device: torch.device | None = None) -> str:
    """What method="auto" runs for an (..., m, n) stack on ``device_type``: "extension", "torch" or
    "shifted_cholqr3" (unless :func:`preferred_qr_method` sets another). On CUDA, the decision of
    the GPU results for ``device`` (klkern/runtime/_decisions.py) where there is one, else the
    extension up to ``AUTO_EXTENSION_MAX_N``; "extension" only where the extension is available."""
    if device_type != "cuda":
        return "torch"
    decided = _decisions.qr_auto(device, n) if device is not None else None
    if decided is None:
        decided = "extension" if n <= AUTO_EXTENSION_MAX_N else "torch"
    if decided == "extension" and not extension_available:
        return "torch"
    return decided


_preferred = "auto"


def preferred_qr_method(method: str | None = None) -> str:
    """The method that ``batched_qr(method="auto")`` (so every eigenbasis refresh) runs.

    Without an argument, returns the current choice; with one of ``QR_METHODS``, sets it for the
    process and returns it, as ``torch.backends.cuda.preferred_linalg_library`` does for torch's
    solvers. "auto" (the default) restores the measured choice of :func:`auto_method`;
    "extension" applies to CUDA tensors only (elsewhere "auto" decides). Any other choice also
    makes the CPU refresh form V with that method instead of applying LAPACK's reflectors
    (:func:`applies_reflectors`). Raises ValueError for a value not in ``QR_METHODS``.
    """
    global _preferred
    if method is not None:
        if method not in QR_METHODS:
            raise ValueError(f"preferred_qr_method: invalid method={method!r}; must be one of {QR_METHODS}")
        _preferred = method
    return _preferred


# Matrices that a product-built method ("cholqr2", "shifted_cholqr3") handed to Householder, per
# method, since the process started (or qr_fallbacks(reset=True)).
_FALLBACKS = {"cholqr2": 0, "shifted_cholqr3": 0}


def qr_fallbacks(reset: bool = False) -> dict:
    """{method: number of matrices it redid by Householder} for "cholqr2" and "shifted_cholqr3"
    (a matrix whose Cholesky failed or whose check tripped; non-finite matrices are not counted).
    ``reset=True`` returns the counts and sets them to 0."""
    counts = dict(_FALLBACKS)
    if reset:
        for k in _FALLBACKS:
            _FALLBACKS[k] = 0
    return counts


# CholeskyQR2 accepts a matrix when its Q is orthonormal to this (max |Q^T Q - I|, in float64);
# it then agrees with Householder to ~1e-15. A matrix above it (condition beyond ~1e7, rank
# deficiency) falls back to Householder.
CHOLQR2_ORTH_TOL = 1e-10


def batched_qr(A: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Q factor of a QR of ``A`` (..., m, n), m >= n, with diag(R) >= 0.

    A float64 ``A`` is factored and returned in float64, any other real
    floating dtype (float32, bfloat16, float16) in float32 (returned as
    float32). Column j of Q is multiplied by sign(R_jj) (+1 where R_jj == 0),
    which makes Q unique for full-rank input.

    ``method``:

    * "auto" (default): on CUDA, what the GPU results decide for the tensor's
      device (``auto_method``; klkern/runtime/_gpu_decisions.py, written from
      bench/results/gpu_*/ by ``python bench/gpu_suite.py decide``), else
      "extension" for n <= 3072 (the faster of it and torch as measured on an
      H200); "extension" only when the extension is built or can be JIT-built
      (unless ``KLKERN_NO_EXT=1`` or autograd needs to track ``A``), "torch"
      otherwise and on the CPU;
    * "extension": one batched blocked Householder QR for the whole stack on
      CUDA (csrc/batched_qr_kernels.cu); a clear error when unavailable;
    * "torch": ``torch.linalg.qr`` (Householder) plus the sign fix;
    * "cholqr2": CholeskyQR2 in float64 (``Q = A R^-1`` from the Cholesky
      factor of ``A^T A``, twice), batched matrix products, Cholesky and
      triangular solves; each matrix whose Cholesky fails or whose Q is not
      orthonormal to ``CHOLQR2_ORTH_TOL`` (condition beyond ~1e7) is redone by
      Householder (:func:`cholqr2`);
    * "shifted_cholqr3": shifted CholeskyQR3 in float64 on the column-scaled
      matrix, the same routines; it answers matrices up to a condition number
      of about 1e14 itself and redoes the others by Householder
      (:func:`shifted_cholqr3`; :func:`qr_fallbacks` counts them).

    :func:`preferred_qr_method` sets what "auto" runs (and so every
    eigenbasis refresh). All methods agree to rounding on full-rank input.
    Raises ValueError for an unknown ``method``, fewer than 2 dims, m < n, or a
    complex or integer ``A``.

    Non-finite input: a matrix of the batch that holds a NaN or Inf (or whose
    R gets a non-finite diagonal) returns an all-NaN Q; the other matrices of
    the batch are computed as if it were absent. Rank-deficient input is fine
    (Q stays orthonormal; a zero column gives R_jj = 0 and a positive sign).
    """
    if method not in QR_METHODS:
        raise ValueError(f"batched_qr: invalid method={method!r}; must be one of {QR_METHODS}")
    if A.dim() < 2:
        raise ValueError(f"batched_qr: A must have at least 2 dims, got shape {tuple(A.shape)}")
    m, n = A.shape[-2], A.shape[-1]
    if m < n:
        raise ValueError(f"batched_qr: A must have m >= n, got shape {tuple(A.shape)}")
    if A.is_complex() or not A.is_floating_point():
        raise ValueError(f"batched_qr: A must be a real floating tensor (float32 or float64; bfloat16 and float16 "
                         f"are factored in float32), got {A.dtype}")
    work = A if A.dtype in (torch.float32, torch.float64) else A.float()
    if method == "auto" and _preferred != "auto" and (_preferred != "extension" or work.is_cuda):
        method = _preferred
    if work.numel() == 0:
        return _torch_qr(work)
    if method == "cholqr2":
        return cholqr2(work)[0]
    if method == "shifted_cholqr3":
        return shifted_cholqr3(work)[0]
    if method == "torch":
        return _torch_qr(work)
    chosen = auto_method(work.device.type, n, True, work.device) if method == "auto" else method
    if chosen == "shifted_cholqr3":
        return shifted_cholqr3(work)[0]
    usable = work.is_cuda and not (work.requires_grad and torch.is_grad_enabled())
    wanted = chosen == "extension"
    op = qr_extension() if usable and wanted else None
    if op is not None:
        return op(work.reshape(-1, m, n)).reshape(work.shape)
    if method == "extension":
        why = ("it needs CUDA tensors that autograd does not track" if not usable else
               "the CUDA extension is not available (KLKERN_NO_EXT=1, or it could not be built: see the "
               "warning above)")
        raise RuntimeError(f"batched_qr(method='extension'): {why}; use method='auto', 'torch', 'cholqr2' or "
                           "'shifted_cholqr3'")
    return _torch_qr(work)


def cholqr2(work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CholeskyQR2 of a float32/float64 stack, in float64, with the per-matrix Householder fallback.

    Returns ``(Q, used)`` where ``used`` (batch shape, bool) marks the matrices
    that CholeskyQR2 answered (False: Householder, or a non-finite matrix).
    """
    m, n = work.shape[-2], work.shape[-1]
    X = work.reshape(work.shape[:-2].numel(), m, n).double()
    finite = torch.isfinite(X).flatten(1).all(1)
    Q = torch.where(finite[:, None, None], X, torch.zeros((), dtype=X.dtype, device=X.device))
    ok = finite.clone()
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    for _ in range(2):  # Q <- Q R^-1 with R = L^T, L L^T = Q^T Q
        L, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        ok &= info == 0
        L = torch.where(ok[:, None, None], L, eye)
        Q = torch.linalg.solve_triangular(L.mT, Q, upper=True, left=False)
    orth = (Q.mT @ Q - eye).abs().flatten(1).amax(1) if n else torch.zeros_like(ok, dtype=X.dtype)
    ok &= orth <= CHOLQR2_ORTH_TOL  # False for NaN too
    return _redo_failed("cholqr2", work, Q, ok, finite)


def _redo_failed(method: str, work: torch.Tensor, Q: torch.Tensor, ok: torch.Tensor,
                 finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (float64, (B, m, n)) in ``work``'s dtype and shape, with the matrices not ``ok`` redone by
    Householder (one host read for the whole batch); counts the finite ones in qr_fallbacks."""
    m, n = work.shape[-2], work.shape[-1]
    Q = Q.to(work.dtype)
    redo = ~ok
    if bool(redo.any()):
        Q[redo] = _torch_qr(work.reshape(work.shape[:-2].numel(), m, n)[redo])
        _FALLBACKS[method] += int((redo & finite).sum())
    return Q.reshape(work.shape), ok.reshape(work.shape[:-2])


# shifted_cholqr3 accepts a matrix when the Cholesky factor L of its third pass is the identity to
# this (max |L - I|): the second pass's Q then has a condition number of at most about 3, and a
# CholeskyQR pass on such a matrix is orthonormal to float64 rounding times a small multiple of n
# (tests/test_qr.py measures the orthogonality of what it accepts).
SHIFTED_CHOLQR3_TOL = 0.5
_U64 = 2.0 ** -53  # float64 unit roundoff


def shifted_cholqr3(work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted CholeskyQR3 of a float32/float64 stack on its column-scaled matrix, in float64.

    Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa, "Shifted Cholesky QR for computing the QR
    factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 42(1), 2020 (Algorithm 4.1).
    Every column is first scaled to unit norm (``A D`` has the same Q as ``A`` for a positive
    diagonal D, and a refresh's input, a factor nearly diagonal in its eigenbasis, is nearly
    orthogonal once scaled). Pass 1: ``R_1^T R_1 = X^T X + s I`` (Cholesky), ``X <- X R_1^-1``,
    with the shift ``s = 11 (m n + n (n + 1)) u g`` (u = 2^-53; g = max_i sum_j |(X^T X)_ij|, an
    upper bound of ||X||_2^2, so the first Cholesky succeeds as the paper proves), then two plain
    CholeskyQR passes: it answers matrices up to a condition number of about 1e14 (measured on
    dense 64 x 48 float64 matrices; tests/test_qr.py checks 1e13) and hands those beyond to
    Householder, where the second pass's Cholesky fails. The R of
    every pass has a positive diagonal, so Q is the one with diag(R) >= 0. Per (m, n) matrix:
    three Gram products (2 m n^2 each), three Cholesky factorizations (n^3 / 3) and three
    triangular solves (m n^2): batched library routines, no Householder reflector.

    Returns ``(Q, used)`` as :func:`cholqr2`: ``used`` (batch shape, bool) marks the matrices it
    answered; a matrix whose Cholesky fails (a zero column, exact rank deficiency, a condition
    number beyond about 1e14) or whose third pass is not the identity to ``SHIFTED_CHOLQR3_TOL`` is
    redone by Householder (one host read per call, counted in :func:`qr_fallbacks`); a non-finite
    one gives an all-NaN Q.
    """
    m, n = work.shape[-2], work.shape[-1]
    X = work.reshape(work.shape[:-2].numel(), m, n).double()
    finite = torch.isfinite(X).flatten(1).all(1)
    X = torch.where(finite[:, None, None], X, torch.zeros((), dtype=X.dtype, device=X.device))
    norms = torch.linalg.vector_norm(X, dim=-2, keepdim=True)
    X = X / torch.where(norms > 0, norms, 1.0)
    ok = finite.clone()
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    L = eye
    for i in range(3):
        G = X.mT @ X
        if i == 0:  # the shift, from the row sums' bound of ||X||_2^2 = ||G||_2
            shift = 11 * (m * n + n * (n + 1)) * _U64 * G.abs().sum(-1).amax(-1)
            G = G + shift[:, None, None] * eye
        L, info = torch.linalg.cholesky_ex(G)
        ok &= info == 0
        L = torch.where(ok[:, None, None], L, eye)
        X = torch.linalg.solve_triangular(L.mT, X, upper=True, left=False)
    if n:
        ok &= (L - eye).abs().flatten(1).amax(1) <= SHIFTED_CHOLQR3_TOL  # False for NaN too
    return _redo_failed("shifted_cholqr3", work, X, ok, finite)


def _torch_qr(work: torch.Tensor) -> torch.Tensor:
    """The torch fallback: torch.linalg.qr, sign fix, NaN rule (same contract as the kernels)."""
    Q, R = torch.linalg.qr(work, mode="reduced")
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    Q = Q * torch.where(diag < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(-2)
    finite = torch.isfinite(diag).all(-1) & torch.isfinite(work).flatten(-2).all(-1)
    return Q.masked_fill(~finite[..., None, None], float("nan"))


def eigh_descending(S: torch.Tensor, rtol: float | None = None,
                    reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of symmetric ``S`` (..., d, d), descending order.

    Runs in float32 (or float64 when S is float64); if the solver fails it
    retries in float64 and casts back. Raises :class:`EighFailure` if both fail.
    With ``rtol``, the directions without energy (eigenvalues at most ``rtol`` of the largest,
    e.g. :func:`null_rtol`) are made canonical by :func:`complete_null` (candidates: the
    columns of ``reference``, default the identity).
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
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    if rtol is None:
        return evals, evecs
    return complete_null(evals, evecs, rtol, reference)


class BasisChange:
    """The orthogonal V (..., d, d) of a refresh, applied from the right: ``apply(X) = X V``.

    Either explicit (``V`` given) or, on the CPU, LAPACK's Householder reflectors of the QR
    (``reflectors``, ``tau`` from ``torch.geqrf``) with column signs ``signs``, applied by
    ``torch.ormqr`` without forming V (which saves the 4/3 d^3 flops of forming it). ``X`` is
    (B, m, d) with the same batch size B as V (B, d, d); products are float32-accurate whatever
    the matmul precision and torch's settings (SPEC: QR and what carries state into a basis stay
    fp32; :func:`klkern.runtime._precision.exact_matmul`).
    """

    def __init__(self, V=None, reflectors=None, tau=None, signs=None):
        self.V, self.reflectors, self.tau, self.signs = V, reflectors, tau, signs

    def apply(self, X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``X V``, written into ``out`` when given (``out`` may be X itself). With reflectors,
        a column-major float32 ``out`` (LAPACK's layout, e.g. ``X.mT.contiguous().mT``) is
        written in place; another layout costs torch.ormqr a temporary and a transposing copy."""
        if self.V is not None:
            Y = exact_matmul(X, self.V)
            return Y if out is None else out.copy_(Y)
        Y = torch.ormqr(self.reflectors, self.tau, X, left=False, transpose=False, out=out)
        return Y.mul_(self.signs.unsqueeze(-2))

    def split(self, sizes: list[int]) -> list["BasisChange"]:
        """Per part of the leading (batch) dim: the changes of a stack that was concatenated."""
        fields = (self.V, self.reflectors, self.tau, self.signs)
        parts = [f.split(sizes) if f is not None else [None] * len(sizes) for f in fields]
        return [BasisChange(*p) for p in zip(*parts)]

    def mode_product(self, X: torch.Tensor, k: int) -> torch.Tensor:
        """X x_k V^T for a stack X (B, d_0, ..., d_{n-1}): mode k of each block rotated by V."""
        moved = X.movedim(k + 1, -1)
        out = self.apply(moved.reshape(X.shape[0], -1, X.shape[k + 1]))
        return out.reshape(moved.shape).movedim(-1, k + 1)


def applies_reflectors(A: torch.Tensor) -> bool:
    """Whether power_step keeps LAPACK's reflectors (CPU; measured 1.3x faster than forming V and
    multiplying at d = 3072) or forms V with batched_qr (CUDA, where the extension is batched)."""
    return not A.is_cuda and A.numel() > 0 and _preferred in ("auto", "extension")


def power_step(R: torch.Tensor, order: torch.Tensor | None = None,
               out: torch.Tensor | None = None, rtol: float | None = None) -> tuple[BasisChange, torch.Tensor]:
    """One QR power-iteration step of a factor held in its eigenbasis, without leaving it.

    With ``S = Q R Q^T`` (Q orthogonal, R (B, d, d) symmetric float32/float64) the refresh
    ``Q_new = qr(S Q Pi) = qr(Q R Pi)`` equals ``Q V`` where ``R Pi = V T`` (QR, diag(T) >= 0;
    Q V is orthogonal and T upper triangular, so by uniqueness both sides agree). Returns
    ``(change, R_new)``: ``change`` a :class:`BasisChange` applying V (``change.apply(Q)`` is
    Q_new; ``change.V`` is None where V is kept as reflectors), and
    ``R_new = Q_new^T S Q_new = V^T R V``, computed as ``(T Pi^T V)^T`` (the
    same symmetric matrix; symmetric up to rounding, as the factors' products are, and the
    asymmetry does not grow over refreshes, measured ~5e-8).
    ``order`` (B, d) is the column permutation Pi (SOAP sorts by diag(R)); None is the identity.
    ``out`` (B, d, d), R's dtype, may be R itself: receives R_new instead of a new tensor.

    Cost per factor: one QR and, on the CPU, one reflector application (T Pi^T V); on CUDA
    (batched_qr, explicit V) two products. No product forms ``Q R`` or ``Q^T Q_new``: against
    qr(Q R), P = Q^T Q_new and P^T R P this saves two of the four d^3 products.
    Non-finite R gives an all-NaN V and R_new for that matrix, as batched_qr does.

    ``rtol``: a column of R Pi that adds at most ``rtol`` times the largest to the columns
    before it (|T_jj|: a direction without energy, or one they already span) gets a column of V
    that the rounding picks, and every later column is orthogonalised against it. Where there is
    one, the QR is taken again with such a column replaced by its direction's old basis vector
    e_i (so it keeps that vector, orthonormalised against the columns before it, and the later
    ones are orthogonalised against a vector the input decides), V formed and R_new = V^T R V
    multiplied out. One host read.
    """
    # R Pi, read as the transpose of Pi^T R (R is symmetric up to rounding): column-major, which
    # LAPACK takes without a transposing copy; the rows of Pi^T R are whole-row copies
    A = (R if order is None else rows_gather(R, order)).mT
    if not applies_reflectors(A):
        V = batched_qr(A)
        if rtol is not None:  # |T_jj| = |v_j^T a_j|
            missing = undetermined((V * A).sum(-2).abs(), rtol)
            if bool(missing.any()):
                return _kept_step(R, A, order, missing, out)
        R_new = exact_matmul(exact_matmul(V.mT, R), V)
        return BasisChange(V=V), R_new if out is None else out.copy_(R_new)
    # max and min propagate NaN and are one read each (isfinite writes a d x d mask)
    finite = torch.isfinite(A.amax((-2, -1))) & torch.isfinite(A.amin((-2, -1)))
    private = order is not None  # A is a copy here, which geqrf may overwrite
    if not bool(finite.all()):
        A, private = torch.where(finite[..., None, None], A, torch.eye(A.shape[-1], dtype=A.dtype)), False
    # in place on a private column-major copy (geqrf's own copy of its input saved); a where()
    # result is row-major, so geqrf copies that one itself
    reflectors, tau = torch.geqrf(A, out=(A, A.new_empty(A.shape[:-1]))) if private else torch.geqrf(A)
    diag = torch.diagonal(reflectors, dim1=-2, dim2=-1)
    signs = torch.where(diag < 0, -1.0, 1.0).to(A.dtype)
    signs = torch.where(finite.unsqueeze(-1), signs, float("nan"))
    change = BasisChange(reflectors=reflectors, tau=tau, signs=signs)
    if rtol is not None:
        missing = undetermined(diag.abs(), rtol)
        if bool(missing.any()):  # A was overwritten by geqrf: R Pi again
            A = R if order is None else R.gather(-1, order.unsqueeze(-2).expand_as(R))
            return _kept_step(R, A, order, missing, out)
    # T = diag(s) T_h, the triangle of the sign-fixed QR, built transposed: geqrf's output is
    # column-major, so its transpose is row-major and tril, the sign scaling and the row gather
    # below are contiguous passes (triu and scatter on the column-major layout cost 2-3x more).
    # T^T is built in ``out`` (R's memory is free once geqrf has read it) and T Pi^T V is then
    # computed in place on it: ormqr's column-major layout is T^T's memory, and its result's
    # transpose is R_new, so no copy is made beyond the passes that build T
    home = out if out is not None and out.is_contiguous() else None
    if order is None:
        Tt = torch.tril(reflectors.mT, out=home) if home is not None else reflectors.mT.tril()
        Tt.mul_(signs.unsqueeze(-2))
    else:  # T Pi^T: column j of T goes to column order[j], i.e. row c of its transpose is row
        # inverse[c] of T^T
        inverse = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        Tt = rows_gather(reflectors.mT.tril().mul_(signs.unsqueeze(-2)), inverse, out=home)
    change.apply(Tt.mT, out=Tt.mT)  # Tt now holds R_new (the transpose of T Pi^T V)
    return change, Tt if home is out or out is None else out.copy_(Tt)


def _kept_step(R: torch.Tensor, A: torch.Tensor, order: torch.Tensor | None, missing: torch.Tensor,
               out: torch.Tensor | None) -> tuple[BasisChange, torch.Tensor]:
    """power_step's QR of A = R Pi taken again with the columns marked ``missing`` replaced by
    their directions' old basis vectors (e_order[j] at position j); R_new = V^T R V."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand(R.shape)
    own = eye if order is None else eye.gather(-1, order.unsqueeze(-2).expand_as(eye))
    V = batched_qr(torch.where(missing.unsqueeze(-2), own, A), method="torch")
    R_new = exact_matmul(exact_matmul(V.mT, R), V)
    return BasisChange(V=V), R_new if out is None else out.copy_(R_new)


def rows_gather(X: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X[b, index[b, i], :]`` for a stack X (B, n, d) and index (B, r) (int64): whole-row
    copies, one index_select over the flattened rows (a gather with the index expanded over
    the rows' entries costs ~1.7x more on the CPU at d = 3072). Returns (B, r, d), row-major,
    or ``out`` (contiguous (B, r, d), not overlapping X) filled with it."""
    B, n, d = X.shape
    offsets = torch.arange(B, device=X.device).unsqueeze(-1) * n
    rows = (index + offsets).reshape(-1)
    if out is not None:
        torch.index_select(X.reshape(B * n, d), 0, rows, out=out.view(B * index.shape[-1], d))
        return out
    return X.reshape(B * n, d).index_select(0, rows).reshape(B, index.shape[-1], d)
