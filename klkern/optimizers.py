"""The public optimizers: KLShampoo, KLSOAP, SOAP and Shampoo.

All four share one constructor shape and these options (defaults in
parentheses; ``beta2`` below is ``shampoo_beta`` when given, else ``betas[1]``):

* ``lr`` (3e-3): learning rate.
* ``betas`` ((0.95, 0.95)): ``beta1`` for momentum/first moment; ``betas[1]``
  for Adam-style second moments and, by default, the factor EMAs.
* ``shampoo_beta`` (None): EMA weight of the Kronecker factors; None or a
  negative value means ``betas[1]``.
* ``eps`` (1e-8): damping in the denominators.
* ``weight_decay`` (0.01): decoupled, applied after the update
  (``W <- W - lr*wd*W``).
* ``precondition_frequency`` (10): refresh period T of the eigenbases.
* ``normalize_grads`` (False): divide each parameter's update by its RMS.
* ``max_precond_dim`` (10000): larger modes are not preconditioned (see
  ``large_dim_policy``); 0 preconditions nothing: every parameter takes the
  AdamW path (the SOAP release's way to get Adam everywhere).
* ``merge_dims`` (False): merge consecutive modes while their product stays
  at most ``max_precond_dim``. A parameter with at most ``max_precond_dim``
  entries becomes one mode, which takes the AdamW path unless
  ``precondition_1d`` (as in the SOAP release); lower ``max_precond_dim``
  to keep such weights preconditioned.
* ``precondition_1d`` (False): precondition 1-D parameters with a full factor
  instead of the AdamW path.
* ``data_format`` ("channels_first"): "channels_last" treats a 4-D
  (O, H, W, I) tensor as (O, I, H, W).
* ``block_size`` (None): split every mode into chunks of at most this size;
  each block is an independent Kronecker problem.
* ``state_dtype`` (torch.float32): dtype of the eigenbases, the rotated
  factors and the momenta of KL-Shampoo, KL-SOAP and SOAP, and of the AdamW
  path's momentum: torch.float32 or torch.bfloat16 (half their memory).
  Whatever it says, float32 holds what is inverted or divides (the
  eigenvalue estimates, Adam second moments, Shampoo's factors and roots)
  and Shampoo's momentum, which its inverse roots multiply: in bf16 their
  amplified rounding stalled an ill-conditioned least-squares problem at
  loss 0.68 against 1.4e-6 (bench/bf16_state.py). QR and
  eigendecompositions run in float32 or float64. torch.float16 raises
  ValueError: its range flushes squared gradients to zero.
* ``large_dim_policy`` ("adamw"; SOAP: "identity"): a parameter with a mode
  above ``max_precond_dim`` takes the AdamW path ("adamw") or leaves that mode
  unrotated with an identity factor and unit eigenvalues ("identity").
* ``matmul_precision`` (None): precision of the rotation and preconditioning
  products and (except Shampoo's) of the factor products: None follows
  ``torch.get_float32_matmul_precision()`` at every step; "highest" (true
  fp32), "high" (TF32 where the hardware has it) or "medium" (bf16 operands)
  override it. Accumulation, eigenvalue estimates, QR and eigendecompositions
  stay fp32. torch's settings are only read, never written (they are
  process-wide): each precision comes from the products' operands
  (see klkern/runtime/_precision.py).
* ``mask_unseen`` (True): a direction of a preconditioned mode whose gradient
  has been exactly zero at every step (an input feature never used, a masked
  output, an embedding row never looked up: a row or column of the block that
  never saw a nonzero entry) gets no update, as under AdamW. Without it,
  float32 rounding in the null space of a factor moves such entries (measured
  in bench/results/unseen_cpu.md, as the largest dead step over the largest
  live one: up to 6.2e-5 for Shampoo, its roots' rounding; 2.2e-9 for the
  others, whose directions without energy have canonical bases; up to 0.27
  for SOAP before those; 0 with the mask). Where every direction has seen a
  gradient the step is the same to the bit; False is the SPEC's step. State:
  per block and preconditioned mode k, ``seen{k}`` (d_k,), the largest
  absolute gradient entry seen in each slice (float32). A checkpoint saved
  without ``seen{k}`` (before this option) loads with every direction seen;
  as in torch.optim, ``load_state_dict`` restores the saved groups' value of
  this option over the constructor's.
* ``backend`` ("auto"): "auto" (per device and matmul precision, the path
  measured faster on that GPU: what the committed GPU results decide, see
  docs/gpu.md, "What the GPU results decide"; today the torch path
  everywhere), "torch" (the batched torch path, any device) or "triton" (the
  fused Triton kernels, else a clear error; on CPU tensors only under
  ``TRITON_INTERPRET=1``). The ``KLKERN_BACKEND`` environment variable
  overrides it. The kernels handle 2-D blocks with one or both modes preconditioned (Shampoo: both)
  and the AdamW path (docs/gpu.md, "Triton kernels"); other blocks use torch. Where
  "auto" picks the kernels, one that fails to compile or launch is replaced
  by the torch path (one warning); "triton" raises.
* ``process_group`` (None): a ``torch.distributed.ProcessGroup`` over which
  replicated (DDP) parameters split the preconditioner work: each block is
  stepped by one rank and the new values are all-gathered (docs/distributed.md).
  None for one process and for FSDP2's DTensor parameters.
* ``communication_dtype`` (torch.float32): what that all-gather sends:
  torch.float32 (the new values, exact) or torch.bfloat16 (the updates,
  rounded; half the traffic).
* ``cuda_graph`` (False): capture the steady step in a CUDA graph and replay
  it (parameters on a CUDA device): each step is then one gradient copy, one
  upload of the step's coefficients and one graph launch. Refresh steps run
  eagerly; anything that changes what the step computes (a load, a new group,
  a hyperparameter other than lr, the matmul precision) captures again, so a
  graph is never replayed stale (klkern/engine/_graph.py). ``.grad`` tensors need not
  stay the same from step to step.

A step never poisons the state: a NaN/Inf gradient skips its parameter, and
a block whose gradient is too large for its state to stay finite (a finite
gradient can overflow) is skipped; both are decided on the device (a steady
step reads nothing back to the host), counted in ``optimizer.nonfinite_skipped``
(read from the device when it is read, and at refresh steps) and warned about
once (klkern/engine/_guard.py). A skipped step still counts in the parameter's step
count (which schedules its refreshes and bias corrections).

1-D parameters (and parameters sent to the AdamW path) get
``m/(sqrt(v)+eps)`` with Adam moments from ``betas``, the bias-corrected step
size ``lr*sqrt(1-betas[1]^t)/(1-beta1^t)`` and decoupled weight decay. For
KLShampoo, KLSOAP and SOAP the first step a parameter sees only initialises
its state (the parameter is not changed), for every parameter alike. Their
preconditioned blocks are initialised from the gradient (factors, bases,
scale-free eigenvalue estimates), so a block starts from its first gradient
that carries scale (a nonzero sum of squares): until then it does not step,
and a parameter none of whose blocks has one is not initialised.
"""

