"""Turn pytest-benchmark JSON from bench/test_kernel_bench.py into a ratio table (Markdown).

    python bench/summarize_kernel_bench.py RESULT.json [--out RESULT.md]
"""

from __future__ import annotations

import json
import os
import re
import sys


def main(path: str) -> str:
    data = json.loads(open(path).read())
    med = {}
    for b in data["benchmarks"]:
        m = re.match(r"test_(\w+)\[(.+)\]", b["name"])
        op, params = m.group(1), m.group(2).split("-")
        impl = next((p for p in params if p in ("eager", "cublas", "triton", "triton_ieee")), "floor")
        mode = next((p for p in params if p in ("highest", "high", "medium")), "-")
        shape = next(p for p in params if "x" in p and p[0].isdigit())
        kind = next((p for p in params if p in ("kl", "adam")), None)
        if kind:
            op = f"{op} ({kind})"
        med[(mode, op, shape, "eager" if impl == "cublas" else impl)] = b["stats"]["median"] * 1e3
    machine = data.get("machine_info", {})
    # bench/conftest.py records the GPU, versions and klkern's commit (pytest-benchmark's own
    # commit_info reads the .git of wherever it ran, which a copied tree may not have right).
    klkern_info = machine.get("klkern", {})
    commit = klkern_info.get("commit") or data.get("commit_info", {}).get("id", "unknown")[:10]
    lines = [f"# Fused-operation microbenchmarks ({klkern_info.get('device', machine.get('gpu', 'device unknown'))})",
             "",
             f"- source: {os.path.basename(path)}; datetime {data.get('datetime', '')}; commit {commit}; "
             f"torch {klkern_info.get('torch', '?')}, triton {klkern_info.get('triton', '?')}",
             "- median of 10 synchronised calls, one call = one stack of B same-shape blocks; the torch "
             "reference (eager; cuBLAS for the plain product) and the kernel at the same matmul precision; "
             "at \"highest\" the kernel by 3xTF32 (triton) and by fp32 FMA (triton ieee)", "",
             "| precision | operation | B x m x n | eager ms | triton ms | speedup | triton ieee ms | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for (mode, op, shape, impl), t in sorted(med.items()):
        if impl != "eager":
            continue
        tri = med.get((mode, op, shape, "triton"))
        ieee = med.get((mode, op, shape, "triton_ieee"))
        if tri:
            last = f" {ieee:.3f} | {t / ieee:.2f} |" if ieee else " | |"
            lines.append(f"| {mode} | {op} | {shape} | {t:.3f} | {tri:.3f} | {t / tri:.2f} |{last}")
    for (mode, op, shape, impl), t in sorted(med.items()):
        if impl == "floor":
            lines.append(f"| {mode} | GEMM floor (6 products) | {shape} | {t:.3f} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = main(sys.argv[1])
    if len(sys.argv) == 4 and sys.argv[2] == "--out":
        with open(sys.argv[3], "w") as fh:
            fh.write(text)
    print(text, end="")
