"""Real gradients are not well behaved: zero first gradients, intermittent zeros, rank-deficient
factors, low-precision state, tiny and huge loss scales. Each pathology, for all four optimizers,
against the same run without it.

Faults found from outside (public bug reports against other Shampoo/SOAP libraries, re-created
here), each tested as a kind:

1. a zero first gradient started KL-Shampoo's scale-free eigenvalue estimates at zero (a first
   real step ~1000x too large); now a block starts from its first gradient that carries scale;
2. a diagnostic that underflowed on rank-deficient factors decided, through the overflow guard,
   that SOAP's steps were rolled back; now diagnostics stay finite and the guard reads only what
   updates read;
3. Shampoo stored its factors and roots in bf16 and inverted them; now everything inverted or
   dividing stays float32.

Bounds (measured on this task; the bound leaves room above the measurement): the final loss on
held-out inputs relative to the pathology-free run, and the largest parameter change of any step
relative to the pathology-free run's largest (a step must never blow up).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import rel_err

import klkern
from klkern import reference as R

OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]
SCALE_STARTED = ["KLShampoo", "KLSOAP", "SOAP"]  # initialised from their first gradient


SCALE = 300.0  # the mean loss times this: gradients of order 1 (as a summed loss gives), so the
# eigenvalue estimates sit above their floors and a wrong start shows


def _task(name, steps=40, batch=64, loss_scale=SCALE, zero_every=0, zero_first=False,
          state_dtype=torch.float32, seed=0, spike=1.0, spike_at=20, **options):
    """A 16-32-8 tanh MLP regressing a fixed random map, fresh inputs every step.
    Returns (held-out loss, largest change of any parameter entry in one step, rollbacks)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    opt = getattr(klkern, name)(model.parameters(), lr=3e-3, precondition_frequency=5, state_dtype=state_dtype,
                                **options)
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(16, 8, generator=gen)
    largest = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(steps):
            X = torch.randn(batch, 16, generator=gen)
            loss = (model(X) - torch.tanh(X @ target)).pow(2).mean()
            opt.zero_grad(set_to_none=False)
            (loss * loss_scale * (spike if t == spike_at else 1.0)).backward()
            if (zero_first and t == 0) or (zero_every and t % zero_every == zero_every - 1):
                for p in model.parameters():  # an unused module, or DDP's find_unused_parameters
                    p.grad.zero_()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            largest = max(largest, max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)))
    X = torch.randn(512, 16, generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        held_out = float((model(X) - torch.tanh(X @ target)).pow(2).mean())
    for p in model.parameters():
        assert torch.isfinite(p).all()
    return held_out, largest, opt.nonfinite_skipped


_BASE: dict = {}


def _base(name):
    if name not in _BASE:
        _BASE[name] = _task(name)
    return _BASE[name]


# (pathology, task arguments, bound on the loss ratio, bound on the largest-step ratio); measured
# ratios, the largest over the four optimizers: loss 1.08 / 1.15 / 1.46 / 1.001 / 1.0, step
# 1.08 / 1.2 / 1.05 / 1.01 / 1.56. Before the fixes: a zero first gradient gave KL-Shampoo 4.7x
# the loss and a 322x step; bf16 state gave Shampoo 1.54x the loss.
PATHOLOGIES = [
    ("zero first gradient", dict(zero_first=True), 1.1, 1.5),
    ("every third gradient zero", dict(zero_every=3), 1.3, 1.5),
    ("batch of 4 < width 32 (rank-deficient factors)", dict(batch=4), 1.6, 1.5),
    ("bf16 state", dict(state_dtype=torch.bfloat16), 1.01, 1.05),
    ("loss x 1e8", dict(loss_scale=1e8 * SCALE), 1.1, 2.0),
]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("pathology, kwargs, loss_bound, step_bound", PATHOLOGIES, ids=[p[0] for p in PATHOLOGIES])
def test_a_pathology_stays_close_to_the_run_without_it(name, pathology, kwargs, loss_bound, step_bound):
    base_loss, base_step, _ = _base(name)
    loss, step, skipped = _task(name, **kwargs)
    assert skipped == 0, f"{pathology}: {skipped} parameter-steps rolled back"
    assert loss <= loss_bound * base_loss, (pathology, loss / base_loss)
    assert step <= step_bound * base_step, (pathology, step / base_step)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_tiny_loss_scale_moves_nothing_far(name):
    """Loss x 1e-20: gradients near the eps and floor scales. Nothing blows up or rolls back, and
    the model is no worse than where it started."""
    start, _, _ = _task(name, steps=0)
    loss, step, skipped = _task(name, loss_scale=1e-20 * SCALE)
    assert skipped == 0 and step <= _base(name)[1] and loss <= 1.01 * start


@pytest.mark.parametrize("name", SCALE_STARTED)
def test_a_zero_first_gradient_only_delays_the_start(name):
    """A parameter whose first gradient is zero is not initialised by it: the run is exactly the
    run that starts one step later (its first real step is the initialisation-only step)."""
    runs = []
    for zero_first in (True, False):
        torch.manual_seed(0)
        W = torch.nn.Parameter(torch.randn(32, 32) * 0.1)
        opt = getattr(klkern, name)([W], lr=1e-3)
        gen = torch.Generator().manual_seed(5)
        grads = ([torch.zeros(32, 32)] if zero_first else []) + [torch.randn(32, 32, generator=gen) for _ in range(6)]
        for G in grads:
            W.grad = G
            opt.step()
        runs.append((W.detach().clone(), opt.state[W]["step"]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("name", SCALE_STARTED)
def test_a_block_waits_for_its_first_gradient_with_scale(name):
    """block_size splits a weight into 4 blocks; one of them gets zero gradients for 3 steps. It
    does not step until then (it moves by weight decay only), starts from its first gradient with
    scale, and the fast path follows the reference, which has the same rule, step by step."""
    torch.manual_seed(0)
    start = torch.randn(32, 32) * 0.1
    fast, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    kw = dict(lr=1e-3, weight_decay=0.01, block_size=16, precondition_frequency=3)
    opt = getattr(klkern, name)([fast], **kw)
    ref_opt = getattr(R, "Reference" + name)([ref], **kw)
    gen = torch.Generator().manual_seed(5)
    for t in range(10):
        G = torch.randn(32, 32, generator=gen)
        if t < 3:
            G[:16, :16] = 0
        fast.grad, ref.grad = G.clone(), G.clone()
        before = fast.detach()[:16, :16].clone()
        opt.step()
        ref_opt.step()
        if 1 <= t <= 3:  # t = 3 is the block's initialisation-only step
            assert torch.allclose(fast.detach()[:16, :16], before * (1 - 1e-3 * 0.01), rtol=0, atol=1e-7), t
        assert rel_err(fast, ref) < 1e-5, t
    assert torch.equal(fast.detach()[:16, :16] == before, torch.zeros(16, 16, dtype=torch.bool))


@pytest.mark.parametrize("name", SCALE_STARTED)
def test_state_allocated_by_init_state_waits_for_scale(name):
    """init_state() (for loading a distributed checkpoint) allocates state as a zero first gradient
    would; stepped without loading anything, each block starts from its first gradient with scale
    instead of stepping from an estimate without scale."""
    torch.manual_seed(0)
    W0 = torch.randn(32, 32) * 0.1
    a, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    with_init = getattr(klkern, name)([a], lr=1e-3)
    with_init.init_state()
    plain = getattr(klkern, name)([b], lr=1e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        G = torch.randn(32, 32, generator=gen)
        a.grad, b.grad = G.clone(), G.clone()
        with_init.step()
        plain.step()
    assert rel_err(a, b) < 1e-6


def test_copies_and_reloads_remember_waiting_blocks():
    """Which blocks still wait for scale is found again from the state after a load or a copy."""
    import copy

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(32, 32) * 0.1)
    opt = klkern.KLShampoo([W], lr=1e-3, block_size=16)
    G = torch.randn(32, 32)
    G[:16, :16] = 0
    W.grad = G.clone()
    opt.step()
    twin = copy.deepcopy(opt)
    fresh = klkern.KLShampoo([torch.nn.Parameter(W.detach().clone())], lr=1e-3, block_size=16)
    fresh.load_state_dict(opt.state_dict())
    for o in (opt, twin, fresh):
        p = o.param_groups[0]["params"][0]
        before = p.detach()[:16, :16].clone()
        p.grad = G.clone()
        o.step()
        assert torch.allclose(p.detach()[:16, :16], before * (1 - 1e-3 * 0.01), rtol=0, atol=1e-7)


@pytest.mark.parametrize("loss_scale, eps", [(1e5, 1e-8), (1.0, 1e-20)])
def test_rank_deficient_factors_do_not_stop_soap(loss_scale, eps):
    """Fault: SOAP with Linear(64, 64) and batches of 8 (rank-deficient factors) under a 1e5 loss
    scale, or eps=1e-20, never changed the weight (every step rolled back: the KL diagnostic's
    product of 1e-30 floors underflowed, and the guard checked the diagnostic too), and
    diagnostics() was inf. Now the weight trains and the diagnostic is finite."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    opt = klkern.SOAP(lin.parameters(), lr=1e-3, eps=eps)
    start = lin.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        X, Y = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
        opt.zero_grad()
        (((lin(X) - Y) ** 2).mean() * loss_scale).backward()
        opt.step()
    assert opt.nonfinite_skipped == 0
    assert float((lin.weight.detach() - start).abs().max()) > 1e-3
    for values in opt.diagnostics().values():
        for key, value in values.items():
            assert torch.isfinite(torch.tensor(value)), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_what_is_inverted_stays_float32(name):
    """Fault: Shampoo with state_dtype=bf16 stored and inverted bf16 factors (+14-27% loss). Every
    factor, root, eigenvalue estimate and second moment (inverted, or its square root divides) is
    float32 whatever state_dtype says (and mask_unseen's seen, a maximum of |gradient| entries),
    and so is Shampoo's momentum, which its inverse roots multiply (its bf16 rounding stalled an
    ill-conditioned problem, tests/test_dtypes.py); bases, rotated factors and the other momenta
    follow it."""
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    opt = getattr(klkern, name)(params, state_dtype=torch.bfloat16, precondition_frequency=1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    seen = set()
    for st in opt.state.values():
        for block in st["blocks"]:
            for key, value in block.items():
                seen.add(key.rstrip("0123456789"))
                inverted = key.startswith(("lam", "exp_avg_sq", "L", "root", "kl", "seen", "floor_scale"))
                amplified = name == "Shampoo" and key == "exp_avg" and value.dim() == 2  # not the bias's
                assert value.dtype == (torch.float32 if inverted or amplified else torch.bfloat16), key
    assert "exp_avg_sq" in seen and ("L" in seen or "R" in seen)


# One outlier batch: the loss times k at step 20 (a refresh step, precondition_frequency 5) or 22.
# Measured (loss ratio at the end, 18-20 steps later / the largest step over the spike-free run's),
# over k = 1e2, 1e4, 1e6: KL-Shampoo at its defaults (spike_threshold 1e3: the outlier is scaled
# down before the moments and estimates see it) 1.01-1.02 / 1.0; without it (the SPEC's step)
# 1.2-1.3e6 / 14-1.4e5; with eigenvalues_first 1.01-1.02 / 1.0 (the threshold acts there too);
# KL-SOAP 1.01-1.02 / 1.0 (without the threshold 1.05-1.12 / 2.6-26); SOAP 1.08-1.26 / 1.0-30
# (largest when the spike meets a refresh: v is permuted, not rotated, into the new basis, as the
# SOAP release does); Shampoo 1.31-1.41 / 1.0. A ratio above 1 at the end is the stall that a
# second-moment-like estimate inflated by the spike causes (AdamW's too).
SPIKES = [(1e2, 20), (1e4, 20), (1e6, 20), (1e6, 22)]
SPIKE_BOUNDS = {  # (optimizer, options): (loss bound, step bound)
    ("KLShampoo", ""): (1.1, 1.2),
    ("KLShampoo", "eigenvalues_first"): (1.1, 1.2),
    ("KLSOAP", ""): (1.1, 1.2),
    ("SOAP", ""): (1.5, 40.0),
    ("Shampoo", ""): (1.6, 1.2),
}


@pytest.mark.parametrize("name, option", list(SPIKE_BOUNDS), ids=lambda v: v or "default")
@pytest.mark.parametrize("factor, at", SPIKES, ids=[f"x{f:g}@{a}" for f, a in SPIKES])
def test_one_spike_keeps_the_step_bounded(name, option, factor, at):
    options = {option: True} if option else {}
    base_loss, base_step, _ = _task(name, **options)
    loss, step, skipped = _task(name, spike=factor, spike_at=at, **options)
    loss_bound, step_bound = SPIKE_BOUNDS[(name, option)]
    assert skipped == 0
    assert step <= step_bound * base_step, step / base_step
    assert loss <= loss_bound * base_loss, loss / base_loss


@pytest.mark.parametrize("factor", [1e2, 1e4])
def test_a_spike_in_the_spec_order_moves_kl_shampoo_far(factor):
    """Why spike_threshold exists: in the SPEC's step (spike_threshold=None) the spiking gradient
    is divided by estimates from before it, so the step grows with the spike (x14 at 1e2, x1400
    at 1e4; the default threshold holds x1e4 to 0.84x the spike-free run's largest step)."""
    _, base_step, _ = _task("KLShampoo", spike_threshold=None)
    _, step, _ = _task("KLShampoo", spike=factor, spike_threshold=None)
    assert step > 0.05 * factor * base_step, step / base_step


def _lams(opt):
    return [v.clone() for st in opt.state.values() for block in st.get("blocks", ()) for k, v in block.items()
            if k.startswith("lam")]


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP"])
@pytest.mark.parametrize("threshold", [None, 1e3])
def test_spike_threshold_keeps_the_estimates(name, threshold):
    """One x1e4 gradient: at the default threshold no eigenvalue estimate grows by more than
    (1 - w) + w * 10 in that step, w the EMA's weight (1 - beta2) / (1 - beta2^t) under the
    default "debiased" start (1.45x once t is large): the outlier is scaled until no direction
    holds more than 10x its estimate. Without it they jump by ~1e7 and stall the next steps."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(24, 16))
    opt = getattr(klkern, name)([W], lr=1e-2, spike_threshold=threshold, init_factor="debiased")
    X, Y = torch.randn(64, 16), torch.randn(64, 24)
    for t in range(12):
        opt.zero_grad()
        ((X @ W.T - Y).pow(2).mean() * (1e4 if t == 11 else 1.0)).backward()
        before = _lams(opt)
        opt.step()
    growth = max(float((a / b).max()) for a, b in zip(_lams(opt), before))
    w = 0.05 / (1 - 0.95**11)  # the outlier is step t = 11 (the first call only initialises)
    if threshold is None:
        assert growth > 1e5, growth
    else:
        assert growth <= (1 - w) + w * 10 + 1e-5, growth


def test_spike_threshold_follows_a_lasting_change_of_scale():
    """Scaled gradients that persist (the loss x1e4 from step 20 on) are not outliers forever: the
    estimates grow up to 1.45x per step until they match, and training goes on. Measured: loss
    1.22x the unscaled run's 100 steps later (without the threshold: 261x; the first scaled step
    is the SPEC's unbounded one)."""
    def run(scale, **options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        opt = klkern.KLShampoo(model.parameters(), lr=3e-3, precondition_frequency=5, **options)
        gen = torch.Generator().manual_seed(1)
        target = torch.randn(16, 8, generator=gen)
        for t in range(120):
            X = torch.randn(64, 16, generator=gen)
            loss = (model(X) - torch.tanh(X @ target)).pow(2).mean()
            opt.zero_grad()
            (loss * 300 * (scale if t >= 20 else 1.0)).backward()
            opt.step()
        return float(loss.detach())
    assert run(1e4) < 1.5 * run(1.0), run(1e4) / run(1.0)


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP"])
@pytest.mark.parametrize("loss_scale", [1e-6, 1e5])
@pytest.mark.parametrize("batch", [8, 256], ids=["rank-deficient", "full-rank"])
def test_spike_threshold_leaves_runs_without_outliers_alone(name, loss_scale, batch):
    """Gradients far from a constant start (init_factor=0.1 against a loss x1e5 or x1e-6) and
    rank-deficient ones (batch 8 < width 64) are no outliers: the default run is the run without
    the threshold, to the bit. (The first projection sets the scale of a constant start, so the
    threshold is not in force at t = 1; without that rule KL-SOAP scaled every step of this run.)"""
    def run(**options):
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 64)
        opt = getattr(klkern, name)(lin.parameters(), lr=1e-3, init_factor=0.1, **options)
        A = torch.randn(64, 64)
        for _ in range(30):
            X = torch.randn(batch, 64)
            opt.zero_grad()
            (((lin(X) - X @ A) ** 2).mean() * loss_scale).backward()
            opt.step()
        return [p.detach().clone() for p in lin.parameters()]
    for a, b in zip(run(), run(spike_threshold=None)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_spike_threshold_follows_estimates_that_start_too_small(seed):
    """Batch size 1 (rank-1 gradients) under the default "debiased" start: after the first
    projection most directions' estimates sit at their floor, so the second gradient can look
    like an outlier (whitened energy ~3e3). It is scaled no lower than whitened energy 2, so the
    estimates grow and catch up: the run ends within 5 % of the run without the threshold.
    (Scaled only by the largest direction, seed 1 was scaled at every step and ended at 1.32
    against 0.40.)"""
    def run(**options):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(128, 128, bias=False)
        opt = klkern.KLShampoo(lin.parameters(), lr=1e-2, **options)
        A, X_eval = torch.randn(128, 128) / 128**0.5, torch.randn(512, 128)
        for _ in range(200):
            X = torch.randn(1, 128)
            opt.zero_grad()
            ((lin(X) - X @ A) ** 2).mean().backward()
            opt.step()
        with torch.no_grad():
            return float(((lin(X_eval) - X_eval @ A) ** 2).mean())
    assert run() <= 1.05 * run(spike_threshold=None)


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP"])
def test_spike_threshold_is_validated(name):
    p = torch.nn.Parameter(torch.randn(4, 4))
    cls = getattr(klkern, name)
    for bad in (0.5, -1.0, float("nan"), float("inf"), "high"):
        with pytest.raises(ValueError, match="spike_threshold"):
            cls([p], spike_threshold=bad)
    cls([p], spike_threshold=None)
    cls([p], spike_threshold=1.0)


def test_eigenvalues_first_is_refused_where_it_would_do_nothing():
    """The idealized mode (eigenbasis="eigh") has no eigenvalue update to move first, so the
    option would be a silent no-op there (a new user's spike run gave identical steps)."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="eigenvalues_first.*eigenbasis='eigh'"):
        klkern.KLShampoo([p], eigenbasis="eigh", eigenvalues_first=True)
    klkern.KLShampoo([p], eigenbasis="eigh")  # each alone is fine
    klkern.KLShampoo([p], eigenvalues_first=True)
