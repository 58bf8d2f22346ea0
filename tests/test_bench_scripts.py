"""The GPU benchmark scripts, run on the CPU so that their logic is tested before a GPU runs them.

step_bench.py and qr_bench.py take ``--device cpu`` (tiny shapes, the Triton
path through the interpreter); the kernel-benchmark summary is fed a
synthetic pytest-benchmark file; tests/test_gpu_suite.py tests the GPU suite.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klkern.runtime import _backend

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(_backend.triton_import_error() is not None or _backend.interpreter_problem() is not None,
                    reason=f"needs triton's interpreter: {_backend.interpreter_problem()}")
def test_step_bench_smoke(tmp_path):
    done = _run(["bench/step_bench.py", "--device", "cpu", "--model", "tiny", "--steps", "1",
                 "--optimizers", "KLShampoo,Shampoo", "--precisions", "highest,medium",
                 "--freq1-optimizers", "KLSOAP", "--freq1-steps", "1", "--out", str(tmp_path)],
                {"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(next(tmp_path.glob("step_*.json")).read_text())
    assert [(r["precision"], r["optimizer"]) for r in data["rows"]] == [
        ("highest", "KLShampoo"), ("highest", "Shampoo"), ("medium", "KLShampoo"), ("medium", "Shampoo")]
    assert len(data["freq1"]) == 2 and {"device", "torch", "triton", "commit", "date"} <= set(data["meta"])
    # the refresh table: KL-Shampoo at the middle precision, its factors (the bias takes AdamW's path)
    (refresh,) = data["refresh"]
    assert (refresh["precision"], refresh["optimizer"]) == ("highest", "KLShampoo")
    assert refresh["factor_sizes"] == {"32": 3, "20": 1, "24": 1, "48": 1}
    assert refresh["floor_ms"] > 0 and refresh["sync"]["max_ms"] >= refresh["sync"]["median_ms"] > 0
    assert refresh["stagger"]["max_ms"] > 0
    md = next(tmp_path.glob("step_*.md")).read_text()
    assert "precondition_frequency 1" in md and "TFLOP/s" in md and "## The refresh" in md


def test_step_flops_counts_the_products():
    import step_bench

    import klkern

    params = [torch.nn.Parameter(torch.zeros(6, 4)), torch.nn.Parameter(torch.zeros(5)),
              torch.nn.Parameter(torch.zeros(3, 2, 4))]
    # 2-D: 6 products of 2 N d per mode; the 1-D bias takes the AdamW path; 3-D: three modes
    expect_kl = 6 * 24 * (6 + 4) + 6 * 24 * (3 + 2 + 4)
    assert step_bench.step_flops(klkern.KLShampoo(params)) == expect_kl
    assert step_bench.step_flops(klkern.Shampoo(params)) == expect_kl * 4 / 6
    assert step_bench.device_peaks("NVIDIA H100 80GB HBM3")["medium"] == 989.4
    assert step_bench.device_peaks("NVIDIA H100 PCIe")["highest"] == 51.2
    assert step_bench.device_peaks("Some GPU") is None


def test_diagnostics_cost_smoke(tmp_path):
    done = _run(["bench/diagnostics_cost.py", "--model", "tiny", "--steps", "2", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((tmp_path / "diagnostics_cost_cpu_tiny.json").read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]
    for row in data["rows"]:
        assert all(math.isfinite(v) and v > 0 for k, v in row.items() if k.endswith("_ms")), row
    assert {"device", "torch", "commit", "date"} <= set(data["meta"])
    assert "refreshing step" in (tmp_path / "diagnostics_cost_cpu_tiny.md").read_text()


def test_qr_bench_smoke(tmp_path):
    done = _run(["bench/qr_bench.py", "--device", "cpu", "--shapes", "2x40x33", "--quick", "--out-dir",
                 str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(next(tmp_path.glob("qr_*.json")).read_text())
    row = data["rows"][0]
    assert {"torch_ms", "cholqr2_ms", "householder_ms"} <= set(row)
    assert all(row["accurate"].values())


def test_kernel_bench_summary(tmp_path):
    import summarize_kernel_bench

    benchmarks = []
    for mode in ("highest", "medium"):
        for op in ("rotate", "precondition"):
            for impl, ms in (("eager", 2.0), ("triton", 1.0), ("triton_ieee", 4.0)):
                kind = "-kl" if op == "rotate" else ""
                benchmarks.append({"name": f"test_{op}[12x768x768-{impl}-{mode}{kind}]", "stats": {"median": ms / 1e3}})
        benchmarks.append({"name": f"test_gemm_floor[12x768x768-{mode}]", "stats": {"median": 0.5e-3}})
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"benchmarks": benchmarks, "machine_info": {}, "datetime": "now"}))
    table = summarize_kernel_bench.main(str(path))
    assert "| medium | precondition | 12x768x768 | 2.000 | 1.000 | 2.00 | 4.000 | 0.50 |" in table
    assert "| highest | rotate (kl) | 12x768x768 | 2.000 | 1.000 | 2.00 |" in table
    assert "| highest | GEMM floor (6 products) | 12x768x768 | 0.500 |" in table


def test_step_profile_smoke(tmp_path):
    done = _run(["bench/step_profile.py", "--device", "cpu", "--model", "tiny", "--steps", "1", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(next(tmp_path.glob("profile_*.json")).read_text())
    assert [(r["optimizer"], r["backend"]) for r in data["rows"]] == [("KLShampoo", "torch"), ("KLSOAP", "torch")]
    for row in data["rows"]:
        assert row["refresh"]["wall_ms_per_step"] > 0 and row["steady"]["wall_ms_per_step"] > 0
    assert {"device", "torch", "commit", "date"} <= set(data["meta"])


def test_peer_step_smoke(tmp_path):
    """bench/peer_step.py on tiny shapes: klkern's rows, a peer that is absent skipped with its
    reason (none is installed in CI), the refresh profile, and the result files."""
    out = tmp_path / "peer.md"
    done = _run(["bench/peer_step.py", "--model", "tiny", "--steps", "10", "--frequencies", "1,10", "--rounds", "1",
                 "--warmup", "2",
                 "--out", str(out)], env_extra={"PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    ours = [r for r in data["rows"] if r["implementation"] == "klkern"]
    assert {(r["period"], r["algorithm"]) for r in ours} == {(p, a) for p in (1, 10)
                                                            for a in ("KL-Shampoo", "KL-SOAP", "SOAP", "Shampoo")}
    assert all(r["ms"] > 0 and r["finite"] and r["state_mib"] > 0 for r in ours)
    for name, prof in data["refresh_profile"].items():
        assert prof["refresh_ms"] > 0 and prof["step_ms"] > 0 and prof["qr_ms"] > 0, name
        assert prof["qr_ms"] + prof["products_ms"] + prof["memory_ms"] <= 1.05 * prof["refresh_ms"], name
    floor = data["refresh_floor"]
    assert [(r["d"], r["factors"]) for r in floor["rows"]] == [(24, 6), (40, 2)]
    for r in floor["rows"]:
        assert min(r["geqrf_ms"], r["ormqr_ms"], r["product_ms"], r["linalg_qr_ms"]) > 0
        assert r["klkern_ms"] == r["geqrf_ms"] + 2 * r["ormqr_ms"]
    text = out.read_text()
    assert "| 1 | KL-Shampoo | klkern |" in text and "Where klkern's refresh goes" in text
    assert "The refresh's kernels alone" in text and "| 40 | 2 |" in text
    for peer in ("HeavyBall", "pytorch-optimizer", "Emerging-Optimizers"):
        if peer not in data["meta"]["versions"]:
            assert any(s.startswith(peer) for s in data["meta"]["skipped"]), peer


def test_spike_recovery_smoke(tmp_path):
    """bench/spike_recovery.py, short: every run measured against its spike-free twin, the table
    written (tests/test_robustness.py tests the property it shows)."""
    out = tmp_path / "spike.md"
    done = _run(["bench/spike_recovery.py", "--seeds", "0", "--factors", "1e6", "--steps", "80", "--spike-at", "50",
                 "--after", "25", "--optimizers", "AdamW,KL-Shampoo (eigenvalues_first)", "--out", str(out)])
    assert done.returncode == 0, done.stdout + done.stderr
    done = _run(["bench/spike_recovery.py", "--task", "lstsq", "--seeds", "0", "--factors", "1e4",
                 "--optimizers", "KL-Shampoo", "--out", str(tmp_path / "lstsq.md")])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {r["optimizer"] for r in rows} == {"AdamW", "KL-Shampoo (eigenvalues_first)"}
    assert all(r["worst_ratio"] >= r["ratio_20"] > 0 for r in rows)
    assert "| KL-Shampoo (eigenvalues_first) |" in out.read_text()
    lstsq = json.loads((tmp_path / "lstsq.json").read_text())
    assert lstsq["meta"]["task"] == "lstsq" and lstsq["rows"][0]["ratio_20"] < 1.1  # the default recovers


def _wheel(tmp_path: Path, name: str, requires_python: str = ">=3.8") -> Path:
    """A one-module wheel written by hand (no network, no build backend)."""
    import zipfile

    out = tmp_path / "wheels"
    out.mkdir(exist_ok=True)
    path = out / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                                 f"Requires-Python: {requires_python}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for f, text in files.items():
            zf.writestr(f, text)
    return path


def test_fetch_peers_installs_without_network(tmp_path):
    """What fetch_peers leaves in its folder installs with no index: each wheel on its own (one this
    Python refuses is reported, the others go on), the copied sources beside them; the manifest
    lists every file with its size and hash. The download itself needs network (not run here)."""
    import fetch_peers

    peers = tmp_path / "peers"
    peers.mkdir()
    for wheel in (_wheel(tmp_path, "peer_probe_ok"), _wheel(tmp_path, "peer_probe_future", ">=9.9")):
        shutil.copy(wheel, peers)
    source = tmp_path / "checkout" / "peer_probe_src"
    source.mkdir(parents=True)
    (source / "__init__.py").write_text("FROM_SOURCE = True\n")
    (source / "__pycache__").mkdir()
    done = _run(["bench/fetch_peers.py", "--no-download", "--dir", str(peers), "--source",
                 f"peer_probe_src={source}"])
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads((peers / "manifest.json").read_text())
    wheels = {p.name for p in peers.glob("*.whl")}
    assert {f["file"] for f in info["files"]} == wheels | {"src/peer_probe_src/__init__.py"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in info["files"])
    assert [p["distribution"] for p in info["peers"]] == [name for name, _, _ in fetch_peers.PEERS]

    target = tmp_path / "site"
    done = _run(["bench/fetch_peers.py", "--install", "--dir", str(peers), "--target", str(target)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not installed: peer_probe_future" in done.stderr and "requires a different Python" in done.stderr
    probe = subprocess.run([sys.executable, "-c", "import peer_probe_ok, peer_probe_src; "
                            "print(peer_probe_ok.VALUE, peer_probe_src.FROM_SOURCE)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert probe.stdout.split() == ["42", "True"], probe.stdout + probe.stderr
    assert not (tmp_path / "missing").exists()
    done = _run(["bench/fetch_peers.py", "--install", "--dir", str(tmp_path / "missing")])
    assert done.returncode != 0 and "does not exist" in done.stderr


def test_fetch_peers_download_command_pins_every_peer():
    import fetch_peers

    cmd = fetch_peers.download_command(Path("peers"), "3.12")
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    pinned = [c for c in cmd if "==" in c]
    assert len(pinned) == len(fetch_peers.PEERS) and "heavyball==3.2.1" in pinned


# ------------------------------------------------------------------ documented commands, as a new user runs them


def _code_blocks(text: str) -> list:
    """The shell blocks of a Markdown text (```bash, ```sh, ```text or unnamed)."""
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang in ("", "bash", "sh", "text")]


def documented_commands() -> list:
    """(where, command) for every `python bench/X.py ...` the README, docs/ and the bench scripts'
    docstrings show, as written (continuation lines joined, comments dropped)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for block in _code_blocks(text):
            for line in block.replace("\\\n", " ").splitlines():
                if "python bench/" in line:
                    found.append((path.name, " ".join(line.split("#")[0].split())))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        found += [(path.name, " ".join(span.split())) for span in re.findall(r"`([^`]*python bench/[^`]*)`", prose)]
    for path in sorted((ROOT / "bench").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in doc.replace("\\\n", " ").splitlines():
            if "python bench/" in line and line.strip().split()[0] in ("python", "TRITON_INTERPRET=1"):
                found.append((path.name, line.strip()))
    return found


def _bare(command: str) -> str:
    """The command without its trailing comment."""
    return re.split(r"\s#", command)[0].strip()


def _literal(command: str) -> bool:
    """A command to run as written, not a synopsis ("[--steps 10]", "cpu|cuda")."""
    return "[" not in command and "|" not in command and "..." not in command


_PARSE_ONLY = r'''
import argparse, json, runpy, shlex, sys
results = {}
real = argparse.ArgumentParser.parse_args
class Parsed(BaseException):
    pass
def parse_only(self, args=None, namespace=None):
    real(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_only
for command in json.loads(sys.argv[1]):
    words = shlex.split(command)
    words = words[:next((i for i, w in enumerate(words) if w.startswith((">", "2>"))), len(words))]
    words = words[words.index("python"):]  # no VAR=value prefix
    sys.argv = words[1:]
    try:
        runpy.run_path(words[1], run_name="__main__")
        results[command] = "ran without parsing arguments"
    except Parsed:
        results[command] = "ok"
    except SystemExit as err:
        results[command] = f"exit {err.code}"
    except BaseException as err:
        results[command] = f"{type(err).__name__}: {err}"
print(json.dumps(results))
'''


def test_every_documented_command_parses():
    """Every command the docs show, literally, is accepted by its script's own arguments (each
    script run up to its argument parsing, which is then stopped): an option renamed or removed
    in a script but not in the docs fails here. The GPU suite's commands are tests/test_gpu_suite.py's."""
    commands = sorted({_bare(c) for _, c in documented_commands() if _literal(c) and "gpu_suite" not in c})
    assert len(commands) > 20
    done = subprocess.run([sys.executable, "-c", _PARSE_ONLY, json.dumps(commands)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, KLKERN_BENCH_OUT=str(ROOT / "bench" / "out")))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    bad = {c: r for c, r in results.items() if r != "ok"}
    assert not bad, bad


SMOKE = [c for _, c in documented_commands() if c.endswith("# smoke run") or "# smoke run " in c]
# Smoke lines known to fail, with the reason (none today: a failure here is a fault to mend).
SMOKE_KNOWN_BAD: dict = {}


def _results_state() -> str:
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "bench/results"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return done.stdout


@pytest.mark.parametrize("command", [
    pytest.param(_bare(c), id=c.split()[1], marks=[pytest.mark.xfail(strict=True, reason=SMOKE_KNOWN_BAD[_bare(c)])]
                 if _bare(c) in SMOKE_KNOWN_BAD else []) for c in SMOKE])
def test_every_documented_smoke_run_runs_and_leaves_the_committed_results_alone(command, tmp_path):
    """Each smoke run a script's docstring shows runs as written, from a fresh shell, in a few seconds
    to a minute on the CPU, and writes into bench/out/ (here $KLKERN_BENCH_OUT), never into the
    committed bench/results/ (a user's run must not overwrite what the README cites)."""
    if "step_bench" in command and (_backend.triton_import_error() or _backend.interpreter_problem()):
        pytest.skip(f"needs triton's interpreter: {_backend.interpreter_problem()}")
    before = _results_state()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(KLKERN_BENCH_OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    done = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # qr_bench's ran past 5 minutes
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert _results_state() == before
    if "step_bench" not in command:  # step_bench.py writes into bench/out/ itself
        assert list(tmp_path.iterdir()), "nothing written into $KLKERN_BENCH_OUT"


def test_there_is_a_smoke_run_for_every_gpu_benchmark():
    scripts = {c.split()[1] for c in SMOKE}
    assert {"bench/step_bench.py", "bench/step_profile.py", "bench/qr_bench.py", "bench/peer_step.py",
            "bench/diagnostics_cost.py", "bench/lr_sweep.py"} <= scripts


def test_no_script_writes_into_the_committed_results_by_default():
    """The kind behind a run that overwrote what the README cites: no bench script's --out default,
    nor any path it builds, points into bench/results/ (bench/_meta.out_dir() is the default);
    only the GPU suite, whose business is that folder, names it."""
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name in ("gpu_suite.py", "gpu_decide.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == "results":
                found.append(f"{path.name}:{node.lineno}: a path through 'results'")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"(\S*/)?bench/results(/\S*)?", node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_peer_step_rounds_the_timed_steps_up_to_whole_refresh_periods():
    import peer_step

    assert [peer_step.timed_steps(2, p) for p in (1, 10)] == [2, 10]
    assert [peer_step.timed_steps(25, p) for p in (1, 10)] == [25, 30]
    assert [peer_step.timed_steps(0, p) for p in (1, 10)] == [3, 10]