from __future__ import annotations

import inspect

import torch

from .algorithms import _options
from .engine._optimizer import ShampooFamilyOptimizer

__all__ = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]


class KLShampoo(ShampooFamilyOptimizer):
    """KL-Shampoo (Lin et al., Fig. 3 right; Claims 2 and 3), without Adam.

    Per block ``G`` (m x n): momentum ``M``, Kronecker factors ``S_a``, ``S_b``
    with bases ``Q_a``, ``Q_b`` and eigenvalue estimates ``lam_a``, ``lam_b``.
    Each step ``U = Q_a [(Q_a^T M Q_b) / (sqrt(lam_a lam_b^T) + eps)] Q_b^T``;
    the factors follow ``S_a <- beta2 S_a + (1-beta2)/n G S_b^-1 G^T`` (and
    symmetrically), the eigenvalues the KL projection of Claim 3 with a floor
    ``s/c^2`` (``eigval_floor``), and the bases one power-iteration + QR step every T steps.
    No Adam second moment is stored for matrices.

    Arguments (besides the shared ones listed in :mod:`klkern.optimizers`):

    * ``init_factor`` ("debiased"): how the eigenvalue estimates start. "debiased"
      (klkern's default): every entry of each preconditioned mode's ``lam`` starts at
      mean(G_0^2)^(1/K) from the first gradient (K preconditioned modes, floored), then
      a bias-corrected EMA, weight (1 - beta2) / (1 - beta2^t), so the start only
      weights the first projection; "rms": the same start with the plain EMA; a number
      (the SPEC's and the authors' prototype's 0.1): that value in every entry. The
      default changed from 0.1 after bench/results/init_study.md (held-out seeds, two
      tasks); ``init_factor=0.1, spike_threshold=None, eigval_floor="absolute"``
      restores the prototype's behaviour.
    * ``eigval_clamp`` (4000): ``c_k = max(10, min(d_k, eigval_clamp))``
      bounds ``lam^-1/2`` by ``c_k / sqrt(s)`` (``eigval_floor``).
    * ``eigval_floor`` ("relative"): step 5's floor is ``lam_k >= s / c_k^2``.
      "relative" (klkern's): s is the block's own scale, mean(G^2)^(1/K) of the
      gradient that initialises it (its first nonzero one; K preconditioned
      modes; the value "debiased" starts ``lam`` at), so a constant factor on
      the loss (a sum instead of a mean, gradient accumulation, a loss weight)
      leaves the step as it was, as for AdamW: the update at loss scales 1e-5
      to 1e2 is 0.91x-1.06x the update at 1, against 0.004x-0.04x at 1e-5 with
      "absolute", the SPEC's and the prototype's ``s = 1``
      (bench/results/loss_scale_cpu.md). The default changed after
      bench/results/floor_study.md: on held-out seeds of the main job's two
      tasks the final loss is 0.015 lower on one (all three seeds) and level on
      the other (0.001 lower, inside the seed spread);
      ``eigval_floor="absolute"`` restores the SPEC's floor. Checkpoints saved
      without it load with ``s = 1``. The gradient limit of klkern/engine/_guard.py
      scales with ``s^((K-1)/2)``.
    * ``eigenvalues_first`` (False): update the factors and eigenvalue estimates
      with the current gradient before preconditioning it (Adam's order: the
      step is scaled by estimates that include its own gradient); False is the
      SPEC's and the prototype's order (steps 2-3 use the estimates from before
      this gradient). The two tie on the main job's two tasks
      (bench/results/order_study.md). Refused with ``eigenbasis="eigh"``, which
      has no eigenvalue update.
    * ``spike_threshold`` (1e3): an outlier gradient is scaled down before the
      momentum and the estimates see it (steps 1-5). A gradient is an outlier when its
      whitened energy per entry, ``e = mean(Gr^2 / (lam_a lam_b))`` (about 1 for a
      gradient the estimates expect; at most 38 on the main job's two 500-step tasks,
      571 in the first steps of a 100-step schedule), exceeds the threshold. It is then
      multiplied by ``sqrt(min(1, max(10 / r, 2 / e)))``, r the largest
      ``proj_k_i / lam_k_i`` over modes and directions (step 5's projection, Claim 3,
      from the estimates before this gradient): no direction holds more than 10 times
      its estimate, so one step grows an estimate by at most ``(1 - w) + 10 w`` (w the
      EMA's weight; 1.45x at w = 0.05), unless that would leave the whole gradient
      below whitened energy 2, which keeps estimates that are far too small (a lasting
      change of scale; most directions after a rank-1 first gradient) growing until
      they catch up. The first update (t = 1, the second ``step()``) is never scaled:
      its projection sets the scale of estimates that start from a constant
      (``init_factor=0.1``). Below the threshold the step is the SPEC's, to the bit: on
      the main job's two tasks (3 seeds each) no gradient was scaled. klkern's, not the
      SPEC's: after one outlier batch (loss x1e2..x1e6) the SPEC's step left the loss
      1.6x-4.7e8x its spike-free run's 20 steps later, with the threshold 1.04x-1.07x
      (two tasks, bench/results/spike_recovery_cpu.md and
      spike_recovery_lstsq_cpu.md). None: the SPEC's and the prototype's step. A number
      >= 1; ValueError otherwise.
    * ``eigenbasis`` ("qr"): "eigh" is the idealized KL-Shampoo of Eq. (4):
      every T steps an exact eigendecomposition gives both the bases and the
      eigenvalues (floored), and the eigenvalue EMA is off; with
      ``precondition_frequency=1`` it uses the exact S^-1 and S^-1/2 each step
      (``staleness_threshold`` does not apply to it).
    * ``stagger_refresh`` (False): each block keeps the refresh period T but gets its own offset,
      dealt so that every step of a period refreshes about 1/T of the refresh work (blocks
      largest first onto the least-loaded step; klkern/engine/_schedule.py): no step pays for every
      refresh at once. The offsets follow from the shapes, so a resumed run keeps them. False
      (the SPEC's schedule) refreshes every basis at ``t % precondition_frequency == 0``.
    * ``staleness_threshold`` (None): refresh only the bases that have gone stale. At a
      refresh step (every ``precondition_frequency`` steps: the least a basis waits) a
      block's basis along a mode is refreshed only when its staleness, ``||offdiag(Q^T S
      Q)||_F^2 / ||diag(Q^T S Q)||^2`` (``diagnostics()["staleness"]``, 0 when Q
      diagonalises S), exceeds this; every 32nd refresh step refreshes every basis. None
      (the SPEC's rule) refreshes every basis at every refresh step.
    """

    algorithm = "klshampoo"


