"""Build and install klkern.

The package is pure Python plus optional compiled parts. setup.py uses
torch.utils.cpp_extension's BuildExtension so the CUDA extension ``klkern._C``
(csrc/) is built when a CUDA toolkit and a CUDA build of torch are present;
otherwise it is skipped with one line and the package installs as pure Python.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _skip_extension(reason: str) -> None:
    print(f"klkern: skipping the CUDA extension klkern._C: {reason}", file=sys.stderr)


def _cuda_extension():
    """(ext_modules, cmdclass) for klkern._C, or ([], {}) with the reason printed.

    The extension is optional: when its build fails, one line says why and the
    package installs as pure Python (klkern/linalg/_ext.py can still JIT-build it on
    first CUDA use, else batched_qr falls back to torch.linalg.qr).
    """
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _skip_extension("torch is not importable at build time")
        return [], {}
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        _skip_extension("no CUDA build of torch or no CUDA toolkit")
        return [], {}
    # nvcc 13 has no sm_70; without a GPU at build time torch cannot pick the archs itself.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension whose failure (compiler, toolkit, version checks) does not fail the install."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001 - any failure: install without the extension
                _skip_extension(f"build failed ({_first_line(err)})")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                _skip_extension(f"build failed ({_first_line(err)})")

    try:
        ext = cpp_extension.CUDAExtension(
            "klkern._C",
            sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            optional=True,  # setuptools then skips copying a missing build output
        )
    except Exception as err:  # noqa: BLE001 - e.g. OSError when CUDA_HOME is unusable
        _skip_extension(f"cannot configure it ({_first_line(err)})")
        return [], {}
    return [ext], {"build_ext": OptionalBuildExtension}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


ext_modules, cmdclass = _cuda_extension()


class BuildPyWithSources(build_py):
    """build_py that also ships csrc/ inside the package (klkern/csrc/), so that an installed
    wheel can JIT-build the QR extension on first CUDA use (klkern/linalg/_ext.py)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "klkern", "csrc")
        os.makedirs(target, exist_ok=True)
        for source in _csrc_files():
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


def _csrc_files() -> list:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                  + glob.glob(os.path.join(ROOT, "csrc", "*.h")))


cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

# The metadata (name, version, dependencies, extras) is pyproject.toml's [project] table.
setup(
    # triton_kernels/ installs as klkern.triton_kernels (the top-level name
    # `triton_kernels` belongs to another package).
    packages=find_packages(include=["klkern", "klkern.*"]) + ["klkern.triton_kernels"],
    package_dir={"klkern.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
