"""Options changed between steps the torch way (``opt.param_groups[i][key] = value``, e.g. after a
resume), and parameters whose storage or shape is replaced (``p.data = ...``, as SAM does).

Faults: ``block_size`` raised IndexError in all four optimizers; ``max_precond_dim`` raised
KeyError 'exp_avg_sq' in KL-Shampoo and stepped on state shaped for the old value in the others;
``data_format`` on a square conv kernel stepped on state in the old axis order (the shapes
match). Every option that shapes the state (klkern/engine/_layout.py) now restarts the state of
the parameters whose blocks it changes, as a fresh optimizer with the new value would start it,
with a warning naming the option; ``state_dtype`` converts the state. And a parameter whose
storage was replaced made every step rebuild its plan; a new storage of the same shape, dtype and
device only re-points the write-back.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from _helpers import assert_same_state, rel_err

import klkern
from klkern.algorithms import _blocking
from klkern.algorithms._algorithms import ALGORITHMS
from klkern.engine import _engine

OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]
KW = dict(lr=1e-2, precondition_frequency=3)

# option -> (shape of a parameter whose blocks it changes, options at construction, new value;
# None: the other choice than the optimizer's default)
CHANGES = {
    "block_size": ((16, 12), {}, 8),
    "max_precond_dim": ((16, 12), {}, 12),
    "merge_dims": ((4, 3, 8), {"max_precond_dim": 12}, True),
    "data_format": ((4, 3, 3, 3), {}, "channels_last"),  # square: the same block shapes, other axes
    "precondition_1d": ((10,), {}, True),
    "large_dim_policy": ((16, 12), {"max_precond_dim": 12}, None),
}
UNCHANGED = (5, 5)  # a parameter none of these changes touch: it keeps its state


def test_every_option_that_shapes_blocks_is_covered():
    """The options here are every option the block plan follows (so a new one needs a case)."""
    assert set(CHANGES) == set(_blocking.PLAN_OPTIONS)
    assert set(_blocking.PLAN_OPTIONS) == set(inspect.signature(_blocking.make_plan).parameters) - {"shape"}


def _grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("option", list(CHANGES))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_layout_option_changed_restarts_as_a_fresh_optimizer(name, option):
    shape, kw, value = CHANGES[option]
    cls = getattr(klkern, name)
    if value is None:
        value = {"adamw": "identity", "identity": "adamw"}[cls([torch.nn.Parameter(torch.zeros(2))]).defaults[option]]
    old_group = dict(cls([torch.nn.Parameter(torch.zeros(2))], **kw).defaults)
    assert _blocking.plan_for(shape, old_group) != _blocking.plan_for(shape, {**old_group, option: value})
    assert _blocking.plan_for(UNCHANGED, old_group) == _blocking.plan_for(UNCHANGED, {**old_group, option: value})
    torch.manual_seed(0)
    W, V = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(UNCHANGED))
    Vc = torch.nn.Parameter(V.detach().clone())
    grads = _grads([shape, UNCHANGED], 9)
    opt = cls([W, V], **KW, **kw)
    straight = cls([Vc], **KW, **kw)  # V without the change: it keeps its state
    for t in range(5):
        _step(opt, [W, V], grads[t])
        _step(straight, [Vc], grads[t][1:])
    opt.param_groups[0][option] = value
    W2 = torch.nn.Parameter(W.detach().clone())
    fresh = cls([W2], **KW, **{**kw, option: value})
    with pytest.warns(RuntimeWarning, match=f"{option}={old_group[option]!r} -> {value!r}.*restarts"):
        _step(opt, [W, V], grads[5])
    _step(fresh, [W2], grads[5][:1])
    _step(straight, [Vc], grads[5][1:])
    for t in range(6, 9):
        _step(opt, [W, V], grads[t])
        _step(fresh, [W2], grads[t][:1])
        _step(straight, [Vc], grads[t][1:])
    assert torch.equal(W, W2) and torch.equal(V, Vc)
    assert_same_state(opt.state_dict()["state"][0], fresh.state_dict()["state"][0])
    assert_same_state(opt.state_dict()["state"][1], straight.state_dict()["state"][0])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_new_shape_restarts_as_a_fresh_optimizer(name):
    """``p.data`` replaced by a tensor of another shape: its state restarts (before: a step on
    state of the old shape)."""
    cls = getattr(klkern, name)
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 6))
    opt = cls([W], **KW)
    for grads in _grads([(6, 6)], 4):
        _step(opt, [W], grads)
    W.data = torch.randn(8, 6)
    W2 = torch.nn.Parameter(W.detach().clone())
    fresh = cls([W2], **KW)
    with pytest.warns(RuntimeWarning, match=r"shape \(6, 6\) -> \(8, 6\)"):
        _step(opt, [W], _grads([(8, 6)], 1, seed=1)[0])
    _step(fresh, [W2], _grads([(8, 6)], 1, seed=1)[0])
    for grads in _grads([(8, 6)], 3, seed=2):
        _step(opt, [W], grads)
        _step(fresh, [W2], grads)
    assert torch.equal(W, W2)
    assert_same_state(opt.state_dict()["state"], fresh.state_dict()["state"])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dtype_changed_converts_the_state(name, dtypes):
    """``state_dtype`` changed: the state is converted (the names kept in float32 stay float32)
    and steps on as an optimizer constructed with the new value holding that converted state."""
    old, new = dtypes
    cls = getattr(klkern, name)
    shapes = [(6, 5), (5,)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = _grads(shapes, 8)
    opt = cls(params, state_dtype=old, **KW)
    for t in range(4):
        _step(opt, params, grads[t])
    saved = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["state_dtype"] = new
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    converted = cls(twins, state_dtype=new, **KW)
    def kept_float32(index, key):  # the 1-D parameter takes the AdamW path
        return ALGORITHMS["adamw" if len(shapes[index]) == 1 else cls.algorithm].keeps_float32(key)

    for index, state in saved["state"].items():
        for block in state["blocks"].values():
            for key, value in block.items():
                if not kept_float32(index, key):
                    assert value.dtype == old
                    block[key] = value.to(new)
    saved["param_groups"][0]["state_dtype"] = str(new).removeprefix("torch.")
    converted.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a conversion, no restart
        _step(opt, params, grads[4])
    _step(converted, twins, grads[4])
    for t in range(5, 8):
        _step(opt, params, grads[t])
        _step(converted, twins, grads[t])
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
    assert_same_state(opt.state_dict()["state"], converted.state_dict()["state"])
    for index, p in enumerate(params):
        for block in opt.state[p]["blocks"]:
            for key, value in block.items():
                assert value.dtype == (torch.float32 if kept_float32(index, key) else new), key


def test_a_change_between_the_change_and_a_save_is_not_saved_on_old_state():
    """An option changed and then saved without a step: the saved state is the one the next step
    would use (restarted), never old-layout state under the new option."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    opt = klkern.SOAP([W], **KW)
    for grads in _grads([(4, 3, 3, 3)], 3):
        _step(opt, [W], grads)
    opt.param_groups[0]["data_format"] = "channels_last"
    with pytest.warns(RuntimeWarning, match="data_format"):
        sd = opt.state_dict()
    assert 0 not in sd["state"] or not sd["state"][0].get("blocks")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_copies_remember_the_layout_their_state_has(name):
    """A copy made after the change and before the step restarts as its original would."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(16, 12))
    opt = getattr(klkern, name)([W], **KW)
    for grads in _grads([(16, 12)], 3):
        _step(opt, [W], grads)
    opt.param_groups[0]["block_size"] = 8
    twin = copy.deepcopy(opt)
    p = twin.param_groups[0]["params"][0]
    last = _grads([(16, 12)], 3, seed=1)
    with pytest.warns(RuntimeWarning, match="block_size"):
        for grads in last:
            _step(opt, [W], grads)
    with pytest.warns(RuntimeWarning, match="block_size"):
        for grads in last:
            _step(twin, [p], grads)
    assert torch.equal(W, p)


def _sam_run(name, replace, steps=8, **kw):
    """Steps where ``replace(W)`` may give W a new storage before each step (SAM's restore)."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(16, 12))
    b = torch.nn.Parameter(torch.randn(12))
    opt = getattr(klkern, name)([W, b], **KW, **kw)
    for grads in _grads([(16, 12), (12,)], steps):
        if replace:
            replace(W)
            replace(b)
        _step(opt, [W, b], grads)
    return W.detach().clone(), b.detach().clone()


@pytest.mark.parametrize("layout", [{}, {"block_size": 8}, {"block_size": 8, "normalize_grads": True}])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_replaced_storage_re_points_the_plan(name, layout, monkeypatch):
    """``p.data = new`` of the same shape, dtype and device before every step: the plan is built
    once per structural change as without it (before: at every step), and the parameters are
    the ones of the run without replacement, also when the new storage is not contiguous."""
    builds = []
    original = _engine.StepEngine._build

    def counted(self, stepping):
        builds.append(1)
        return original(self, stepping)

    monkeypatch.setattr(_engine.StepEngine, "_build", counted)
    plain = _sam_run(name, None, **layout)
    plain_builds = len(builds)
    builds.clear()
    copied = _sam_run(name, lambda p: setattr(p, "data", p.data.clone()), **layout)
    assert len(builds) == plain_builds  # only the first steps (initialisation, first update) build
    strided = _sam_run(name, lambda p: setattr(p, "data", p.data.t().contiguous().t() if p.dim() == 2
                                               else p.data.clone()), **layout)
    for a, b, c in zip(plain, copied, strided):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert rel_err(plain[0], _sam_run(name, None, steps=0)[0]) > 0  # the run moved the weights
