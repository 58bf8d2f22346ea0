"""A step never changes torch's process-wide settings, and gets its precision without them
(klkern/runtime/_precision.py, issue 40 item 3).

torch's float32 matmul settings are process-wide: had a step set them for its own products,
another thread (evaluation, logging, a second model) would compute at the step's precision
while it runs, and a second optimizer's step would read them as the user's. The kind is checked
four ways:

* every write to one of torch's global settings during steps, inits, refreshes and diagnostics
  of all four optimizers, at every precision and under every global setting, is recorded
  (deterministic): none is allowed;
* a watcher thread polls every setting while those run: it never sees a change, and its own
  autocast region stays on (autocast's state is per thread in torch);
* four optimizers stepping in four threads under "medium" end bit-identical to the same runs
  one after the other;
* every float32 product a step computes is issued by klkern/runtime/_precision.py (which
  chooses operands and products for the arithmetic it wants): a bare ``@`` or ``torch.bmm``
  elsewhere would follow whatever the settings say.

Accuracy of what replaces the settings, measured on the CPU with TF32 emulated
(``emulate_tf32_off_gpu``: a product under "high" or "medium" rounds its operands to TF32, as
cuBLAS does): the float32-accurate product (3xTF32 there, float64 on the CPU's own reduced
settings) is within FP32_ERROR_RATIO of a true fp32 product's error against float64 (measured
1.01-1.09), where a plain product under TF32 is 1159-2309 times worse.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from _helpers import kernel_device, mlp, rel_err

import klkern
from klkern import linalg
from klkern.runtime import _precision

OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]
GLOBALS = ["highest", "high", "medium"]
MODES = [None, "highest", "high", "medium"]
# The float32-accurate product's error against float64 (Frobenius, relative), as a multiple of a
# true fp32 product's: 3xTF32 drops lo*lo (2^-22 relative) and rounds lo to TF32 (2^-11 of
# 2^-11), both at fp32's own roundoff. Measured under emulation at (B, m, K, n) = (4, 24, 96, 32),
# (2, 64, 512, 48), (3, 48, 48, 48), (4, 256, 256, 256), (2, 64, 2048, 64): 1.01-1.09 (the
# float64 route: 0.10-0.19). Bound 2 (the required "within 2x of a true fp32 product's").
FP32_ERROR_RATIO = 2.0
# A plain TF32 product's error at the same shapes: 1159-2309 fp32 errors (TF32 rounds each
# operand to 2^-11); the test asks for 100x, so that the bound above is known to be able to fail
# (the emulation is on).
TF32_ERROR_RATIO = 100.0
# KL-Shampoo's init and first update on the regression MLP (tests/_helpers.mlp), as a distance from
# the true-fp32 step over the distance travelled: measured 1.3e-6 with every fp32-required product
# by 3xTF32 under emulated TF32, 9.4e-7 for a 1e-7 relative change of the gradients, 1.2e-4 for
# the step at "high" (TF32 operands); bound 5e-6 (the TF32 step must move 10x that).
ROUNDOFF_STEP = 5e-6


def _reset_settings():
    torch.set_float32_matmul_precision("highest")
    torch.backends.fp32_precision = "none"  # type: ignore[attr-defined]


@pytest.fixture
def restore_settings():
    yield
    _reset_settings()
    _precision.emulate_tf32_off_gpu(False)


def _read(get):
    try:
        return get()
    except RuntimeError as err:  # torch refuses to answer for mixed legacy / per-backend settings
        return f"raises: {str(err)[:40]}"


# every process-wide setting of torch that decides how a float32 product, a convolution or a
# solver computes (read, never written, by the watcher)
SETTINGS = {
    "get_float32_matmul_precision": torch.get_float32_matmul_precision,
    "backends.fp32_precision": lambda: torch.backends.fp32_precision,  # type: ignore[attr-defined]
    "cuda.matmul.fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
    "cuda.matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
    "cuda.matmul.allow_fp16_reduced": lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
    "cuda.matmul.allow_bf16_reduced": lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
    "cuda.preferred_linalg_library": lambda: str(torch.backends.cuda.preferred_linalg_library()),
    "mkldnn.fp32_precision": lambda: torch.backends.mkldnn.fp32_precision,  # type: ignore[attr-defined]
    "mkldnn.matmul.fp32_precision": lambda: torch.backends.mkldnn.matmul.fp32_precision,  # type: ignore[attr-defined]
    "mkldnn.conv.fp32_precision": lambda: torch.backends.mkldnn.conv.fp32_precision,  # type: ignore[attr-defined]
    "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
    "cudnn.fp32_precision": lambda: torch.backends.cudnn.fp32_precision,  # type: ignore[attr-defined]
    "cudnn.conv.fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,  # type: ignore[attr-defined]
    "cudnn.rnn.fp32_precision": lambda: torch.backends.cudnn.rnn.fp32_precision,  # type: ignore[attr-defined]
    "cudnn.deterministic": lambda: torch.backends.cudnn.deterministic,
    "cudnn.benchmark": lambda: torch.backends.cudnn.benchmark,
    "deterministic_algorithms": torch.are_deterministic_algorithms_enabled,
    "default_dtype": torch.get_default_dtype,
}


def _settings() -> dict:
    return {name: _read(get) for name, get in SETTINGS.items()}


# torch._C's setters of process-wide numerics settings (every Python-level API above ends in one)
_SETTER_WORDS = ("tf32", "precision", "reduced", "accumulation", "cudnn", "mkldnn", "onednn", "deterministic",
                 "default_dtype", "linalg", "blas", "sdp")


@pytest.fixture
def record_writes(monkeypatch):
    writes: list = []

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            writes.append((name, args))
            return fn(*args, **kwargs)
        return wrapped

    for name in dir(torch._C):
        if name.startswith("_set_") and any(word in name for word in _SETTER_WORDS):
            monkeypatch.setattr(torch._C, name, recorder(name, getattr(torch._C, name)))
    monkeypatch.setattr(torch, "set_float32_matmul_precision",
                        recorder("set_float32_matmul_precision", torch.set_float32_matmul_precision))
    return writes


def _params(seed=0, device="cpu"):
    """A 2-D weight (both modes preconditioned), a conv kernel (4-D, merged modes), a 1-D bias
    (AdamW path) and a weight with a mode above max_precond_dim (SOAP: identity mode)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 6), (4, 3, 2, 2), (8,), (3, 40)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(device)) for s in shapes]


