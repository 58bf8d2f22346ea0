"""The four optimizers behave like torch.optim optimizers: the conventions of PyTorch's generic
optimizer tests (torch/testing/_internal/common_optimizers.py and test/test_optim.py), in
klkern's own code, and the faults found against them, each tested as a kind.

Where this family legitimately differs from an elementwise optimizer, the test says so and checks
the documented behaviour instead: the first step of KL-Shampoo, KL-SOAP and SOAP only initialises
the state of a parameter (it does not change it), and updates are not elementwise (a parameter's
update depends on the whole block).

Tolerances: copies, reloads and the like must be bit-identical (same arithmetic on the CPU);
comparisons of two runs whose batching differs (param groups against separate optimizers) allow
float32 roundoff, RTOL = 1e-6 relative to the largest entry.
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
from _helpers import rel_err

import klkern
from klkern.algorithms import _options
from klkern.distributed import _distributed

OPTIMIZERS = [klkern.KLShampoo, klkern.KLSOAP, klkern.SOAP, klkern.Shampoo]
IDS = [cls.__name__ for cls in OPTIMIZERS]
RTOL = 1e-6
DATA = Path(__file__).resolve().parent / "data"


def _params(seed=0, dtype=torch.float32):
    """A 2-D weight, a bias, a 4-D kernel (merge_dims, channels_last) and a 0-D scale."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 16), (16,), (4, 3, 2, 2), ()]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _steps(opt, params, start, count):
    for t in range(start, start + count):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()


def _opt_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _same_state(a: dict, b: dict) -> None:
    """Two state dicts hold the same values (tensors bit for bit)."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _same_state(x, y)
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                _same_state({0: u}, {0: v})
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), key
        else:
            assert x == y, (key, x, y)


# ---------------------------------------------------------------------------- every option


def _alternative(name: str, default):
    """A valid value other than the default, for every option of every optimizer."""
    table = {
        "lr": 1e-2, "betas": (0.9, 0.99), "shampoo_beta": 0.9, "eps": 1e-6, "weight_decay": 0.05,
        "precondition_frequency": 2, "normalize_grads": True, "max_precond_dim": 12, "merge_dims": True,
        "precondition_1d": True, "data_format": "channels_last", "block_size": 8, "state_dtype": torch.bfloat16,
        "large_dim_policy": "identity" if default == "adamw" else "adamw", "matmul_precision": "medium",
        "init_factor": "rms" if default == 0.1 else 0.1, "eigval_clamp": 100.0, "eigenbasis": "eigh",
        "correct_bias": False, "exponent": 0.25, "grafting": "none", "eigenvalues_first": True,
        "staleness_threshold": 1e-3, "spike_threshold": 100.0, "stagger_refresh": True, "mask_unseen": False,
            "eigval_floor": "absolute" if default == "relative" else "relative",
    }
    if name not in table:
        raise AssertionError(f"option {name!r} has no alternative value here: add one to _alternative")
    assert table[name] != default, name
    return table[name]


# Constructor keywords that are not param-group options, with a non-default value each.
CONSTRUCTOR = {"backend": "torch", "communication_dtype": torch.bfloat16}


def _variants(cls):
    """(label, kwargs): the defaults, then every option changed on its own."""
    defaults = _options.DEFAULTS[cls.algorithm]
    out = [("defaults", {})]
    out += [(name, {name: _alternative(name, value)}) for name, value in defaults.items()]
    out += [(name, {name: value}) for name, value in CONSTRUCTOR.items()]
    return out


def _copy(opt, how: str):
    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _public(opt) -> dict:
    return {k: v for k, v in vars(opt).items() if not k.startswith("_") and k not in ("state", "param_groups")}


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_a_copy_keeps_every_option_and_steps_bit_identically(cls, how):
    """Fault: copies lost backend, process_group, communication_dtype and nonfinite_skipped and
    could not step. Over every constructor option (each changed on its own, the list derived from
    the defaults, not written here): the copy has the same public attributes, defaults and groups,
    and 3 more steps (with a refresh) give the original's parameters and state bit for bit."""
    for label, kwargs in _variants(cls):
        params = _params()
        opt = cls(params, **kwargs)
        _steps(opt, params, 0, 3)
        opt.nonfinite_skipped = 2  # a counter a copy must carry too
        twin = _copy(opt, how)
        assert type(twin) is cls
        assert _public(twin) == _public(opt) and twin.defaults == opt.defaults, label
        assert [{k: v for k, v in g.items() if k != "params"} for g in twin.param_groups] == \
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups], label
        _steps(opt, params, 3, 3)
        _steps(twin, _opt_params(twin), 3, 3)
        for a, b in zip(_opt_params(twin), params):
            assert torch.equal(a, b), label
        _same_state(twin.state_dict(), opt.state_dict())


