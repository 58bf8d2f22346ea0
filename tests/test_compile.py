"""Every GPU kernel compiled for real GPUs (sm_80, sm_90) without a GPU.

Triton: ``klkern.triton_kernels.compile_check`` records the kernel launches
that steps of all four optimizers make (every matmul precision, state dtype,
parameter dtype, normalize_grads, blocks that cannot write the parameters,
aligned and unaligned shapes), expands each over its tile table, and compiles
the variants with ``triton.compile`` for sm_80 and sm_90 in a process
without the interpreter. A variant passes when it compiles, fits the
architecture's shared memory, does not spill, and uses tensor cores exactly
when its precision asks for them.

By default a representative subset is compiled (per kernel, precision, tile
entry, alignment, weighting and operand dtypes: the variant with the most
fused work, i.e. the highest register pressure; about 150 compilations, ~40 s
on 2 cores); ``-m slow`` compiles all of them (about 440 compilations). CI
(.ci/run) runs the default set with the newest triton and again with the
oldest supported one (3.6, whose tl.dot needs K >= 16).

CUDA (csrc/): ``nvcc --resource-usage`` for sm_80 and sm_90 must match the
committed csrc/resource_usage.txt (regenerate with
``python tests/test_compile.py --update``) and show no spills.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from klkern.runtime import _backend

ROOT = Path(__file__).resolve().parent.parent
RESOURCE_FILE = ROOT / "csrc" / "resource_usage.txt"
ARCHS = "80,90"

needs_triton = pytest.mark.skipif(_backend.triton_import_error() is not None, reason="needs triton")


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _tool(*args, interpret: bool, timeout: int):
    return subprocess.run([sys.executable, "-m", "klkern.triton_kernels.compile_check", *args], cwd=ROOT,
                          env=_env(interpret), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """The recorded variants (a subprocess under the interpreter)."""
    if _backend.triton_import_error() is not None:
        pytest.skip("needs triton")
    path = tmp_path_factory.mktemp("variants") / "variants.json"
    done = _tool("record", str(path), interpret=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return path


def _compile(variants: Path, tmp_path: Path, subset: str, timeout: int) -> tuple[list, str]:
    report = tmp_path / "report.json"
    done = _tool("compile", str(variants), "--arch", ARCHS, "--subset", subset, "--out", str(report),
                 "--md", str(tmp_path / "report.md"), interpret=False, timeout=timeout)
    rows = json.loads(report.read_text())["rows"] if report.is_file() else []
    return rows, done.stdout + done.stderr


KERNELS = ("_product_kernel", "_rotate_kernel", "_factor_ema_kernel", "_precondition_kernel")


@needs_triton
def test_recorded_variants_cover_what_the_optimizers_launch(variants):
    """The recording saw every product kernel at every product arithmetic (3xTF32 and fp32 FMA
    for "highest"), the rotation's epilogues (projections; momentum or Adam's moments; the
    direction), one-sided rotations and writes (a mode left unrotated), the parameter write in
    the preconditioning's epilogue (in every parameter dtype) and its U-storing form, the moments
    under spike_threshold and the AdamW path's kernel, unaligned shapes, and both entries of a tile table."""
    recorded = json.loads(variants.read_text())
    by = {}
    for v in recorded:
        by.setdefault(v["kernel"].split(":")[-1], []).append(v)
    assert set(by) == set(KERNELS) | {"_scaled_moments_kernel", "_adamw_kernel"}
    for kernel in KERNELS:
        dots = {v["constexprs"]["DOT"] for v in by[kernel]}
        assert dots >= {"tf32x3", "tf32", "bf16"}, (kernel, dots)
    # KL-Shampoo; Adam; none (under spike_threshold the moments wait for scaled_moments_, both kinds)
    assert {c["MOMENTS"] for c in (v["constexprs"] for v in by["_rotate_kernel"])} == {0, 1, 2}
    assert {v["constexprs"]["MOMENTS"] for v in by["_scaled_moments_kernel"]} == {1, 2}
    assert any(c["PROJ"] and c["DIRECTION"] for c in (v["constexprs"] for v in by["_rotate_kernel"]))
    written = [v["constexprs"] for v in by["_precondition_kernel"] if v["constexprs"]["WRITE"]]
    assert {c["W_DTYPE"]["tl_dtype"] for c in written} == {"fp32", "bf16", "fp16"}
    assert any(not v["constexprs"]["WRITE"] for v in by["_precondition_kernel"])  # normalize_grads: U stored
    # one-sided blocks (a mode left unrotated), both orientations, in the rotation and the write
    for kernel, flags in (("_rotate_kernel", ("SIDE_A", "SIDE_B")),
                          ("_precondition_kernel", ("LIVE_SIDE_A", "LIVE_SIDE_B"))):
        sides = {tuple(v["constexprs"][f] for f in flags) for v in by[kernel]}
        assert {(True, True), (True, False), (False, True)} <= sides, (kernel, sides)
    assert {v["aligned"] for v in recorded} == {True, False}
    assert not any(c.get("EMULATE") for v in recorded for c in [v["constexprs"]])
    sizes = {json.dumps(v["tiles"], sort_keys=True) for v in by["_rotate_kernel"]
             if v["aligned"] and v["constexprs"]["DOT"] == "bf16"}
    assert len(sizes) == 2  # both entries of the table