def _grads(params, t):
    g = torch.Generator().manual_seed(1000 + t)
    return [torch.randn(p.shape, generator=g).to(p.device) for p in params]


VARIANTS = {  # options that take other code paths (tracking, refresh kinds, state dtype, blocking)
    "KLShampoo": [{}, {"eigenbasis": "eigh"}, {"eigenvalues_first": True, "staleness_threshold": 0.0,
                                              "stagger_refresh": True}],
    "KLSOAP": [{}, {"staleness_threshold": 0.0, "state_dtype": torch.bfloat16}],
    "SOAP": [{}, {"block_size": 4, "normalize_grads": True}],
    "Shampoo": [{}, {"grafting": "none", "state_dtype": torch.bfloat16}],
}


def _exercise(name, mode, backend="torch", steps=5, variants=None, frequency=2, device="cpu"):
    """init_state, steps (the first initialises; a refresh every ``frequency`` steps; with
    ``frequency=1`` and 34 steps, the periodic QR of Q R itself at the 32nd refresh), diagnostics:
    what a run of ``name`` does."""
    for options in variants if variants is not None else VARIANTS[name]:
        params = _params(device=device)
        opt = getattr(klkern, name)(params, lr=1e-2, backend=backend, matmul_precision=mode,
                                    precondition_frequency=frequency, max_precond_dim=32, **options)
        if options == {}:
            opt.init_state()
        for t in range(steps):
            for p, grad in zip(params, _grads(params, t)):
                p.grad = grad
            opt.step()
        opt.diagnostics()


def _set_global(setting):
    torch.set_float32_matmul_precision(setting)


# ---------------------------------------------------------------------------- no setting is written


@pytest.mark.parametrize("setting", GLOBALS)
def test_no_step_writes_a_torch_setting(setting, record_writes, restore_settings):
    """Deterministic: all four optimizers, each matmul_precision, their option variants, init,
    refresh, diagnostics, under each global setting: torch's setters are never called."""
    _set_global(setting)
    record_writes.clear()
    for name in OPTIMIZERS:
        for mode in MODES:
            _exercise(name, mode)
    assert record_writes == [], record_writes[:5]


@pytest.mark.skipif(kernel_device() is None, reason="needs the Triton kernels (GPU or interpreter)")
def test_no_triton_step_writes_a_torch_setting(record_writes, restore_settings):
    """The Triton path (kernels interpreted here) and the torch code around it (refresh, init)."""
    _set_global("medium")
    record_writes.clear()
    for name in OPTIMIZERS:
        for mode in ("highest", "high", None):
            _exercise(name, mode, backend="triton", steps=3, variants=[{}], device=kernel_device())
    assert record_writes == [], record_writes[:5]


