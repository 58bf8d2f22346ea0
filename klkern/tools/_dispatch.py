"""Counting what a step dispatches and what it reads back to the host, on any device.

On a GPU every aten operation that computes is a kernel launch, and every value read back to
the host stalls the launches behind it until the device catches up. Both can be counted without
a GPU: :class:`DispatchCounter` sees every aten operation the step dispatches (views included)
and every host read, whether it goes through the dispatcher (``.item()``, ``bool(t)``,
``float(t)``, a copy to the CPU) or around it (``.tolist()``, ``.numpy()``), and every operation
whose output size depends on its values (which reads back on CUDA: ``nonzero``,
``masked_select``, ``repeat_interleave`` without ``output_size``, ``segment_reduce`` checking its
lengths...). Used by
tests/test_dispatch.py and bench/step_bench.py.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DispatchCounter"]

# aten operations that read a value back to the host
_READS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}
# aten operations whose output size depends on the values (a read back on CUDA)
_VALUE_SIZED = {"nonzero", "nonzero_static", "masked_select", "unique_dim", "_unique", "_unique2",
                "unique_consecutive", "masked_scatter", "argwhere"}


class DispatchCounter(TorchDispatchMode):
    """``with DispatchCounter() as c: opt.step()``; then ``c.total`` (aten operations),
    ``c.ops`` (a Counter by name), ``c.host_reads`` and ``c.reads`` (what read)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.reads: list[str] = []
        self._patched: list = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_reads(self) -> int:
        return len(self.reads)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in _READS or name in _VALUE_SIZED:
            self.reads.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
            self.reads.append("repeat_interleave without output_size")
        elif name == "segment_reduce" and not kwargs.get("unsafe", False):
            self.reads.append("segment_reduce without unsafe=True (checks its lengths on the host)")
        elif name in ("_to_copy", "copy_", "to"):
            self._copy_to_host(name, args, kwargs)
        return func(*args, **kwargs)

    def _copy_to_host(self, name, args, kwargs) -> None:
        if name == "copy_":
            dst, src = args[0], args[1]
            if isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu":
                self.reads.append("copy to the host")
        else:
            device = kwargs.get("device")
            src = args[0]
            if device is not None and torch.device(device).type == "cpu" and src.device.type != "cpu":
                self.reads.append("copy to the host")

    def __enter__(self):
        for attr in ("tolist", "numpy", "__array__"):
            original = getattr(torch.Tensor, attr)

            def reader(t, *a, _original=original, _attr=attr, **k):
                self.reads.append(_attr)
                return _original(t, *a, **k)

            self._patched.append((attr, original))
            setattr(torch.Tensor, attr, reader)
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, original in self._patched:
            setattr(torch.Tensor, attr, original)
        self._patched = []
        return super().__exit__(*exc)
