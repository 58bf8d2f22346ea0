"""``optimizer.diagnostics()``: how well each parameter's preconditioner fits its gradients.

Per parameter (aggregated over its blocks, weighted by their sizes):

* ``kl``: the KL objective of the block's covariance estimate on the
  gradients it preconditions (SPEC "Idealized and diagnostic modes"), per
  entry, minus that of an isotropic estimate c I, both at their KL-optimal
  scale: in expectation KL(E[gg^T], S) - KL(E[gg^T], c I), so 0 means no
  better than the identity, lower is a better fit, and neither the gradients'
  nor the estimate's scale matters (optimizers compare). An EMA over steps
  (klkern.algorithms._tracking.track_kl_): evaluated at the first update and at every
  refresh step (no update reads it), before the estimate sees the gradient,
  for KL-Shampoo, KL-SOAP and SOAP (whose estimate is its
  eigenbasis with the eigenvalues diag(Q^T GG Q)); for Shampoo at each root
  refresh, on that step's gradient (NaN before the first refresh);
* ``eig_min``, ``eig_max``: the range of the eigenvalue estimates (KL:
  ``lam``; SOAP: diag(Q^T GG Q); Shampoo: the eigenvalues of its factors);
* ``staleness``: how stale the eigenbasis is, the off-diagonal energy of
  Q^T S Q relative to its diagonal, ||offdiag||_F^2 / ||diag||^2 (0: Q
  diagonalises the current factor S), mean over modes and blocks;
* ``update_rms``: the RMS of the update direction the current state gives
  (before the learning rate; rotations preserve the Frobenius norm, so for
  the rotated optimizers it needs no matrix product).

A parameter on the AdamW path has ``update_rms`` only. Everything is computed
as tensors and read back with one host synchronisation per device; Shampoo's
staleness and eigenvalue range need an eigendecomposition of each factor per
call (its state keeps no eigenbasis).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..algorithms._algorithms import ALGORITHMS
from ..algorithms._blocking import plan_for
from ..algorithms._functional import staleness
from ..algorithms._stacked import _lam_product, _rotate_back
from ..distributed._distributed import local
from ..runtime._precision import exact_matmul, optimizer_math

__all__ = ["collect"]


def _block_stats(path: str, block: dict, shape: tuple, mask, group: dict, t: int) -> dict:
    """0-d tensors: kl (per entry), eig_min, eig_max, staleness, and the update's squared norm."""
    algorithm = ALGORITHMS[path]
    f = {k: v.float() for k, v in block.items()}
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    bias = math.sqrt(1 - beta2**t) / (1 - beta1**t) if t > 0 else 1.0
    out: dict = {}
    if not algorithm.preconditioned:
        scale = bias if group.get("correct_bias", True) else 1.0
        out["update_sq"] = ((f["exp_avg"] / (f["exp_avg_sq"].sqrt() + eps)) ** 2).sum() * scale**2
        return out
    modes = [k for k, on in enumerate(mask) if on]
    if algorithm.kl_estimate:
        eigs = [f[f"lam{k}"] for k in modes]
        factors = [f[f"R{k}"] for k in modes]
    elif algorithm.eigenbasis:  # SOAP: the eigenvalues diag(Q^T GG Q)
        factors = [f[f"R{k}"] for k in modes]
        eigs = [torch.diagonal(R) for R in factors]
    else:  # shampoo: the basis in use is the eigenbasis of its roots
        eigs, factors = [], []
        for k in modes:
            L = f[f"L{k}"]
            eigs.append(torch.linalg.eigvalsh(L))
            _, Q = torch.linalg.eigh(f[f"root{k}"])
            factors.append(exact_matmul(exact_matmul(Q.mT, L), Q))
    out["eig_min"] = torch.stack([e.min() for e in eigs]).min()
    out["eig_max"] = torch.stack([e.max() for e in eigs]).max()
    out["staleness"] = torch.stack([staleness(R) for R in factors]).mean()
    weight = f["kl_weight"]
    out["kl"] = torch.where(weight > 0, f["kl"] / weight.clamp(min=1e-30), torch.full_like(weight, float("nan")))
    if algorithm.kl_estimate and not algorithm.second_moment:  # KL-Shampoo: 1 / sqrt(lam) scaling
        lams = [f[f"lam{k}"] if on else None for k, on in enumerate(mask)]
        D = 1.0 / (torch.sqrt(_lam_product([lam.unsqueeze(0) if lam is not None else None for lam in lams],
                                           len(shape))[0]) + eps)
        out["update_sq"] = ((f["exp_avg"] * D) ** 2).sum()
    elif algorithm.eigenbasis:  # KL-SOAP, SOAP: Adam in the eigenbasis
        scale = bias if algorithm.bias_corrected_update and group.get("correct_bias", True) else 1.0
        out["update_sq"] = ((f["exp_avg"] / (f["exp_avg_sq"].sqrt() + eps)) ** 2).sum() * scale**2
    else:
        A = f["exp_avg"] / (f["exp_avg_sq"].sqrt() + eps) * bias
        if group["grafting"] == "adam" or t < group["precondition_frequency"]:
            out["update_sq"] = (A * A).sum()  # grafting: ||U|| = ||A|| (and A itself before any root)
        else:
            roots = [f[f"root{k}"].unsqueeze(0) if on else None for k, on in enumerate(mask)]
            P = _rotate_back(f["exp_avg"].unsqueeze(0), roots)  # m x_k root_k, as the step computes it
            out["update_sq"] = (P * P).sum()
    return out


