"""pytest configuration of the kernel benchmarks: what every pytest-benchmark result records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-benchmark, when installed
def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from bench._meta import git_commit, utc_now

    info = {"commit": git_commit(), "date": utc_now(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    machine_info["klkern"] = info