class KLSOAP(ShampooFamilyOptimizer):
    """KL-SOAP: SOAP's rotated Adam with the KL factor estimate of KL-Shampoo.

    Factors, eigenvalue estimates (used only to weight the factor updates)
    and refreshes as in :class:`KLShampoo`; the update is
    ``Q_a [m / (sqrt(v) + eps)] Q_b^T`` with ``m`` and ``v`` Adam moments of the
    rotated gradient (``v`` with ``betas[1]``, no bias correction). ``m`` is
    carried into the new basis at a refresh, ``v`` is not.

    Arguments (besides the shared ones listed in :mod:`klkern.optimizers`):

    * ``init_factor`` (0.1): the prototype's start of the eigenvalue estimates;
      or "rms" / "debiased" as for :class:`KLShampoo`, which tie with 0.1 for
      KL-SOAP in bench/results/init_study.md, so its default did not change.
    * ``eigval_clamp`` (4000): ``c_k = max(10, min(d_k, eigval_clamp))``
      bounds ``lam^-1/2`` by ``c_k / sqrt(s)`` (``eigval_floor``).
    * ``eigval_floor`` ("absolute"): the floor's scale s, as for
      :class:`KLShampoo`; here it shapes only the factor EMA's weights (the
      update is Adam's in the eigenbasis), and "relative" ties with the SPEC's
      "absolute" on the main job's two tasks and in
      bench/results/loss_scale_cpu.md (bench/results/floor_study.md), so the
      default did not change.
    * ``spike_threshold`` (1e3): as for :class:`KLShampoo`, with KL-SOAP's
      eigenvalue estimates: an outlier gradient is scaled down before ``m``, ``v``,
      the factors and the estimates see it. Runs without outliers are the SPEC's to
      the bit (no gradient scaled on the main job's two tasks); after one outlier
      batch (x1e2..x1e6) KL-SOAP without it stayed 1.2x-512x its spike-free loss 20
      steps later (``v`` and the factors inflated by the spike), with it 1.0x-1.08x
      (bench/results/spike_recovery*.md). None: the SPEC's step.
    * ``stagger_refresh`` (False): each block keeps the refresh period T but gets its own offset,
      dealt so that every step of a period refreshes about 1/T of the refresh work (blocks
      largest first onto the least-loaded step; klkern/engine/_schedule.py): no step pays for every
      refresh at once. The offsets follow from the shapes, so a resumed run keeps them. False
      (the SPEC's schedule) refreshes every basis at ``t % precondition_frequency == 0``.
    * ``staleness_threshold`` (None): refresh only the bases that have gone stale. At a
      refresh step (every ``precondition_frequency`` steps: the least a basis waits) a
      block's basis along a mode is refreshed only when its staleness, ``||offdiag(Q^T S
      Q)||_F^2 / ||diag(Q^T S Q)||^2`` (``diagnostics()["staleness"]``, 0 when Q
      diagonalises S), exceeds this; every 32nd refresh step refreshes every basis. None
      (the SPEC's rule) refreshes every basis at every refresh step.
    """

    algorithm = "klsoap"


