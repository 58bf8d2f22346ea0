"""state_dtype=torch.bfloat16 against float32 state, on an ill-conditioned least-squares problem
and on the main job.

    python bench/bf16_state.py [--steps 5000] [--lrs 3e-3,1e-2,3e-2] [--main-job [--main-steps N]] [--out FILE]

The problem: W (16 x 32) fits W* from inputs x whose covariance, in a random orthonormal basis,
has eigenvalues log-spaced from 1 to 1e-4 (``cond``); each step draws a batch of 256 inputs; the
loss reported is the population loss tr((W - W*) C (W - W*)^T) / 16, exact. For each
optimizer and learning rate: the final loss with float32 state, with bf16 state and their ratio;
AdamW (torch.optim.AdamW) for scale. tests/test_dtypes.py runs a short version (300 steps at lr
3e-2). With ``--main-job``: the main job (bench/train_lm.py, preset cpu, seed 0; ``--main-steps``
shortens it) with every optimizer under both state dtypes, its final validation losses.
Prints a markdown report (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, utc_now  # noqa: E402

OPTIMIZERS = {"klshampoo": klkern.KLShampoo, "klsoap": klkern.KLSOAP, "soap": klkern.SOAP, "shampoo": klkern.Shampoo}


def least_squares(cls, state_dtype, lr: float, steps: int, m: int = 16, n: int = 32, cond: float = 1e-4,
                  batch: int = 256, seed: int = 0) -> float:
    """The population loss after ``steps`` steps of ``cls`` (None: torch.optim.AdamW) from W = 0."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(m, n, generator=gen)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    spread = torch.logspace(0, math.log10(cond), n)  # the input covariance's eigenvalues
    W = torch.nn.Parameter(torch.zeros(m, n))
    if cls is None:
        opt = torch.optim.AdamW([W], lr=lr, weight_decay=0.0)
    else:
        opt = cls([W], lr=lr, weight_decay=0.0, state_dtype=state_dtype)
    for _ in range(steps):
        X = basis @ (spread.sqrt().unsqueeze(1) * torch.randn(n, batch, generator=gen))
        loss = ((W - target) @ X).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    E = (W.detach() - target).double() @ basis.double()
    return float((E * E * spread.double()).sum() / m)


def least_squares_table(steps: int, lrs: list) -> str:
    lines = ["| optimizer | lr | loss, float32 state | loss, bf16 state | bf16 / float32 |", "|---|---|---|---|---|"]
    for name, cls in OPTIMIZERS.items():
        for lr in lrs:
            a = least_squares(cls, torch.float32, lr, steps)
            b = least_squares(cls, torch.bfloat16, lr, steps)
            lines.append(f"| {name} | {lr:g} | {a:.3g} | {b:.3g} | {b / a:.2f} |")
            print(lines[-1], flush=True)
    for lr in lrs:
        lines.append(f"| adamw (torch) | {lr:g} | {least_squares(None, None, lr, steps):.3g} | | |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main_job_table(steps: int | None) -> str:
    import csv
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "bench" / "train_lm.py")
    train_lm = importlib.util.module_from_spec(spec)
    sys.modules["train_lm"] = train_lm  # its dataclasses look their module up there
    spec.loader.exec_module(train_lm)
    finals: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("float32", "bfloat16"):
            out = Path(tmp) / label
            sets = [a for name in OPTIMIZERS for a in ("--set", f"{name}.state_dtype=torch.{label}")]
            train_lm.main(["--optimizers", ",".join(OPTIMIZERS), "--seeds", "0", "--no-progress", "--out", str(out),
                           *(["--steps", str(steps)] if steps else []), *sets])
            with open(out / "runs.csv") as fh:
                for row in csv.DictReader(fh):
                    if row["val_loss"] != "":
                        finals[(row["optimizer"], label)] = float(row["val_loss"])
    lines = ["| optimizer | final val loss, float32 state | bf16 state | bf16 / float32 |", "|---|---|---|---|"]
    for name in OPTIMIZERS:
        a, b = finals[(name, "float32")], finals[(name, "bfloat16")]
        lines.append(f"| {name} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    p.add_argument("--main-job", action="store_true", help="also the main job, seed 0, both state dtypes")
    p.add_argument("--main-steps", type=int, help="shorten the main job to this many steps")
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lrs = [float(x) for x in args.lrs.split(",")]
    command = "python bench/bf16_state.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = ["# state_dtype: bf16 against float32 state\n",
              f"- command: `{command}`",
              f"- {platform.machine()}, torch {torch.__version__}, commit {git_commit()}, {utc_now()}\n",
              f"## Least squares, input covariance 1 ... 1e-4, {args.steps} steps (population loss)\n",
              least_squares_table(args.steps, lrs)]
    if args.main_job:
        report += [f"\n## The main job (preset cpu, seed 0, {args.main_steps or 'all'} steps)\n",
                   main_job_table(args.main_steps)]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