def test_every_option_has_an_alternative():
    for cls in OPTIMIZERS:
        assert len(_variants(cls)) == 1 + len(_options.DEFAULTS[cls.algorithm]) + len(CONSTRUCTOR)


def test_a_deep_copy_shares_the_process_group_and_pickling_refuses_it(monkeypatch):
    """A communicator cannot be copied: a deep copy shares it; pickling says what to do instead."""
    group = object()
    monkeypatch.setattr(_distributed, "check_process_group", lambda g: None)
    opt = klkern.KLShampoo(_params(), process_group=group)
    assert copy.deepcopy(opt).process_group is group
    with pytest.raises(TypeError, match=r"process_group.*state_dict\(\)"):
        pickle.dumps(opt)


def test_an_old_pickle_without_the_newer_attributes_loads(tmp_path):
    """A pickle made before an attribute or option existed loads with its default."""
    params = _params()
    opt = klkern.KLSOAP(params)
    _steps(opt, params, 0, 2)
    state = opt._getstate()
    for name in ("backend", "communication_dtype", "nonfinite_skipped"):
        del state[name]
    for group in state["param_groups"]:
        del group["matmul_precision"]
    old = klkern.KLSOAP.__new__(klkern.KLSOAP)
    old.__setstate__(state)
    assert old.backend == "auto" and old.nonfinite_skipped == 0
    assert old.param_groups[0]["matmul_precision"] is None
    _steps(old, params, 2, 2)


