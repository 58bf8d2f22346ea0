"""Inputs and eager torch references for the kernel benchmarks (bench/test_kernel_bench.py).

Each case is a stack of B same-shape blocks. The eager reference of each
fused operation is what the torch path does for the same work, one torch
op at a time, its products at the given matmul precision through the torch
path's own product function (klkern.runtime._precision.bmm: "highest" true fp32,
"high" TF32, "medium" bf16 operands with fp32 results).
"""

from __future__ import annotations

import os

import torch

from klkern.runtime._precision import bmm

# (B, m, n): GPT-2-small and 1B-class block shapes, stacks of 12; KLKERN_KERNEL_SHAPES
# ("12x768x768,12x2048x2048") narrows them (bench/gpu_suite.py does, to fit a lease).
SHAPES = [(12, 768, 768), (12, 768, 3072), (12, 2048, 2048), (12, 2048, 8192), (12, 4096, 4096)]
if os.environ.get("KLKERN_KERNEL_SHAPES"):
    SHAPES = [tuple(int(x) for x in item.split("x")) for item in os.environ["KLKERN_KERNEL_SHAPES"].split(",")]


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
    Ra = torch.randn(B, m, m, device=device, generator=g)
    Rb = torch.randn(B, n, n, device=device, generator=g)
    W = torch.randn(B, m, n, device=device, generator=g)
    return dict(G=G, Qa=Qa, Qb=Qb, lam_a=lam_a, lam_b=lam_b, M=M, Ra=Ra + Ra.mT, Rb=Rb + Rb.mT, W=W)


def eager_rotate_project(c, mode="highest", beta1=0.95):
    Gr = bmm(c["Qa"].mT, bmm(c["G"], c["Qb"], mode), mode)
    c["M"].mul_(beta1).add_(Gr, alpha=1 - beta1)
    sq = Gr * Gr
    proj_a = (sq / c["lam_b"][:, None, :]).mean(2)
    proj_b = (sq / c["lam_a"][:, :, None]).mean(1)
    return Gr, proj_a, proj_b


def eager_factor_ema(c, Gr, mode="highest", beta2=0.95):
    n = Gr.shape[2]
    W = Gr / c["lam_b"][:, None, :]
    return c["Ra"].mul_(beta2).add_(bmm(W, Gr.mT, mode), alpha=(1 - beta2) / n)


def eager_precondition(c, mode="highest", lr=1e-3, wd=0.01, eps=1e-8):
    D = 1.0 / (torch.sqrt(c["lam_a"][:, :, None] * c["lam_b"][:, None, :]) + eps)
    U = bmm(c["Qa"], bmm(c["M"] * D, c["Qb"].mT, mode), mode)
    c["W"].add_(U, alpha=-lr)
    c["W"].add_(c["W"], alpha=-lr * wd)
    return c["W"]


def gemm_floor(c, mode="highest"):
    """The products a 2-D KL-Shampoo step cannot avoid: 2 for Gr, 2 for U, 2 factor products."""
    Gr = bmm(c["Qa"].mT, bmm(c["G"], c["Qb"], mode), mode)
    bmm(Gr, Gr.mT, mode)
    bmm(Gr.mT, Gr, mode)
    return bmm(c["Qa"], bmm(c["M"], c["Qb"].mT, mode), mode)
