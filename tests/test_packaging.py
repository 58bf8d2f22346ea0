"""The package metadata (pyproject.toml's [project] table) agrees with the code."""

from __future__ import annotations

from pathlib import Path

import pytest

import klkern

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_and_extras():
    meta = project()["project"]
    assert meta["version"] == klkern.__version__
    assert meta["requires-python"] == ">=3.10"
    # what the README's commands and .ci/run install
    assert {"test", "train", "triton", "lint"} <= set(meta["optional-dependencies"])
    ci = (ROOT / ".ci" / "run").read_text()
    assert '".[test,train]"' in ci and '".[lint]"' in ci


def test_lint_and_type_checks_are_configured():
    tool = project()["tool"]
    assert tool["ruff"]["lint"]["mccabe"]["max-complexity"] == 25
    assert tool["mypy"]["files"] == ["klkern"] and tool["mypy"]["check_untyped_defs"] is True
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ruff check" in ci and "mypy" in ci
