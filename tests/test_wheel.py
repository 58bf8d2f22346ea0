"""The wheel a user installs: it holds the package, the Triton kernels and the CUDA sources,
installs into a fresh virtual environment, and passes ``python -m klkern.check`` there.

The fresh environment gets torch (and triton, numpy) from this one through a
``.pth`` line pointing at their site-packages; ``.pth`` files inside that
directory are not processed, so this checkout's editable install of klkern is
invisible there and ``import klkern`` can only find the wheel's copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(out.glob("klkern-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("klkern/__init__.py", "klkern/check.py", "klkern/triton_kernels/product.py",
                   "klkern/triton_kernels/compile_check.py", "klkern/csrc/batched_qr_kernels.cu",
                   "klkern/csrc/batched_qr_kernels.h", "klkern/csrc/batched_qr.cpp"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_wheel_in_a_fresh_venv_passes_the_check(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = Path(torch.__file__).resolve().parent.parent  # this environment's site-packages
    (Path(purelib) / "_klkern_test_deps.pth").write_text(f"{deps}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    where = subprocess.run([str(python), "-c", "import klkern, klkern.linalg._ext as e; print(klkern.__file__); "
                            "print(e.CSRC); print(all((e.CSRC / s).is_file() for s in e.SOURCES))"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert where.returncode == 0, where.stderr
    module, csrc, found = where.stdout.split()
    assert module.startswith(purelib) and csrc.startswith(purelib) and found == "True"
    check = subprocess.run([str(python), "-m", "klkern.check"], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    assert " 0 failed" in check.stdout and "qr: cholqr2" in check.stdout
