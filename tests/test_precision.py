"""Matrix-product precision (klkern/runtime/_precision.py, SPEC "Precision") on the CPU.

TF32 and bf16 tensor-core products cannot run here, so their arithmetic is
emulated: operands rounded to TF32 (10-bit mantissa) or bf16 (7-bit
mantissa), products and sums in fp32. "medium" does this on every device;
"high" only where the hardware has TF32 (CUDA), and in these tests through
``emulate_tf32_off_gpu(True)``, on the torch path and in the Triton interpreter.

Tolerances:

* PRODUCT_RTOL: an emulated product against the float64 product of the
  rounded operands: only fp32 accumulation error (K <= 64 terms), 1e-5.
* TRAJECTORY_BOUND: how far a 200-step training trajectory (small regression
  MLP with full-rank weight gradients, 20 refreshes) moves from the
  "highest" one, as ||W_mode - W_highest|| / ||W_highest - W_0|| over all
  parameters. Each product's relative error is about the operands' unit
  roundoff (TF32 2^-11 = 4.9e-4, bf16 2^-9 = 2.0e-3); the optimizers are
  contracting here, so the trajectories move by a small multiple of it
  (measured: at most 1.0e-3 for "high" and 2.1e-2 for "medium", SOAP the
  most). Bounds: 5e-3 and 5e-2, room for other BLAS summation orders.
* PATH_RTOL: Triton (interpreted) against torch at the same mode after 12
  steps with a refresh. Both round the same operands in the same order, so
  KL-Shampoo, KL-SOAP and SOAP agree to ~1e-6 under "medium"; where the
  inputs of a rounding differ at fp32 roundoff (Shampoo's roots from an
  eigendecomposition, TF32's ties) an operand can land one TF32 / bf16 unit
  apart (measured up to 1.1e-4 under "high" for Shampoo, whose factor EMA the
  kernels compute by 3xTF32 and the torch path by its own split: 1.6e-6 apart
  at "highest"; 3.8e-4 under "medium"). The bound is a quarter of the
  operands' unit roundoff, and the paths must be closer to each other than to
  "highest" (half as close for all but Shampoo). On a GPU under "high", cuBLAS decides
  whether a TF32-allowed product uses TF32 (for these small blocks it did
  not); GPU_TF32_RTOL then bounds TF32's whole effect (measured up to 5.0e-4
  on an H200; bound 4x that).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import kernel_device, kernel_skip_reason, mlp, rel_err

import klkern
from klkern.runtime import _precision

PRODUCT_RTOL = 1e-5
# mode -> bound on the relative deviation of a 200-step trajectory from "highest"
TRAJECTORY_BOUND = {"high": 5e-3, "medium": 5e-2}
PATH_RTOL = {"high": 5e-4, "medium": 2e-3}
GPU_TF32_RTOL = 2e-3  # TF32 kernels against cuBLAS's choice at "high" on a GPU (see the test)
OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]


@pytest.fixture
def tf32_emulation():
    _precision.emulate_tf32_off_gpu(True)
    yield
    _precision.emulate_tf32_off_gpu(False)


# ---------------------------------------------------------------------------- the building blocks


def test_round_tf32_keeps_ten_mantissa_bits():
    one = torch.tensor(1.0)
    eps = 2.0 ** -10  # TF32's spacing at 1
    x = torch.tensor([1 + eps / 2, 1 + eps / 2 - 2 ** -20, -(1 + eps / 2), 1 + eps, 3.0e-39, float("inf"),
                      float("nan")])
    r = _precision.round_tf32(x)
    assert r[0] == one + eps  # ties away from zero, like cvt.rna.tf32.f32
    assert r[1] == one
    assert r[2] == -(one + eps)
    assert r[3] == one + eps  # representable: unchanged
    assert torch.isinf(r[5]) and torch.isnan(r[6])
    y = torch.randn(10000) * 1e3
    ry = _precision.round_tf32(y)
    bits = ry.view(torch.int32) & 0x1FFF
    assert int(bits.abs().max()) == 0  # the low 13 mantissa bits are clear
    assert float(((ry - y).abs() / y.abs()).max()) <= 2.0 ** -11 * (1 + 1e-6)


@pytest.mark.parametrize("mode", ["medium", "high"])
def test_bmm_rounds_the_operands(mode, tf32_emulation):
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 17, 64, generator=gen), torch.randn(3, 64, 9, generator=gen)
    rnd = _precision.round_bf16 if mode == "medium" else _precision.round_tf32
    exact = rnd(A).double() @ rnd(B).double()
    got = _precision.bmm(A, B, mode)
    assert got.dtype == torch.float32
    assert rel_err(got, exact) < PRODUCT_RTOL
    # and the rounding is really there: the fp32 product is far from it
    assert rel_err(A.double() @ B.double(), exact) > 10 * PRODUCT_RTOL
    R = torch.randn(3, 17, 9, generator=gen)
    expect = 0.9 * R.double() + 0.1 * exact
    assert rel_err(_precision.baddbmm_(R.clone(), A, B, 0.9, 0.1, mode), expect) < PRODUCT_RTOL


def test_high_on_cpu_is_fp32_without_emulation():
    """torch's convention: the CPU has no TF32, so "high" there is true fp32."""
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 32, 8, generator=gen)
    assert torch.equal(_precision.bmm(A, B, "high"), _precision.bmm(A, B, "highest"))


