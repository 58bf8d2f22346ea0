"""The eigenvalue-initialisation study of KL-Shampoo and KL-SOAP, on two tasks.

    python bench/init_study.py --shakespeare FILE [--out DIR]   # FILE: the complete works of Shakespeare

Three initialisations of the eigenvalue estimates ``lam`` (klkern's
``init_factor``): the prototype's constant 0.1, "rms" (every entry
mean(G_0^2)^(1/K) from the first gradient, so that the Kronecker estimate
starts at the gradient's own scale) and "debiased" (the same start, then a
bias-corrected EMA: the starting value weights only the first projection).
Against them: AdamW, SOAP and Shampoo with and without grafting.

Protocol, on each task (the CPU preset on the standard library's sources,
and the same model on the characters of the Shakespeare corpus):

1. learning rate only, the same grid for every optimizer, one run per rate with
   seed 100 and validation windows that the evaluation does not use
   (bench/lr_sweep.py, whose cached runs are reused);
2. the best rate of each, 3 evaluation seeds (0, 1, 2), bench/train_lm.py;
3. on the first task, one longer run (4x the steps, seed 0) of the main
   optimizers, to see whether the early advantage over AdamW persists.

Writes ``init_study.md`` (the tables, every command) and the folders of each
step's results into ``--out`` (default bench/out/, ignored by git; ``--out
bench/results`` refreshes the committed study).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._meta import out_dir  # noqa: E402

RESULTS = out_dir()  # --out
REL = Path(os.path.relpath(RESULTS, ROOT))  # paths in the recorded commands, relative to the repository
NAMES = ["adamw", "klshampoo-0.1", "klshampoo-rms", "klshampoo-debiased", "klsoap-0.1", "klsoap-rms",
         "klsoap-debiased", "soap", "shampoo", "shampoo-nograft"]


def run(cmd: list, log: list) -> None:
    log.append(" ".join(cmd))
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def main(argv=None) -> None:
    global RESULTS, REL
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shakespeare", required=True, help="the Shakespeare text file (not shipped with klkern)")
    ap.add_argument("--only", choices=("sweep", "eval", "long", "report"), action="append",
                    help="run only these stages (default: all)")
    ap.add_argument("--tasks", default="stdlib,shakespeare", help="the tasks whose sweep and evaluation run")
    ap.add_argument("--out", default=str(RESULTS),
                    help="folder (default bench/out/; bench/results: the committed study)")
    args = ap.parse_args(argv)
    RESULTS = Path(args.out).resolve()
    REL = Path(os.path.relpath(RESULTS, ROOT))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stages = args.only or ["sweep", "eval", "long", "report"]
    tasks = {"stdlib": ["--preset", "cpu"],
             "shakespeare": ["--preset", "shakespeare-cpu", "--data", args.shakespeare]}
    log: list = []
    best: dict = {}
    for task, opts in tasks.items():
        sweep = RESULTS / f"lr_sweep_{task}"
        if "sweep" in stages and task in args.tasks.split(","):
            run(["bench/lr_sweep.py", *opts, "--optimizers", ",".join(NAMES), "--out",
                 str(REL / f"lr_sweep_{task}"), "--no-progress"], log)
        if sweep.with_suffix(".json").exists():
            best[task] = json.loads(sweep.with_suffix(".json").read_text())["best"]
        if "eval" in stages and task in args.tasks.split(","):
            lrs = [f"--lr={n}={best[task][n]:g}" for n in NAMES if n in best[task]]
            run(["bench/train_lm.py", *opts, "--optimizers", ",".join(n for n in NAMES if n in best[task]),
                 "--out", str(REL / f"init_study_{task}"), "--no-progress", *lrs], log)
    if "long" in stages:
        names = ["adamw", "soap", "klshampoo-debiased", "klsoap-debiased", "shampoo", "klshampoo-0.1"]
        lrs = [f"--lr={n}={best['stdlib'][n]:g}" for n in names]
        run(["bench/train_lm.py", *tasks["stdlib"], "--steps", "2000", "--seeds", "0", "--optimizers",
             ",".join(names), "--out", str(REL / "init_study_stdlib_long"), "--no-progress", *lrs], log)
    (RESULTS / "init_study_commands.txt").open("a").write("".join(f"python {c}\n" for c in log))
    if "report" in stages:
        report(best)


def _run_line(meta: dict) -> str:
    return (f"- {meta['device']}; torch {meta['torch']}; commit {meta.get('commit', 'not recorded')}; "
            f"{meta['date']}; corpus {meta['source']} (sha256 {meta['sha256']})")


def _summary(folder: Path) -> tuple[dict, list]:
    data = json.loads((folder / "summary.json").read_text())
    return data["meta"], data["table"]


def _kl_by_step(folder: Path) -> dict:
    """(optimizer, step) -> mean over seeds of the logged KL objective, from runs.csv (read once)."""
    import csv

    values: dict = {}
    with open(folder / "runs.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("kl"):
                values.setdefault((row["optimizer"], int(row["step"])), []).append(float(row["kl"]))
    return {key: sum(v) / len(v) for key, v in values.items()}


def report(best: dict) -> None:
    lines = ["# Initialising KL-Shampoo's and KL-SOAP's eigenvalue estimates", "",
             "`python bench/init_study.py --shakespeare FILE` (commands in `init_study_commands.txt`). "
             "Learning rate tuned alone, on the same grid for every optimizer, with a seed and validation "
             "windows the evaluation does not use (`lr_sweep_<task>.md`); evaluation on seeds 0, 1, 2.",
             "KL objective: the KL-Shampoo objective of each optimizer's own Kronecker estimate, on each "
             "incoming gradient before the estimate sees it, per entry, minus that of the best isotropic "
             "estimate c I, EMA 0.9 over steps (0: no better than a scaled identity; lower fits better; "
             "mean over the preconditioned blocks and the seeds).", ""]
    for task in ("stdlib", "shakespeare"):
        folder = RESULTS / f"init_study_{task}"
        if not (folder / "summary.json").exists():
            continue
        meta, table = _summary(folder)
        steps = meta["config"]["steps"]
        lines += [f"## Task: {task}", _run_line(meta)]
        sweep = RESULTS / f"lr_sweep_{task}.json"
        if sweep.exists():
            smeta = json.loads(sweep.read_text())["meta"]
            lines.append(f"- learning rates from `lr_sweep_{task}.md`: commit "
                         f"{smeta.get('commit', 'not recorded (run before result files recorded it)')}; "
                         f"{smeta['date']}")
        lines += ["", "| optimizer | lr | final val loss (3 seeds) | steps to AdamW's final loss | KL objective at "
                  "step 50 | at the end | optimizer ms/step |", "|---|---|---|---|---|---|---|"]
        kl = _kl_by_step(folder)
        for r in table:
            reach = "-" if r.get("steps_to_target") is None else ", ".join(
                "never" if not math.isfinite(x) else f"{x:.0f}" for x in r["steps_to_target"])
            loss = (f"{r['val_loss_mean']:.3f} +- {r['val_loss_std']:.3f}" if math.isfinite(r["val_loss_mean"])
                    else "diverged")
            kl50, kl_end = (kl.get((r["optimizer"], s), math.nan) for s in (50, steps))
            fmt = lambda x: "-" if not math.isfinite(x) else f"{x:.3f}"  # noqa: E731
            lines.append(f"| {r['optimizer']} | {r['lr']:g} | {loss} | {reach} | {fmt(kl50)} | {fmt(kl_end)} | "
                         f"{r['opt_ms_per_step']:.1f} |")
        lines.append("")
    folder = RESULTS / "init_study_stdlib_long"
    if (folder / "summary.json").exists():
        meta, table = _summary(folder)
        lines += ["## Longer horizon: task stdlib, 2000 steps (4x), seed 0", "", _run_line(meta), "",
                  "| optimizer | lr | final val loss | steps to AdamW's final loss |", "|---|---|---|---|"]
        for r in table:
            reach = ", ".join("never" if not math.isfinite(x) else f"{x:.0f}" for x in (r.get("steps_to_target") or []))
            lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['val_loss_mean']:.3f} | {reach or '-'} |")
        lines.append("")
    (RESULTS / "init_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
