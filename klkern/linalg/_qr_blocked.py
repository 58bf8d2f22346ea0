"""Blocked Householder QR in plain torch: the executable specification of csrc/.

``blocked_householder_qr`` is a step-by-step transcription of the CUDA kernels
in ``csrc/batched_qr_kernels.cu`` (same panel width, same reflector
convention, same order of operations, same sign and NaN rules), so the
algorithm can be tested on a machine without a GPU. Each function below names
the kernel it mirrors; the tensors play the roles of the kernels' buffers:

* ``work`` (B, m, n): the kernels' ``A`` buffer. Overwritten like LAPACK's
  geqrf (row-major): R on and above the diagonal, the Householder vectors
  below it (unit first entry implicit).
* ``T`` (B, w, w) per panel: the upper-triangular factor of the compact WY
  form H_j0 H_j0+1 ... H_j0+w-1 = I - V T V^T (LAPACK dlarft, forward,
  columnwise); the kernels keep these in the workspace ``Tbuf``.

Reflector convention (LAPACK dlarfg): for x = column j on rows j.., with
alpha = x_0 and sigma = ||x_1:||^2,
beta = -sign(alpha) sqrt(alpha^2 + sigma), tau = (beta - alpha) / beta,
v = x / (alpha - beta) with v_0 = 1, and R_jj = beta. When sigma == 0 (the
column is already zero below the diagonal, e.g. a zero column or n = m's last
column) the reflector is the identity: tau = 0, R_jj = alpha, no division.
Q is formed explicitly from the reflectors and column j is negated where
R_jj < 0 (R_jj == 0 counts as positive), so diag(R) >= 0.

Non-finite input: if any R_jj is not finite (which happens exactly when the
matrix holds a NaN or Inf, or overflows), that matrix's Q is all NaN; the
other matrices of the batch are unaffected.
"""

from __future__ import annotations

import torch

__all__ = ["NB", "blocked_householder_qr"]

NB = 32  # panel width: kNB in csrc/batched_qr_kernels.cu (one warp lane per panel column)
ACC = torch.float64  # the kernels' per-step scalars, T, and the float32 rescue


def blocked_householder_qr(A: torch.Tensor, nb: int = NB) -> torch.Tensor:
    """Q of A (..., m, n), m >= n, with diag(R) >= 0, by the kernels' blocked algorithm.

    Mirrors ``run_batched_qr`` in csrc/batched_qr_kernels.cu: n <= nb takes
    the single-kernel path (``small_qr_kernel``); otherwise each panel of nb
    columns is factored (``panel_kernel``) and applied to the trailing columns
    (``form_w_kernel`` + ``apply_w_kernel`` with T^T), then Q is accumulated
    backwards from the identity (``identity_kernel``, then ``form_w_kernel`` +
    ``apply_w_kernel`` with T, the last one fusing the sign flip and NaN rule).
    float32 and float64 run in their own dtype; other dtypes in float32.
    """
    if A.dim() < 2:
        raise ValueError(f"blocked_householder_qr: A must have at least 2 dims, got shape {tuple(A.shape)}")
    m, n = A.shape[-2], A.shape[-1]
    if m < n:
        raise ValueError(f"blocked_householder_qr: A must have m >= n, got shape {tuple(A.shape)}")
    if nb < 1:
        raise ValueError(f"blocked_householder_qr: nb must be >= 1, got {nb}")
    lead = A.shape[:-2]
    dtype = A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32
    work = A.reshape(-1, m, n).to(dtype).clone(memory_format=torch.contiguous_format)
    B = work.shape[0]
    if B == 0 or n == 0:
        return work.reshape(*lead, m, n)
    bad = torch.zeros(B, dtype=torch.bool, device=A.device)

    if n <= nb:  # small_qr_kernel: one block per matrix does everything
        T, bad = _factor_panel(work, 0, n)
        Q = _small_q(work, T)
    else:
        panels = []
        for j0 in range(0, n, nb):  # panel_kernel, then the trailing update
            w = min(nb, n - j0)
            T, bad_k = _factor_panel(work, j0, w)
            bad |= bad_k
            panels.append((j0, w, T))
            if j0 + w < n:
                _apply_block_reflector(work, j0, w, T, work[:, j0:, j0 + w:], transpose_t=True)
        Q = torch.eye(m, n, dtype=dtype, device=A.device).expand(B, m, n).clone()  # identity_kernel
        for j0, w, T in reversed(panels):  # backward accumulation, as LAPACK's orgqr
            _apply_block_reflector(work, j0, w, T, Q[:, j0:, j0:], transpose_t=False)
    Q = _finalize(Q, work, bad)
    return Q.reshape(*lead, m, n)


RESCUE_TINY, RESCUE_HUGE = 1e-26, 1e30  # kRescueTiny, kRescueHuge: float32 steps redone in float64


def _panel_dots(X: torch.Tensor, col: int) -> torch.Tensor:
    """acc_c = sum_i X[i][c] X[i][col] in the panel's dtype (the kernels' per-thread sums), as float64."""
    return (X * X[:, :, col:col + 1]).sum(1).to(ACC)


