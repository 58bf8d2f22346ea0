"""The GPU benchmark scripts, run on the CPU so that their logic is tested before a GPU runs them.

step_bench.py and qr_bench.py take ``--device cpu`` (tiny shapes, the Triton
path through the interpreter); the kernel-benchmark summary is fed a
synthetic pytest-benchmark file; tests/test_gpu_suite.py tests the GPU suite.
"""

from __future__ import annotations

import json
import math
import os
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
