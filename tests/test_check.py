"""``python -m klkern.check`` / ``klkern.check()``: the self-check a new user (and the GPU suite) runs first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import klkern
from klkern import check as check_module
from klkern.runtime import _backend


def _run(env_extra: dict, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "klkern.check", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_on_the_cpu_passes_with_its_table(tmp_path):
    out = tmp_path / "check.json"
    done = _run({}, "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    for needle in ("torch path: KLShampoo", "torch path: Shampoo", "qr: cholqr2", "qr: torch", "skipped"):
        assert needle in done.stdout, needle
    rows = json.loads(out.read_text())["rows"]
    ran = [r for r in rows if r["status"] == "ok"]
    assert len(ran) >= 8 and all(r["max_error"] <= r["tolerance"] for r in ran)
    assert done.stderr == ""  # no warnings on a machine without a GPU


@pytest.mark.skipif(_backend.triton_import_error() is not None or _backend.interpreter_problem() is not None,
                    reason=f"needs triton's interpreter: {_backend.interpreter_problem()}")
def test_cli_under_the_interpreter_checks_the_kernels():
    done = _run({"TRITON_INTERPRET": "1"}, "--quick")
    assert done.returncode == 0, done.stdout + done.stderr
    for needle in ("rotate (highest)", "factor_ema_ (medium)", "precondition (high)",
                   "triton path: KLShampoo"):
        assert needle in done.stdout, needle


def test_a_mismatch_or_an_error_fails_the_check(monkeypatch, capsys):
    monkeypatch.setattr(check_module, "_qr_error", lambda method, device, dtype: 1.0)
    assert check_module.main([]) == 1
    assert "MISMATCH" in capsys.readouterr().out

    def broken(*args, **kwargs):
        raise RuntimeError("simulated driver failure")

    monkeypatch.setattr(check_module, "_qr_error", lambda method, device, dtype: 0.0)
    monkeypatch.setattr(check_module, "_trajectory_error", broken)
    rows = klkern.check(quick=True)
    errors = [r for r in rows if r["status"].startswith("ERROR")]
    assert any("simulated driver failure" in r["status"] for r in errors)
    assert check_module.failed(rows)


def test_on_a_gpu_machine_a_missing_extension_or_driver_is_a_failure(monkeypatch):
    """With CUDA present, an extension that could not be built and a triton without a driver are
    failing rows (the GPU suite must not pass with them), not skips; KLKERN_NO_EXT=1 is a skip."""
    from klkern.linalg import _ext

    monkeypatch.setattr(check_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check_module, "_trajectory_error", lambda *a, **k: 0.0)
    monkeypatch.setattr(check_module, "_qr_error", lambda *a, **k: 0.0)

    def no_driver(*args, **kwargs):
        raise RuntimeError("backend='triton': no usable Triton driver for device cuda")

    monkeypatch.setattr(_backend, "resolve", no_driver)
    monkeypatch.setattr(_ext, "qr_extension", lambda: None)
    monkeypatch.setattr(_ext, "LAST_ERROR", "RuntimeError: Error building extension\nbatched_qr.cu(3): error: boom")
    monkeypatch.delenv("KLKERN_NO_EXT", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = klkern.check(quick=True)
    bad = {r["path"]: r["status"] for r in check_module.failed(rows)}
    assert "error: boom" in bad["qr: extension"]
    assert "no usable Triton driver" in bad["triton kernels"]
    monkeypatch.setenv("KLKERN_NO_EXT", "1")
    rows = klkern.check(quick=True)
    assert "qr: extension" not in {r["path"] for r in check_module.failed(rows)}
