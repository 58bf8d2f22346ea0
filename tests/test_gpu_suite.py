"""bench/gpu_suite.py, the one command a GPU lease runs: its budget and packing logic on the CPU.

A lease gives one command a few minutes and returns only what lies in one folder, at most 8
files there. These tests run the suite's machinery with stand-in parts (short Python commands)
and check what the lease depends on: a part is not started when the budget cannot hold it, a
part that runs over its time is killed with its children, the folder never holds more than
MAX_FILES files and is packed after every part (so a run cut short keeps what it measured), and
``unpack`` restores every file the parts wrote. Without a GPU the suite exits at once.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_suite  # noqa: E402


def _part(name, code, least=1, limit=30):
    """A stand-in part running ``code`` (a Python snippet; WORK is its folder)."""
    def command(work, seconds):
        return [[sys.executable, "-c", f"WORK = {str(work)!r}\n" + code]]
    return gpu_suite.Part(name, least, limit, f"stand-in {name}", command)


def test_allotment_respects_least_limit_and_reserve():
    part = gpu_suite.Part("x", least=30, limit=100, about="")
    reserve = gpu_suite.RESERVE_S
    assert gpu_suite.allotment(part, 500) == 100
    assert gpu_suite.allotment(part, 30 + reserve + 5) == 35
    assert gpu_suite.allotment(part, 30 + reserve - 1) is None
    assert gpu_suite.allotment(part, -5) is None


def test_parts_run_in_order_within_the_budget_and_are_packed(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    parts = [
        _part("first", "import pathlib; pathlib.Path(WORK, 'a.md').write_text('| table a |')"),
        _part("slow", "import time, pathlib; pathlib.Path(WORK, 'partial.txt').write_text('kept'); time.sleep(60)",
              limit=2),
        _part("failing", "raise SystemExit(3)"),
        _part("too_big", "print('never')", least=10_000),
    ]
    start = time.monotonic()
    rows = gpu_suite.run_parts(parts, 60, work, out, {"PATH": "/usr/bin:/bin"}, start, echo=lambda s: None,
                               header="- device: stand-in")
    took = time.monotonic() - start
    assert [r["status"] for r in rows] == ["ok", "timeout", "failed", "skipped (budget)"]
    assert took < 20  # the sleeping part was killed at its limit
    assert rows[2]["note"] == "exit codes 3"
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.md"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/first/a.md" in names and "results/slow/partial.txt" in names  # cut short, kept
    summary = (out / "summary.md").read_text()
    assert "| slow | timeout |" in summary and "| too_big | skipped (budget) |" in summary
    assert "stand-in" in summary


def test_a_timed_out_part_takes_its_children_with_it(tmp_path):
    marker = tmp_path / "child_alive"
    child = f"import time, pathlib; time.sleep(4); pathlib.Path({str(marker)!r}).write_text('x')"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nimport time; time.sleep(60)\n"
    rows = gpu_suite.run_parts([_part("parent", code, limit=1)], 60, tmp_path / "w", tmp_path / "o", {},
                               time.monotonic(), echo=lambda s: None)
    assert rows[0]["status"] == "timeout"
    time.sleep(5)
    assert not marker.exists()


def test_budget_counts_from_the_suite_start(tmp_path):
    """A suite whose preflight used most of the budget starts no part that cannot fit."""
    started = time.monotonic() - 95  # 95 of 100 s already spent
    rows = gpu_suite.run_parts([_part("late", "print(1)", least=1)], 100, tmp_path / "w", tmp_path / "o", {},
                               started, echo=lambda s: None)
    assert rows[0]["status"] == "skipped (budget)"


def test_pack_refuses_more_than_the_lease_returns(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    out.mkdir()
    for i in range(gpu_suite.MAX_FILES):
        (out / f"extra{i}.txt").write_text("x")
    with pytest.raises(RuntimeError, match="at most 8"):
        gpu_suite.pack(out, work, [], "")


def test_unpack_restores_every_file(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "step").mkdir(parents=True)
    (work / "step" / "step_x.json").write_text('{"rows": []}')
    (work / "qr").mkdir()
    (work / "qr" / "qr_x.md").write_text("| qr |")
    gpu_suite.pack(out, work, [dict(part="step", status="ok", seconds=1.0, note="")], "- device: X")
    (out / "environment.json").write_text(json.dumps({"device": "NVIDIA Test GPU 80GB"}))
    (out / "suite.log").write_text("log")
    dest = gpu_suite.unpack(out, tmp_path / "dest")
    assert (dest / "step" / "step_x.json").read_text() == '{"rows": []}'
    assert (dest / "qr" / "qr_x.md").is_file() and (dest / "summary.md").is_file()
    assert (dest / "suite.log").read_text() == "log"
    assert gpu_suite.slug("NVIDIA H200") == "nvidia-h200"


def test_unpack_refuses_paths_outside_the_destination(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "environment.json").write_text(json.dumps({"device": "X"}))
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(evil, arcname="../evil.txt")
    with pytest.raises(ValueError, match="refusing"):
        gpu_suite.unpack(out, tmp_path / "dest")


def test_every_part_has_a_command_and_priority_order():
    names = [p.name for p in gpu_suite.PARTS]
    assert names[:3] == ["check", "step", "qr"]  # the decisive numbers first
    for part in gpu_suite.PARTS:
        commands = part.command(Path("/tmp/w"), 100)
        assert commands and part.least < part.limit
        for command in commands:
            command = command[0] if isinstance(command, tuple) else command
            script = next((str(c) for c in command if str(c).endswith(".py")), None)
            if script:  # the scripts it runs exist
                assert (ROOT / script).is_file(), script
    with pytest.raises(SystemExit, match="unknown part"):
        gpu_suite._select(["nope"])


def test_the_main_job_takes_its_rates_from_the_sweep_run_before_it(tmp_path):
    """The train part passes the sweep part's winners (--lr-from) when the sweep ran earlier in the
    same lease, and the preset's rates otherwise; both run the GPU preset on the same optimizers."""
    def command(name):
        part = next(p for p in gpu_suite.PARTS if p.name == name)
        return [str(c) for c in part.command(tmp_path / name, 300)[-1]]
    names = [p.name for p in gpu_suite.PARTS]
    assert names.index("sweep") < names.index("train")
    train = command("train")
    assert "--lr-from" not in train and train[train.index("--preset") + 1] == "gpu"
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "lr_sweep_gpu.json").write_text("{}")
    train = command("train")
    assert train[train.index("--lr-from") + 1] == str(tmp_path / "sweep" / "lr_sweep_gpu.json")
    sweep = command("sweep")
    assert sweep[sweep.index("--out") + 1] == str(tmp_path / "sweep" / "lr_sweep_gpu")
    assert train[train.index("--optimizers") + 1] == sweep[sweep.index("--optimizers") + 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_exits_at_once_with_one_line(tmp_path):
    """With this test's interpreter as $PYTHON (a venv's python whether or not the venv is active,
    so not whatever python3 is first on PATH), the suite runs on it and names it."""
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--out", str(tmp_path / "x"),
                           "--budget", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.strip().count("\n") == 0 and "no CUDA GPU" in done.stdout
    assert f"(python: {sys.executable})" in done.stdout
    assert done.stderr == ""
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "x").exists()


