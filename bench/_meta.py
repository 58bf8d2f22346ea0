"""Shared by the benchmarks: the provenance every result file records (commit, date), and timing."""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit(full: bool = False) -> str:
    """HEAD's hash (short unless ``full``), with "+dirty" when tracked code under klkern/,
    triton_kernels/, csrc/ or bench/ (not the results in bench/results/) differs from
    it; "unknown" outside git. ``KLKERN_COMMIT`` overrides it (a copy of the tree without
    its .git, e.g. on a lent GPU machine, is told the commit it was made from)."""
    if os.environ.get("KLKERN_COMMIT"):
        return os.environ["KLKERN_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", *([] if full else ["--short"]), "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "klkern", "triton_kernels", "csrc", "bench",
                                ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def out_dir() -> Path:
    """Where a benchmark writes when no --out is given: bench/out/ (ignored by git), or
    ``$KLKERN_BENCH_OUT``. The committed results in bench/results/ change only when a command
    names them (``--out bench/results/...``), so a run of your own never overwrites what the
    docs cite."""
    return Path(os.environ.get("KLKERN_BENCH_OUT") or ROOT / "bench" / "out")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def sync(device) -> None:
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def times_ms(fn, device, reps: int) -> list:
    """Wall times of ``reps`` calls of ``fn()`` in ms, the device synchronised around each."""
    import time

    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn, device, reps: int) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` calls, the device synchronised around each."""
    import statistics

    return statistics.median(times_ms(fn, device, reps))