class SOAP(ShampooFamilyOptimizer):
    """SOAP (Vyas et al.), with the public release's semantics and defaults.

    Adam in the eigenbasis of Shampoo's factors ``GG_k``; every T steps the
    basis columns are sorted by the estimated eigenvalues, ``v`` is permuted
    alike, and ``Q <- qr(GG Q)``. Modes above ``max_precond_dim`` are left
    unrotated (``large_dim_policy="identity"``).

    Arguments (besides the shared ones listed in :mod:`klkern.optimizers`):

    * ``correct_bias`` (True): step size ``lr * sqrt(1 - betas[1]^t) / (1 - beta1^t)``
      (Adam's bias correction); False: ``lr``.
    * ``stagger_refresh`` (False): each block keeps the refresh period T but gets its own offset,
      dealt so that every step of a period refreshes about 1/T of the refresh work (blocks
      largest first onto the least-loaded step; klkern/engine/_schedule.py): no step pays for every
      refresh at once. The offsets follow from the shapes, so a resumed run keeps them. False
      (the SPEC's schedule) refreshes every basis at ``t % precondition_frequency == 0``.
    * ``staleness_threshold`` (None): refresh only the bases that have gone stale. At a
      refresh step (every ``precondition_frequency`` steps: the least a basis waits) a
      block's basis along a mode is refreshed only when its staleness, ``||offdiag(Q^T GG
      Q)||_F^2 / ||diag(Q^T GG Q)||^2`` (``diagnostics()["staleness"]``, 0 when Q
      diagonalises GG), exceeds this; every 32nd refresh step refreshes every basis. None
      (the SPEC's rule) refreshes every basis at every refresh step.
    """

    algorithm = "soap"