def test_the_cuda_probe_says_why_there_is_no_gpu(tmp_path):
    """Not every failed probe is "no GPU": a torch that cannot be imported is named as such."""
    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    info, why = gpu_suite.probe_cuda(dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert "torch cannot be imported" in why and "libcudart" in why
    info, why = gpu_suite.probe_cuda(dict(os.environ))
    if not torch.cuda.is_available():
        assert why.startswith("no CUDA GPU") and info["torch"] == torch.__version__


def test_the_summary_quotes_every_part_result(tmp_path):
    """summary.md quotes each part's own table, the main job's two folders down included."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "train" / "train_lm").mkdir(parents=True)
    (work / "train" / "train_lm" / "summary.md").write_text("| main job table |")
    (work / "qr").mkdir()
    (work / "qr" / "qr_x.md").write_text("| qr table |")
    gpu_suite.pack(out, work, [dict(part="train", status="ok", seconds=1.0, note="")], "")
    summary = (out / "summary.md").read_text()
    assert "| main job table |" in summary and "| qr table |" in summary
    assert "| train | ok | 1.0 |" in summary


def _klkern_imports(source: str) -> list:
    """(module, name) of every `from klkern... import name` in a piece of Python source."""
    return [(node.module, alias.name) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("klkern")
            for alias in node.names]


def test_scripts_run_in_subprocesses_import_what_exists():
    """Python held in a string and run elsewhere (the suite's preflight on the GPU machine) is not
    checked by the import of its module: every klkern name such a script imports must exist, or a
    lease fails at its first line. Every string constant of bench/ that parses as Python is read."""
    import importlib
    import importlib.util

    scripts = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import klkern" in node.value:
                try:
                    scripts.append((path.name, node.value, _klkern_imports(node.value)))
                except SyntaxError:
                    continue
    assert any(name == "gpu_suite.py" and imports for name, _, imports in scripts)  # the preflight is read
    missing = []
    for name, _, imports in scripts:
        for module, attr in imports:
            owner = importlib.import_module(module)
            if not hasattr(owner, attr) and importlib.util.find_spec(f"{module}.{attr}") is None:
                missing.append(f"{name}: from {module} import {attr}")
    assert not missing, missing