def test_no_linalg_or_emulated_product_writes_a_torch_setting(record_writes, restore_settings):
    """klkern.linalg (QR methods, the refresh's power step, eigh) and every product function,
    with TF32 emulated and not."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 12, 12, generator=gen)
    for setting in GLOBALS:
        _set_global(setting)
        for emulate in (False, True):
            _precision.emulate_tf32_off_gpu(emulate)
            record_writes.clear()
            for method in linalg.QR_METHODS[1:]:
                if method != "extension":
                    linalg.batched_qr(A, method=method)
            change, _ = linalg.power_step(A + A.mT)
            change.apply(A)
            linalg.eigh_descending(A + A.mT)
            for mode in _precision.PRECISIONS:
                _precision.bmm(A, A, mode)
                _precision.baddbmm_(A.clone(), A, A, 0.5, 0.5, mode)
            _precision.exact_matmul(A, A)
            assert record_writes == [], (setting, emulate, record_writes[:5])


def test_watcher_thread_never_sees_a_change(restore_settings):
    """Another thread polling every setting while all four optimizers run (every precision,
    every global setting) sees each one as it was; its autocast region stays on throughout."""
    stop = threading.Event()
    expected: dict = {}
    seen: list = []
    ready = threading.Event()
    polls = [0]

    def watch():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ready.set()
            while not stop.is_set():
                now = _settings()
                now["autocast"] = torch.is_autocast_enabled("cpu")
                if now != expected["value"]:
                    seen.append({k: v for k, v in now.items() if v != expected["value"].get(k)})
                polls[0] += 1
                # a short pause between polls (a step takes milliseconds, so a setting changed for
                # it would still be seen): a thread that never pauses starves torch's intra-op
                # threads on a 2-core machine (the test took 12 minutes instead of seconds)
                time.sleep(1e-4)

    for setting in GLOBALS:
        _set_global(setting)
        expected["value"] = {**_settings(), "autocast": True}
        stop.clear()
        ready.clear()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        ready.wait()
        try:
            for name in OPTIMIZERS:
                for mode in MODES:
                    _exercise(name, mode, steps=3, variants=[{}])
        finally:
            stop.set()
            watcher.join(timeout=60)
        assert not watcher.is_alive()
        assert seen == [], (setting, seen[:3])
    assert polls[0] > 100  # the watcher really ran alongside


# ---------------------------------------------------------------------------- threads = sequential


def _train(name, steps=12, seed=0):
    """A regression MLP with a 256-wide input: its products with 256 terms (the forward pass, the
    factor and rotation products of the first weight) are where this CPU's oneDNN computes
    differently under "bf16" (from K = 256 on; smaller products are unchanged)."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
    gen = torch.Generator().manual_seed(seed)  # not torch's global generator, which the threads share
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    opt = getattr(klkern, name)(model.parameters(), lr=3e-3, backend="torch", precondition_frequency=3)
    W = torch.randn(256, 16, generator=gen) / 16
    for _ in range(steps):
        X = torch.randn(64, 256, generator=gen)
        loss = (model(X) - torch.tanh(X @ W)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_threaded_runs_equal_sequential_runs(restore_settings):
    """Four optimizers in four threads under set_float32_matmul_precision("medium") end
    bit-identical to the same runs one after the other (no step changes what another thread's
    products or its reading of the user's setting see)."""
    _set_global("medium")
    switch, intra_op = sys.getswitchinterval(), torch.get_num_threads()
    torch.set_num_threads(1)  # one BLAS thread per call: a product's summation order is then fixed
    try:
        sequential = {name: _train(name) for name in OPTIMIZERS}
        sys.setswitchinterval(1e-5)  # interleave the threads' steps finely
        with ThreadPoolExecutor(max_workers=len(OPTIMIZERS)) as pool:
            futures = {name: pool.submit(_train, name) for name in OPTIMIZERS}
            threaded = {name: future.result(timeout=300) for name, future in futures.items()}
    finally:
        sys.setswitchinterval(switch)
        torch.set_num_threads(intra_op)
    for name in OPTIMIZERS:
        assert torch.equal(threaded[name], sequential[name]), (name, rel_err(threaded[name], sequential[name]))


# ---------------------------------------------------------------------------- every product routed

_PRODUCTS = {torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm, torch.einsum,
             torch.tensordot, torch.mv, torch.nn.functional.linear, torch.linalg.matmul, torch.linalg.multi_dot,
             torch.chain_matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.matmul,
             torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.baddbmm, torch.Tensor.baddbmm_, torch.Tensor.addmm,
             torch.Tensor.addmm_, torch.Tensor.mv}
_TORCH_DIR = os.path.dirname(torch.__file__)


class _ProductOrigins(torch.overrides.TorchFunctionMode):
    """Records (caller module, line) of every float32 matrix product."""

    def __init__(self):
        super().__init__()
        self.origins: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.dtype == torch.float32 for t in tensors):
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
                    frame = frame.f_back
                if frame is not None:
                    self.origins.append((frame.f_globals.get("__name__"), frame.f_lineno))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("setting", ["highest", "high"])
