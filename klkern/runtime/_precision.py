"""Matrix-product precision, by torch's float32 matmul convention (SPEC "Precision"),
obtained without ever writing torch's settings.

klkern's products that rotate and precondition (``Q^T G Q``, ``Q (.) Q^T``,
Shampoo's ``L_root M R_root``) and the factor products of the algorithms that
use their factors only for an eigenbasis (KL-Shampoo, KL-SOAP, SOAP) follow
one of torch's three settings, on both paths:

* ``"highest"``: float32-accurate products (torch's default);
* ``"high"``: TF32 operands (10-bit mantissa) where the hardware has them:
  CUDA; on the CPU what torch's oneDNN does under "tf32" (TF32 only on CPUs
  with such units; a true fp32 product elsewhere, as on the x86 CPUs klkern
  is tested on), never bf16;
* ``"medium"``: bfloat16 operands, on every device (the torch path casts
  them; on the CPU, where torch has no bf16 x bf16 -> fp32 product, it rounds
  them to bf16 and multiplies in fp32, which is the same arithmetic).

Accumulation is float32 in every mode. Everything else (Shampoo's factors,
the eigenvalue projection and ``lam``, QR, eigendecompositions, the
initialisation and the refresh products around them) is float32-accurate
whatever the setting: :func:`exact_matmul`.

The setting comes from the optimizer's ``matmul_precision`` argument, else
from torch's global setting (``torch.set_float32_matmul_precision`` or the
per-backend ``torch.backends.cuda.matmul.fp32_precision``), read at every step.

How each precision is obtained: torch's settings are process-wide (another
thread of the process would see any change and compute at it, and another
optimizer's step would read it as the user's), so klkern only reads them
(:func:`arithmetic`: what torch's own float32 product does now on a device)
and chooses operands and products that give the wanted arithmetic under them:

* float32-accurate where torch's product is not (a "high" or "medium"
  setting in force): on CUDA three TF32 products of operands split into a
  TF32-exact high part and the remainder, ``hi hi + (hi lo + lo hi)``
  (3xTF32, as CUTLASS and Triton's ``tf32x3`` do; its error against float64
  measured 1.01-1.09x a true fp32 product's, tests/test_thread_precision.py);
  on the CPU, whose oneDNN may round to bf16 or TF32 where the CPU has such
  units (an AMD EPYC with AVX512-BF16 changed products of 256 terms or more
  under "bf16"), one float64 product rounded to float32;
* TF32 where torch's product is true fp32 (``matmul_precision="high"`` under
  a "highest" setting, CUDA): operands rounded to TF32 explicitly, then that
  product: TF32's arithmetic on the fp32 units (its accuracy, not the speed
  of TF32 tensor cores, which need torch's setting at "high" or the Triton
  path);
* bf16: operands rounded to bf16, which every torch arithmetic multiplies
  exactly.

Outside a step the settings are read at each product; a step reads them once,
at its start, for its own thread (:func:`optimizer_math`). Without a GPU, TF32
cannot be observed: ``emulate_tf32_off_gpu(True)`` makes the CPU behave as
CUDA does (a product under a "high" or "medium" setting rounds its operands
to TF32; ``"high"`` products are TF32 whatever the setting), in the torch path
and in the Triton interpreter, so tests can measure what TF32 does on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

__all__ = ["PRECISIONS", "resolve", "snapshot", "global_precision", "arithmetic", "exact_matmul", "exact_products",
           "bmm",
           "baddbmm_", "optimizer_math", "torch_precision", "round_tf32", "round_bf16", "emulate_tf32_off_gpu",
           "emulating_tf32"]

PRECISIONS = ("highest", "high", "medium")

_EMULATE_TF32 = {"on": False}
_STEP = threading.local()  # .arithmetic: {"cpu": ..., "cuda": ...} read at the start of this thread's step


def emulate_tf32_off_gpu(enabled: bool) -> None:
    """Make the CPU behave as CUDA under TF32 (torch path and interpreter). For tests."""
    _EMULATE_TF32["on"] = bool(enabled)


def emulating_tf32() -> bool:
    return _EMULATE_TF32["on"]


def global_precision(device: torch.device | None = None) -> str:
    """torch's current float32 matmul precision as "highest", "high" or "medium".

    ``torch.get_float32_matmul_precision()`` when the settings are consistent;
    when the per-backend API left them mixed (torch then refuses to answer),
    the value of the backend of ``device``.
    """
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        pass
    if device is not None and device.type == "cpu":
        value = torch.backends.mkldnn.matmul.fp32_precision  # type: ignore[attr-defined]  # torch >= 2.9
        return {"bf16": "medium", "tf32": "high"}.get(value, "highest")
    return "high" if _effective(torch.backends.cuda.matmul.fp32_precision) == "tf32" else "highest"


def snapshot() -> dict:
    """torch's global setting now, per device type ({"cpu": mode, "cuda": mode}); read (never
    written) at the start of a step."""
    return {kind: global_precision(torch.device(kind)) for kind in ("cpu", "cuda")}


def resolve(setting: str | None, device: torch.device, global_modes: dict) -> str:
    """The mode of a product on ``device``: the optimizer's ``matmul_precision``, else the
    global setting from :func:`snapshot` (for devices other than the CPU, CUDA's)."""
    if setting is not None:
        return setting
    return global_modes["cpu" if device.type == "cpu" else "cuda"]


def _effective(value: str) -> str:
    """A per-backend value with "none" (follow the generic setting) resolved."""
    if value == "none":
        value = torch.backends.fp32_precision  # type: ignore[attr-defined]  # torch >= 2.9
    return "ieee" if value == "none" else value


def _read_arithmetic(kind: str) -> str:
    if kind == "cpu":
        value = _effective(torch.backends.mkldnn.matmul.fp32_precision)  # type: ignore[attr-defined]
        if emulating_tf32():
            return "ieee" if value == "ieee" else "tf32"
        return value
    return "ieee" if _effective(torch.backends.cuda.matmul.fp32_precision) == "ieee" else "tf32"


def arithmetic(device: torch.device) -> str:
    """What torch's own float32 product does on ``device`` under the current settings: "ieee"
    (true fp32), "tf32" (CUDA under "high" or "medium": cuBLAS may use TF32 tensor cores; the CPU
    under :func:`emulate_tf32_off_gpu`) or, on the CPU, oneDNN's "bf16" or "tf32" (which it
    applies where the CPU has such units). Inside a step, the value read at the step's start."""
    kind = "cpu" if device.type == "cpu" else "cuda"
    cached = getattr(_STEP, "arithmetic", None)
    return cached[kind] if cached is not None else _read_arithmetic(kind)


@contextlib.contextmanager
def optimizer_math():
    """What an optimizer step runs under: torch's settings as read at its start (for this thread
    only: :func:`arithmetic`) and autocast off, so that ``opt.step()`` inside a ``torch.autocast``
    region computes what it computes outside (as torch.optim's do; autocast's state is per
    thread in torch). Writes none of torch's process-wide settings."""
    previous = getattr(_STEP, "arithmetic", None)
    _STEP.arithmetic = {kind: _read_arithmetic(kind) for kind in ("cpu", "cuda")}
    try:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if device_type == "cuda" and not torch.cuda.is_available():
                    continue
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        _STEP.arithmetic = previous


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10-bit mantissa, round to nearest, ties away from zero),
    as the cvt.rna.tf32.f32 instruction does."""
    x = x.float().contiguous()
    rounded = ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to bfloat16 (round to nearest even) and back."""
    return x.to(torch.bfloat16).float()


