"""Figures the docs quote from committed result files, checked against those files, so that a
re-run that changes a result cannot leave a stale figure behind (the main job's table in
docs/tuning.md and its row in the README, the README's sample progress line and what the main job
trains on), and files the docs point to exist."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import train_lm  # noqa: E402

SUMMARY = json.loads((ROOT / "bench" / "results" / "train_lm_cpu" / "summary.json").read_text())
NAMES = {"adamw": "AdamW (torch)", "klshampoo": "KL-Shampoo", "klsoap": "KL-SOAP", "soap": "SOAP",
         "shampoo": "Shampoo (Adam grafting)", "shampoo-nograft": "Shampoo, no grafting"}
README = (ROOT / "README.md").read_text()


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def main_job_rows() -> list:
    """docs/tuning.md's main-job table, row by row, as the committed summary says."""
    rows = []
    for r in SUMMARY["table"]:
        steps = ", ".join("not reached" if not math.isfinite(x) else f"{x:.0f}" for x in r["steps_to_target"])
        rows.append(f"| {NAMES[r['optimizer']]} | {_lr(r['lr'])} | {r['val_loss_mean']:.3f} +- {r['val_loss_std']:.3f} "
                    f"| [{r['val_loss_min']:.3f}, {r['val_loss_max']:.3f}] | {steps} | {r['ms_per_step']:.1f} | "
                    f"{r['opt_ms_per_step']:.1f} | {r['state_mib']:.2f} |")
    return rows


def test_tuning_quotes_the_committed_main_job():
    text = (ROOT / "docs" / "tuning.md").read_text()
    header = "| optimizer | lr | final val loss (3 seeds) | [min, max] | steps to AdamW's final loss | ms/step |"
    lines = text.split(header, 1)[1].splitlines()[2:]
    table = lines[:next(i for i, line in enumerate(lines) if not line.startswith("|"))]
    assert table == main_job_rows()
    meta = SUMMARY["meta"]
    assert f"torch {meta['torch'].split('+')[0]}, Python {meta['python']}, commit {meta['commit']};" in text


def test_the_readme_quotes_the_committed_main_job():
    by = {r["optimizer"]: f"{r['val_loss_mean']:.3f} +- {r['val_loss_std']:.3f}" for r in SUMMARY["table"]}
    row = next(line for line in README.splitlines() if line.startswith("| main job, final validation loss"))
    for name, label in (("klshampoo", "KL-Shampoo"), ("klsoap", "KL-SOAP"), ("soap", "SOAP"), ("shampoo", "Shampoo"),
                        ("shampoo-nograft", "Shampoo without grafting"), ("adamw", "AdamW")):
        assert f"{label} {by[name]}" in row, (label, by[name])


def test_the_readme_sample_progress_line_is_what_the_main_job_prints():
    """The line the README shows is the one train_lm.py prints for that run of the default job
    (its number in the seed-major order, the optimizer's rate, the preset's steps)."""
    n, total, name, seed, lr, steps = re.search(
        r"`\[run (\d+)/(\d+)\] (\S+) seed=(\d+) lr=(\S+): (\d+) steps \.\.\.`", README).groups()
    args = train_lm.parse_args([])
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [(o, s) for s in seeds for o in train_lm.OPTIMIZERS]
    assert runs[int(n) - 1] == (name, int(seed)) and int(total) == len(runs)
    assert float(lr) == train_lm.learning_rates(args)[name] and f"lr={float(lr):g}" == f"lr={lr}"
    assert int(steps) == train_lm.PRESETS["cpu"].steps
    assert f"It trains {len(runs)} models ({len(train_lm.OPTIMIZERS)} optimizers x {len(seeds)} seeds)" in README


def test_the_readme_names_the_python_whose_library_the_committed_job_trained_on():
    version = ".".join(SUMMARY["meta"]["python"].split(".")[:2])
    assert f"the committed figures come from Python {version}." in README
    assert SUMMARY["meta"]["source"].startswith(f"Python {SUMMARY['meta']['python']} stdlib")


def test_the_papers_folder_the_specification_points_to_exists():
    """docs/spec.md (kept word for word) says its papers lie in a folder beside it and names them by
    file: the folder is there and says which paper each name stands for."""
    spec = (ROOT / "docs" / "spec.md").read_text()
    folder = re.search(r"`(\w+)/` beside this file", spec).group(1)
    index = (ROOT / "docs" / folder / "README.md").read_text()
    for name in set(re.findall(r"`([\w.-]+\.txt)`", spec)):
        assert f"`{name}`" in index, name


def test_the_main_jobs_summary_names_the_cpu_and_the_corpus(tmp_path):
    meta = {"preset": "cpu", "source": "Python 3.12.3 stdlib (/usr/lib/python3.12)", "bytes": 10, "sha256": "ab",
            "tokens": "bytes", "vocab": 256, "params": 1, "config": {}, "torch": "t", "python": "3.12.3",
            "device": f"cpu ({train_lm.cpu_model()}, 2 cores)", "threads": 2, "klkern": "0", "commit": "c",
            "date": "d", "command": "x"}
    text = train_lm.markdown([], meta)
    assert "another Python version trains on other text" in text
    model = train_lm.cpu_model()
    assert model and model in text
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        name = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()).group(1).strip()
        assert model.startswith(name)
