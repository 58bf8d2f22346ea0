"""What every result file under bench/results records: the commit it ran at and when."""
from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit(full: bool = False) -> str:
    """HEAD's hash (short unless ``full``), with "+dirty" when tracked files under
    klkern/, triton_kernels/, csrc/ or bench/ differ from it; "unknown" outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", *([] if full else ["--short"]), "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "klkern", "triton_kernels", "csrc", "bench"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