def test_every_float32_product_of_a_step_is_issued_by_precision(setting, restore_settings):
    """A product outside klkern/runtime/_precision.py would compute at whatever torch's setting
    says (no step sets it any more): none exists on any path the steps, inits, refreshes (the
    periodic QR of Q R at the 32nd refresh included) and diagnostics of the four optimizers take."""
    _set_global(setting)
    mode = _ProductOrigins()
    with mode:
        for name in OPTIMIZERS:
            _exercise(name, None, steps=3)
        _exercise("KLShampoo", None, steps=34, frequency=1)
    outside = sorted({o for o in mode.origins if o[0] != "klkern.runtime._precision"})
    assert mode.origins and outside == [], outside


# ---------------------------------------------------------------------------- accuracy without settings


def _fro_err(C: torch.Tensor, exact: torch.Tensor) -> float:
    return float((C.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("shape", [(4, 24, 96, 32), (2, 64, 512, 48), (3, 48, 48, 48)])
def test_exact_products_are_fp32_accurate_under_tf32(shape, restore_settings):
    """Under "high" with TF32 emulated (what CUDA does), every fp32-required product (exact_matmul,
    bmm/baddbmm_ at "highest", linalg's basis change) is within FP32_ERROR_RATIO of a true fp32
    product's error against float64; the plain TF32 product is far worse (so the bound can fail)."""
    B, m, k, n = shape
    gen = torch.Generator().manual_seed(k)
    A, X = torch.randn(B, m, k, generator=gen), torch.randn(B, k, n, generator=gen) * 1e-3
    exact = A.double() @ X.double()
    fp32 = _fro_err(torch.bmm(A, X), exact)  # true fp32 (settings at "highest" here)
    _set_global("high")
    _precision.emulate_tf32_off_gpu(True)
    assert _precision.arithmetic(A.device) == "tf32"
    tf32 = _fro_err(torch.matmul(_precision.round_tf32(A), _precision.round_tf32(X)), exact)
    assert tf32 > TF32_ERROR_RATIO * fp32
    R = torch.randn(B, m, n, generator=gen)
    got = {
        "exact_matmul": _precision.exact_matmul(A, X),
        "bmm highest": _precision.bmm(A, X, "highest"),
        "baddbmm_ highest": _precision.baddbmm_(R.clone(), A, X, 0.0, 1.0, "highest"),
    }
    for what, C in got.items():
        assert _fro_err(C, exact) <= FP32_ERROR_RATIO * fp32, (what, _fro_err(C, exact), fp32)
    if k == n:  # the refresh's basis change X V (linalg.BasisChange with an explicit V)
        V = torch.linalg.qr(torch.randn(B, n, n, generator=gen))[0]
        change_exact = A.double() @ V.double()
        _set_global("highest")
        _precision.emulate_tf32_off_gpu(False)
        reference = _fro_err(torch.bmm(A, V), change_exact)
        _set_global("high")
        _precision.emulate_tf32_off_gpu(True)
        assert _fro_err(linalg.BasisChange(V=V).apply(A), change_exact) <= FP32_ERROR_RATIO * reference


@pytest.mark.parametrize("setting", ["high", "medium"])
def test_exact_products_on_the_cpus_own_reduced_settings(setting, restore_settings):
    """Without emulation, under oneDNN's "tf32" or "bf16" (which it applies on CPUs with those
    units) the fp32-required products run in float64: at least as accurate as true fp32, and
    what oneDNN then does no longer matters."""
    gen = torch.Generator().manual_seed(5)
    A, X = torch.randn(2, 128, 512, generator=gen), torch.randn(2, 512, 64, generator=gen)
    exact = A.double() @ X.double()
    fp32 = _fro_err(torch.bmm(A, X), exact)
    _set_global(setting)
    assert _precision.arithmetic(A.device) in ("tf32", "bf16")
    for C in (_precision.exact_matmul(A, X), _precision.bmm(A, X, "highest")):
        assert _fro_err(C, exact) <= fp32
    assert torch.equal(_precision.exact_matmul(A, X), (A.double() @ X.double()).float())


def test_high_is_tf32_without_changing_the_setting(restore_settings):
    """matmul_precision="high" under a "highest" global (CUDA, emulated): the operands are rounded
    to TF32 explicitly, the same arithmetic as under a "high" global, and nothing is set."""
    _precision.emulate_tf32_off_gpu(True)
    gen = torch.Generator().manual_seed(2)
    A, X = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 64, 8, generator=gen)
    expect = _precision.round_tf32(A).double() @ _precision.round_tf32(X).double()
    under_highest = _precision.bmm(A, X, "high")
    _set_global("high")
    under_high = _precision.bmm(A, X, "high")
    for C in (under_highest, under_high):
        assert rel_err(C, expect) < 1e-5  # fp32 accumulation of K = 64 exact products
    assert rel_err(A.double() @ X.double(), expect) > 1e-4  # the rounding is really there


def _first_update(mode, setting, emulate, perturb=0.0):
    """KL-Shampoo's parameters after its init and first update on the regression MLP."""
    _set_global(setting)
    _precision.emulate_tf32_off_gpu(emulate)
    model = mlp()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = klkern.KLShampoo(model.parameters(), lr=3e-3, backend="torch", matmul_precision=mode)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(16, 16, generator=gen) / 4
    for _ in range(2):
        X = torch.randn(64, 16, generator=gen)
        loss = (model(X) - torch.tanh(X @ W)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.grad.mul_(1 + perturb)
        opt.step()
    _reset_settings()
    _precision.emulate_tf32_off_gpu(False)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), start


def test_highest_step_is_fp32_under_a_tf32_setting(restore_settings):
    """A whole step: KL-Shampoo's init and first update with matmul_precision="highest" under a
    "high" global, TF32 emulated, land where true fp32 lands to within ROUNDOFF_STEP (about what a
    1e-7 change of the gradient does), while the same step at "high" moves far more. (Later steps
    and the other optimizers turn roundoff into larger moves, issue 40 item 5, so a trajectory
    cannot tell fp32 from 3xTF32: the products are measured one by one above.)"""
    reference, start = _first_update("highest", "highest", False)
    travelled = float((reference - start).norm())

    def moved(params):
        return float((params - reference).norm()) / travelled

    exact = moved(_first_update("highest", "high", True)[0])
    assert exact < ROUNDOFF_STEP
    assert moved(_first_update("high", "high", True)[0]) > 10 * ROUNDOFF_STEP


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_products_and_solvers_under_tf32(restore_settings):
    """On a GPU under "high": exact_matmul (3xTF32) is within FP32_ERROR_RATIO of fp32's error while
    cuBLAS's own product uses TF32 at this size; torch's solvers klkern calls in float32 (QR,
    eigh, Cholesky, triangular solve) give what they give under "highest" (they ignore TF32:
    MAGMA turns it off, cuSOLVER keeps its own handle)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(8, 512, 512, generator=gen).to("cuda")
    X = torch.randn(8, 512, 512, generator=gen).to("cuda")
    S = A @ A.mT / 512 + torch.eye(512, device="cuda")
    exact = A.double() @ X.double()
    fp32 = _fro_err(torch.bmm(A, X), exact)

    def solvers():
        return [torch.linalg.qr(A)[0], torch.linalg.qr(A[:, :64, :64])[0], torch.linalg.eigh(S[:2])[1],
                torch.linalg.cholesky_ex(S)[0], torch.linalg.solve_triangular(torch.linalg.cholesky(S), A,
                                                                               upper=False)]

    before = solvers()
    _set_global("high")
    assert _fro_err(torch.bmm(A, X), exact) > 10 * fp32  # cuBLAS uses TF32 here
    assert _fro_err(_precision.exact_matmul(A, X), exact) <= FP32_ERROR_RATIO * fp32
    assert _fro_err(_precision.bmm(A, X, "highest"), exact) <= FP32_ERROR_RATIO * fp32
    for a, b in zip(solvers(), before):
        assert torch.equal(a, b)