class Shampoo(ShampooFamilyOptimizer):
    """Shampoo with Adam grafting (the baseline of the KL paper, Eq. 1).

    Factors ``L <- beta2 L + (1-beta2) G G^T`` (and ``R``); every T steps
    ``(L + eps I)^-p`` by eigendecomposition; ``P = L_root M R_root`` with
    momentum ``M``. Until the first roots exist (t < T) the update is the Adam
    direction ``A``.

    Arguments (besides the shared ones listed in :mod:`klkern.optimizers`):

    * ``exponent`` (0.5): p per side (0.25 is the original Shampoo).
    * ``grafting`` ("adam"): ``U = P ||A||_F / ||P||_F`` per block (the
      Adam direction's norm), or "none": ``U = P``.
    """

    algorithm = "shampoo"


def _signature(cls) -> inspect.Signature:
    """The constructor's signature with every option and its default (help(), IDEs)."""
    P = inspect.Parameter
    defaults = _options.DEFAULTS[cls.algorithm]
    params = [P("params", P.POSITIONAL_OR_KEYWORD), P("lr", P.POSITIONAL_OR_KEYWORD, default=defaults["lr"])]
    params += [P(name, P.KEYWORD_ONLY, default=value) for name, value in defaults.items() if name != "lr"]
    params += [P("backend", P.KEYWORD_ONLY, default="auto"), P("process_group", P.KEYWORD_ONLY, default=None),
               P("communication_dtype", P.KEYWORD_ONLY, default=torch.float32),
               P("cuda_graph", P.KEYWORD_ONLY, default=False)]
    return inspect.Signature(params)


for _cls in (KLShampoo, KLSOAP, SOAP, Shampoo):
    _cls.__signature__ = _signature(_cls)  # type: ignore[union-attr]  # what inspect.signature reads