def _settings():
    return (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


@pytest.fixture
def restore_global_precision():
    """Back to torch's defaults: the legacy setting (which torch keeps apart) and the per-backend ones."""
    saved = _settings()
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision, \
        torch.backends.mkldnn.matmul.fp32_precision = saved


@pytest.mark.parametrize("style", ["legacy-high", "legacy-medium", "backend-tf32"])
def test_resolution_and_global_settings_untouched(style, restore_global_precision):
    """matmul_precision=None follows torch's setting (either API); a step leaves it as it was."""
    if style == "legacy-high":
        torch.set_float32_matmul_precision("high")
        expect = {"cpu": "high", "cuda": "high"}
    elif style == "legacy-medium":
        torch.set_float32_matmul_precision("medium")
        expect = {"cpu": "medium", "cuda": "medium"}
    else:  # the per-backend API, which leaves torch.get_float32_matmul_precision() raising
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        expect = {"cpu": "highest", "cuda": "high"}
    before = _settings()
    assert _precision.snapshot() == expect
    assert _precision.resolve(None, torch.device("cpu"), expect) == expect["cpu"]
    assert _precision.resolve("highest", torch.device("cpu"), expect) == "highest"
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = klkern.KLShampoo([p], backend="torch")
    for _ in range(3):
        p.grad = torch.randn(6, 5)
        opt.step()
    assert _settings() == before


def test_invalid_matmul_precision():
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="matmul_precision='low'"):
        klkern.SOAP([p], matmul_precision="low")


def test_products_follow_the_mode_and_the_rest_stays_fp32(monkeypatch):
    """Which products follow the mode: the rotations and (not for Shampoo) the factor
    products; the others (Shampoo's factors) are fp32, the initial factors float64 (their Gram,
    outside these wrappers: no matmul precision applies to float64). The refresh on the CPU
    applies LAPACK's reflectors (fp32, no product here); its explicit route is fp32 too
    (tests/test_linalg.py runs it; here through the periodic QR of Q R, 3 fp32 products a mode)."""
    seen = []
    inner = {"depth": 0}

    def spy(fn):
        def wrapped(*args):
            if inner["depth"] == 0:
                seen.append(args[-1])
            inner["depth"] += 1
            try:
                return fn(*args)
            finally:
                inner["depth"] -= 1
        return wrapped

    monkeypatch.setattr(_precision, "bmm", spy(_precision.bmm))
    monkeypatch.setattr(_precision, "baddbmm_", spy(_precision.baddbmm_))
    # two steps with a refresh every step. KL-Shampoo / SOAP: init 2 factor products (float64, not
    # counted); step 2: 2 rotations, 2 back, 2 factor products (mode); its refresh applies reflectors.
    # Shampoo, each step: 2 factor products (fp32), 2 preconditioning products (mode), and at its
    # refresh (here every step) 2 rotations of G for the KL diagnostic (fp32).
    for name, expect in (("KLShampoo", (6, 0)), ("SOAP", (6, 0)), ("Shampoo", (4, 8))):
        seen.clear()
        p = torch.nn.Parameter(torch.randn(8, 6))
        opt = getattr(klkern, name)([p], backend="torch", matmul_precision="medium", precondition_frequency=1)
        for _ in range(2):
            p.grad = torch.randn(8, 6)
            opt.step()
        assert (seen.count("medium"), seen.count("highest")) == expect, (name, seen)
    # the periodic QR of Q R (step 32, a refresh every step): Q R, Q^T Q_new and V^T R in fp32
    # per mode (8 and 6 are two sizes); then R V through linalg's fp32 product
    seen.clear()
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = klkern.KLShampoo([p], backend="torch", matmul_precision="medium", precondition_frequency=1)
    for _ in range(33):  # the first step initialises: steps t = 1..32 follow
        p.grad = torch.randn(8, 6)
        opt.step()
    assert (seen.count("medium"), seen.count("highest")) == (6 * 32, 2 * 3), seen  # init: float64, not counted


