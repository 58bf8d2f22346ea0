"""Where a step's time goes on a GPU: torch.profiler over a few steps of each path.

    python bench/step_profile.py [--out DIR] [--optimizers KLShampoo,KLSOAP] [--precision high]
    python bench/step_profile.py --device cpu --model tiny     # smoke run (no GPU)

For each optimizer and path (torch, Triton) on step_bench's GPT-2-small
parameter set: the wall time of ``--steps`` profiled ordinary steps and of
one refreshing step, the device-busy fraction (summed kernel time over wall
time), kernel launches per step, host synchronisations per step
(cudaStreamSynchronize / cudaDeviceSynchronize / blocking copies) and the
kernels taking the most device time. Writes profile_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from step_bench import workload  # noqa: E402

import klkern  # noqa: E402
from bench._meta import git_commit, out_dir, sync, utc_now  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_EVENTS = ("cudaMemcpy", "cudaMemcpyAsync")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _profile(opt, params, grads, steps: int, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for p, g in zip(params, grads):
        p.grad = g
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()

    def count(names):
        return sum(e.count for e in events if e.key in names)

    def device_us(e):
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)

    kernels = [e for e in events if device_us(e) > 0 and e.device_type.name == "CUDA"] if device.type == "cuda" else []
    busy = sum(device_us(e) for e in kernels) / 1e3
    top = sorted(kernels, key=device_us, reverse=True)[:12]
    return {
        "wall_ms_per_step": wall / steps,
        "device_busy_ms_per_step": busy / steps,
        "launches_per_step": count(LAUNCH_EVENTS) / steps,
        "syncs_per_step": count(SYNC_EVENTS) / steps,
        "copies_per_step": count(COPY_EVENTS) / steps,
        "top": [{"kernel": e.key[:90], "ms_per_step": device_us(e) / 1e3 / steps, "calls_per_step": e.count / steps}
                for e in top],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", default="KLShampoo,KLSOAP")
    ap.add_argument("--precision", default="high")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", choices=("gpt2-small", "tiny"), default="gpt2-small")
    ap.add_argument("--out", default=str(out_dir()),
                    help="folder (default bench/out/; bench/results: the committed files)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    _, params, grads = workload(args.model, device, "step_profile.py")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)"
    # "graph": the torch path with klkern's own CUDA graph of the steady step (cuda_graph=True)
    backends = ["torch", "triton", "graph"] if device.type == "cuda" else ["torch"]
    rows = []
    for opt_name in args.optimizers.split(","):
        for backend in backends:
            work = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = getattr(klkern, opt_name)(work, backend="torch" if backend == "graph" else backend,
                                            matmul_precision=args.precision, precondition_frequency=1000,
                                            cuda_graph=backend == "graph")
            for _ in range(4 if backend == "graph" else 2):  # initialisation, compiling (and capturing)
                for p, gr in zip(work, grads):
                    p.grad = gr
                opt.step()
            row = {"optimizer": opt_name, "backend": backend, "steady": _profile(opt, work, grads, args.steps, device)}
            for group in opt.param_groups:  # the next step refreshes every eigenbasis
                group["precondition_frequency"] = 1
            row["refresh"] = _profile(opt, work, grads, 1, device)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("optimizer", "backend")}
                             | {"steady_ms": round(row["steady"]["wall_ms_per_step"], 2),
                                "refresh_ms": round(row["refresh"]["wall_ms_per_step"], 2)}), flush=True)
            del opt, work
    meta = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
            "date": utc_now(), "precision": args.precision, "steps": args.steps}
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Step profile, GPT-2-small parameter set, {name}", "",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), commit {meta['commit']}, {meta['date']}; "
             f"matmul precision {args.precision}; `python bench/step_profile.py`", "",
             "| optimizer | path | step | wall ms | device-busy ms | launches | host syncs | copies |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind in ("steady", "refresh"):
            s = r[kind]
            lines.append(f"| {r['optimizer']} | {r['backend']} | {kind} | {s['wall_ms_per_step']:.2f} | "
                         f"{s['device_busy_ms_per_step']:.2f} | {s['launches_per_step']:.0f} | "
                         f"{s['syncs_per_step']:.0f} | {s['copies_per_step']:.0f} |")
    for r in rows:
        for kind in ("steady", "refresh"):
            if r[kind]["top"]:
                lines += ["", f"## {r['optimizer']} {r['backend']} {kind}: top kernels", "",
                          "| kernel | ms per step | calls per step |", "|---|---|---|"]
                lines += [f"| `{t['kernel']}` | {t['ms_per_step']:.3f} | {t['calls_per_step']:.0f} |"
                          for t in r[kind]["top"]]
    (out / f"profile_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6 + 2 * len(rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
