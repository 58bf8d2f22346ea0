"""Inputs and eager torch references for the kernel benchmarks (bench/test_kernel_bench.py).

Each case is a stack of B same-shape blocks. The eager side of each fused operation is its torch
reference (the ``reference_*`` function beside the kernel in triton_kernels/: the same work, one
torch op at a time, its products at the given matmul precision through klkern's torch product,
klkern.runtime._precision.bmm); the GEMM floor is the products alone.
"""

from __future__ import annotations

import importlib
import os

import torch

from klkern.runtime._precision import bmm

# (B, m, n): GPT-2-small and 1B-class block shapes, stacks of 12; KLKERN_KERNEL_SHAPES
# ("12x768x768,12x2048x2048") narrows them (bench/gpu_suite.py does, to fit a lease).
SHAPES = [(12, 768, 768), (12, 768, 3072), (12, 2048, 2048), (12, 2048, 8192), (12, 4096, 4096)]
if os.environ.get("KLKERN_KERNEL_SHAPES"):
    SHAPES = [tuple(int(x) for x in item.split("x")) for item in os.environ["KLKERN_KERNEL_SHAPES"].split(",")]

# The operations' modules (their names are shadowed by the functions in klkern.triton_kernels).
OPS = ("rotate", "factor_ema", "precondition", "product", "adamw")


def module(name: str):
    return importlib.import_module(f"klkern.triton_kernels.{name}")


def make(B, m, n, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    G = torch.randn(B, m, n, device=device, generator=g) * 1e-3
    # Timing does not need orthogonal bases; QR of 12 8192^2 matrices would
    # cost more than the whole benchmark.
    Qa = torch.randn(B, m, m, device=device, generator=g) / m**0.5
    Qb = torch.randn(B, n, n, device=device, generator=g) / n**0.5
    lam_a = torch.rand(B, m, device=device, generator=g) + 0.01
    lam_b = torch.rand(B, n, device=device, generator=g) + 0.01
    M = torch.randn(B, m, n, device=device, generator=g) * 1e-3
    V = torch.rand(B, m, n, device=device, generator=g) * 1e-6
    Ra = torch.randn(B, m, m, device=device, generator=g)
    Rb = torch.randn(B, n, n, device=device, generator=g)
    W = torch.randn(B, m, n, device=device, generator=g)
    keep = torch.ones(B, dtype=torch.bool, device=device)
    betas = torch.full((B,), 0.95, device=device)
    return dict(G=G, Qa=Qa, Qb=Qb, lam_a=lam_a, lam_b=lam_b, M=M, V=V, Ra=Ra + Ra.mT, Rb=Rb + Rb.mT, W=W,
                keep=keep, betas=betas, X=torch.empty_like(M),
                pw=(1 / (m * lam_a), 1 / (n * lam_b)), sq=(lam_a.sqrt(), lam_b.sqrt()))


def rotate_args(c, kind: str) -> dict:
    """KL-Shampoo's rotation ("kl": momentum, projections, M * D) or SOAP's ("adam": m, v, m / (sqrt(v) + eps))."""
    if kind == "kl":
        return dict(projection=c["pw"], momentum=(c["M"], c["betas"]), betas=(0.05, 0.05), eps=1e-8,
                    sqrt_lam=c["sq"], direction=c["X"])
    return dict(adam=(c["M"], c["betas"], c["V"], c["betas"]), betas=(0.05, 0.05), eps=1e-8, direction=c["X"])


def params(c):
    """The parameters the precondition kernel writes (a table of the stack's blocks)."""
    from klkern.triton_kernels import ParamTable

    return ParamTable(list(c["W"].unbind(0)))


def gemm_floor(c, mode="highest"):
    """The products a 2-D KL-Shampoo step cannot avoid: 2 for Gr, 2 for U, 2 factor products."""
    Gr = bmm(c["Qa"].mT, bmm(c["G"], c["Qb"], mode), mode)
    bmm(Gr, Gr.mT, mode)
    bmm(Gr.mT, Gr, mode)
    return bmm(c["Qa"], bmm(c["M"], c["Qb"].mT, mode), mode)


def adamw_case(c):
    """The AdamW path's members of a GPT-2-small-sized case: a token embedding and biases (their
    flat gradient and moments, the parameters themselves)."""
    from klkern.triton_kernels import FlatMembers

    B, m, n = c["G"].shape
    device = c["G"].device
    params = [torch.randn(50257, 768, device=device)] + [torch.randn(m, device=device) for _ in range(4 * B)]
    N = sum(p.numel() for p in params)
    return dict(members=FlatMembers(params), G=torch.randn(N, device=device) * 1e-3,
                m=torch.zeros(N, device=device), v=torch.zeros(N, device=device),
                keep=torch.ones(len(params), dtype=torch.bool, device=device),
                update=torch.tensor(-1e-3, device=device), decay=torch.tensor(-1e-5, device=device))


def eager_adamw(a, beta1=0.9, beta2=0.95, eps=1e-8):
    """What the torch path does for the AdamW path: the flat moments, the direction, the
    parameters gathered into a flat buffer, updated and scattered back."""
    m, v, G = a["m"], a["v"], a["G"]
    m.mul_(beta1).add_(G, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(G, G, value=1 - beta2)
    U = m / (v.sqrt() + eps)
    params = a["members"].params
    W = torch.cat([p.reshape(-1) for p in params])
    W.addcmul_(U, a["update"])
    W.addcmul_(W, a["decay"])
    torch._foreach_copy_(params, [w.view(p.shape) for w, p in zip(W.split([p.numel() for p in params]), params)])
