"""How each optimizer's update depends on a constant factor on the loss.

    python bench/loss_scale.py [--out bench/results/loss_scale_cpu.md]

A loss multiplied by c (a sum instead of a mean, gradient accumulation dividing by the number of
micro-batches, a loss weight) multiplies every gradient by c; an adaptive optimizer's update
should stay about what it was. The task: least squares ``||X W^T - Y||^2`` per sample, averaged
over a batch of 64, for one weight W of each of the report's shapes (64 x 96, 256 x 128,
8 x 512), inputs with feature scales from 1 to 1e-2 (an ill-conditioned input factor), W from 0.
After 20 steps (lr 1e-3, weight decay off, a refresh every 10) the figure is ``||W_20 - W_0||`` at
scale c over the same at c = 1: 1 is scale-free. Gradient entries at c = 1 have an RMS of about
0.04-0.06, so at c = 1e-5 they are about 5e-7, 50 times Adam's eps = 1e-8: the part of the
figure that eps takes away is AdamW's row. KL-Shampoo and KL-SOAP run with both eigenvalue
floors: ``eigval_floor="relative"`` (KL-Shampoo's default) and the SPEC's "absolute" (KL-SOAP's).
tests/test_loss_scale.py runs the same measurement.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402

SHAPES = [(64, 96), (256, 128), (8, 512)]
SCALES = [1e-5, 1e-3, 1e-1, 1e2]
STEPS = 20
# (row label, optimizer class, extra arguments)
RUNS = [
    ("KLShampoo (eigval_floor=relative)", klkern.KLShampoo, {}),
    ("KLShampoo, eigval_floor=absolute (the SPEC's)", klkern.KLShampoo, {"eigval_floor": "absolute"}),
    ("KLSOAP (eigval_floor=absolute, the SPEC's)", klkern.KLSOAP, {}),
    ("KLSOAP, eigval_floor=relative", klkern.KLSOAP, {"eigval_floor": "relative"}),
    ("SOAP", klkern.SOAP, {}),
    ("Shampoo", klkern.Shampoo, {}),
    ("AdamW (torch)", torch.optim.AdamW, {}),
]


def movement(cls, shape: tuple, scale: float, steps: int = STEPS, device=None, **kwargs) -> float:
    """``||W_steps - W_0||_F`` after ``steps`` steps on the least-squares task with the loss times
    ``scale`` (module docstring); the data depend on the shape only."""
    device = torch.device("cpu") if device is None else device
    m, n = shape
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(m, n, generator=gen) / n**0.5
    X = torch.randn(256, n, generator=gen) * torch.logspace(0, -2, n)
    Y = X @ A.T + 0.1 * torch.randn(256, m, generator=gen)
    X, Y = X.to(device), Y.to(device)
    W = torch.nn.Parameter(torch.zeros(m, n, device=device))
    opt = cls([W], lr=1e-3, weight_decay=0.0, **kwargs)
    for _ in range(steps):
        rows = torch.randint(0, 256, (64,), generator=gen).to(device)
        loss = ((X[rows] @ W.T - Y[rows]) ** 2).sum(1).mean() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(W.detach().norm())


def ratio(cls, shape: tuple, scale: float, **kwargs) -> float:
    """The update's size at loss scale ``scale`` over its size at 1 (1: scale-free)."""
    return movement(cls, shape, scale, **kwargs) / movement(cls, shape, 1.0, **kwargs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(out_dir() / "loss_scale_cpu.md"),
                   help="result file (default bench/out/; bench/results/loss_scale_cpu.md is the committed one)")
    args = p.parse_args(argv)
    head = "| optimizer | shape | " + " | ".join(f"c = {c:g}" for c in SCALES) + " |"
    lines = [
        "# The update at loss scale c over the update at c = 1",
        "",
        f"`python bench/loss_scale.py`. {' '.join(__doc__.split(chr(10) + chr(10))[2].split())}",
        "",
        f"- {platform.machine()} CPU; torch {torch.__version__}; commit {git_commit()}; {utc_now()}",
        "",
        head,
        "|" + "---|" * (2 + len(SCALES)),
    ]
    for label, cls, kwargs in RUNS:
        for shape in SHAPES:
            base = movement(cls, shape, 1.0, **kwargs)
            cells = [f"{movement(cls, shape, c, **kwargs) / base:.3g}" for c in SCALES]
            lines.append(f"| {label} | {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
