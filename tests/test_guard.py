"""No step poisons the state (klkern/engine/_guard.py), and a failing kernel does not stop training.

Property tests: random block shapes and one step whose (finite) gradient has
a scale from 1e-30 to 1e30, between ordinary steps, for all four optimizers
on both paths (Triton through the interpreter). Whatever the scale, every
parameter and every state tensor stays finite, and a step that was rolled
back leaves its blocks exactly as they were.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _helpers import kernel_device, kernel_skip_reason

import klkern
from klkern.engine import _guard
from klkern.runtime import _backend

OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]
SCALES = [1e-30, 1e-20, 1e-10, 1.0, 1e5, 1e10, 1e15, 1e18, 1e20, 1e25, 1e30]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(kernel_device() is None,
                                                                     reason=kernel_skip_reason()))]


def _random_shapes(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    return [(pick(1, 12), pick(1, 12)), (pick(2, 9), pick(2, 9)), (pick(2, 4), pick(2, 4), pick(2, 4)), (pick(1, 7),)]


def _state_tensors(opt):
    for state in opt.state.values():
        for block in state.get("blocks", []):
            if block is not None:
                yield from block.values()


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {"step": st.get("step"), "blocks": [{k: v.clone() for k, v in b.items()} for b in st["blocks"]]}
             for p, st in opt.state.items() if "blocks" in st})


def _assert_finite(opt, params, where):
    for p in params:
        assert torch.isfinite(p).all(), f"parameter {tuple(p.shape)} not finite {where}"
    for t in _state_tensors(opt):
        assert torch.isfinite(t).all(), f"state not finite {where}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_any_gradient_scale_keeps_state_finite(name, backend):
    for case, scale in enumerate(SCALES):
        shapes = _random_shapes(seed=case)
        gen = torch.Generator().manual_seed(100 + case)
        device = kernel_device() if backend == "triton" else torch.device("cpu")
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(device)) for s in shapes]
        opt = getattr(klkern, name)(params, backend=backend, lr=1e-2, precondition_frequency=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for t in range(6):
                big = t == 3
                for p in params:
                    p.grad = (torch.randn(p.shape, generator=gen) * (scale if big else 1.0)).to(device)
                if big:
                    before_params = [p.detach().clone() for p in params]
                    skipped = opt.nonfinite_skipped
                opt.step()
                _assert_finite(opt, params, f"after step {t} (scale {scale:g}, shapes {shapes})")
                if big and opt.nonfinite_skipped > skipped:
                    # at least one parameter was rolled back: its blocks are exactly as before
                    restored = [i for i, (a, b) in enumerate(zip(params, before_params)) if torch.equal(a, b)]
                    assert restored, "a rollback was counted but no parameter is unchanged"
        if scale >= 1e20:  # squares overflow fp32 for every optimizer: the big step was rolled back
            assert opt.nonfinite_skipped >= 1, (name, scale)
        if scale <= _guard.GRAD_SAFE:  # below the guard's threshold nothing is rolled back
            assert opt.nonfinite_skipped == 0, (name, scale)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rollback_restores_state_and_parameters_exactly(name):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(4))]
    opt = getattr(klkern, name)(params, lr=1e-2, precondition_frequency=2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    before_params, before_state = _snapshot(opt, params)
    for p in params:
        p.grad = torch.full(p.shape, 1e20)
    # read from the device at a refresh step (Shampoo's here) or when asked for
    with pytest.warns(RuntimeWarning, match="rolled back"):
        opt.step()
        assert opt.nonfinite_skipped == 2
    after_params, after_state = _snapshot(opt, params)
    for a, b in zip(after_params, before_params):
        assert torch.equal(a, b)
    for pid, st in before_state.items():
        assert after_state[pid]["step"] == st["step"] + 1  # a skipped step counts
        for blk_a, blk_b in zip(after_state[pid]["blocks"], st["blocks"]):
            for key in blk_b:
                assert torch.equal(blk_a[key], blk_b[key]), key
    assert opt.nonfinite_skipped == 2
    # training goes on normally afterwards, and warns only once
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    assert not torch.equal(params[0], before_params[0])


def test_only_the_overflowing_block_is_rolled_back():
    """block_size splits one weight into 4 blocks; only the block whose gradient overflows is restored."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = klkern.KLShampoo([p], lr=1e-2, block_size=4)
    for _ in range(2):
        p.grad = torch.randn(8, 8)
        opt.step()
    before = p.detach().clone()
    state_before = [{k: v.clone() for k, v in b.items()} for b in opt.state[p]["blocks"]]
    grad = torch.randn(8, 8)
    grad[:4, :4] *= 1e21
    p.grad = grad
    opt.step()
    with pytest.warns(RuntimeWarning, match="rolled back"):
        assert opt.nonfinite_skipped == 1
    assert torch.equal(p[:4, :4], before[:4, :4])
    assert not torch.equal(p[4:, :], before[4:, :])
    blocks = opt.state[p]["blocks"]
    assert torch.equal(blocks[0]["R0"], state_before[0]["R0"])  # the bad block: restored
    assert not torch.equal(blocks[3]["R0"], state_before[3]["R0"])  # the others stepped
    assert opt.state[p]["step"] == 2


