"""What a step tracks beside its update: the directions of each block that have seen a gradient
(``mask_unseen``) and the KL objective of each block's covariance estimate on its gradients
(``optimizer.diagnostics()['kl']``; klkern/tools/_diagnostics.py reads it). No update reads either EMA
of the objective.
"""

from __future__ import annotations

import math

import torch

from ._stacked import _modes

KL_TRACK_BETA = 0.9  # EMA over steps of the per-entry KL objective


def _kl_names(B: int) -> dict:
    return {"kl": (B,), "kl_weight": (B,)}


def _seen_names(G: torch.Tensor, mask) -> dict:
    """mask_unseen: seen{k} (B, d_k) for every preconditioned mode."""
    return {f"seen{k}": (G.shape[0], G.shape[k + 1]) for k in _modes(mask)}


def see_(bufs: dict, G: torch.Tensor, mask) -> None:
    """seen_k <- max(seen_k, max |G| over each slice along mode k), in place: 0 in a slice while
    every gradient was exactly zero there (reference.update_seen). At initialisation; a step's
    is DevicePlan.see, for all stacks at once."""
    nd = G.dim()
    for k in _modes(mask):
        seen = bufs[f"seen{k}"]
        dims = [j for j in range(1, nd) if j != k + 1]
        norm = torch.linalg.vector_norm(G, ord=math.inf, dim=dims) if dims else G.abs()
        torch.maximum(seen, norm, out=seen)


def track_kl_(bufs: dict, Gr: torch.Tensor, lams: list, keep: torch.Tensor | None = None) -> None:
    """Fold the KL objective of the block's current estimate, evaluated on the incoming
    rotated gradient ``Gr`` (before the estimate sees it), into an EMA over steps.

    The estimate is S = kron_k Q_k diag(lam_k) Q_k^T (``lams[k]`` (B, d_k), None for a mode
    without one). What is tracked is its objective minus that of an isotropic estimate c I,
    both at their KL-optimal overall scale, per entry:

        0.5 (log(q / ||Gr||^2) + logdet / N),  q = ||Gr / sqrt(prod lam)||^2,
        logdet = sum_k (N / d_k) sum log lam_k  (klkern.analysis.kl_objective)

    In expectation this is KL(E[gg^T], S) - KL(E[gg^T], c I): 0 for an estimate no better
    than the identity, negative when it captures the gradients' structure. It does not
    depend on the scale of the gradients or of the estimate, so optimizers compare. Blocks with
    ``keep`` False (a skipped step) leave their EMA as it was."""
    B, shape = Gr.shape[0], tuple(Gr.shape[1:])
    # float64: a product of floored eigenvalues (1e-30 each for SOAP's diagonals of a rank-deficient
    # factor) underflows float32, and Gr^2 over it would overflow; the diagnostic must stay finite.
    # q is contracted one mode at a time (the last first) by matrix-vector products with 1 / lam_k,
    # so the only block-sized tensor is the float64 copy of Gr, squared in place.
    squares = Gr.double().square_()
    energy = squares.reshape(B, -1).sum(1)
    q = squares
    for k in reversed(range(len(shape))):
        if lams[k] is None:
            q = q.sum(-1)
        else:
            inverse = lams[k].double().reciprocal().unsqueeze(-1)  # (B, d_k, 1)
            q = torch.bmm(q.reshape(B, -1, shape[k]), inverse).reshape(q.shape[:-1])
    _fold_kl_(bufs, q, energy, lams, shape, keep)


def kl_from_projection_(bufs: dict, proj: torch.Tensor, lams: list, k: int, Gr: torch.Tensor,
                        keep: torch.Tensor | None = None) -> None:
    """:func:`track_kl_` for the KL variants from mode k's eigenvalue projection
    proj_k = mean over the other modes of Gr^2 / prod_{j!=k} lam_j (computed anyway, by the
    kernels too): q = (N / d_k) sum_i proj_k_i / lam_k_i, against ||Gr||^2 = ||G||^2."""
    shape = tuple(Gr.shape[1:])
    energy = torch.linalg.vector_norm(Gr.reshape(Gr.shape[0], -1), dim=1, dtype=torch.float64).square()
    q = (math.prod(shape) / shape[k]) * (proj.double() / lams[k].double()).sum(1)
    _fold_kl_(bufs, q, energy, lams, shape, keep)


# The tracked objective is clamped to this magnitude: a diagnostic, finite whatever the factors
# (a rank-deficient one gives log-ratios of hundreds; nothing here can decide a step).
KL_LIMIT = 1e6


def _fold_kl_(bufs: dict, q: torch.Tensor, energy: torch.Tensor, lams: list, shape: tuple,
              keep: torch.Tensor | None = None) -> None:
    """Fold one step's objective into the EMA, computed in float64 and clamped to +-KL_LIMIT
    (a non-finite one, from an overflowing gradient, leaves the EMA as it was)."""
    N = math.prod(shape)
    q, energy = q.double(), energy.double()
    logdet = torch.zeros_like(q)
    for k, lam in enumerate(lams):
        if lam is not None:
            logdet = logdet + (N / shape[k]) * torch.log(lam.double().clamp(min=1e-300)).sum(1)
    ratio = torch.clamp(q, min=1e-300) / torch.clamp(energy, min=1e-300)
    objective = 0.5 * (torch.log(ratio) + logdet / N)
    # q = 0 measures nothing: a zero gradient, or one whose squares underflow float32 in the KL
    # variants' projection (|g| below ~1e-23), which would fold in log(1e-300): the EMA is kept
    finite = torch.isfinite(objective) & (q > 0)
    if keep is not None:
        finite &= keep
    decay = torch.where(finite, KL_TRACK_BETA, 1.0).to(bufs["kl"].dtype)
    add = torch.where(finite, 1 - KL_TRACK_BETA, 0.0).to(bufs["kl"].dtype)
    objective = torch.where(finite, objective.clamp(-KL_LIMIT, KL_LIMIT), 0.0).to(bufs["kl"].dtype)
    bufs["kl"].mul_(decay).add_(add * objective)
    bufs["kl_weight"].mul_(decay).add_(add)