def collect(opt, named_parameters=None) -> dict:
    """The diagnostics of every parameter with state: {name or index: {statistic: float}}."""
    names = {}
    if named_parameters is not None:
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError("diagnostics(named_parameters): expected (name, parameter) pairs, e.g. "
                                f"model.named_parameters(); got an item of type {type(item).__name__}")
            names[id(item[1])] = item[0]
    pending: list = []  # (key, statistic, 0-d tensor)
    index = -1
    with torch.no_grad(), optimizer_math():
        for group in opt.param_groups:
            for p in group["params"]:
                index += 1
                state = opt.state.get(p)
                if not state or "blocks" not in state:
                    continue
                key = names.get(id(p), index)
                tensor = local(p)
                plan = plan_for(tensor.shape, group)
                path = "adamw" if plan.adamw else opt.algorithm
                sums: dict = defaultdict(list)
                numel = 0
                for i, block in enumerate(state["blocks"]):
                    if block is None:
                        continue
                    shape = plan.block_shape(i)
                    n = math.prod(shape)
                    numel += n
                    stats = _block_stats(path, block, shape, plan.masks[i], group, state["step"])
                    for name, value in stats.items():
                        sums[name].append((value, n))
                if not numel:
                    continue
                device = tensor.device
                pending.append((key, "update_rms", torch.sqrt(torch.stack([v for v, _ in sums["update_sq"]]).sum()
                                                              / numel).to(device)))
                if not ALGORITHMS[path].preconditioned:
                    continue
                pending.append((key, "kl", (torch.stack([v * n for v, n in sums["kl"]]).sum() / numel).to(device)))
                pending.append((key, "eig_min", torch.stack([v for v, _ in sums["eig_min"]]).min().to(device)))
                pending.append((key, "eig_max", torch.stack([v for v, _ in sums["eig_max"]]).max().to(device)))
                pending.append((key, "staleness", torch.stack([v for v, _ in sums["staleness"]]).mean().to(device)))
    by_device: dict = defaultdict(list)
    for entry in pending:
        by_device[entry[2].device].append(entry)
    out: dict = {}
    for entries in by_device.values():
        values = torch.stack([v.float() for _, _, v in entries]).tolist()  # the one host sync
        for (key, name, _), value in zip(entries, values):
            out.setdefault(key, {})[name] = value
    return out
