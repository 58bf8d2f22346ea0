"""Loader of klkern's CUDA extension (csrc/): the op ``torch.ops.klkern.batched_qr``.

``qr_extension()`` returns the op or None, deciding once per process:

1. ``KLKERN_NO_EXT=1`` in the environment: None (read on every call, so tests
   and debugging can switch it at any time).
2. A CPU build of torch (``torch.version.cuda is None``): None, silently;
   there are no CUDA tensors to accelerate.
3. ``import klkern._C``: the extension built by setup.py.
4. Otherwise a JIT build of the sources (``klkern/csrc/`` in an installed
   wheel, the clone's ``csrc/`` in an editable install) with ``torch.utils.cpp_extension.load``
   into ``$KLKERN_CACHE`` (default ``~/.cache/klkern``), in a subfolder per
   torch/CUDA version; later processes reuse it (about 15 s the first time).
5. If that fails (no toolkit, a compile error): one RuntimeWarning naming the reason, then None,
   and callers use torch.linalg.qr.

Only ``klkern.linalg.batched_qr`` calls it, and only for CUDA tensors, so
importing klkern never builds or warns.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from ..runtime._errors import describe, summary

__all__ = ["qr_extension", "CSRC", "SOURCES"]

def _sources_dir() -> Path:
    """csrc/ inside the installed package (wheels ship it there), else the clone's csrc/."""
    package = Path(__file__).resolve().parent.parent  # klkern/
    return package / "csrc" if (package / "csrc").is_dir() else package.parent / "csrc"


CSRC = _sources_dir()
SOURCES = ("batched_qr_kernels.cu", "batched_qr.cpp")
JIT_NAME = "klkern_C"

_lock = threading.Lock()
LAST_ERROR: str | None = None  # the whole error of the last failed load or build (warnings show one line)
_state: dict = {"decided": False, "op": None}


def qr_extension():
    """``torch.ops.klkern.batched_qr`` if the extension is loaded or loadable, else None."""
    if os.environ.get("KLKERN_NO_EXT", "0") not in ("", "0"):
        return None
    if not _state["decided"]:
        with _lock:
            if not _state["decided"]:
                _state["op"] = _load()
                if _state["op"] is not None:
                    register_fake("klkern::batched_qr")
                _state["decided"] = True
    return _state["op"]


def register_fake(qualname: str) -> bool:
    """Give the QR op ``qualname`` ((batch, m, n) -> Q of the same shape and dtype, contiguous)
    a fake kernel, so that torch.compile and FakeTensorMode can trace code that calls it.
    Returns False when one is registered already (e.g. by an earlier load in this process)."""
    def fake(A):
        return torch.empty(A.shape, dtype=A.dtype, device=A.device)

    if qualname in _FAKES:
        return False
    torch.library.register_fake(qualname)(fake)
    _FAKES.add(qualname)
    return True


_FAKES: set = set()


def _registered_op():
    try:
        return torch.ops.klkern.batched_qr
    except (AttributeError, RuntimeError):
        return None


def _load():
    if torch.version.cuda is None:
        return None
    op = _registered_op()
    if op is not None:
        return op
    try:
        import klkern._C  # noqa: F401  (registers the op; built by setup.py)
    except ImportError:
        pass
    else:
        op = _registered_op()
        if op is not None:
            return op
    try:
        return jit_build()
    except Exception as err:  # noqa: BLE001 - any failure means: use the torch fallback
        global LAST_ERROR
        LAST_ERROR = describe(err)
        warnings.warn(
            f"klkern: the CUDA QR extension is unavailable ({summary(err)}; the whole error: "
            "klkern.linalg._ext.LAST_ERROR); "
            "klkern.linalg.batched_qr uses torch.linalg.qr instead",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def cache_dir() -> Path:
    """Where the JIT build goes: $KLKERN_CACHE or ~/.cache/klkern, per torch and CUDA version."""
    root = os.environ.get("KLKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "klkern")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return Path(root) / tag


def jit_build():
    """Build csrc/ with torch.utils.cpp_extension.load and return the registered op (raises on failure)."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA build of torch or no CUDA toolkit (set CUDA_HOME)")
    sources = [CSRC / name for name in SOURCES]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise RuntimeError(f"CUDA sources not found ({', '.join(missing)}); reinstall klkern (its wheel ships them)")
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=JIT_NAME,
        sources=[str(s) for s in sources],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build_dir),
        verbose=False,
        is_python_module=False,
    )
    op = _registered_op()
    if op is None:
        raise RuntimeError("the extension built but torch.ops.klkern.batched_qr is not registered")
    return op