# ---------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("cls", OPTIMIZERS + [torch.optim.AdamW], ids=IDS + ["AdamW"])
def test_state_dict_and_load_hooks_follow_torch(cls):
    """Fault: a load pre-hook saw an empty "state" and what it returned for it was ignored; the
    post-hook ran before the state was loaded. Checked here for klkern and, as the reference,
    torch.optim.AdamW, with the same hooks."""
    params = _params()
    opt = cls(params, lr=1e-2)
    _steps(opt, params, 0, 2)
    seen = {}

    def save_pre(o):
        seen["save_pre"] = True

    def save_post(o, sd):
        seen["save_post_groups"] = len(sd["param_groups"])
        return {**sd, "marker": 1}

    opt.register_state_dict_pre_hook(save_pre)
    opt.register_state_dict_post_hook(save_post)
    sd = opt.state_dict()
    assert seen["save_pre"] and sd["marker"] == 1  # a post-hook's return is the state dict

    fresh = cls(_params(seed=1), lr=1e-2)

    def load_pre(o, state_dict):
        seen["load_pre_state"] = len(state_dict["state"])
        changed = copy.deepcopy(state_dict)
        changed["param_groups"][0]["lr"] = 0.5
        first = changed["state"][0]
        if "blocks" in first:
            first["blocks"]["0"]["exp_avg"] = first["blocks"]["0"]["exp_avg"] * 0 + 7.0
        else:
            first["exp_avg"] = first["exp_avg"] * 0 + 7.0
        return changed

    def load_post(o):
        seen["load_post_state"] = len(o.state)

    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(load_post)
    fresh.load_state_dict(sd)
    assert seen["load_pre_state"] == len(sd["state"]) > 0  # the pre-hook sees the whole state
    assert seen["load_post_state"] == len(sd["state"])  # the post-hook runs once it is loaded
    assert fresh.param_groups[0]["lr"] == 0.5  # what the pre-hook returned is loaded
    state = fresh.state[fresh.param_groups[0]["params"][0]]
    value = state["blocks"][0]["exp_avg"] if "blocks" in state else state["exp_avg"]
    assert torch.all(value == 7.0)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_step_hooks_run_around_every_step(cls):
    params = _params()
    opt = cls(params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    _steps(opt, params, 0, 2)
    assert calls == [("pre", True), ("post", True)] * 2


# ---------------------------------------------------------------------------- param groups


def _invalid(name: str):
    table = {
        "lr": -1.0, "betas": (1.0, 0.9), "shampoo_beta": 1.5, "eps": -1e-8, "weight_decay": -0.1,
        "precondition_frequency": 0, "normalize_grads": "yes", "max_precond_dim": -1, "merge_dims": 1,
        "precondition_1d": "no", "data_format": "nhwc", "block_size": 0, "state_dtype": torch.int8,
        "large_dim_policy": "drop", "matmul_precision": "low", "init_factor": 0.0, "eigval_clamp": -1.0,
        "eigenbasis": "svd", "correct_bias": 1, "exponent": 0.0, "grafting": "sgd", "eigenvalues_first": "yes",
        "staleness_threshold": -1.0, "spike_threshold": 0.5, "stagger_refresh": "yes", "mask_unseen": 1,
        "eigval_floor": "none",
    }
    if name not in table:
        raise AssertionError(f"option {name!r} has no invalid value here: add one to _invalid")
    return table[name]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_a_refused_param_group_leaves_the_optimizer_as_it_was(cls):
    """Fault: add_param_group(lr=-1) raised but kept the group (then stepped as gradient ascent,
    and the corrected group was refused as a duplicate). For every option's invalid value, and a
    complex parameter: ValueError naming it, the groups unchanged, the corrected group accepted."""
    for name in _options.DEFAULTS[cls.algorithm]:
        params = _params()
        opt = cls(params[:1])
        _steps(opt, params[:1], 0, 2)
        before = copy.deepcopy(opt.param_groups)
        with pytest.raises(ValueError, match=f"invalid {name}"):
            opt.add_param_group({"params": params[1:3], name: _invalid(name)})
        assert len(opt.param_groups) == 1
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
            [{k: v for k, v in g.items() if k != "params"} for g in before]
        opt.add_param_group({"params": params[1:3]})
        assert len(opt.param_groups) == 2
    opt = cls(_params()[:1])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_groups_with_different_hyperparameters_are_independent(cls):
    """Two groups with their own lr, betas and weight decay step exactly like two optimizers."""
    a, b = _params(), _params()
    opt = cls([{"params": a[:2], "lr": 1e-2, "betas": (0.9, 0.99)},
               {"params": a[2:], "lr": 3e-3, "weight_decay": 0.1}])
    first = cls(b[:2], lr=1e-2, betas=(0.9, 0.99))
    second = cls(b[2:], lr=3e-3, weight_decay=0.1)
    for t in range(6):
        for p, g in zip(a, _grads(a, t)):
            p.grad = g
        for p, g in zip(b, _grads(b, t)):
            p.grad = g
        opt.step()
        first.step()
        second.step()
    for x, y in zip(a, b):
        assert rel_err(x, y) <= RTOL


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_state_dict_round_trip_across_group_changes(cls):
    """Save after add_param_group, load into a fresh optimizer with the same groups: equal steps."""
    params = _params()
    opt = cls(params[:2])
    _steps(opt, params[:2], 0, 2)
    opt.add_param_group({"params": params[2:], "lr": 1e-3})
    _steps(opt, params, 2, 2)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = cls(copies[:2])
    fresh.add_param_group({"params": copies[2:], "lr": 1e-3})
    fresh.load_state_dict(opt.state_dict())
    _steps(opt, params, 4, 3)
    _steps(fresh, copies, 4, 3)
    for x, y in zip(copies, params):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_state_dicts_are_deterministic(cls):
    runs = []
    for _ in range(2):
        params = _params()
        opt = cls(params)
        _steps(opt, params, 0, 4)
        runs.append(opt.state_dict())
    _same_state(runs[0], runs[1])
    _same_state(runs[0], runs[0])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_an_older_state_dict_gets_the_defaults_of_options_it_lacks(cls):
    """Fault: a state dict whose groups lacked a key added later (matmul_precision) loaded, then
    step() raised KeyError; every future option would break every checkpoint. Now, for every
    option in turn: loading fills it with the group's default and training goes on."""
    params = _params()
    opt = cls(params)
    _steps(opt, params, 0, 2)
    for name in _options.DEFAULTS[cls.algorithm]:
        sd = copy.deepcopy(opt.state_dict())
        for group in sd["param_groups"]:
            del group[name]
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        fresh = cls(copies)
        fresh.load_state_dict(sd)
        assert fresh.param_groups[0][name] == fresh.defaults[name]
        _steps(fresh, copies, 2, 1)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_a_newer_state_dict_with_unknown_group_keys_loads(cls):
    params = _params()
    opt = cls(params)
    _steps(opt, params, 0, 2)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group["an_option_from_the_future"] = 1
    fresh = cls([torch.nn.Parameter(p.detach().clone()) for p in params])
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["an_option_from_the_future"] == 1
    _steps(fresh, _opt_params(fresh), 2, 1)


def test_a_loaded_state_dict_with_an_invalid_group_is_refused():
    params = _params()
    opt = klkern.SOAP(params)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="invalid lr"):
        klkern.SOAP(_params()).load_state_dict(sd)


