"""Who is watching the Triton launches: the seam between the kernels and the counters.

klkern's kernels (``triton_kernels/``) report each launch here with the bytes it moves, split
the way the GPU pays for them: ``product`` (the product's own operands and result, each read or
written once) and ``extra`` (what a prologue or epilogue reads or writes besides them: moments,
parameters, factor tiles of an EMA, eigenvalue vectors). klkern/tools/_dispatch.py's
``DispatchCounter`` registers itself while it counts, so a steady step's traffic is the sum of
its aten operations and its kernel launches, counted on any device without running a GPU.
Nothing here imports klkern.
"""

from __future__ import annotations

import contextlib

__all__ = ["Traffic", "observing", "observers", "report", "quiet"]


class Traffic:
    """The bytes one launch moves: ``product`` (operands read, result written, once each) and
    ``extra`` (everything else it reads or writes)."""

    __slots__ = ("product", "extra")

    def __init__(self, product: int = 0, extra: int = 0):
        self.product = int(product)
        self.extra = int(extra)

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.product + other.product, self.extra + other.extra)

    def __repr__(self) -> str:
        return f"Traffic(product={self.product}, extra={self.extra})"


_OBSERVERS: list = []


def observers() -> list:
    return _OBSERVERS


@contextlib.contextmanager
def observing(observer):
    """``observer.kernel(name, traffic)`` is called for every launch inside the block."""
    _OBSERVERS.append(observer)
    try:
        yield observer
    finally:
        _OBSERVERS.remove(observer)


def report(name: str, traffic: Traffic) -> None:
    for observer in _OBSERVERS:
        observer.kernel(name, traffic)


@contextlib.contextmanager
def quiet():
    """Run a launch with the observers' torch dispatch modes set aside: under the interpreter a
    kernel executes through torch operations of its own that a GPU would not dispatch."""
    if not _OBSERVERS:
        yield
        return
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield
