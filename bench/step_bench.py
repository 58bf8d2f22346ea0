"""Whole-step GPU benchmark: KL-Shampoo (and the others) on a GPT-2-small (124M) parameter set.

    python bench/step_bench.py [--steps 20] [--out bench/results]

For each optimizer, the torch path and the Triton path step the same 124M
parameter set (12 layers of (2304, 768), (768, 768), (3072, 768),
(768, 3072) weights, biases and LayerNorms, position embeddings (1024, 768),
token embeddings (50257, 768) which take the AdamW path) with random
gradients, side by side in one process. Reported: median and mean step
time over ``--steps`` timed steps (precondition_frequency 10: the mean
includes refreshes), their ratio, peak memory above the parameters and
gradients during a step, and the "GEMM floor": cuBLAS time (TF32 off) of
the six matrix products per preconditioned block that a step cannot avoid.
Writes ``gpu_step_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False


def gpt2_small_shapes():
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,),
                   (3072, 768), (3072,), (768, 3072), (768,)]
    return shapes + [(768,), (768,)]


def time_steps(opt, params, grads, steps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(steps + 2):
        for p, g in zip(params, grads):
            p.grad = g
        torch.cuda.synchronize()
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # the initialisation step and one warm-up (kernel compilation) step
            times.append(start.elapsed_time(end))
    return times


def gemm_floor_ms(shapes, reps=5):
    """cuBLAS time of the 6 unavoidable products per 2-D preconditioned block, stacked per shape."""
    groups = {}
    for s in shapes:
        if len(s) == 2 and max(s) <= 10000:
            groups[s] = groups.get(s, 0) + 1
    tensors = []
    for (m, n), B in groups.items():
        tensors.append([torch.randn(B, m, n, device="cuda"), torch.randn(B, m, m, device="cuda"),
                        torch.randn(B, n, n, device="cuda")])

    def run():
        for G, Qa, Qb in tensors:
            Gr = Qa.mT @ (G @ Qb)
            torch.bmm(Gr, Gr.mT)
            torch.bmm(Gr.mT, Gr)
            Qa @ (Gr @ Qb.mT)

    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--optimizers", default="KLShampoo,KLSOAP,SOAP,Shampoo")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_bench.py needs a CUDA GPU (run bench/gpu_suite.sh on a GPU machine)")
    shapes = gpt2_small_shapes()
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, device="cuda", generator=g) * 0.02) for s in shapes]
    grads = [torch.randn(*s, device="cuda", generator=g) * 1e-3 for s in shapes]
    n_params = sum(p.numel() for p in params)
    rows = []
    for name in args.optimizers.split(","):
        row = {"optimizer": name}
        for backend in ("torch", "triton"):
            work = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = getattr(klkern, name)(work, backend=backend)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = time_steps(opt, work, grads, args.steps)
            row[f"{backend}_median_ms"] = statistics.median(times)
            row[f"{backend}_mean_ms"] = statistics.fmean(times)
            row[f"{backend}_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row[f"{backend}_state_mib"] = opt.state_bytes() / 2**20
            del opt, work
            torch.cuda.empty_cache()
        row["speedup_median"] = row["torch_median_ms"] / row["triton_median_ms"]
        row["speedup_mean"] = row["torch_mean_ms"] / row["triton_mean_ms"]
        rows.append(row)
        print(row, flush=True)
    floor = gemm_floor_ms(shapes)
    for row in rows:
        row["triton_over_floor"] = row["triton_median_ms"] / floor
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "params": n_params, "steps": args.steps, "gemm_floor_ms": floor}
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_step_{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Whole-step benchmark, GPT-2-small parameter set ({n_params / 1e6:.1f}M), {meta['device']}", "",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, commit {commit}, "
             f"{meta['date']}; {args.steps} timed steps, precondition_frequency 10",
             f"- GEMM floor (6 products per 2-D block, cuBLAS fp32, TF32 off): {floor:.2f} ms", "",
             "| optimizer | torch median ms | triton median ms | speedup (median) | speedup (mean) | "
             "triton / GEMM floor | peak extra MiB torch | peak extra MiB triton |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['torch_median_ms']:.2f} | {r['triton_median_ms']:.2f} | "
                     f"{r['speedup_median']:.2f} | {r['speedup_mean']:.2f} | {r['triton_over_floor']:.2f} | "
                     f"{r['torch_peak_extra_mib']:.0f} | {r['triton_peak_extra_mib']:.0f} |")
    (out / f"gpu_step_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
