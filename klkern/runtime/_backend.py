"""The one dispatch decision: torch or Triton, per step and device.

``backend`` (constructor argument, overridden by the ``KLKERN_BACKEND``
environment variable) is "auto", "torch" or "triton":

* "torch": the batched torch path (_functional), on any device;
* "auto": per device and matmul precision, the path measured faster on a GPU
  (what the GPU results decide for that device, ``_decisions.auto_kernels``;
  ``AUTO_KERNELS`` where no result speaks for it), silently: it is the same math;
* "triton": the kernels or a clear error; on CPU tensors only under
  ``TRITON_INTERPRET=1`` (the interpreter, how CI runs the kernels).
"""

from __future__ import annotations

import functools
import os

import torch

from . import _decisions

BACKENDS = ("auto", "torch", "triton")

# Whether backend="auto" runs the Triton kernels for CUDA tensors at each matmul precision on a
# device that no GPU result speaks for (runtime/_decisions.py: a device's own results, or those of
# its compute capability, decide otherwise). First GPU run (NVIDIA H200, torch 2.11, triton 3.6;
# bench/results/gpu_nvidia-h200/step/step_nvidia-h200.md, GPT-2-small parameter set, median step):
# the torch path was faster for all four optimizers at every precision (Triton / torch step time
# 1.9-2.3x at "highest", 1.6-2.4x at "high", 1.1-1.8x at "medium"), so "auto" means torch until
# tuned kernels measure faster. backend="triton" still runs them.
AUTO_KERNELS = {"highest": False, "high": False, "medium": False}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when klkern.triton_kernels imports, else the reason (import is silent either way)."""
    try:
        import triton  # noqa: F401

        from .. import triton_kernels  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken triton install
        return f"{type(err).__name__}: {err}"
    return None


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run kernels here, or None. Known: triton 3.6-3.8's
    interpreter fails with numpy >= 2.4 ("only 0-dimensional arrays can be converted to
    Python scalars"; fixed in triton 3.9); it needs numpy at all. Reads the installed
    versions without importing triton: TRITON_INTERPRET must be set before triton is imported."""
    from importlib import metadata

    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "triton is not installed"
    try:
        numpy_version = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return "Triton's interpreter needs numpy (pip install numpy)"
    if _version(triton_version) < (3, 9) and _version(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter fails with numpy {numpy_version} (numpy >= 2.4 "
                "needs triton >= 3.9): install numpy<2.4 or triton>=3.9")
    return None


@functools.lru_cache(maxsize=None)
def _cuda_driver_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton

        triton.runtime.driver.active  # noqa: B018 - raises without an active driver
    except Exception:  # noqa: BLE001 - any failure means no usable driver
        return False
    return True


def requested(backend: str) -> str:
    """The constructor's backend, or KLKERN_BACKEND when set."""
    env = os.environ.get("KLKERN_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"KLKERN_BACKEND={env!r}: must be one of {BACKENDS}")
        return env
    return backend


def resolve(backend: str, device: torch.device, precision: str | None = None) -> str:
    """'torch' or 'triton' for state and gradients on ``device`` whose products run at matmul
    ``precision`` ("highest", "high", "medium"; None: any, i.e. "auto" never picks the kernels)."""
    backend = requested(backend)
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        usable = triton_import_error() is None and _cuda_driver_ok()
    elif device.type == "cpu":
        usable = interpreting() and triton_import_error() is None and interpreter_problem() is None
    else:
        usable = False
    if backend == "auto":
        if precision is None or not usable or device.type != "cuda":
            return "torch"
        decided = _decisions.auto_kernels(device, precision)
        faster = AUTO_KERNELS.get(precision, False) if decided is None else decided
        return "triton" if faster else "torch"
    if usable:
        return "triton"
    if triton_import_error() is not None:
        raise RuntimeError(f"backend='triton' but the Triton kernels cannot be imported "
                           f"({triton_import_error()}); install triton>=3.6 or use backend='auto'/'torch'")
    if device.type == "cpu" and interpreting() and interpreter_problem():
        raise RuntimeError(f"backend='triton' on the CPU under TRITON_INTERPRET=1: {interpreter_problem()}")
    if device.type == "cpu":
        raise RuntimeError("backend='triton' with parameters on the CPU: the kernels need a CUDA device, "
                           "or TRITON_INTERPRET=1 set before klkern is imported (slow, for tests); "
                           "use backend='auto' or 'torch' on the CPU")
    raise RuntimeError(f"backend='triton': no usable Triton driver for device {device}; use backend='auto'")