def test_failed_initialisation_leaves_the_parameter_uninitialised():
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = klkern.SOAP([p])
    p.grad = torch.full((5, 4), 1e30)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        opt.step()
    assert p not in opt.state or "step" not in opt.state[p]
    p.grad = torch.randn(5, 4)
    opt.step()
    assert opt.state[p]["step"] == 0 and all(torch.isfinite(t).all() for t in _state_tensors(opt))


@pytest.mark.parametrize("eps, copies", [(1e-8, False), (0.0, True)])
def test_only_unbounded_hyperparameters_copy_the_state(eps, copies):
    """A steady step decides on the device and copies no state (no clone); a group whose eps does
    not bound the update (eps < 1e-16) copies its state to restore from."""
    from klkern.tools._dispatch import DispatchCounter

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    opt = klkern.KLSOAP(model.parameters(), eps=eps)
    for t in range(4):
        model(torch.randn(16, 8)).pow(2).mean().backward()
        with DispatchCounter() as counter:
            opt.step()
        opt.zero_grad()
    assert (counter.ops["clone"] > 0) == copies and counter.host_reads == 0


def test_unbounded_hyperparameters_are_always_guarded():
    """eps=0 lets Adam's m / (sqrt(v) + eps) divide by zero: every batch is guarded, nothing poisons."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = klkern.SOAP([p], eps=0.0)
    assert _guard.unbounded("soap", opt.param_groups[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(4):
            g = torch.randn(4, 4)
            g[:, 0] = 0.0  # a zero column: v = 0 there
            p.grad = g
            opt.step()
            _assert_finite(opt, [p], f"step {t}")


# ---------------------------------------------------------------------------- kernel failure fallback

needs_interpreter = pytest.mark.skipif(kernel_device() != torch.device("cpu"),
                                       reason="CPU models through the Triton interpreter")


def _pair(monkeypatch, bias: bool = True):
    """Two identical models: one with backend="torch", one with "auto" forced onto the kernels
    (``bias=False``: every parameter preconditioned, no AdamW path)."""
    real_resolve = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda backend, device, precision=None: (
        "triton" if _backend.requested(backend) == "auto" else real_resolve(backend, device, precision)))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(12, 12, bias=bias), torch.nn.Tanh(),
                                          torch.nn.Linear(12, 12, bias=bias)))
    return models


def _train(models, opts, steps, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        X, Y = torch.randn(32, 12, generator=gen), torch.randn(32, 12, generator=gen)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            (model(X) - Y).pow(2).mean().backward()
            opt.step()


@needs_interpreter
@pytest.mark.parametrize("failing", ["rotate", "factor_ema_"])
def test_failing_kernel_falls_back_to_torch(monkeypatch, failing):
    """A kernel that raises (here on purpose; on a GPU: compilation, launch, shared memory) under
    backend="auto": one warning naming the cause, the step equals the torch path's, and the kernel
    is not tried again. factor_ema_ fails after the rotation's kernel already updated the moments,
    which are restored first. (No biases: the AdamW path's own kernel would run and round apart
    from torch's in the last bit.)"""
    from klkern import triton_kernels as K

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of resources: shared memory, Required: 262144, Hardware limit: 232448")

    monkeypatch.setattr(K, failing, broken)
    models = _pair(monkeypatch, bias=False)
    opts = [klkern.KLShampoo(models[0].parameters(), backend="torch"),
            klkern.KLShampoo(models[1].parameters(), backend="auto")]
    with pytest.warns(RuntimeWarning, match="Triton kernels failed .*out of resources") as record:
        _train(models, opts, steps=5)
    assert len([w for w in record if "Triton kernels failed" in str(w.message)]) == 1
    assert len(calls) == 1  # the failing variant ran once, then the torch path took over
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


@needs_interpreter
def test_working_kernels_under_auto_run_and_agree(monkeypatch):
    models = _pair(monkeypatch)
    opts = [klkern.KLSOAP(models[0].parameters(), backend="torch"),
            klkern.KLSOAP(models[1].parameters(), backend="auto")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(models, opts, steps=4)
    assert opts[1]._kernels_proven and not opts[1]._kernels_failed
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert float((a - b).detach().abs().max()) < 1e-5


@needs_interpreter
def test_backend_triton_still_raises(monkeypatch):
    from klkern import triton_kernels as K

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compilation failure")

    monkeypatch.setattr(K, "precondition", broken)
    p = torch.nn.Parameter(torch.randn(6, 6))
    opt = klkern.KLShampoo([p], backend="triton")
    p.grad = torch.randn(6, 6)
    opt.step()
    p.grad = torch.randn(6, 6)
    with pytest.raises(RuntimeError, match="simulated compilation failure"):
        opt.step()


def test_grad_safe_and_state_limit_are_consistent():
    """The unguarded bound of _guard's docstring: the largest term an unguarded step adds stays
    below STATE_LIMIT at the largest preconditioned dimension and eigenvalue clamp."""
    d, c = 1e4, 4000.0
    gr = _guard.GRAD_SAFE * d  # |Gr| <= ||G||_F <= GRAD_SAFE * sqrt(m n)
    assert gr**2 * c**2 < _guard.STATE_LIMIT
    assert d * gr**2 < _guard.STATE_LIMIT
    assert math.sqrt(d * d) * gr * c**2 < _guard.STATE_LIMIT


def test_rollback_through_a_copying_block_layout():
    """merge_dims on a channels_last 4-D weight: its blocks are copies, not views; a rolled-back
    block is still written back into the parameter, and the other blocks keep their update."""
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(4, 3, 2, 6))
    opt = klkern.KLShampoo([p], lr=1e-2, merge_dims=True, max_precond_dim=18, data_format="channels_last",
                           block_size=4)
    plan = klkern.algorithms._blocking.plan_for(p.shape, opt.param_groups[0])
    assert not plan.trivial and len(plan.masks) > 1
    assert plan.extract(p.detach())[0].untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    for _ in range(2):
        p.grad = torch.randn(p.shape)
        opt.step()
    before = [b.clone() for b in plan.extract(p.detach())]
    grad = torch.randn(p.shape)
    blocks = plan.extract(grad)  # copies: scale block 0 through the layout
    blocks[0].mul_(1e21)
    p.grad = plan.assemble(blocks)
    opt.step()
    with pytest.warns(RuntimeWarning, match="rolled back"):
        assert opt.nonfinite_skipped == 1
    after = plan.extract(p.detach())
    assert torch.equal(after[0], before[0])
    assert not torch.equal(after[-1], before[-1])
    assert torch.isfinite(p).all()
