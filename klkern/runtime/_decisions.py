"""The defaults that GPU results decide, looked up for the device a tensor lives on.

The decisions themselves are data, generated from the committed result files by ``python
bench/gpu_suite.py decide`` into ``_gpu_decisions.py`` beside this file (never edited by hand;
a test checks that the committed file is what ``decide`` writes). For a CUDA device:

* its own entry answers first (``DEVICES``, keyed by the device's name as
  ``torch.cuda.get_device_name`` gives it, lower-cased, every other run of characters a '-',
  e.g. "nvidia-h200");
* else the entry of its compute capability (``CAPABILITIES``, e.g. "9.0"), which holds only
  what every measured device of that capability agreed on;
* else ``None``: no GPU result speaks for it, and the caller keeps its built-in default (the
  behaviour klkern had before any GPU result).

Keys: ``backend_auto`` ({precision: "torch" | "triton"}, read by ``_backend.resolve``),
``qr_auto`` ([[least n, method], ...], read by ``klkern.linalg.batched_qr(method="auto")``),
``cuda_graph`` (whether ``cuda_graph=True`` measured faster; documentation only) and
``tiles`` (the Triton kernels' tile table from the tuning run, for the kernels).
"""

from __future__ import annotations

import functools
import re

import torch

from . import _gpu_decisions


def device_key(name: str) -> str:
    """A device name as the decisions and the result folders key it ("NVIDIA H200" -> "nvidia-h200")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _identity(index: int) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(index)
    return device_key(torch.cuda.get_device_name(index)), f"{major}.{minor}"


def identity(device: torch.device) -> tuple[str, str] | None:
    """(device key, capability) of a CUDA device, or None (another device type, or no CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _identity(device.index if device.index is not None else torch.cuda.current_device())


def decision(key: str, name: str, capability: str, devices: dict | None = None,
             capabilities: dict | None = None):
    """What the results decide for ``key`` on the device ``name`` of ``capability``, or None."""
    devices = _gpu_decisions.DEVICES if devices is None else devices
    capabilities = _gpu_decisions.CAPABILITIES if capabilities is None else capabilities
    own = devices.get(name, {}).get(key)
    return own if own is not None else capabilities.get(capability, {}).get(key)


@functools.lru_cache(maxsize=None)
def _cached(key: str, name: str, capability: str):
    return decision(key, name, capability)


def for_device(key: str, device: torch.device):
    """What the results decide for ``key`` on ``device``, or None (no evidence: keep the default)."""
    ident = identity(device)
    return None if ident is None else _cached(key, *ident)


def auto_kernels(device: torch.device, precision: str) -> bool | None:
    """Whether backend="auto" runs the Triton kernels on ``device`` at matmul ``precision``, or None."""
    choice = for_device("backend_auto", device)
    if not choice or precision not in choice:
        return None
    return choice[precision] == "triton"


def qr_method(table: list, n: int) -> str:
    """The method of a ``qr_auto`` table ([[least n, method], ...], ascending) for width ``n``."""
    method = table[0][1]
    for least, name in table:
        if n >= least:
            method = name
    return method


def qr_auto(device: torch.device, n: int) -> str | None:
    """What batched_qr(method="auto") runs for width ``n`` on ``device``, or None."""
    table = for_device("qr_auto", device)
    return qr_method(table, n) if table else None
