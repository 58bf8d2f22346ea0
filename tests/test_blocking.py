"""Block plans (merge_dims, block_size, channels_last, large modes) and the AdamW path."""

import math

import pytest
import torch

import klkern
from klkern.algorithms._blocking import make_plan, merge_shape

OPTS = dict(merge_dims=False, max_precond_dim=10000, block_size=None, precondition_1d=False,
            data_format="channels_first", large_dim_policy="adamw")


def plan(shape, **kw):
    return make_plan(tuple(shape), **{**OPTS, **kw})


@pytest.mark.parametrize(
    "shape, limit, merged",
    [
        ((3, 5), 100, (15,)),
        ((64, 3, 3, 3), 100, (64, 27)),
        ((5, 20000), 10000, (5, 20000)),
        ((20000, 3), 10000, (20000, 3)),
        ((1, 768), 10000, (768,)),
        ((8, 8, 8), 64, (64, 8)),
    ],
)
def test_merge_shape_follows_soap_rule(shape, limit, merged):
    assert merge_shape(shape, limit) == merged


@pytest.mark.parametrize(
    "shape, kw",
    [
        ((10, 7), dict(block_size=4)),
        ((6, 2, 3, 5), dict(data_format="channels_last")),
        ((6, 2, 3, 5), dict(data_format="channels_last", merge_dims=True, max_precond_dim=10, block_size=3)),
        ((9, 9, 4), dict(block_size=5)),
        ((17,), dict(precondition_1d=True, block_size=5)),
    ],
)
def test_extract_assemble_round_trip(shape, kw):
    p = plan(shape, **kw)
    x = torch.randn(*shape)
    blocks = p.extract(x)
    assert sum(b.numel() for b in blocks) == x.numel()
    assert all(max(b.shape) <= (kw.get("block_size") or 10**9) for b in blocks)
    assert torch.equal(p.assemble([b.clone() for b in blocks]), x)


def test_channels_last_permutes_modes():
    p = plan((6, 2, 3, 5), data_format="channels_last")
    assert p.view_shape == (6, 5, 2, 3)


def test_paths():
    assert plan((7,)).adamw
    assert not plan((7,), precondition_1d=True).adamw
    assert plan(()).adamw
    big = plan((20, 30), max_precond_dim=25)
    assert big.adamw  # default policy: a large mode sends the parameter to AdamW
    ident = plan((20, 30), max_precond_dim=25, large_dim_policy="identity")
    assert not ident.adamw and ident.masks == ((True, False),)
    blocked = plan((20, 30), max_precond_dim=25, block_size=16)
    assert not blocked.adamw and all(all(m) for m in blocked.masks)
    assert plan((30, 30), max_precond_dim=25, large_dim_policy="identity").adamw  # nothing left to rotate


def _adam_by_hand(p0, grads, lr, betas, eps, wd, skip_first):
    w = p0.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    t = 0
    for i, g in enumerate(grads):
        if skip_first and i == 0:
            continue
        t += 1
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        w = w - step * m / (v.sqrt() + eps)
        w = w - lr * wd * w
    return w


@pytest.mark.parametrize("cls", [klkern.KLShampoo, klkern.KLSOAP, klkern.SOAP, klkern.Shampoo])
def test_one_dimensional_parameters_take_the_adamw_path(cls):
    """Written out by hand, not from reference.py: Adam moments, SOAP's
    bias-corrected step size, decoupled decay after the update; the first
    step only initialises for the optimizers that have that rule."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(11))
    p0 = p.detach().clone()
    grads = [torch.randn(11) for _ in range(6)]
    opt = cls([p], lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _adam_by_hand(p0, grads, 0.05, (0.8, 0.9), 1e-6, 0.1, skip_first=cls is not klkern.Shampoo)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)


def test_soap_without_rotated_modes_is_adam():
    """Distributed-Shampoo-style pin: SOAP with every mode left unrotated is Adam."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 9))
    p0 = p.detach().clone()
    grads = [torch.randn(6, 9) for _ in range(5)]
    opt = klkern.SOAP([p], max_precond_dim=3, lr=0.01)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _adam_by_hand(p0, grads, 0.01, (0.95, 0.95), 1e-8, 0.01, skip_first=True)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)


def test_same_shape_blocks_are_stacked_across_parameters():
    """Blocks of one shape share stacked buffers (one batched call per shape)."""
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    opt = klkern.KLShampoo(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(8, 8)
        opt.step()
    q = [opt.state[p]["blocks"][0]["Q0"] for p in params]
    assert q[0].untyped_storage().data_ptr() == q[1].untyped_storage().data_ptr() == q[2].untyped_storage().data_ptr()
    assert [(st.path, st.shape, st.B) for plan in opt._engine.plans for st in plan.stacks] == [("klshampoo", (8, 8), 3)]
