"""Low-precision parameters and state."""

import importlib.util
from pathlib import Path

import pytest
import torch
from _helpers import PAIRS, clone_params, kept_float32, make_params, quadratic_grads, rel_err

from klkern.algorithms._algorithms import ALGORITHMS

_BENCH = Path(__file__).resolve().parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("bf16_state", _BENCH / "bf16_state.py")
bf16_state = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf16_state)

SHAPES = [(8, 8), (6,), (3, 4, 5)]
# The fast path's distance from the reference, as a fraction of how far the reference moved (mean
# absolute change per entry, 0.004-0.02 over these 15 steps at lr 1e-2). Both do the same float32
# math and round once per step to the parameter's dtype: measured identical on the CPU. A few
# entries rounded the other way (one ulp: 0.0078 at |w| in [1, 2) in bf16) shift the mean
# distance by a few percent of the movement; a parameter that is not written back is 100 % off.
MOVE_RTOL = 0.1


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().mean())


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_reference(name, dtype):
    """Math in float32, result written back in the parameter's dtype: the fast path and the
    reference (which upcasts the same way) move every parameter alike, to within MOVE_RTOL of
    the movement itself (not of the parameter's size, which a frozen parameter would meet)."""
    fast_cls, ref_cls = PAIRS[name]
    p_fast = make_params(SHAPES, dtype=dtype)
    p_ref = clone_params(p_fast)
    start = clone_params(p_fast)
    targets = [torch.randn(*s) for s in SHAPES]
    opt_f, opt_r = fast_cls(p_fast, lr=1e-2), ref_cls(p_ref, lr=1e-2)
    for t in range(15):
        quadratic_grads(p_fast, targets, t)
        quadratic_grads(p_ref, targets, t)
        opt_f.step()
        opt_r.step()
    for a, b, s in zip(p_fast, p_ref, start):
        assert a.dtype == dtype
        moved = _mean_abs(b, s)
        assert moved > 2e-3, (tuple(a.shape), moved)  # 15 steps of ~lr each, well above one ulp's share
        assert _mean_abs(a, b) <= MOVE_RTOL * moved, (tuple(a.shape), _mean_abs(a, b), moved)
    for p in p_fast:
        assert all(v.dtype == torch.float32 for v in opt_f.state[p]["blocks"][0].values())


@pytest.mark.parametrize("name", list(PAIRS))
def test_bf16_state_halves_what_follows_state_dtype_and_tracks_fp32(name):
    cls = PAIRS[name][0]
    targets = [torch.randn(*s) for s in SHAPES]
    runs = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        params = make_params(SHAPES)
        opt = cls(params, lr=1e-2, state_dtype=state_dtype)
        for t in range(20):
            quadratic_grads(params, targets, t)
            opt.step()
        runs[state_dtype] = (params, opt)
    (p32, o32), (p16, o16) = runs[torch.float32], runs[torch.bfloat16]

    def split_bytes(params, opt):  # (bytes of state that follows state_dtype, bytes kept float32)
        follows = fixed = 0
        for p in params:
            for block in opt.state[p]["blocks"]:
                for key, value in block.items():
                    n = value.numel() * value.element_size()
                    if kept_float32(name, block, key):
                        fixed += n
                    else:
                        follows += n
        return follows, fixed

    (f32, k32), (f16, k16) = split_bytes(p32, o32), split_bytes(p16, o16)
    assert f16 == pytest.approx(f32 / 2, rel=0.01) and k16 == k32 and f32 > 0
    start = make_params(SHAPES)
    for a, b, s in zip(p16, p32, start):
        # bf16 state moves the trajectory by far less than the step itself
        assert rel_err(a, b) < 0.1 * rel_err(b, s) + 1e-3


# The ill-conditioned least squares of bench/bf16_state.py (input covariance 1 ... 1e-4), shortened
# to 300 steps at lr 3e-2. Measured (bf16 / float32 state): KL-Shampoo 1.00, KL-SOAP 1.06,
# SOAP 1.11, Shampoo 1.00; with Shampoo's momentum in bf16 Shampoo ended at 1.0e-1 against 3.9e-5
# (2575x), its inverse roots amplifying the momentum's rounding. The bound is the one required of
# bf16 state: at most twice the float32-state loss.
BF16_LOSS_RATIO = 2.0
LS_STEPS, LS_LR = 300, 3e-2
# float32 state gets this far in those steps (measured 3.9e-5 to 7.5e-4): the comparison is made
# where the optimizer has resolved the small-eigenvalue directions, not before
LS_PROGRESS = 1e-2


@pytest.mark.parametrize("name", list(PAIRS))
def test_bf16_state_loses_nothing_on_ill_conditioned_least_squares(name):
    """The state a preconditioner amplifies is kept float32 whatever state_dtype says: bf16 state
    ends within BF16_LOSS_RATIO of float32 state on a problem of condition number 1e4."""
    cls = PAIRS[name][0]
    full = bf16_state.least_squares(cls, torch.float32, LS_LR, LS_STEPS)
    half = bf16_state.least_squares(cls, torch.bfloat16, LS_LR, LS_STEPS)
    assert full < LS_PROGRESS, full
    assert half <= BF16_LOSS_RATIO * full, (half, full)


def test_state_kept_float32_is_float32_in_every_path():
    """What an algorithm keeps float32 (Algorithm.keeps_float32) is float32 under bf16 state, from
    its init and from a state dict saved with that name in bf16 (before it was kept float32)."""
    for name, (cls, _) in PAIRS.items():
        params = make_params([(6, 5)])
        opt = cls(params, lr=1e-2, state_dtype=torch.bfloat16)
        quadratic_grads(params, [torch.randn(6, 5)], 0)
        opt.step()
        block = opt.state[params[0]]["blocks"][0]
        algorithm = ALGORITHMS[name]
        for key, value in block.items():
            want = torch.float32 if algorithm.keeps_float32(key) else torch.bfloat16
            assert value.dtype == want, (name, key, value.dtype)
        saved = opt.state_dict()
        blocks = saved["state"][0]["blocks"]
        first = blocks[0] if isinstance(blocks, list) else blocks["0"]  # the list form, or keyed by index
        for key, value in first.items():
            if value.is_floating_point():
                first[key] = value.to(torch.bfloat16)
        again = cls(params, lr=1e-2, state_dtype=torch.bfloat16)
        again.load_state_dict(saved)
        for key, value in again.state[params[0]]["blocks"][0].items():
            if algorithm.keeps_float32(key) and value.is_floating_point():
                assert value.dtype == torch.float32, (name, key, value.dtype)
