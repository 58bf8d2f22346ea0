"""How accurate is each way of computing a product, against float64, on the operands a step multiplies.

    TRITON_INTERPRET=1 python bench/product_accuracy.py [--out DIR]   # the CPU (the kernels emulated)
    python bench/product_accuracy.py --device cuda [--out DIR]         # a GPU (the kernels themselves)

The kernels' product (triton_kernels/product.py) at every arithmetic: "highest" by 3xTF32
(split operands, three TF32 products) and by fp32 FMA ("ieee"), "high" (TF32 operands), "medium"
(bf16 operands), and torch's own fp32 product, each against the float64 product of the same fp32
operands. The operands are what a step and a refresh multiply: a factor whose eigenvalues span
1e-16..10 times a basis, the same factor rotated into that basis, a small network's weight
gradient times a basis, and that gradient's Gram matrix. Under the interpreter the kernels round
their operands as the GPU does (TF32: cvt.rna; bf16: to nearest even), so the CPU measures each
mode's rounding, up to the last bits of accumulation order. Writes
``product_accuracy_<device>.json``/``.md``: the largest error relative to the largest entry.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402


def operands(device: torch.device, d: int = 96, seed: int = 12) -> dict:
    """{case: (A, B)} in float64 (the cases of tests/test_triton.py's tf32x3 check)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=torch.float64))[0]
    factor = Q @ torch.diag_embed(torch.logspace(-16, 1, d, dtype=torch.float64).expand(2, d)) @ Q.mT
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(40, 96), torch.nn.Tanh(), torch.nn.Linear(96, 72))
    X = torch.randn(256, 40, generator=gen) * torch.logspace(-2, 1, 40)
    (net(X) - torch.randn(256, 72, generator=gen)).pow(3).abs().mean().backward()
    G = net[2].weight.grad.T.contiguous().double().unsqueeze(0)  # (1, 96, 72)
    cases = {"factor @ basis": (factor, basis), "basis^T factor @ basis": (basis.mT @ factor, basis),
             "gradient^T @ basis": (G.mT, basis[:1, :96]), "gradient^T @ gradient": (G.mT, G)}
    return {k: (a.float().to(device), b.float().to(device)) for k, (a, b) in cases.items()}


def errors(device: torch.device) -> list:
    from klkern import triton_kernels as K
    from klkern.runtime import _precision
    from klkern.triton_kernels import _config

    rows = []
    for case, (A, B) in operands(device).items():
        exact = A.double().cpu() @ B.double().cpu()
        scale = float(exact.abs().max())

        def err(C):
            return float((C.double().cpu() - exact).abs().max()) / scale

        row = {"case": case, "torch fp32": err(torch.bmm(A.cpu(), B.cpu()))}
        for label, dot, mode in (("3xTF32", "tf32x3", "highest"), ("fp32 FMA", "ieee", "highest"),
                                 ("TF32", None, "high"), ("bf16", None, "medium")):
            previous = _config.highest_dot(dot) if dot else None
            _precision.emulate_tf32_off_gpu(mode == "high")
            try:
                row[label] = err(K.batched_product(A, B, precision=mode))
            finally:
                _precision.emulate_tf32_off_gpu(False)
                if previous:
                    _config.highest_dot(previous)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(out_dir()))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("product_accuracy.py on the CPU runs the kernels in Triton's interpreter: "
                         "set TRITON_INTERPRET=1 (before Python starts)")
    import triton

    rows = errors(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
            "date": utc_now(), "emulated": device.type == "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if device.type == "cpu" else name.lower().replace(" ", "_")
    (out / f"product_accuracy_{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    labels = ["3xTF32", "fp32 FMA", "torch fp32", "TF32", "bf16"]
    lines = [f"# Product accuracy against float64 ({name}{', the kernels emulated' if meta['emulated'] else ''})",
             "", f"- torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, {meta['date']}; "
             f"`python bench/product_accuracy.py`",
             "- largest error over the largest entry of the float64 product of the same fp32 operands; "
             "3xTF32 and fp32 FMA are the kernels' two ways of computing \"highest\"", "",
             "| operands | " + " | ".join(labels) + " | 3xTF32 / fp32 FMA |", "|---" * (len(labels) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(f"{r[k]:.2e}" for k in labels)
                     + f" | {r['3xTF32'] / r['fp32 FMA']:.2f} |")
    (out / f"product_accuracy_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