@needs_triton
def test_recorded_variants_are_what_a_gpu_launches(variants):
    """Recorded as a GPU prepares its launches, not as the interpreter runs them: the GPU's tiles
    (a 48-wide block is one 64-wide tile, an argument triton specialises to the constant 1) and
    bf16 intermediates under "medium" (the interpreter keeps those in fp32)."""
    from klkern.triton_kernels.rotate import _rotate_kernel

    recorded = json.loads(variants.read_text())
    rotate = [v for v in recorded if v["kernel"].endswith("_rotate_kernel")]
    names = [n for n in _rotate_kernel.arg_names if n not in rotate[0]["constexprs"] and n not in rotate[0]["tiles"]]
    at = {n: i for i, n in enumerate(names)}
    assert any(v["args"][at["tiles_m"]][1] == "1" or v["args"][at["tiles_n"]][1] == "1" for v in rotate)
    # the second product's B operand: T = G Q_b, bf16 under "medium" (two-sided blocks)
    intermediates = [v for v in rotate if v["constexprs"]["DOT"] == "bf16" and v["constexprs"]["SIDE_A"]
                     and v["constexprs"]["SIDE_B"] and v["args"][at["BM"]][0] == "*bf16"]
    assert intermediates, "no bf16 intermediate recorded under medium"


def test_every_tile_is_legal_on_the_oldest_triton():
    """triton 3.6 (setup.py's minimum) rejects tl.dot with K < 16: no table entry may have it."""
    from klkern.triton_kernels import _config

    tables = [cfg for table in _config.TILE_TABLES.values() for entries in table.values() for _, cfg in entries]
    tables += [cfg for table in _config.UNALIGNED_TILES.values() for cfg in table.values()]
    tables += [cfg for table in _config.CANDIDATES.values() for entries in table.values() for cfg in entries]
    products = [cfg for cfg in tables if "BLOCK_K" in cfg]
    assert len(products) > 40 and all(cfg["BLOCK_K"] >= _config.MIN_BLOCK_K == 16 for cfg in products)


@needs_triton
def test_representative_variants_compile_without_spills(variants, tmp_path):
    rows, log = _compile(variants, tmp_path, "representative", timeout=900)
    assert rows, log
    from klkern.triton_kernels.compile_check import problems

    bad = {f"{r['kernel']} {r['constexprs']} {r['tiles']} sm_{r['arch']}": problems(r) for r in rows if problems(r)}
    assert not bad, bad
    by_dot = {}
    for r in rows:
        if "DOT" in r["constexprs"]:
            by_dot.setdefault((r["constexprs"]["DOT"], r["arch"]), []).append(r["mma"] + r["wgmma"])
    for arch in (80, 90):
        for dot in ("tf32x3", "tf32", "bf16"):
            assert min(by_dot[(dot, arch)]) > 0, (dot, arch)
        assert max(by_dot[("ieee", arch)]) == 0
    # sm_90 uses the Hopper instruction for the tensor-core products
    assert all(r["wgmma"] > 0 for r in rows if r["arch"] == 90 and r["constexprs"].get("DOT", "ieee") != "ieee")
    assert all("registers" in r and "spill_stores" in r for r in rows)


