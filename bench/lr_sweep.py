"""Learning-rate sweep behind the defaults of bench/train_lm.py.

Every optimizer gets the same tuning budget: one run per learning rate of the
same grid, with a seed (100) and validation windows that the comparison in
train_lm.py does not use, on the same preset. The learning rate with the
lowest final validation loss wins; a run whose loss becomes non-finite counts
as diverged. When an optimizer's best rate lies on an edge of the grid, its
sweep goes on along the same half-decade ladder (1, 3, 10, ...) in that
direction, up to ``--extend`` more rates, so no optimizer is judged at a rate
the grid merely cut off. Copy the winners into ``DEFAULT_LR`` in train_lm.py.

Results already in the output JSON for the same preset, config, corpus and
seed are reused (``--fresh`` ignores them), so an interrupted or extended
sweep does not repeat runs; the files are rewritten after every run (the JSON's
``complete`` lists the optimizers whose sweep ended), and ``--budget`` starts
no run that would likely end past it.

    python bench/lr_sweep.py                 # preset cpu, ~12 min on 2 cores
    python bench/lr_sweep.py --preset tiny --optimizers adamw,klshampoo --grid 1e-3,1e-2 --extend 0   # smoke run

Writes ``lr_sweep_<preset>.md`` and ``.json`` into bench/out/ (ignored by git; ``--out
bench/results/lr_sweep_<preset>`` refreshes the committed sweep).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm  # noqa: E402

from bench._meta import git_commit, out_dir, utc_now  # noqa: E402

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
LADDER = tuple(float(f"{m}e{e}") for e in range(-7, 1) for m in (1, 3))  # 1e-7 ... 3
SWEEP_SEED = 100
SWEEP_VAL_SEED = 4321


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(train_lm.PRESETS), default="cpu")
    p.add_argument("--optimizers", default=",".join(train_lm.OPTIMIZERS))
    p.add_argument("--grid", default=",".join(f"{x:g}" for x in GRID),
                   help="comma-separated learning rates, the same for every optimizer")
    p.add_argument("--steps", type=int, help="override the preset's number of steps")
    p.add_argument("--extend", type=int, default=3,
                   help="most extra rates per optimizer whose best is on a grid edge (default 3)")
    p.add_argument("--fresh", action="store_true", help="do not reuse results in the output JSON")
    p.add_argument("--data", help="text file instead of the stdlib sources")
    p.add_argument("--max-bytes", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output stem (default bench/out/lr_sweep_<preset>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds: start no run that would likely end past this (0: no limit)")
    return p.parse_args(argv)


def _best(losses: dict):
    """The rate with the lowest finite final loss; None when every run diverged."""
    ok = {lr: v for lr, v in losses.items() if math.isfinite(v)}
    return min(ok, key=ok.get) if ok else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = train_lm.PRESETS[args.preset]
    if args.steps:
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in train_lm.ALL_OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; choose from {', '.join(train_lm.ALL_OPTIMIZERS)}")
    names, _ = train_lm.installed(names, cfg)  # a peer that is not installed is skipped, and said so
    grid = [float(x) for x in args.grid.split(",") if x.strip()]
    device = torch.device(args.device)
    data = train_lm.load_data(args, cfg)

    stem = Path(args.out) if args.out else out_dir() / f"lr_sweep_{args.preset}"
    key = {"preset": args.preset, "config": asdict(cfg), "seed": SWEEP_SEED, "val_seed": SWEEP_VAL_SEED,
           "sha256": data["sha256"]}
    cached: dict = {}
    complete: list = []
    if stem.with_suffix(".json").exists() and not args.fresh:
        old = json.loads(stem.with_suffix(".json").read_text())
        if all(old["meta"].get(k) == v for k, v in key.items()):
            cached = old["final_val_loss"]
            complete = list(old.get("complete", old.get("best", {})))
    command = "python bench/lr_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {**key, "grid": grid, "source": data["source"], "torch": torch.__version__, "commit": git_commit(),
            "date": utc_now(), "command": command}
    losses: dict[str, dict[str, float]] = {name: dict(per) for name, per in cached.items()}
    started, longest = time.monotonic(), 0.0

    class OutOfBudget(Exception):
        pass

    def run(name: str, lr: float) -> float:
        nonlocal longest
        if f"{lr:g}" in cached.get(name, {}):
            loss = cached[name][f"{lr:g}"]
        else:
            if args.budget and time.monotonic() - started + longest > args.budget:
                raise OutOfBudget
            t0 = time.monotonic()
            r = train_lm.train_one(name, SWEEP_SEED, lr, cfg, data, device, progress=not args.no_progress,
                                   val_seed=SWEEP_VAL_SEED)
            longest = max(longest, time.monotonic() - t0)
            loss = r["final_val_loss"]
            losses.setdefault(name, {})[f"{lr:g}"] = loss if math.isfinite(loss) else float("nan")
            write(stem, args.preset, cfg, meta, losses, complete)  # after every run: a cut keeps it
        print(f"{name:16s} lr={lr:<8g} final val loss {loss:.4f}", file=sys.stderr)
        return loss if math.isfinite(loss) else float("nan")

    try:
        for name in names:
            tried = {lr: run(name, lr) for lr in grid}
            for _ in range(args.extend):
                lr = _best(tried)
                if lr is None:
                    break
                lower = [x for x in LADDER if x < min(tried) * 0.99]
                higher = [x for x in LADDER if x > max(tried) * 1.01]
                if lr == min(tried) and lower:
                    tried[lower[-1]] = run(name, lower[-1])
                elif lr == max(tried) and higher:
                    tried[higher[0]] = run(name, higher[0])
                else:
                    break
            losses[name] = {f"{lr:g}": tried[lr] for lr in sorted(tried)}
            complete = [n for n in dict.fromkeys([*complete, name])]
    except OutOfBudget:
        left = names[names.index(name):]
        print(f"lr_sweep: budget of {args.budget:g} s reached; not complete: {', '.join(left)}", file=sys.stderr)
    text = write(stem, args.preset, cfg, meta, losses, complete)
    print(text)
    return {name: lr for name in complete if (lr := _best({float(k): v for k, v in losses[name].items()}))}


def write(stem: Path, preset: str, cfg, meta: dict, losses: dict, complete: list) -> str:
    """The .md and .json of the sweep so far; ``best`` only for the optimizers whose sweep ended."""
    best = {name: float(lr) for name in complete
            if name in losses and (lr := _best({float(k): v for k, v in losses[name].items()})) is not None}
    names = list(losses)
    columns = sorted({float(lr) for per in losses.values() for lr in per})
    lines = [f"# lr sweep: preset `{preset}`", "",
             f"- one run per (optimizer, lr), seed {SWEEP_SEED}, validation windows seed {SWEEP_VAL_SEED}, "
             f"{cfg.steps} steps; grid {', '.join(f'{x:g}' for x in meta['grid'])} for every optimizer, "
             "extended along the half-decade ladder where the best rate was on an edge (`-`: not run); "
             "`div`: the loss became non-finite",
             f"- corpus: {meta['source']} (sha256 {meta['sha256']}); torch {meta['torch']}; "
             f"commit {meta['commit']}; date {meta['date']}",
             f"- command: `{meta['command']}`",
             *([f"- **partial**: sweep not complete for {', '.join(n for n in names if n not in complete)}"]
               if any(n not in complete for n in names) else []), "",
             "Final validation loss; **bold** = the default chosen for train_lm.py.", "",
             "| optimizer | " + " | ".join(f"{lr:g}" for lr in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in names:
        cells = []
        for lr in columns:
            v = losses[name].get(f"{lr:g}")
            cell = "-" if v is None else "div" if not math.isfinite(v) else f"{v:.4f}"
            cells.append(f"**{cell}**" if best.get(name) == lr else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "final_val_loss": losses, "best": best,
                                                    "complete": complete}, indent=1) + "\n")
    return text


if __name__ == "__main__":
    main()
