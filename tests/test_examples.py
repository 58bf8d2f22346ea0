"""The scripts under examples/, run as a user runs them, on tiny settings (seconds each).

Each script checks its own outcome (the loss falls; a resumed run equals the uninterrupted one;
ranks stay in sync; diagnostics are finite) and exits non-zero otherwise. An example whose
packages the test environment lacks is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(args, timeout=300, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(env or {})}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_example_is_tested():
    tested = {"train_loop.py", "watch_diagnostics.py", "ddp_checkpoint.py", "hf_trainer.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("optimizer", ["KLShampoo", "SOAP"])
def test_train_loop(optimizer):
    done = _run([sys.executable, "examples/train_loop.py", "--optimizer", optimizer, "--steps", "40"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical to the uninterrupted run" in done.stdout


def test_watch_diagnostics():
    done = _run([sys.executable, "examples/watch_diagnostics.py", "--steps", "20", "--every", "10"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "staleness" in done.stdout and "0.weight" in done.stdout


@pytest.mark.parametrize("keep", [True, False], ids=["dir", "temporary"])
def test_ddp_checkpoint_with_torchrun(tmp_path, keep):
    """The folder the script reports holds the checkpoint with --dir; without, the temporary
    folder it made is reported as deleted, and is."""
    where = ["--dir", str(tmp_path / "ckpt")] if keep else []
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                 f"--master_port={_free_port()}", "examples/ddp_checkpoint.py", "--steps", "8", *where],
                timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed run identical; ranks in sync" in done.stdout
    folder = Path(re.search(r"checkpoint (?:was )?in (\S+)", done.stdout).group(1))
    if keep:
        assert folder == tmp_path / "ckpt" and any(folder.iterdir()), done.stdout
    else:
        assert "(temporary, now deleted" in done.stdout and not folder.exists(), done.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="examples/hf_trainer.py needs transformers, not installed here")
def test_hugging_face_trainer():
    done = _run([sys.executable, "examples/hf_trainer.py", "--steps", "20"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "under the Trainer" in done.stdout
