"""Matrix-product precision, by torch's float32 matmul convention (SPEC "Precision").

klkern's products that rotate and precondition (``Q^T G Q``, ``Q (.) Q^T``,
Shampoo's ``L_root M R_root``) and the factor products of the algorithms that
use their factors only for an eigenbasis (KL-Shampoo, KL-SOAP, SOAP) follow
one of torch's three settings, on both paths:

* ``"highest"``: true float32 products (torch's default);
* ``"high"``: TF32 operands (10-bit mantissa) where the hardware has them
  (CUDA); torch's CPU matmul ignores it and so does klkern there;
* ``"medium"``: bfloat16 operands, on every device (the torch path casts
  them; on the CPU, where torch has no bf16 x bf16 -> fp32 product, it rounds
  them to bf16 and multiplies in fp32, which is the same arithmetic).

Accumulation is float32 in every mode. Everything else (Shampoo's factors,
the eigenvalue projection and ``lam``, QR, eigendecompositions and the
refresh products around them) runs in true float32 whatever the setting.

The setting comes from the optimizer's ``matmul_precision`` argument, else
from torch's global setting (``torch.set_float32_matmul_precision`` or the
per-backend ``torch.backends.cuda.matmul.fp32_precision``), read at every step.

Without a GPU, TF32 cannot be observed: ``emulate_tf32_off_gpu(True)`` makes
"high" round operands to TF32 on non-CUDA tensors, in the torch path and in
the Triton interpreter, so tests can measure what TF32 does on the CPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["PRECISIONS", "resolve", "snapshot", "global_precision", "torch_precision", "bmm", "baddbmm_",
           "round_tf32", "round_bf16", "emulate_tf32_off_gpu", "emulating_tf32"]

PRECISIONS = ("highest", "high", "medium")

_EMULATE_TF32 = {"on": False}


def emulate_tf32_off_gpu(enabled: bool) -> None:
    """Round operands to TF32 for "high" on non-CUDA tensors (torch path and interpreter). For tests."""
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
    """torch's global setting now, per device type ({"cpu": mode, "cuda": mode}); taken at the
    start of a step, before klkern sets its own values for the step's products."""
    return {kind: global_precision(torch.device(kind)) for kind in ("cpu", "cuda")}


def resolve(setting: str | None, device: torch.device, global_modes: dict) -> str:
    """The mode of a product on ``device``: the optimizer's ``matmul_precision``, else the
    global setting from :func:`snapshot` (for devices other than the CPU, CUDA's)."""
    if setting is not None:
        return setting
    return global_modes["cpu" if device.type == "cpu" else "cuda"]


_BACKEND_VALUES = {"highest": ("ieee", "ieee"), "high": ("tf32", "tf32")}


def _effective(value: str) -> str:
    """A per-backend value with "none" (follow the generic setting) resolved."""
    if value == "none":
        value = torch.backends.fp32_precision  # type: ignore[attr-defined]  # torch >= 2.9
    return "ieee" if value == "none" else value


@contextlib.contextmanager
def torch_precision(mode: str):
    """Run torch's own float32 matmuls at ``mode`` ("highest" or "high"), restoring the caller's settings.

    Sets and restores the per-backend values (cuda and mkldnn), which leaves
    torch's settings exactly as they were, whichever API the caller used.
    """
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


@contextlib.contextmanager
def optimizer_math():
    """What an optimizer step runs under: torch's float32 matmuls in true fp32 (products that
    follow a matmul_precision choose their own) and autocast off, so that ``opt.step()``
    inside a ``torch.autocast`` region computes what it computes outside (as torch.optim's
    do); the caller's settings are restored."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        stack.enter_context(torch_precision("highest"))
        yield


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10-bit mantissa, round to nearest, ties away from zero),
    as the cvt.rna.tf32.f32 instruction does."""
    x = x.float().contiguous()
    rounded = ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to bfloat16 (round to nearest even) and back."""
    return x.to(torch.bfloat16).float()


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


def bmm(A: torch.Tensor, B: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 ``A @ B`` of two (batch, ., .) stacks with operands at ``mode``."""
    if mode == "medium":
        if A.is_cuda and _native_bf16_bmm("cuda"):
            return torch.bmm(A.bfloat16(), B.bfloat16(), out_dtype=torch.float32)
        with torch_precision("highest"):
            return torch.bmm(round_bf16(A), round_bf16(B))
    if mode == "high" and not A.is_cuda and emulating_tf32():
        with torch_precision("highest"):
            return torch.bmm(round_tf32(A), round_tf32(B))
    with torch_precision(mode):
        return torch.bmm(A.float(), B.float())


def baddbmm_(R: torch.Tensor, A: torch.Tensor, B: torch.Tensor, beta: float, alpha: float,
             mode: str) -> torch.Tensor:
    """In place ``R <- beta R + alpha A @ B`` (R float32) with the product at ``mode``."""
    if mode == "highest" or (mode == "high" and (R.is_cuda or not emulating_tf32())):
        with torch_precision(mode):
            return R.baddbmm_(A, B, beta=beta, alpha=alpha)
    return R.mul_(beta).add_(bmm(A, B, mode), alpha=alpha)