def _float32(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands float32, unless both are float64 (torch's products of those are exact)."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A, B
    return A.float(), B.float()


def _tf32_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch's product under a TF32 setting (emulated on the CPU: operands rounded to TF32)."""
    if A.device.type == "cpu":
        return torch.matmul(round_tf32(A), round_tf32(B))
    return torch.matmul(A, B)


def _tf32x3(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """float32-accurate ``A @ B`` from three TF32 products: each operand split into its TF32
    rounding ``hi`` (exact in TF32) and the remainder ``lo`` (exact in fp32), ``lo lo`` (below
    fp32's rounding) left out, the two small terms summed first. A non-finite operand gives a
    non-finite result (NaN where an fp32 product might give inf)."""
    Ah, Bh = round_tf32(A), round_tf32(B)
    Al, Bl = A - Ah, B - Bh
    small = _tf32_matmul(Ah, Bl).add_(_tf32_matmul(Al, Bh))
    return _tf32_matmul(Ah, Bh).add_(small)


@contextlib.contextmanager
def exact_products(product):
    """Inside the block (this thread), :func:`exact_matmul` of two float32 stacks is
    ``product(A, B)``: a float32-accurate product of klkern's own (the Triton kernels' 3xTF32 on
    tensor cores, for the refreshes of stacks that run on the kernels)."""
    previous = getattr(_STEP, "exact_product", None)
    _STEP.exact_product = product
    try:
        yield
    finally:
        _STEP.exact_product = previous


def exact_matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32-accurate ``torch.matmul(A, B)`` whatever torch's settings (float64 operands: their
    own product), written into ``out`` when given. Inside :func:`exact_products`, two float32
    stacks go to its product; else where torch's product is true fp32 it is that product; under
    TF32 (CUDA) three TF32 products (:func:`_tf32x3`); under the CPU's reduced settings one
    float64 product rounded to float32."""
    own = getattr(_STEP, "exact_product", None)
    if own is not None and A.dim() == 3 and B.dim() == 3 and A.dtype == B.dtype == torch.float32:
        result = own(A, B)
        return result if out is None else out.copy_(result)
    A, B = _float32(A, B)
    kind = "ieee" if A.dtype == torch.float64 else arithmetic(A.device)
    if kind == "ieee":  # bmm for stacks: one operation (matmul dispatches views around its bmm)
        return torch.bmm(A, B, out=out) if A.dim() == B.dim() == 3 else torch.matmul(A, B, out=out)
    if kind == "tf32" and (A.device.type != "cpu" or emulating_tf32()):
        result = _tf32x3(A, B)
    else:
        result = torch.matmul(A.double(), B.double()).float()
    return result if out is None else out.copy_(result)


@functools.lru_cache(maxsize=None)
def _native_bf16_bmm(device_type: str) -> bool:
    """Whether torch has bmm(bf16, bf16, out_dtype=float32) on this device type (CUDA)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _operands(A: torch.Tensor, B: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Operands whose plain torch product, under the settings in force, has ``mode``'s
    arithmetic; None where no such pair exists (a float32-accurate product is then needed)."""
    A, B = A.float(), B.float()
    kind = arithmetic(A.device)
    emulated = A.device.type == "cpu" and emulating_tf32()
    pair: tuple[torch.Tensor, torch.Tensor] | None
    if mode == "medium":  # bf16 values are exact in TF32, in oneDNN's bf16 and in fp32
        pair = round_bf16(A), round_bf16(B)
    elif mode == "high" and (A.device.type != "cpu" or emulated):
        # TF32 by cuBLAS where the setting allows it, else operands rounded to TF32 explicitly
        pair = (A, B) if kind == "tf32" else (round_tf32(A), round_tf32(B))
    elif mode == "high":  # the CPU: oneDNN's "tf32" is TF32 where the CPU has it; never bf16
        pair = (A, B) if kind != "bf16" else None
    else:
        pair = (A, B) if kind == "ieee" else None
    if pair is not None and emulated and kind == "tf32":  # what the emulated GPU's product does
        pair = round_tf32(pair[0]), round_tf32(pair[1])
    return pair


def bmm(A: torch.Tensor, B: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 ``A @ B`` of two (batch, ., .) stacks with operands at ``mode``."""
    if mode == "medium" and A.is_cuda and _native_bf16_bmm("cuda"):
        return torch.bmm(A.bfloat16(), B.bfloat16(), out_dtype=torch.float32)
    pair = _operands(A, B, mode)
    return torch.bmm(*pair) if pair is not None else exact_matmul(A, B)


def baddbmm_(R: torch.Tensor, A: torch.Tensor, B: torch.Tensor, beta: float, alpha: float,
             mode: str) -> torch.Tensor:
    """In place ``R <- beta R + alpha A @ B`` (R float32) with the product at ``mode``."""
    pair = None if mode == "medium" else _operands(A, B, mode)  # "medium": bmm's bf16 product, added
    if pair is not None:
        return R.baddbmm_(*pair, beta=beta, alpha=alpha)
    return R.mul_(beta).add_(bmm(A, B, mode), alpha=alpha)


_BACKEND_VALUES = {"highest": ("ieee", "ieee"), "high": ("tf32", "tf32")}


@contextlib.contextmanager
def torch_precision(mode: str):
    """For benchmark scripts only: torch's own float32 matmuls at ``mode`` ("highest" or "high")
    inside the block, the caller's settings restored after. It WRITES torch's process-wide
    settings (every thread sees them), so no klkern code runs it (tests/test_thread_precision.py
    checks that a step writes none of them); a step gets its precision from :func:`bmm` and
    :func:`exact_matmul` instead."""
    cuda_m, cpu_m = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul  # type: ignore[attr-defined]
    saved = (cuda_m.fp32_precision, cpu_m.fp32_precision)
    wanted = _BACKEND_VALUES["high" if mode == "high" else "highest"]
    if tuple(map(_effective, saved)) == wanted:
        yield
        return
    cuda_m.fp32_precision, cpu_m.fp32_precision = wanted
    try:
        yield
    finally:
        cuda_m.fp32_precision, cpu_m.fp32_precision = saved