SAVED = DATA / "state_dicts_v0.1.0.pt"


def _saved_case(cls):
    """What tests/data/ holds per optimizer: a state dict after 3 steps (a refresh), the next
    gradients and the parameters a further step gives."""
    params = _params()
    opt = cls(params, precondition_frequency=2)
    _steps(opt, params, 0, 3)
    start = [p.detach().clone() for p in params]
    grads = _grads(params, 3)
    for p, g in zip(params, grads):
        p.grad = g
    sd = copy.deepcopy(opt.state_dict())
    opt.step()
    return {"state_dict": sd, "params": start, "grads": grads, "after": [p.detach().clone() for p in params]}


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_state_dicts_saved_by_klkern_0_1_0_load_and_step(cls):
    """State dicts saved by this version (tests/data/, `python tests/test_conformance.py --update`
    writes them) load into every later version and give the same next step (1e-6: the math may be
    re-ordered, not changed)."""
    case = torch.load(SAVED, weights_only=False)[cls.__name__]
    params = [torch.nn.Parameter(p.clone()) for p in case["params"]]
    opt = cls(params)
    opt.load_state_dict(case["state_dict"])
    for p, g in zip(params, case["grads"]):
        p.grad = g
    opt.step()
    for p, expect in zip(params, case["after"]):
        assert rel_err(p, expect) <= RTOL


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_parameters_without_gradients_are_untouched(cls):
    params = _params()
    opt = cls(params, weight_decay=0.1)
    frozen = [p.detach().clone() for p in params]
    for t in range(4):
        params[0].grad = _grads(params, t)[0]
        opt.step()
    for p, before in zip(params[1:], frozen[1:]):
        assert torch.equal(p, before) and p not in opt.state
    assert not torch.equal(params[0], frozen[0])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_float64_parameters_are_not_rounded(cls):
    """Fault: float64 parameters were rounded to float32 on every step. The update is computed in
    float32 (the preconditioner's math, SPEC "Precision") and added to the float64 parameter: with
    lr = 0 a weight of 1 + 1e-12 stays exactly that, and two weights 1e-12 apart that get the same
    update stay 1e-12 apart (float32 rounding would merge them; float64 rounding of the 8
    additions of 4 steps moves the gap by at most ~1.3e-15, measured)."""
    base = torch.randn(8, 8, dtype=torch.float64)
    params = [torch.nn.Parameter(base + 1.0), torch.nn.Parameter(base + 1.0 + 1e-12)]
    idle = [torch.nn.Parameter(torch.full((8, 8), 1 + 1e-12, dtype=torch.float64))]
    opt = cls([{"params": params}, {"params": idle, "lr": 0.0, "weight_decay": 0.0}], lr=1e-2)
    for t in range(4):
        g = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        params[0].grad, params[1].grad, idle[0].grad = g, g.clone(), g.clone()
        opt.step()
    assert torch.equal(idle[0], torch.full((8, 8), 1 + 1e-12, dtype=torch.float64))
    gap = (params[1] - params[0]).detach()
    assert torch.allclose(gap, torch.full_like(gap, 1e-12), rtol=0, atol=4e-15)
    assert params[0].dtype == torch.float64 and not torch.equal(params[0], (base + 1.0))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_mixed_dtypes_in_one_optimizer_step_like_each_alone(cls):
    """float32, bfloat16 and float64 parameters in one optimizer: each steps as it would alone.

    Both runs could agree by not moving a parameter at all, so each must move (lr 3e-2: over
    half of the bf16 entries change, measured 70-98 %; at the default lr most bf16 updates
    round away) and the two agree to MIXED_MOVE_RTOL of that movement (measured identical)."""
    MIXED_MOVE_RTOL = 1e-3  # float32 roundoff of another batching, against movements of 0.03-0.2
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    together = [_params(seed=3, dtype=d)[0] for d in dtypes]
    alone = [_params(seed=3, dtype=d)[0] for d in dtypes]
    start = [p.detach().clone() for p in alone]
    opt = cls(together, lr=3e-2)
    singles = [cls([p], lr=3e-2) for p in alone]
    for t in range(5):
        gen = torch.Generator().manual_seed(t)
        g = torch.randn(16, 16, generator=gen)
        for p, q in zip(together, alone):
            p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
        opt.step()
        for single in singles:
            single.step()
    for p, q, s in zip(together, alone, start):
        p, q = p.detach(), q.detach()
        assert p.dtype == q.dtype
        assert float((p != s).float().mean()) > 0.5 and float((q != s).float().mean()) > 0.5, p.dtype
        moved = float((q.double() - s.double()).abs().max())
        assert float((p.double() - q.double()).abs().max()) <= MIXED_MOVE_RTOL * moved, p.dtype


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_zero_size_and_zero_dim_parameters(cls):
    """A 0-element parameter is skipped; a 0-D one takes the AdamW path (it is a scalar)."""
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    scalar = torch.nn.Parameter(torch.tensor(1.5))
    opt = cls([empty, scalar], lr=1e-2)
    for t in range(3):
        empty.grad = torch.zeros(0, 5)
        scalar.grad = torch.tensor(0.3 + t)
        opt.step()
    assert empty.shape == (0, 5)
    moved = float(scalar.detach()) != 1.5
    assert moved  # the AdamW path's first step updates (only preconditioned blocks initialise first)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_tensor_lr_and_schedulers(cls):
    """A tensor lr works and an LR scheduler that edits it (as torch's do) changes the steps."""
    params = _params()
    opt = cls(params, lr=torch.tensor(1e-2))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    twin_params = _params()
    twin = cls(twin_params, lr=1e-2)
    for t in range(4):
        for group in twin.param_groups:
            group["lr"] = 1e-2 * 0.5**t
        for p, q, g in zip(params, twin_params, _grads(params, t)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        twin.step()
        scheduler.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**4)
    for p, q in zip(params, twin_params):
        assert rel_err(p, q) <= RTOL


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_printing_lists_every_group_option(cls):
    text = repr(cls(_params(), lr=2e-3))
    assert text.startswith(cls.__name__ + " (") and "lr: 0.002" in text
    for name in _options.DEFAULTS[cls.algorithm]:
        assert f"{name}: " in text, name


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_max_precond_dim_zero_preconditions_nothing(cls):
    """SOAP's release documents max_precond_dim=0 as Adam on every parameter: every parameter then
    takes the AdamW path, exactly as its flattened (1-D) copy does by default."""
    params = _params()[:3]
    flat = [torch.nn.Parameter(p.detach().reshape(-1).clone()) for p in params]
    opt = cls(params, max_precond_dim=0, lr=1e-2)
    ref = cls(flat, lr=1e-2)
    for t in range(4):
        for p, q, g in zip(params, flat, _grads(params, t)):
            p.grad, q.grad = g, g.reshape(-1).clone()
        opt.step()
        ref.step()
    for p, q in zip(params, flat):
        assert torch.equal(p.detach().reshape(-1), q.detach())
    assert all("blocks" not in st or all("Q0" not in b for b in st["blocks"]) for st in opt.state.values())


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_a_step_inside_autocast_computes_what_it_computes_outside(cls):
    """Found by a new user: opt.step() inside torch.autocast crashed three optimizers (their
    products were autocast to bf16). The optimizer's math ignores autocast, as torch.optim's."""
    runs = []
    for inside in (False, True):
        params = _params()
        opt = cls(params, precondition_frequency=2)
        for t in range(4):
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_lr_may_be_positional_and_help_lists_every_option(cls):
    import inspect

    assert cls(_params(), 2e-2).defaults["lr"] == 2e-2
    signature = inspect.signature(cls)
    assert list(signature.parameters)[:2] == ["params", "lr"]
    assert set(_options.DEFAULTS[cls.algorithm]) | set(CONSTRUCTOR) | {"process_group"} <= set(signature.parameters)
    with pytest.raises(TypeError, match=r"unknown arguments \['lerning_rate'\].*'backend'"):
        cls(_params(), lerning_rate=1e-2)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_a_state_dict_of_another_optimizer_or_model_is_refused_at_load(cls):
    """Found by a new user: such a load was accepted and the first step failed (KeyError, shape
    errors). Now load_state_dict refuses it, naming the parameter, and leaves the optimizer as it was."""
    params = _params()
    opt = cls(params)
    _steps(opt, params, 0, 2)
    other = klkern.SOAP if cls is not klkern.SOAP else klkern.Shampoo
    cases = [other(_params()), torch.optim.AdamW(_params())]
    for source in cases:
        src_params = _opt_params(source)
        for p, g in zip(src_params, _grads(src_params, 0)):
            p.grad = g
        source.step()
        source.step()
    wider = [torch.nn.Parameter(torch.randn(16, 24))] + _params()[1:]
    cases.append(cls(wider))
    _steps(cases[-1], wider, 0, 2)
    for source in cases:
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match=r"loaded state dict: the state of parameter 0 .*another optimizer"):
            opt.load_state_dict(source.state_dict())
        _same_state(opt.state_dict(), before)
    _steps(opt, params, 2, 1)