# ---------------------------------------------------------------------------- whole trajectories


def _train(name, mode, steps, backend="torch", device="cpu"):
    model = mlp().to(device)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = getattr(klkern, name)(model.parameters(), lr=3e-3, backend=backend, matmul_precision=mode)
    gen = torch.Generator().manual_seed(1)
    W = (torch.randn(16, 16, generator=gen) / 4).to(device)
    for _ in range(steps):
        X = torch.randn(64, 16, generator=gen).to(device)
        loss = (model(X) - torch.tanh(X @ W)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), start, float(loss.detach())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trajectory_deviation_is_bounded(name, tf32_emulation):
    """200 steps under "high" (TF32-emulated) and "medium" stay close to "highest".

    Measured (relative deviation, high / medium): KL-Shampoo 1.5e-4 / 1.3e-3,
    KL-SOAP 1.0e-3 / 5.8e-3, SOAP 8.7e-4 / 2.1e-2, Shampoo 4.5e-4 / 5.1e-3;
    for scale, a 1e-3 relative perturbation of every gradient moves them by
    2e-4 / 7e-3 / 2.2e-2 / 1.3e-3 (SOAP's Adam in the rotated basis is the most
    sensitive). Each mode must also change the trajectory (otherwise the test
    would not be testing the mode), and the final losses agree to 10%.
    """
    ref, start, ref_loss = _train(name, "highest", 200)
    travelled = float((ref - start).norm())
    assert travelled > 0.1
    for mode in ("high", "medium"):
        got, _, loss = _train(name, mode, 200)
        deviation = float((got - ref).norm()) / travelled
        assert 0 < deviation < TRAJECTORY_BOUND[mode], (mode, deviation)
        assert abs(loss - ref_loss) < 0.1 * ref_loss + 1e-3


@pytest.mark.skipif(kernel_device() is None, reason=kernel_skip_reason())
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("mode", ["high", "medium"])
def test_triton_path_matches_torch_path_at_each_mode(name, mode, tf32_emulation):
    """The kernels round the same operands as the torch path (interpreted: emulated; on a GPU:
    tensor cores against cuBLAS): 12 steps (one refresh) agree to the operands' roundoff, and
    differ from "highest". Both paths run where the kernels run."""
    device = kernel_device()
    torch_run, _, _ = _train(name, mode, 12, backend="torch", device=device)
    triton_run, _, _ = _train(name, mode, 12, backend="triton", device=device)
    highest, _, _ = _train(name, "highest", 12, backend="torch", device=device)
    if device.type == "cuda" and mode == "high":
        # TF32 is only allowed to cuBLAS, which ran these 16 x 16 products in fp32 on an H200 (the
        # torch path then equals "highest" exactly), while the kernels always use TF32: the paths
        # differ by TF32's whole effect on 12 steps (measured up to 5.0e-4, SOAP).
        assert 0 < rel_err(triton_run, torch_run) < GPU_TF32_RTOL
        assert rel_err(triton_run, highest) > 0
        return
    assert rel_err(triton_run, torch_run) < PATH_RTOL[mode]
    closer = 1.0 if name == "Shampoo" else 0.5  # its roots: fp32 roundoff lands on TF32 ties (above)
    assert rel_err(triton_run, torch_run) < closer * rel_err(torch_run, highest)


def test_kernel_rounding_matches_torch_rounding(tf32_emulation):
    """One product in the interpreter: the kernel's operand rounding equals the torch emulation."""
    if kernel_device() != torch.device("cpu"):
        pytest.skip("needs the Triton interpreter (the operand emulation is the interpreter's)")
    from klkern import triton_kernels as K

    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, 20, 40, generator=gen), torch.randn(2, 40, 24, generator=gen)
    for mode in ("high", "medium"):
        out = K.batched_product(A, B, out=torch.empty(2, 20, 24), precision=mode)
        assert rel_err(out, _precision.bmm(A, B, mode)) < PRODUCT_RTOL, mode