def _factor_panel(work: torch.Tensor, j0: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``factor_panel``: Householder QR of work[:, j0:, j0:j0+w] in place; returns (T, nonfinite flag).

    The kernel keeps, per step b, acc_c = sum_{i>b} a[i][c] a[i][b] over all
    panel columns c (one reduction per step): acc_b is sigma, acc_c (c > b)
    gives w_c = tau (v_b^T a_c), and acc_c (c < b) gives v_c^T v_b for T's
    column b. The pass that applies H_b to rows > b (in the input dtype) also
    accumulates the next step's acc from the updated values. Per-step scalars
    are float64. For float32, a step whose sigma or dots fall outside
    [RESCUE_TINY, RESCUE_HUGE] recomputes acc in float64 (``needs_rescue``).
    """
    P = work[:, j0:, j0:j0 + w]  # the panel, rows j0.. (local row b is global row j0 + b)
    B = P.shape[0]
    single = P.dtype == torch.float32
    T = torch.zeros(B, w, w, dtype=ACC, device=P.device)
    bad = torch.zeros(B, dtype=torch.bool, device=P.device)
    acc = _panel_dots(P[:, 1:, :], 0)  # initial pass: column 0, rows > 0
    for b in range(w):
        # serial part (every warp redundantly; warp 0 writes R row b and T column b)
        rowb = P[:, b, :].to(ACC)
        alpha, sigma = rowb[:, b], acc[:, b]
        if single:
            in_range = (sigma >= RESCUE_TINY) & (sigma <= RESCUE_HUGE) & (acc.abs() <= RESCUE_HUGE).all(-1)
            redo = _panel_dots(P[:, b + 1:, :].to(ACC), b)
            acc = torch.where(in_range[:, None], acc, redo)
            sigma = acc[:, b]
        zero = sigma == 0
        nrm = torch.sqrt(alpha * alpha + sigma)
        beta = torch.where(zero, alpha, torch.where(alpha >= 0, -nrm, nrm))
        tau = torch.where(zero, torch.zeros_like(alpha), (beta - alpha) / beta)
        scale = torch.where(zero, torch.zeros_like(alpha), 1.0 / (alpha - beta))
        base = rowb + scale[:, None] * acc  # c > b: v_b^T a_c; c < b: v_c^T v_b
        wc = tau[:, None] * base
        if b > 0:
            T[:, :b, b] = -tau[:, None] * (T[:, :b, :b] @ base[:, :b, None]).squeeze(-1)
        T[:, b, b] = tau
        P[:, b, b] = beta.to(P.dtype)
        P[:, b, b + 1:] = (rowb[:, b + 1:] - wc[:, b + 1:]).to(P.dtype)
        bad |= ~torch.isfinite(beta)
        # pass over rows > b in the input dtype: v_b = x * scale, a_c -= v_b w_c (c > b)
        X = P[:, b + 1:, :]
        vb = X[:, :, b] * scale.to(P.dtype)[:, None]
        X[:, :, b + 1:] -= vb[:, :, None] * wc.to(P.dtype)[:, None, b + 1:]
        X[:, :, b] = vb
        if b + 1 < w:  # next step's acc, rows > b + 1
            acc = _panel_dots(P[:, b + 2:, :], b + 1)
    return T.to(work.dtype), bad


def _unit_lower(P: torch.Tensor) -> torch.Tensor:
    """V from its storage: strictly-lower part of P, implicit 1 on the diagonal, 0 above."""
    rows, w = P.shape[-2], P.shape[-1]
    return torch.tril(P, diagonal=-1) + torch.eye(rows, w, dtype=P.dtype, device=P.device)


def _apply_block_reflector(work, j0: int, w: int, T, C: torch.Tensor, transpose_t: bool) -> None:
    """C <- (I - V op(T) V^T) C in place, V = the reflectors of panel j0.

    ``form_w_kernel``: W = op(T) (V^T C), op(T) = T^T for the trailing update
    of R (H_last ... H_first applied to A) and T for forming Q (H_first ...
    H_last); ``apply_w_kernel``: C -= V W. Both in the input dtype.
    """
    V = _unit_lower(work[:, j0:, j0:j0 + w])
    W = V.mT @ C
    W = (T.mT if transpose_t else T) @ W
    C -= V @ W


def _small_q(work: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``small_qr_kernel``'s epilogue (n <= NB): Q = E - V (T V1^T), E = I[:, :n], in float64.

    V1 = V[:n] is n x n unit lower triangular, so Y = T V1^T is computed
    without touching the rows below n.
    """
    m, n = work.shape[-2], work.shape[-1]
    V = _unit_lower(work).to(ACC)
    Y = T.to(ACC) @ V[:, :n, :].mT
    E = torch.eye(m, n, dtype=ACC, device=work.device)
    return (E - V @ Y).to(work.dtype)


def _finalize(Q: torch.Tensor, work: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Sign convention and NaN rule (fused into the last ``apply_w_kernel`` / ``small_qr_kernel``)."""
    diag = torch.diagonal(work, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0).to(Q.dtype)
    Q = Q * sign[:, None, :]
    return torch.where(bad[:, None, None], torch.full_like(Q, float("nan")), Q)
