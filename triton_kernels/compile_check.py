"""Compile every Triton kernel variant the optimizers launch for real GPUs, without a GPU.

Two steps, in two processes (the interpreter's patches break compilation in
the process where it ran):

    TRITON_INTERPRET=1 python -m klkern.triton_kernels.compile_check record variants.json
    python -m klkern.triton_kernels.compile_check compile variants.json --arch 80,90 \\
        --out report.json [--md table.md] [--subset representative]

``record`` runs a few steps of every optimizer under every matmul precision,
state dtype and parameter dtype (and with normalize_grads) on small models, records every kernel
launch (kernel, argument types and their triton specialisation, constexprs,
GPU tiles) without executing it (which kernels a step launches depends on
shapes, dtypes and options, not on values), and expands each recorded launch over every entry of its tile
table for its precision, so that the variants a large model would use are
compiled too. Nothing here is a hand-kept list of variants.

``compile`` compiles each (variant, arch) with ``triton.compile`` and
``GPUTarget("cuda", arch, 32)`` and reports: shared memory, registers and
stack from ``cuobjdump --dump-resource-usage`` of the cubin, spill stores and
loads from ``ptxas -v`` of the PTX (run as triton runs it, so the numbers
describe the cubin that runs), and the tensor-core instructions in the PTX
(``mma``, ``wgmma``). A variant passes when it compiles, its shared memory
fits the architecture, it neither spills nor uses a stack frame, and its
``DOT`` mode shows in the PTX (tensor-core instructions for "tf32",
"tf32x3" and "bf16", none for "ieee").
``--subset representative`` keeps, per (kernel, precision, tile entry,
alignment), the variant with the most fused work (the heaviest register
pressure); CI runs that subset; ``-m slow`` records with ``--candidates`` (every
tile the GPU tuning chooses among) and compiles ``tables+candidates``: every
table-entry variant and the representative variant of each candidate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from klkern.runtime._errors import describe, summary

# Per-block shared memory limits (opt-in maximum): A100 163 KB, H100 227 KB
# (of 164 / 228 KB per SM).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TENSOR_CORE_MODES = ("tf32", "tf32x3", "bf16")


# ------------------------------------------------------------------ record


def _record_scenarios():
    """(optimizer class name, constructor kwargs, param dtype, shapes) of the recorded runs."""
    import torch

    import klkern
    from klkern.algorithms._options import DEFAULTS
    from klkern.runtime._precision import PRECISIONS

    # (32, 32) and (20, 24) are single blocks (aligned and unaligned); (48, 32) splits into blocks
    # of two shapes.
    shapes = [(32, 32), (20, 24), (48, 32), (24,)]
    scenarios = []
    for name in ("KLShampoo", "KLSOAP", "SOAP", "Shampoo"):
        for precision in PRECISIONS:
            for state_dtype in (torch.float32, torch.bfloat16):
                base = dict(matmul_precision=precision, state_dtype=state_dtype, precondition_frequency=1,
                            block_size=32)
                for param_dtype in (torch.float32, torch.bfloat16, torch.float16):
                    scenarios.append((name, base, param_dtype, shapes))
                scenarios.append((name, dict(base, normalize_grads=True), torch.float32, shapes))
                if "spike_threshold" in DEFAULTS[getattr(klkern, name).algorithm]:  # the KL optimizers
                    scenarios.append((name, dict(base, spike_threshold=None), torch.float32, shapes))
            # a mode above max_precond_dim left unrotated: one-sided rotations, both orientations
            scenarios.append((name, dict(matmul_precision=precision, precondition_frequency=1, max_precond_dim=32,
                                         large_dim_policy="identity"), torch.float32, [(40, 24), (24, 40)]))
    return scenarios


def record(candidates: bool = False) -> list:
    """Run the scenarios under the interpreter and return the deduplicated, tile-expanded variants
    (``candidates``: also every tile the GPU tuning chooses among, marked ``"candidate": True``)."""
    from klkern.runtime import _backend

    if not _backend.interpreting():
        raise SystemExit("compile_check record: run with TRITON_INTERPRET=1 (launches are recorded "
                         "through the interpreter on CPU tensors)")
    launches = []
    # Nothing is executed, so an interpreter that cannot execute here (triton 3.6 with numpy >= 2.4)
    # does not matter: let backend="triton" resolve on the CPU anyway.
    problem, _backend.interpreter_problem = _backend.interpreter_problem, lambda: None
    try:
        launches = _record_launches()
    finally:
        _backend.interpreter_problem = problem
    return expand(launches, candidates)


def _record_launches() -> list:
    import torch

    import klkern

    from . import _config

    launches = []
    with _config.recording(execute=False) as log:
        for name, kwargs, param_dtype, shapes in _record_scenarios():
            # "highest" both ways: 3xTF32 (the default) and fp32 FMA (the variant the benchmarks time)
            dots = _config.HIGHEST_DOTS if kwargs["matmul_precision"] == "highest" else (None,)
            for dot in dots:
                previous = _config.highest_dot(dot)
                try:
                    gen = torch.Generator().manual_seed(0)
                    params = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(param_dtype)) for s in shapes]
                    opt = getattr(klkern, name)(params, backend="triton", **kwargs)
                    for _ in range(3):  # initialisation, a step with every product, one with spike_threshold
                        for p in params:
                            p.grad = torch.randn(p.shape, generator=gen).to(param_dtype)
                        opt.step()
                finally:
                    _config.highest_dot(previous)
        launches.extend(log)
    return launches


def _key(v: dict) -> str:
    return json.dumps(v, sort_keys=True)


def expand(launches: list, candidates: bool = False) -> list:
    """Deduplicate launches and substitute every tile-table entry of each one's precision (and with
    ``candidates`` every tuning candidate, marked)."""
    from ._config import table_entries

    out = {}
    for launch in launches:
        dot = launch["constexprs"].get("DOT", "ieee")
        tables = table_entries(launch["table"], dot, launch["aligned"])
        for cfg in table_entries(launch["table"], dot, launch["aligned"], candidates):
            variant = dict(launch, tiles=cfg)
            if cfg not in tables:
                variant["candidate"] = True
            out.setdefault(_key(variant), variant)
    return list(out.values())


# ------------------------------------------------------------------ compile


def _weight(variant: dict) -> int:
    """How much fused work a variant carries (flags on, prologue, weights): a proxy for registers."""
    c = variant["constexprs"]
    return sum(1 for k, v in c.items() if isinstance(v, bool) and v and k != "EMULATE") + int(c.get("MOMENTS", 0))


def representative(variants: list) -> list:
    """Per (kernel, DOT, tile entry, alignment, weights or not, dtypes of the first three
    operands): the heaviest variant (ties: the first recorded). The fused work alone is not a
    safe proxy for registers: with triton 3.6 an unweighted bf16 factor EMA spilled where the
    weighted one did not, so weights and operand dtypes are part of the key."""
    best: dict = {}
    for v in variants:
        c = v["constexprs"]
        key = (v["kernel"], c.get("DOT"), _key(v["tiles"]), v["aligned"], c.get("HAS_W"),
               tuple(a[0] for a in v["args"][:3]))
        if key not in best or _weight(v) > _weight(best[key]):
            best[key] = v
    return list(best.values())


def _kernel_fn(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _tools(arch: int):
    """cuobjdump, and the ptxas commands to try for ``-v`` on the PTX: first the ptxas and
    flags triton itself compiles with (so its numbers describe the cubin that runs), then
    the bundled and toolkit ones."""
    import triton

    bundled = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"

    def find(name):
        for candidate in (bundled / name, Path(cuda_home) / "bin" / name):
            if candidate.is_file():
                return str(candidate)
        return shutil.which(name)

    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    commands = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        commands.append([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}"])
    except Exception:  # noqa: BLE001 - other triton versions: fall back to the binaries on disk
        pass
    for name in ("ptxas-blackwell", "ptxas"):
        path = find(name)
        if path:
            commands.append([path, "-lineinfo", "-v", f"--gpu-name={sm}"])
    return find("cuobjdump"), commands


def compile_variant(variant: dict, arch: int) -> dict:
    """Compile one variant for sm_<arch> and measure it (see module doc). Never raises."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": variant["kernel"].split(":")[-1], "arch": arch, "constexprs": variant["constexprs"],
           "tiles": variant["tiles"], "args": variant["args"]}
    fn = _kernel_fn(variant["kernel"])
    names = [n for n in fn.arg_names if n not in variant["constexprs"] and n not in variant["tiles"]]
    if len(names) != len(variant["args"]):
        row["error"] = f"recorded {len(variant['args'])} arguments, kernel has {len(names)}"
        return row
    signature, constexprs, attrs = {}, {}, {}
    for name, (kind, spec) in zip(names, variant["args"]):
        index = fn.arg_names.index(name)
        if spec == "1":
            signature[name] = "constexpr"
            constexprs[(index,)] = 1
        else:
            signature[name] = kind
            if spec == "16":
                attrs[(index,)] = [["tt.divisibility", 16]]
    tl_dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    from ._config import OPTIONS

    meta = {k: v for k, v in variant["tiles"].items() if k not in OPTIONS}
    for name, value in {**variant["constexprs"], **meta}.items():
        signature[name] = "constexpr"
        constexprs[(fn.arg_names.index(name),)] = tl_dtypes[value["tl_dtype"]] if isinstance(value, dict) else value
    signature = {n: signature[n] for n in fn.arg_names}
    options = {k: v for k, v in variant["tiles"].items() if k in OPTIONS}
    start = time.perf_counter()
    try:
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        except TypeError:  # older triton without attrs in ASTSource
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # noqa: BLE001 - reported, the test fails on it
        row["error"] = describe(err)
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["shared"] = int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    row["mma"] = len(re.findall(r"\bmma\.sync\b", ptx))
    row["wgmma"] = len(re.findall(r"\bwgmma\.mma_async\b", ptx))
    cuobjdump, ptxas_commands = _tools(arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        if cuobjdump:
            text = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True,
                                  text=True).stdout
            match = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
            if match:
                row["registers"], row["stack"] = int(match.group(1)), int(match.group(2))
        ptx_file = Path(tmp) / "k.ptx"
        ptx_file.write_text(ptx)
        for command in ptxas_commands:
            done = subprocess.run(command + [str(ptx_file), "-o", str(Path(tmp) / "p.cubin")],
                                  capture_output=True, text=True)
            match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
            if done.returncode == 0 and match:
                row["spill_stores"], row["spill_loads"] = int(match.group(1)), int(match.group(2))
                row["ptxas"] = Path(command[0]).name
                break
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with a compiled variant (empty when it passes every check)."""
    out = []
    if "error" in row:
        return [f"does not compile: {summary(row['error'])}"]
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[row['arch']]} B")
    if row.get("spill_stores") or row.get("spill_loads"):
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    elif row.get("stack", 0) > 0:
        out.append(f"stack frame {row['stack']} B (local memory: spills)")
    if "registers" not in row and "spill_stores" not in row:
        out.append("no resource usage (neither cuobjdump nor ptxas ran)")
    dot = row["constexprs"].get("DOT")
    tensor = row["mma"] + row["wgmma"]
    if dot in TENSOR_CORE_MODES and tensor == 0:
        out.append(f"DOT={dot} but no mma/wgmma in the PTX")
    if dot == "ieee" and tensor:
        out.append("DOT=ieee but the PTX holds tensor-core instructions")
    return out


def compile_all(variants: list, archs: list, jobs: int | None = None) -> list:
    jobs = jobs or os.cpu_count() or 1
    work = [(v, a) for v in variants for a in archs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_variant, *zip(*work))) if work else []


def _label(row: dict) -> str:
    c = row["constexprs"]
    flags = [k for k, v in c.items() if isinstance(v, bool) and v and k != "EMULATE"]
    extra = [f"{k}={v}" for k, v in c.items() if k in ("MOMENTS",) and v]
    if isinstance(c.get("W_DTYPE"), dict) and (c.get("WRITE") or "DECAYS" in c):
        extra.append(f"W={c['W_DTYPE']['tl_dtype']}")
    t = row["tiles"]
    tiles = "x".join(str(t[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK", "BLOCK_K", "BLOCK_E") if k in t)
    return f"{row['kernel']} {c.get('DOT')} {tiles} w{t['num_warps']}s{t['num_stages']} " + " ".join(flags + extra)


def markdown(rows: list, meta: dict) -> str:
    lines = ["# Triton kernel variants compiled for sm_80 / sm_90", "",
             f"- {meta}", "",
             "| variant | arch | registers | spill stores B | shared KB | mma | wgmma | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (_label(r), r["arch"])):
        status = "; ".join(problems(r)) or "ok"
        lines.append(f"| {_label(r)} | {r['arch']} | {r.get('registers', '?')} | {r.get('spill_stores', '?')} | "
                     f"{r.get('shared', 0) / 1024:.1f} | {r.get('mma', '?')} | {r.get('wgmma', '?')} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="record the variants (needs TRITON_INTERPRET=1)")
    rec.add_argument("out")
    rec.add_argument("--candidates", action="store_true", help="also every tile the GPU tuning chooses among")
    comp = sub.add_parser("compile", help="compile recorded variants (TRITON_INTERPRET unset)")
    comp.add_argument("variants")
    comp.add_argument("--arch", default="80,90")
    comp.add_argument("--subset", choices=("all", "representative", "tables+candidates"), default="all",
                      help="tables+candidates: every table-entry variant and the representative of each candidate")
    comp.add_argument("--out", required=True)
    comp.add_argument("--md")
    comp.add_argument("--jobs", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        variants = record(args.candidates)
        Path(args.out).write_text(json.dumps(variants, indent=1) + "\n")
        print(f"recorded {len(variants)} variants -> {args.out}")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check compile: unset TRITON_INTERPRET (the interpreter breaks compilation)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    variants = json.loads(Path(args.variants).read_text())
    if args.subset == "representative":
        variants = representative(variants)
    elif args.subset == "tables+candidates":
        variants = ([v for v in variants if not v.get("candidate")]
                    + representative([v for v in variants if v.get("candidate")]))
    archs = [int(a) for a in args.arch.split(",")]
    start = time.perf_counter()
    rows = compile_all(variants, archs, args.jobs)
    import triton
    meta = {"triton": triton.__version__, "variants": len(variants), "archs": archs, "subset": args.subset,
            "seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    bad = [(r, problems(r)) for r in rows if problems(r)]
    if args.md:
        Path(args.md).write_text(markdown(rows, meta))
    print(f"compiled {len(rows)} (variant, arch) pairs in {meta['seconds']} s; {len(bad)} with problems")
    for r, why in bad:
        print(f"  {_label(r)} sm_{r['arch']}: {'; '.join(why)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
