"""Low-precision parameters and state."""

import pytest
import torch
from _helpers import PAIRS, clone_params, make_params, quadratic_grads, rel_err

from klkern.algorithms._stacked import FLOAT32_STATE

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
                    if key.startswith(FLOAT32_STATE):
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
