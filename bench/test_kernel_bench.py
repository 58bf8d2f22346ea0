"""Microbenchmarks (pytest-benchmark) of each fused Triton operation against eager torch.

GPU only. Run from the repository root (bench/gpu_suite.sh does):

    python -m pytest bench/test_kernel_bench.py --benchmark-json=OUT.json -p no:cacheprovider

Each benchmark is one call of the operation on a stack of 12 same-shape
blocks, synchronised, at one matmul precision ("highest", "high", "medium");
the eager side runs its products at the same precision (kernel_cases.py).
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


def _bench(benchmark, fn):
    from klkern.runtime._precision import torch_precision

    with torch_precision("highest"):  # products not routed through a mode stay fp32, as in a step
        fn()  # compile / warm up
        torch.cuda.synchronize()
        benchmark.pedantic(_sync(fn), rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("mode", PRECISIONS)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_rotate_project(benchmark, case, impl, mode):
    from klkern import triton_kernels as K
    if impl == "eager":
        _bench(benchmark, lambda: C.eager_rotate_project(case, mode))
    else:
        _bench(benchmark, lambda: K.rotate_project(case["G"], case["Qa"], case["Qb"],
                                                    lam=(case["lam_a"], case["lam_b"]),
                                                    momentum=case["M"], beta1=0.95, precision=mode))


@pytest.mark.parametrize("mode", PRECISIONS)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_factor_ema(benchmark, case, impl, mode):
    from klkern import triton_kernels as K
    Gr = case["G"]
    if impl == "eager":
        _bench(benchmark, lambda: C.eager_factor_ema(case, Gr, mode))
    else:
        inv = 1.0 / case["lam_b"]
        n = Gr.shape[2]
        _bench(benchmark, lambda: K.factor_ema_(case["Ra"], Gr, inv, 0.95, 0.05 / n, precision=mode))


@pytest.mark.parametrize("mode", PRECISIONS)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_precondition(benchmark, case, impl, mode):
    from klkern import triton_kernels as K
    if impl == "eager":
        _bench(benchmark, lambda: C.eager_precondition(case, mode))
    else:
        table = K.ParamTable(list(case["W"].unbind(0)))
        _bench(benchmark, lambda: K.precondition(case["M"], case["Qa"], case["Qb"], eps=1e-8,
                                                  lam=(case["lam_a"], case["lam_b"]), params=table,
                                                  step=1e-3, decay=1 - 1e-5, precision=mode))


@pytest.mark.parametrize("mode", PRECISIONS)
def test_gemm_floor(benchmark, case, mode):
    _bench(benchmark, lambda: C.gemm_floor(case, mode))
