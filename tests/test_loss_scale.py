"""eigval_floor: a constant factor on the loss leaves every optimizer's update about unchanged.

The fault (issue: "KL-Shampoo's step depends on the gradient's absolute scale"): the SPEC's
eigenvalue floor ``1 / c_k^2`` is absolute, so at a loss scale of 1e-5 the small gradients of a
block sit on the floor and KL-Shampoo's update shrank to 0.004x-0.04x its update at 1 (AdamW,
SOAP and Shampoo stay near 1x). klkern's default floor ``s / c_k^2`` scales with the block's
first nonzero gradient. Judged as in the report: the update's size after 20 steps at scale c
over its size at c = 1, for c from 1e-5 to 1e2, within [RATIO_LOW, RATIO_HIGH] for all four
optimizers on the report's three shapes (bench/loss_scale.py; measured 0.81-1.09 on this task,
the shortfall at 1e-5 being Adam's eps, which AdamW shows too); with the SPEC's floor the same
measurement shows the fault, so the test can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from _helpers import kernel_device, kernel_skip_reason, rel_err

import klkern
from klkern import reference as R
from klkern.engine import _guard

OPTIMIZERS = [klkern.KLShampoo, klkern.KLSOAP, klkern.SOAP, klkern.Shampoo]
IDS = [cls.__name__ for cls in OPTIMIZERS]
_spec = importlib.util.spec_from_file_location("loss_scale",
                                               Path(__file__).resolve().parent.parent / "bench" / "loss_scale.py")
loss_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loss_scale)
RATIO_LOW, RATIO_HIGH = 0.5, 2.0  # the band


@pytest.mark.parametrize("shape", loss_scale.SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_the_update_does_not_depend_on_the_loss_scale(cls, shape):
    base = loss_scale.movement(cls, shape, 1.0)
    ratios = {c: loss_scale.movement(cls, shape, c) / base for c in loss_scale.SCALES}
    assert all(RATIO_LOW <= r <= RATIO_HIGH for r in ratios.values()), ratios


@pytest.mark.parametrize("shape", loss_scale.SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_absolute_floor_shows_the_fault(shape):
    """The SPEC's floor, by the same measurement: KL-Shampoo's update at 1e-5 is far below the band."""
    assert loss_scale.ratio(klkern.KLShampoo, shape, 1e-5, eigval_floor="absolute") < 0.1


@pytest.mark.skipif(kernel_device() is None, reason=kernel_skip_reason())
@pytest.mark.parametrize("cls", [klkern.KLShampoo, klkern.KLSOAP], ids=["KLShampoo", "KLSOAP"])
def test_the_triton_path_is_loss_scale_free(cls):
    device = kernel_device()
    base = loss_scale.movement(cls, (24, 40), 1.0, device=device, backend="triton")
    for c in (1e-5, 1e2):
        r = loss_scale.movement(cls, (24, 40), c, device=device, backend="triton") / base
        assert RATIO_LOW <= r <= RATIO_HIGH, (c, r)


def _run(opt, W, grads):
    for G in grads:
        W.grad = G.clone()
        opt.step()


def _grads(shape, steps, zero_first=0, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=gen) * torch.logspace(0, -2, shape[1]) for _ in range(steps)]
    return [torch.zeros(shape) if t < zero_first else g * scale for t, g in enumerate(out)]


@pytest.mark.parametrize("cls", [klkern.KLShampoo, klkern.KLSOAP], ids=["KLShampoo", "KLSOAP"])
def test_the_first_nonzero_gradient_sets_the_scale(cls):
    """A block waits for a gradient that carries scale (a layer behind a zero-initialised one
    sees zeros first); that gradient sets s = mean(G^2)^(1/K), and later gradients leave it. With
    eigval_floor="absolute", s = 1."""
    grads = _grads((6, 5), 6, zero_first=2)
    W = torch.nn.Parameter(torch.randn(6, 5))
    opt = cls([W], lr=1e-2, eigval_floor="relative")
    _run(opt, W, grads[:2])
    # allocated (the state has every name, as torch.distributed.checkpoint's template needs), not started
    assert opt.state[W]["step"] == 0 and float(opt.state[W]["blocks"][0]["floor_scale"]) == 0.0
    _run(opt, W, grads[2:3])
    expected = float(grads[2].double().pow(2).mean().sqrt())
    assert math.isclose(float(opt.state[W]["blocks"][0]["floor_scale"]), expected, rel_tol=1e-6)
    _run(opt, W, [10 * G for G in grads[3:]])
    assert math.isclose(float(opt.state[W]["blocks"][0]["floor_scale"]), expected, rel_tol=1e-6)
    p = torch.nn.Parameter(torch.randn(6, 5))
    absolute = cls([p], eigval_floor="absolute")
    _run(absolute, p, grads)
    assert float(absolute.state[p]["blocks"][0]["floor_scale"]) == 1.0


@pytest.mark.parametrize("zero_first", [0, 2])
@pytest.mark.parametrize("eigenbasis", ["qr", "eigh"])
@pytest.mark.parametrize("name", ["klshampoo", "klsoap"])
def test_relative_floor_matches_reference(name, eigenbasis, zero_first):
    """The fast path against the literal reference with the relative floor binding (a loss
    scale of 1e-6 puts the absolute floor far above the eigenvalues, so a fast path that used it
    would differ), with and without leading zero gradients. Square blocks: a rank-deficient
    first factor leaves part of the initial basis arbitrary, and the paths' arbitrary choices
    differ (tests/test_optimizers.py)."""
    if name == "klsoap" and eigenbasis == "eigh":
        pytest.skip("eigenbasis is KL-Shampoo's option")
    fast_cls, ref_cls = {"klshampoo": (klkern.KLShampoo, R.ReferenceKLShampoo),
                         "klsoap": (klkern.KLSOAP, R.ReferenceKLSOAP)}[name]
    kw = dict(lr=1e-2, precondition_frequency=3, eigval_clamp=8.0, eigval_floor="relative")
    if name == "klshampoo":
        kw["eigenbasis"] = eigenbasis
    start = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    Wf, Wr = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    fast, ref = fast_cls([Wf], **kw), ref_cls([Wr], **kw)
    for t, G in enumerate(_grads((6, 6), 12, zero_first=zero_first, scale=1e-6, seed=4)):
        Wf.grad, Wr.grad = G.clone(), G.clone()
        fast.step()
        ref.step()
        moved = (Wr.detach() - start).abs().max()
        # float32 rounding, amplified where lam sits on its floor: measured <= 1.3e-4 of the
        # movement on one CPU and <= 1.1e-3 on another (their BLAS kernels round differently);
        # the absolute floor in the fast path alone differs by more than the movement
        assert (Wf.detach() - Wr.detach()).abs().max() <= 1e-2 * moved + 1e-12, t
    lam_f = fast.state[Wf]["blocks"][0]["lam0"]
    lam_r = ref.state[Wr]["blocks"][0]["lam"][0]
    assert rel_err(lam_f, lam_r) < 1e-3  # measured up to 2e-4; the absolute floor: 1e5 (1/c^2 over 1e-7)
    s = float(fast.state[Wf]["blocks"][0]["floor_scale"])
    assert 0 < s < 1e-5 and lam_f.min() >= s / 100 * (1 - 1e-6)  # s / c^2, c = max(10, min(6, 8))


def test_a_checkpoint_saved_before_the_option_steps_as_it_did():
    """A state dict without floor_scale or eigval_floor (saved before they existed) loads with
    s = 1, the absolute floor it stepped with, and continues bit for bit as the run it came from."""
    grads = _grads((6, 5), 10, scale=1e-4)
    W = torch.nn.Parameter(torch.randn(6, 5))
    old = klkern.KLShampoo([W], lr=1e-2, eigval_floor="absolute", precondition_frequency=3)
    _run(old, W, grads[:5])
    saved = copy.deepcopy(old.state_dict())
    for group in saved["param_groups"]:
        del group["eigval_floor"]
    for state in saved["state"].values():
        state["blocks"] = list(state["blocks"].values())  # that release's list form
        for block in state["blocks"]:
            del block["floor_scale"]
    W2 = torch.nn.Parameter(W.detach().clone())
    new = klkern.KLShampoo([W2], lr=1e-2, precondition_frequency=3)
    new.load_state_dict(saved)
    _run(old, W, grads[5:])
    _run(new, W2, grads[5:])
    assert torch.equal(W, W2)


def test_a_jump_far_above_the_blocks_scale_is_refused_not_overflowed():
    """The gradient limit scales with s^((K-1)/2) (klkern/engine/_guard.py): a block whose first
    gradient had entries of 1e-8 refuses a gradient of entries 1e12 (whose factor terms against
    floors of s / c^2 would pass STATE_LIMIT), counts it, and keeps its state finite; a gradient
    within its limit steps."""
    W = torch.nn.Parameter(torch.randn(6, 5))
    opt = klkern.KLShampoo([W], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    _run(opt, W, [torch.randn(6, 5, generator=gen) * 1e-8 for _ in range(3)])
    before = W.detach().clone()
    with pytest.warns(RuntimeWarning):
        _run(opt, W, [torch.randn(6, 5, generator=gen) * 1e12])
        assert opt.nonfinite_skipped == 1
    assert torch.equal(W.detach(), before)
    for name, value in opt.state[W]["blocks"][0].items():
        assert torch.isfinite(value).all() and value.abs().max() <= _guard.STATE_LIMIT, name
    _run(opt, W, [torch.randn(6, 5, generator=gen) * 1e-6])
    assert opt.nonfinite_skipped == 1 and not torch.equal(W.detach(), before)
