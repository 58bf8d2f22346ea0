"""Recovery from one outlier batch: every optimizer, one gradient spike, two tasks.

    python bench/spike_recovery.py [--task mlp|lstsq] [--seeds 0,1,2] [--factors 1e2,1e4,1e6]
        [--optimizers NAMES] [--steps N --spike-at N --after N] [--out FILE]

Tasks (``--task``):

* ``mlp`` (default): a student MLP (32 -> 64 -> 16, tanh) fits a fixed random teacher of the
  same shape from noisy targets (noise 0.1), mean squared error, batches of 128, constant
  learning rate (AdamW 3e-3, the klkern optimizers 1e-2: the main job's rates); the evaluation
  set carries the same noise, so its loss floor is 0.01. By step 500 of 600, where the spike
  falls, every optimizer is near that floor. Loop step s is the optimizers' step s - 1 (their
  first step only initialises): at 500 with a refresh period of 10, the step before a refresh.
* ``lstsq``: least squares with a 48 x 32 weight from zero (summed squared error per sample,
  batches of 64, learning rate 3e-2 for all), the spike at step 16 of 60, early in training,
  while the spike-free run still improves fast (the setting of the issue that found the fault).

At the spike step the loss is multiplied by the spike factor (a batch whose gradient is that
many times larger: a corrupted batch or a loss-scale glitch), then training goes on normally.
Each run is compared with the same seed's spike-free run, on a fixed evaluation set:

* ``steps to recover``: the steps after the spike until the evaluation loss is within 5 % of
  the spike-free run's at the same step and stays there to the end of the window (``never``:
  still outside at the window's end; 0: never left);
* ``loss ratio +20``: evaluation loss 20 steps after the spike over the spike-free run's;
* ``worst ratio``: the largest ratio over the ``--after`` steps after the spike.

KL-Shampoo runs three times: at its defaults (``spike_threshold=1e3``: an outlier gradient
is scaled down before it enters the momentum and the estimates), with ``spike_threshold=None``
(the SPEC's step: the spiking gradient scaled by estimates from before it) and with
``eigenvalues_first=True`` (Adam's order); KL-SOAP twice, at its defaults and with
``spike_threshold=None``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402

OPTIMIZERS = {
    "AdamW": (lambda p, lr: torch.optim.AdamW(p, lr=lr["adamw"], betas=(0.9, 0.95), weight_decay=0.0)),
    "KL-Shampoo": (lambda p, lr: klkern.KLShampoo(p, lr=lr["klkern"], weight_decay=0.0)),
    "KL-Shampoo (spike_threshold=None)": (lambda p, lr: klkern.KLShampoo(p, lr=lr["klkern"], weight_decay=0.0,
                                                                         spike_threshold=None)),
    "KL-Shampoo (eigenvalues_first)": (lambda p, lr: klkern.KLShampoo(p, lr=lr["klkern"], weight_decay=0.0,
                                                                     eigenvalues_first=True)),
    "KL-SOAP": (lambda p, lr: klkern.KLSOAP(p, lr=lr["klkern"], weight_decay=0.0)),
    "KL-SOAP (spike_threshold=None)": (lambda p, lr: klkern.KLSOAP(p, lr=lr["klkern"], weight_decay=0.0,
                                                                   spike_threshold=None)),
    "SOAP": (lambda p, lr: klkern.SOAP(p, lr=lr["klkern"], weight_decay=0.0)),
    "Shampoo": (lambda p, lr: klkern.Shampoo(p, lr=lr["klkern"], weight_decay=0.0)),
}
WIDTHS = (32, 64, 16)


def mlp(g: torch.Generator) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(WIDTHS[0], WIDTHS[1]), torch.nn.Tanh(),
                              torch.nn.Linear(WIDTHS[1], WIDTHS[2]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return net


def _mlp_task(seed: int):
    """(student, batch(data) -> (x, y), x_eval, y_eval, loss, learning rates)."""
    g = torch.Generator().manual_seed(1000 + seed)
    teacher, student = mlp(g), mlp(g)
    x_eval = torch.randn(1024, WIDTHS[0], generator=g)
    with torch.no_grad():  # evaluation targets carry the training noise: the loss floor is 0.01
        y_eval = teacher(x_eval) + 0.1 * torch.randn(1024, WIDTHS[2], generator=g)

    def batch(data):
        x = torch.randn(128, WIDTHS[0], generator=data)
        with torch.no_grad():
            return x, teacher(x) + 0.1 * torch.randn(128, WIDTHS[2], generator=data)
    return student, batch, x_eval, y_eval, torch.nn.functional.mse_loss, {"adamw": 3e-3, "klkern": 1e-2}


def _lstsq_task(seed: int):
    """Least squares, a 48 x 32 weight from zero, summed squared error per sample."""
    g = torch.Generator().manual_seed(2000 + seed)
    A = torch.randn(48, 32, generator=g)
    student = torch.nn.Linear(32, 48, bias=False)
    torch.nn.init.zeros_(student.weight)
    x_eval = torch.randn(1024, 32, generator=g)
    y_eval = x_eval @ A.T + 0.1 * torch.randn(1024, 48, generator=g)

    def batch(data):
        x = torch.randn(64, 32, generator=data)
        return x, x @ A.T + 0.1 * torch.randn(64, 48, generator=data)

    def loss(pred, y):
        return 0.5 * (pred - y).pow(2).sum(1).mean()
    return student, batch, x_eval, y_eval, loss, {"adamw": 3e-2, "klkern": 3e-2}


# task: (builder, steps, spike at, steps compared after it)
TASKS = {"mlp": (_mlp_task, 600, 500, 100), "lstsq": (_lstsq_task, 60, 16, 40)}


def run(name: str, seed: int, factor: float, steps: int, spike_at: int, task: str = "mlp") -> list[float]:
    """Evaluation loss after every step (index 0: before training)."""
    student, batch, x_eval, y_eval, loss_fn, lr = TASKS[task][0](seed)
    opt = OPTIMIZERS[name](list(student.parameters()), lr)
    data = torch.Generator().manual_seed(seed)

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_fn(student(x_eval), y_eval))

    losses = [evaluate()]
    for step in range(1, steps + 1):
        x, y = batch(data)
        loss = loss_fn(student(x), y)
        if step == spike_at:
            loss = loss * factor
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(evaluate())
    return losses


def measure(spiked: list[float], free: list[float], spike_at: int, after: int) -> dict:
    ratios = [spiked[t] / free[t] for t in range(spike_at, min(len(free), spike_at + after + 1))]
    out = [i for i, r in enumerate(ratios) if r > 1.05]  # recovered: within 5 % from then on
    recover = 0 if not out else (out[-1] + 1 if out[-1] + 1 < len(ratios) else None)
    return {"steps_to_recover": recover, "ratio_20": ratios[min(20, len(ratios) - 1)], "worst_ratio": max(ratios),
            "free_loss_at_spike": free[spike_at - 1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="mlp")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--factors", default="1e2,1e4,1e6")
    ap.add_argument("--steps", type=int, help="default: the task's (mlp 600, lstsq 60)")
    ap.add_argument("--spike-at", type=int, help="default: the task's (mlp 500, lstsq 16)")
    ap.add_argument("--after", type=int, help="steps after the spike that are compared (mlp 100, lstsq 40)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help="comma-separated, from: " + ", ".join(OPTIMIZERS))
    ap.add_argument("--out", type=Path, help="result file (default: bench/out/spike_recovery_cpu.md for the "
                                             "mlp task, spike_recovery_<task>_cpu.md for another)")
    args = ap.parse_args(argv)
    _, steps, spike_at, after = TASKS[args.task]
    if args.out is None:
        name = "spike_recovery_cpu.md" if args.task == "mlp" else f"spike_recovery_{args.task}_cpu.md"
        args.out = out_dir() / name
    args.steps = steps if args.steps is None else args.steps
    args.spike_at = spike_at if args.spike_at is None else args.spike_at
    args.after = after if args.after is None else args.after
    torch.set_num_threads(1)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        factors = [float(f) for f in args.factors.split(",")]
    except ValueError as err:
        ap.error(f"--seeds takes integers and --factors numbers, comma-separated ({err})")
    if not all(f > 0 for f in factors):
        ap.error("--factors must be > 0 (the loss is multiplied by each)")
    names = [n.strip() for n in args.optimizers.split(",")]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        ap.error(f"unknown optimizers {unknown}; choose from: {', '.join(OPTIMIZERS)}")
    if not (2 <= args.spike_at and args.after >= 20 and args.spike_at + args.after <= args.steps):
        ap.error("need 2 <= --spike-at, --after >= 20 (the +20 ratio) and --spike-at + --after <= --steps")
    rows = []
    for name in names:
        for seed in seeds:
            free = run(name, seed, 1.0, args.steps, args.spike_at, args.task)
            for factor in factors:
                spiked = run(name, seed, factor, args.steps, args.spike_at, args.task)
                r = measure(spiked, free, args.spike_at, args.after)
                rows.append({"optimizer": name, "seed": seed, "factor": factor, **r})
                print(f"{name:30s} seed {seed} x{factor:g}: recover "
                      f"{'never' if r['steps_to_recover'] is None else r['steps_to_recover']}, "
                      f"+20 {r['ratio_20']:.3g}, worst {r['worst_ratio']:.3g}", flush=True)
    meta = {"date": utc_now(), "commit": git_commit(), "torch": torch.__version__, "task": args.task, "seeds": seeds,
            "steps": args.steps, "spike_at": args.spike_at, "after": args.after, "factors": factors,
            "command": "python bench/spike_recovery.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write(args.out, meta, rows, names, factors)
    print(f"wrote {args.out}")
    return 0


def write(out: Path, meta: dict, rows: list, names: list, factors: list) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Recovery from one gradient spike (CPU, task {meta['task']})", "",
             f"{meta['date']}, klkern {meta['commit']}, torch {meta['torch']}; seeds {meta['seeds']}; "
             f"{meta['steps']} steps, spike at step {meta['spike_at']}, compared over the next {meta['after']} "
             f"steps. Command: `{meta['command']}`.", "",
             "Per cell, over seeds: steps until the evaluation loss is back within 5 % of the same seed's "
             "spike-free run (`never`: not within the window) / median loss ratio 20 steps after the spike / "
             "worst ratio in the window.", "",
             "| optimizer | spike-free loss at the spike | " + " | ".join(f"x{f:g}" for f in factors) + " |",
             "|---|---|" + "---|" * len(factors)]
    for name in names:
        mine = [r for r in rows if r["optimizer"] == name]
        free = statistics.median(r["free_loss_at_spike"] for r in mine)
        cells = []
        for f in factors:
            cell = [r for r in mine if r["factor"] == f]
            steps = ",".join("never" if r["steps_to_recover"] is None else str(r["steps_to_recover"]) for r in cell)
            cells.append(f"{steps} / {statistics.median(r['ratio_20'] for r in cell):.3g} / "
                         f"{max(r['worst_ratio'] for r in cell):.3g}")
        lines.append(f"| {name} | {free:.4f} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