@needs_triton
@pytest.mark.slow  # about 700 table-entry and 130 candidate compilations: ~10 minutes on 2 cores
def test_every_variant_and_tile_candidate_compiles_without_spills(tmp_path):
    """Every recorded variant at every table entry, and every tuning candidate of every kernel
    with its heaviest epilogue (bench/tune_tiles.py chooses among them on a GPU)."""
    path = tmp_path / "variants.json"
    done = _tool("record", str(path), "--candidates", interpret=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(v.get("candidate") for v in json.loads(path.read_text()))
    rows, log = _compile(path, tmp_path, "tables+candidates", timeout=3600)
    assert rows, log
    from klkern.triton_kernels.compile_check import problems

    bad = [(r["kernel"], r["constexprs"], r["tiles"], r["arch"], problems(r)) for r in rows if problems(r)]
    assert not bad, bad


@needs_triton
def test_the_check_catches_spills_and_shared_memory(variants, tmp_path):
    """The check can fail: a 256x128 rotation tile with KL-SOAP's epilogue (Gr, the projections,
    both moments and the direction) spills on sm_80, and a 256x256x64 bf16 tile needs more shared
    memory than an A100 has."""
    recorded = json.loads(variants.read_text())
    heavy = next(v for v in recorded if v["kernel"].endswith("_rotate_kernel") and v["aligned"]
                 and v["constexprs"]["DOT"] == "tf32" and v["constexprs"]["PROJ"] and v["constexprs"]["MOMENTS"] == 2
                 and v["constexprs"]["DIRECTION"])
    bad = [dict(heavy, tiles=dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=2, maxnreg=255)),
           dict(heavy, tiles=dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, maxnreg=255),
                constexprs=dict(heavy["constexprs"], DOT="bf16"))]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    rows, log = _compile(path, tmp_path, "all", timeout=600)
    from klkern.triton_kernels.compile_check import problems

    found = {(r["tiles"]["BLOCK_N"], r["arch"]): " ".join(problems(r)) for r in rows}
    assert "spill" in found[(128, 80)] and "shared memory" not in found[(128, 80)], found
    assert "shared memory" in found[(256, 80)], found


# ---------------------------------------------------------------------------- csrc/ with nvcc


def nvcc_resource_usage() -> str:
    """``nvcc --resource-usage`` of csrc/batched_qr_kernels.cu for sm_80 and sm_90, one line per kernel."""
    out = ROOT / "build" / "resource_usage.o"
    out.parent.mkdir(exist_ok=True)
    cmd = ["nvcc", "-c", "-O3", "--resource-usage", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", str(ROOT / "csrc" / "batched_qr_kernels.cu"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    version = re.search(r"release ([\d.]+)", subprocess.run(["nvcc", "--version"], capture_output=True,
                                                            text=True).stdout).group(1)
    rows = []
    for block in re.split(r"ptxas info\s+: Compiling entry function ", text)[1:]:
        mangled, arch = re.match(r"'(\S+)' for '(sm_\d+)'", block).groups()
        kernel = _demangle(mangled)
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        stack, stores, loads = map(int, re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block).groups())
        smem = re.search(r"(\d+) bytes smem", block)
        rows.append(f"{arch} {kernel}: registers {regs}, stack {stack} B, spill stores {stores} B, "
                    f"spill loads {loads} B, static shared {int(smem.group(1)) if smem else 0} B")
    header = [f"# nvcc {version} --resource-usage -O3 of csrc/batched_qr_kernels.cu (sm_80, sm_90).",
              "# Regenerate: python tests/test_compile.py --update. Dynamic shared memory is sized at",
              "# launch and checked there against the device's opt-in maximum (see the launcher)."]
    return "\n".join(header + sorted(rows)) + "\n"


def _demangle(mangled: str) -> str:
    filt = shutil.which("c++filt")
    if filt:
        name = subprocess.run([filt, mangled], capture_output=True, text=True).stdout.strip()
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"\(anonymous namespace\)::", "", name)
        return name.split("(")[0]
    return mangled


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_csrc_resource_usage_is_recorded_and_spill_free():
    current = nvcc_resource_usage()
    for line in current.splitlines():
        if not line.startswith("#"):
            assert "stack 0 B, spill stores 0 B, spill loads 0 B" in line, line
    committed = RESOURCE_FILE.read_text()
    if committed.splitlines()[0] != current.splitlines()[0]:
        pytest.skip(f"csrc/resource_usage.txt was recorded with another nvcc ({committed.splitlines()[0]})")
    assert current == committed, "csrc/ changed: run python tests/test_compile.py --update and commit the file"


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        RESOURCE_FILE.write_text(nvcc_resource_usage())
        print(RESOURCE_FILE.read_text())
    else:
        sys.exit("usage: python tests/test_compile.py --update")
