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

It also adds up the **bytes** the step moves, the way a GPU pays for them (``c.bytes``): per
aten operation, every tensor it reads and writes once (an in-place operand both, an ``out=``
or a copy's destination written only, a broadcast operand by its distinct elements, views and
``empty`` nothing); per Triton launch, what the launcher declares (klkern/runtime/_launches.py).
Two categories: ``"product"`` (a matrix product's operands and result: torch's mm/bmm/baddbmm
family and the product part of each kernel launch) and ``"other"`` (element-wise, reduction,
copy and cast operations, and what a kernel's prologue or epilogue moves besides its product's
operands and result): the traffic a fused kernel exists to remove.

``DispatchCounter(dry=True)`` counts what a step at full size would move without paying for its
arithmetic on the CPU: matrix products, symmetric eigendecompositions and QR are not computed (a
product's result is zeros, an in-place product leaves its output as it was, an eigendecomposition
gives distinct positive eigenvalues and the identity's eigenvectors, a QR the identity's columns
and zeros), and Triton launches are recorded as a GPU would prepare them, not executed
(triton_kernels/_config.py ``recording(execute=False)``). What is counted depends on shapes,
dtypes and options only; the values are meaningless.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..runtime import _launches

__all__ = ["DispatchCounter", "tensor_bytes"]

# aten operations that read a value back to the host
_READS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}
# aten operations whose output size depends on the values (a read back on CUDA)
_VALUE_SIZED = {"nonzero", "nonzero_static", "masked_select", "unique_dim", "_unique", "_unique2",
                "unique_consecutive", "masked_scatter", "argwhere"}

# matrix products: their operands and result are "product" traffic
_PRODUCTS = {"mm", "bmm", "baddbmm", "addmm", "addbmm", "matmul", "mv", "addmv", "dot", "_scaled_mm", "linear"}
# in-place operations that write their first operand without reading it
_WRITE_ONLY = {"copy_", "fill_", "zero_", "_foreach_copy_", "_foreach_zero_", "normal_", "uniform_", "random_",
               "set_", "resize_", "_copy_from"}
# operations that allocate without touching memory
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
         "is_nonzero", "item", "equal", "lift_fresh", "detach", "alias", "_to_copy_noop"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a broadcast dimension, stride 0, counts once)."""
    elements = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return elements * t.element_size() if t.numel() else 0


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def op_bytes(func, args, kwargs, out) -> int:
    """Bytes one aten operation reads and writes (see the module docstring)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in _FREE:
        return 0
    read: dict = {}
    written: dict = {}
    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name in kwargs:
            value = kwargs[arg.name]
        elif i < len(args) and not arg.kwarg_only:
            value = args[i]
        else:
            continue
        tensors = _tensors(value)
        if not tensors:
            continue
        writes = arg.alias_info is not None and arg.alias_info.is_write
        for t in tensors:
            if writes:
                written[_key(t)] = tensor_bytes(t)
                if not arg.kwarg_only and name not in _WRITE_ONLY:
                    read[_key(t)] = tensor_bytes(t)
            else:
                read[_key(t)] = tensor_bytes(t)
    for ret, value in zip(schema.returns, out if isinstance(out, tuple) else (out,)):
        if ret.alias_info is None:
            for t in _tensors(value):
                written[_key(t)] = tensor_bytes(t)
    return sum(read.values()) + sum(written.values())


def _dry_result(func, name: str, args, kwargs):
    """What a dry count returns instead of computing ``func`` (None: compute it)."""
    base = name.rstrip("_")
    if base in _PRODUCTS:
        if "out" in kwargs:
            return kwargs["out"]
        if name.endswith("_"):
            return args[0]
        with _no_dispatch():
            return torch.zeros(func(*(_meta(a) for a in args), **{k: _meta(v) for k, v in kwargs.items()}).shape,
                               dtype=kwargs.get("out_dtype") or args[0].dtype, device=args[0].device)
    if name == "linalg_qr":  # (Q, R): the identity's first columns and zeros
        A = args[0]
        m, n = A.shape[-2:]
        k = min(m, n) if kwargs.get("mode", args[1] if len(args) > 1 else "reduced") == "reduced" else m
        with _no_dispatch():
            Q = torch.eye(m, k, dtype=A.dtype, device=A.device).expand(*A.shape[:-2], m, k).clone()
            return Q, torch.zeros(*A.shape[:-2], k, n, dtype=A.dtype, device=A.device)
    if name in ("linalg_eigh", "_linalg_eigh"):
        A = args[0]
        with _no_dispatch():  # distinct positive eigenvalues: no direction counts as without energy
            evals = torch.linspace(1.0, 0.5, A.shape[-1], dtype=A.dtype, device=A.device).expand(A.shape[:-1]).clone()
            evecs = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand(A.shape).clone()
        return (evals, evecs) if name == "linalg_eigh" else (evals, evecs)
    return None


def _meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def _no_dispatch():
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


class DispatchCounter(TorchDispatchMode):
    """``with DispatchCounter() as c: opt.step()``; then ``c.total`` (aten operations),
    ``c.ops`` (a Counter by name), ``c.host_reads`` and ``c.reads`` (what read), ``c.bytes``
    (a Counter: "product", "other"), ``c.op_bytes`` (bytes by operation or kernel name),
    ``c.kernels`` (Triton launches by kernel) and ``c.launches`` (aten operations that compute,
    plus kernel launches: what a GPU launches)."""

    def __init__(self, dry: bool = False):
        super().__init__()
        self.dry = dry
        self._recording: contextlib.AbstractContextManager | None = None
        self.ops: Counter = Counter()
        self.reads: list[str] = []
        self.bytes: Counter = Counter()
        self.op_bytes: Counter = Counter()
        self.kernels: Counter = Counter()
        self._computing = 0
        self._patched: list = []
        self._observing: contextlib.AbstractContextManager | None = None

    @property
    def launches(self) -> int:
        return self._computing + sum(self.kernels.values())

    @property
    def gigabytes(self) -> float:
        return sum(self.bytes.values()) / 1e9

    def kernel(self, name: str, traffic) -> None:
        """A Triton launch and the bytes its launcher declares (klkern/runtime/_launches.py)."""
        self.kernels[name] += 1
        self.bytes["product"] += traffic.product
        self.bytes["other"] += traffic.extra
        self.op_bytes[f"kernel:{name}"] += traffic.product + traffic.extra

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
        out = _dry_result(func, name, args, kwargs) if self.dry else None
        if out is None:
            out = func(*args, **kwargs)
        moved = op_bytes(func, args, kwargs, out)
        if not func.is_view and name not in _FREE:
            self._computing += 1
        if moved:
            self.bytes["product" if name.rstrip("_") in _PRODUCTS else "other"] += moved
            self.op_bytes[name] += moved
        return out

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
        self._observing = _launches.observing(self)
        self._observing.__enter__()
        if self.dry:
            from ..triton_kernels import _config

            self._recording = _config.recording(execute=False)
            self._recording.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, original in self._patched:
            setattr(torch.Tensor, attr, original)
        self._patched = []
        if self._observing is not None:
            self._observing.__exit__(None, None, None)
            self._observing = None
        if self._recording is not None:
            self._recording.__exit__(None, None, None)
            self._recording = None
        return super().__exit__(*exc)
