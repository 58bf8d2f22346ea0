import os

import pytest
import torch

# KLKERN_TEST_CUDA_REPORTED=1: torch reports a CUDA device although none is here, tensors stay on
# the CPU. It shows, without a GPU, every test whose skip condition or device choice is wrong for a
# GPU machine: there the kernels run on CUDA tensors and the interpreter is off. Failures that only
# say "this needs a real GPU" (a tensor moved to CUDA, a CUDA query) are reported as xfail; any
# other failure is such a test (see pytest_runtest_makereport below).
CUDA_REPORTED = os.environ.get("KLKERN_TEST_CUDA_REPORTED") == "1"
if CUDA_REPORTED:
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1

# The Triton kernels run on CPU tensors through Triton's interpreter when no
# GPU is present. The interpreter flag is read when a kernel is decorated, so
# it must be set before klkern.triton_kernels is first imported.
if not torch.cuda.is_available():
    from klkern.runtime import _backend

    if _backend.interpreter_problem() is None:  # else the kernel tests skip, saying why
        os.environ.setdefault("TRITON_INTERPRET", "1")

# What an error says when the test needed a real GPU and the CUDA-reported run has none.
NEEDS_REAL_GPU = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "No CUDA GPUs are available",
                  "CUDA driver initialization failed", "no CUDA-capable device", "0 active drivers",
                  "Cannot access accelerator device when none is available", "cuda:0")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


if CUDA_REPORTED:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        if report.failed and call.excinfo is not None:
            text = str(call.excinfo.value)
            if any(marker in text for marker in NEEDS_REAL_GPU):
                report.outcome = "skipped"
                report.wasxfail = f"needs a real GPU ({text.splitlines()[0][:120] if text else ''})"