@pytest.mark.parametrize("source,target,foreign", [
    (klkern.KLSOAP, klkern.KLShampoo, r"\['exp_avg_sq'\]"),
    (klkern.KLSOAP, klkern.SOAP, r"\['floor_scale', 'lam0', 'lam1'\]"),
    (klkern.SOAP, klkern.KLSOAP, r"lacks \['lam0', 'lam1'\]"),
], ids=["klsoap-into-klshampoo", "klsoap-into-soap", "soap-into-klsoap"])
def test_a_state_dict_holding_more_than_this_optimizer_keeps_is_refused(source, target, foreign):
    """Found by a new user: KL-SOAP's state (a superset of KL-Shampoo's and SOAP's names) loaded
    into KL-Shampoo or SOAP and stepped. A block holding names this optimizer does not keep is
    now refused like one that lacks names, and the optimizer is left as it was."""
    params = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(2)]
    src = source(params)
    _steps(src, params, 0, 2)
    opt = target(params)
    _steps(opt, params, 0, 2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"loaded state dict: the state of parameter 0 .*" + foreign):
        opt.load_state_dict(src.state_dict())
    _same_state(opt.state_dict(), before)


def test_diagnostics_needs_named_parameters():
    params = _params()
    opt = klkern.KLShampoo(params)
    _steps(opt, params, 0, 2)
    model = torch.nn.Linear(3, 3)
    with pytest.raises(TypeError, match=r"\(name, parameter\) pairs, e.g. model.named_parameters\(\)"):
        opt.diagnostics(model.parameters())


