"""Inputs and eager torch references for the kernel benchmarks (bench/test_kernel_bench.py).

Each case is a stack of B same-shape blocks. The eager reference of each
fused operation is what the torch path does for the same work, one torch
op at a time (fp32, TF32 off).
"""

from __future__ import annotations

import torch

# (B, m, n): GPT-2-small and 1B-class block shapes, stacks of 12.
SHAPES = [(12, 768, 768), (12, 768, 3072), (12, 2048, 2048), (12, 2048, 8192), (12, 4096, 4096)]


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


def eager_rotate_project(c, beta1=0.95):
    Gr = c["Qa"].mT @ c["G"] @ c["Qb"]
    c["M"].mul_(beta1).add_(Gr, alpha=1 - beta1)
    sq = Gr * Gr
    proj_a = (sq / c["lam_b"][:, None, :]).mean(2)
    proj_b = (sq / c["lam_a"][:, :, None]).mean(1)
    return Gr, proj_a, proj_b


def eager_factor_ema(c, Gr, beta2=0.95):
    n = Gr.shape[2]
    W = Gr * torch.rsqrt(c["lam_b"])[:, None, :]
    return c["Ra"].baddbmm_(W, W.mT, beta=beta2, alpha=(1 - beta2) / n)


def eager_precondition(c, lr=1e-3, wd=0.01, eps=1e-8):
    D = 1.0 / (torch.sqrt(c["lam_a"][:, :, None] * c["lam_b"][:, None, :]) + eps)
    U = c["Qa"] @ (c["M"] * D) @ c["Qb"].mT
    c["W"].add_(U, alpha=-lr)
    c["W"].add_(c["W"], alpha=-lr * wd)
    return c["W"]


def gemm_floor(c):
    """The products a 2-D KL-Shampoo step cannot avoid: 2 for Gr, 2 for U, 2 factor products."""
    T = c["G"] @ c["Qb"]
    Gr = c["Qa"].mT @ T
    torch.bmm(Gr, Gr.mT)
    torch.bmm(Gr.mT, Gr)
    T2 = c["M"] @ c["Qb"].mT
    return c["Qa"] @ T2
