"""state_dict round trips: stopping at step k and continuing from a fresh
optimizer gives exactly the parameters of an uninterrupted run."""

import io

import pytest
import torch
from _helpers import PAIRS, clone_params, kept_float32, make_params, quadratic_grads

SHAPES = [(6, 6), (4, 9), (5,), (2, 3, 4), (3, 8)]
KW = dict(precondition_frequency=4, block_size=5)


def _run(opt, params, targets, steps):
    for t in steps:
        quadratic_grads(params, targets, t)
        opt.step()


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(name, state_dtype):
    cls = PAIRS[name][0]
    targets = [torch.randn(*s) for s in SHAPES]
    straight = make_params(SHAPES)
    opt = cls(straight, state_dtype=state_dtype, **KW)
    _run(opt, straight, targets, range(23))

    first = make_params(SHAPES)
    opt1 = cls(first, state_dtype=state_dtype, **KW)
    _run(opt1, first, targets, range(11))  # stop mid-way between refreshes
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    opt2 = cls(resumed, state_dtype=state_dtype, **KW)
    opt2.load_state_dict(saved["opt"])
    _run(opt2, resumed, targets, range(11, 23))
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
    # state dtypes survive the round trip
    for p in resumed:
        for block in opt2.state[p]["blocks"]:
            for key, value in block.items():
                expected = torch.float32 if kept_float32(name, block, key) else state_dtype
                assert value.dtype == expected, key


def test_loaded_state_is_independent_of_the_source():
    cls = PAIRS["klshampoo"][0]
    params = make_params([(4, 4)])
    opt = cls(params)
    _run(opt, params, [torch.zeros(4, 4)], range(3))
    sd = opt.state_dict()
    snapshot = {k: v.clone() for k, v in sd["state"][0]["blocks"]["0"].items()}
    other = clone_params(params)
    opt2 = cls(other)
    opt2.load_state_dict(sd)
    _run(opt2, other, [torch.zeros(4, 4)], range(3, 6))
    for k, v in sd["state"][0]["blocks"]["0"].items():
        assert torch.equal(v, snapshot[k]), k


def test_bf16_parameters_keep_float32_state_after_load():
    """torch.optim's default would cast state to the parameter dtype; ours keeps it."""
    cls = PAIRS["klsoap"][0]
    params = make_params([(5, 5)], dtype=torch.bfloat16)
    opt = cls(params)
    _run(opt, params, [torch.zeros(5, 5)], range(3))
    opt2 = cls(clone_params(params))
    opt2.load_state_dict(opt.state_dict())
    p = opt2.param_groups[0]["params"][0]
    assert all(v.dtype == torch.float32 for v in opt2.state[p]["blocks"][0].values())


def test_param_groups_and_lr_round_trip():
    cls = PAIRS["soap"][0]
    a, b = make_params([(4, 4), (3,)])
    opt = cls([{"params": [a], "lr": 1e-3}, {"params": [b], "weight_decay": 0.0}])
    sd = opt.state_dict()
    opt2 = cls([{"params": [a]}, {"params": [b]}])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 1e-3
    assert opt2.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError):
        cls([a, b]).load_state_dict(sd)  # different number of groups