def test_warnings_point_at_the_users_line():
    params = _params()
    opt = klkern.SOAP(params)
    for p in params:
        p.grad = torch.full(p.shape, float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN/Inf") as record:
        opt.step()
    assert record[0].filename == __file__


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_documented_refusals_name_the_fix(cls):
    with pytest.raises(ValueError, match="complex parameters"):
        cls([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients.*sparse=False"):
        opt.step()
    with pytest.raises(ValueError, match=r"invalid state_dtype=torch.float16.*bfloat16"):
        cls(_params(), state_dtype=torch.float16)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--update"]:
        DATA.mkdir(exist_ok=True)
        torch.save({cls.__name__: _saved_case(cls) for cls in OPTIMIZERS}, SAVED)
        print(f"wrote {SAVED} ({SAVED.stat().st_size} bytes)")
    else:
        sys.exit("usage: python tests/test_conformance.py --update")


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_a_deleted_optimizer_is_freed_at_once(cls, cuda_graph, monkeypatch):
    """Fault: the optimizer and its step machinery referred to each other, so ``del opt`` freed
    nothing (its state, and the process group it holds, lived until a garbage collection, in a
    distributed script at interpreter exit, where gloo's teardown could abort a finished run).
    Like torch.optim.AdamW, an optimizer that has stepped (refreshes, the captured step,
    diagnostics, a state-dict round trip, a copy) is freed, state and all, by reference
    counting alone."""
    import gc
    import weakref

    from klkern.engine import _graph

    monkeypatch.setattr(_graph, "EMULATE", True)
    params = _params()
    opt = cls(params, precondition_frequency=2, cuda_graph=cuda_graph)
    for t in range(5):
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    opt.diagnostics()
    opt.load_state_dict(opt.state_dict())
    copy.deepcopy(opt)
    refs = [weakref.ref(opt)] + [weakref.ref(v) for v in opt.state[params[0]]["blocks"][0].values()
                                 if isinstance(v, torch.Tensor)]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del opt
        alive = [r for r in refs if r() is not None]
    finally:
        if enabled:
            gc.enable()
    assert not alive, f"{len(alive)} of {len(refs)} objects survive del (the optimizer first: {refs[0]() is not None})"
