"""Microbenchmarks (pytest-benchmark) of each fused Triton operation against its torch reference.

GPU only. Run from the repository root (bench/gpu_suite.sh does):

    python -m pytest bench/test_kernel_bench.py --benchmark-json=OUT.json -p no:cacheprovider

Each benchmark is one call of the operation on a stack of 12 same-shape blocks, synchronised, at
one matmul precision ("highest", "high", "medium"). Per operation: ``eager`` (its torch reference
in triton_kernels/, the same work one torch op at a time), ``triton`` (the kernel), and at
"highest" ``triton_ieee`` (the kernel with fp32 FMA products instead of 3xTF32); ``test_product``
times the plain product against cuBLAS (torch.bmm) at the same precision, and ``test_gemm_floor``
the products of a KL-Shampoo step alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_cases as C  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks")

PRECISIONS = ["highest", "high", "medium"]
IMPLS = ["eager", "triton", "triton_ieee"]


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module", params=C.SHAPES, ids=lambda s: "x".join(map(str, s)))
def case(request):
    torch.cuda.empty_cache()
    c = C.make(*request.param)
    yield c
    del c
    torch.cuda.empty_cache()


def _bench(benchmark, impl, mode, fused, reference):
    from klkern.triton_kernels import _config

    if impl == "triton_ieee" and mode != "highest":
        pytest.skip("the fp32 FMA variant is one of two ways of computing 'highest'")
    fn = reference if impl == "eager" else fused
    previous = _config.highest_dot("ieee" if impl == "triton_ieee" else "tf32x3")
    try:
        fn()  # compile / warm up
        torch.cuda.synchronize()
        benchmark.pedantic(_sync(fn), rounds=10, iterations=1, warmup_rounds=2)
    finally:
        _config.highest_dot(previous)


@pytest.mark.parametrize("mode", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["kl", "adam"])
def test_rotate(benchmark, case, impl, mode, kind):
    from klkern import triton_kernels as K

    args = (case["G"], case["Qa"], case["Qb"], case["keep"])
    _bench(benchmark, impl, mode, lambda: K.rotate(*args, precision=mode, **C.rotate_args(case, kind)),
           lambda: C.module("rotate").reference_rotate(*args, precision=mode, **C.rotate_args(case, kind)))


@pytest.mark.parametrize("mode", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_factor_ema(benchmark, case, impl, mode):
    from klkern import triton_kernels as K

    Gr, inv, n = case["G"], 1.0 / case["lam_b"], case["G"].shape[2]
    args = (case["Ra"], Gr, inv, case["betas"], 0.05 / n)
    _bench(benchmark, impl, mode, lambda: K.factor_ema_(*args, keep=case["keep"], precision=mode),
           lambda: C.module("factor_ema").reference_factor_ema(*args, precision=mode))


@pytest.mark.parametrize("mode", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_precondition(benchmark, case, impl, mode):
    from klkern import triton_kernels as K

    table = C.params(case)
    kw = dict(params=table, update=case["betas"] * -1e-3, decay=case["betas"] * -1e-5, precision=mode)
    args = (case["M"], case["Qa"], case["Qb"])
    _bench(benchmark, impl, mode, lambda: K.precondition(*args, **kw),
           lambda: C.module("precondition").reference_precondition(*args, **kw))


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_adamw(benchmark, case, impl):
    """The AdamW path (a token embedding and biases), written into the parameters; no product."""
    from klkern import triton_kernels as K

    a = C.adamw_case(case)
    kw = dict(beta1=0.9, beta2=0.95, eps=1e-8, update=a["update"], decay=a["decay"])
    _bench(benchmark, impl, "highest",
           lambda: K.adamw_(a["G"], a["m"], a["v"], a["keep"], a["members"], **kw),
           lambda: C.eager_adamw(a))


@pytest.mark.parametrize("mode", PRECISIONS)
@pytest.mark.parametrize("impl", ["cublas", "triton", "triton_ieee"])
def test_product(benchmark, case, impl, mode):
    """Our product where it replaces cuBLAS's (G Q_b): at "highest" 3xTF32 against fp32 cuBLAS."""
    from klkern import triton_kernels as K
    from klkern.runtime._precision import bmm

    _bench(benchmark, "eager" if impl == "cublas" else impl, mode,
           lambda: K.batched_product(case["G"], case["Qb"], precision=mode),
           lambda: bmm(case["G"], case["Qb"], mode))


@pytest.mark.parametrize("mode", PRECISIONS)
def test_gemm_floor(benchmark, case, mode):
    _bench(benchmark, "eager", mode, None, lambda: C.gemm_floor(case, mode))
