"""CPU step benchmark on GPT-2-small block shapes: klkern vs reference.py.

    python bench/cpu_step.py [--steps 10] [--threads N] [--out bench/results/cpu_step.md]

For each optimizer (KL-Shampoo, KL-SOAP, SOAP, Shampoo) the klkern optimizer
and its literal reference.py transcription step the same parameter set,
(768, 768) x 4, (3072, 768) and (768, 3072) (one GPT-2-small layer's
attention and MLP matrices), side by side in one process. Reported per
optimizer: median and mean step time over ``--steps`` timed steps (with
precondition_frequency 10 and 10 timed steps, one of them is a refresh, so
the mean includes the amortised QR/eigendecomposition), the klkern/reference
ratio of each, and the optimizer state in bytes. The first step (the
initialisation step) and one more warm-up step are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import klkern  # noqa: E402
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402
from klkern import reference  # noqa: E402
from klkern.engine._optimizer import tensor_bytes  # noqa: E402

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
PAIRS = [
    ("KL-Shampoo", klkern.KLShampoo, reference.ReferenceKLShampoo),
    ("KL-SOAP", klkern.KLSOAP, reference.ReferenceKLSOAP),
    ("SOAP", klkern.SOAP, reference.ReferenceSOAP),
    ("Shampoo", klkern.Shampoo, reference.ReferenceShampoo),
]


def state_bytes(opt) -> int:
    return tensor_bytes(opt.state)


def time_optimizer(cls, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in SHAPES]
    grads = [[torch.randn(*s, generator=g) * 1e-3 for s in SHAPES] for _ in range(3)]
    opt = cls(params)
    times = []
    for i in range(steps + 2):
        for p, gr in zip(params, grads[i % 3]):
            p.grad = gr
        start = time.perf_counter()
        opt.step()
        elapsed = time.perf_counter() - start
        if i >= 2:  # skip the initialisation step and one warm-up step
            times.append(elapsed)
    return times, state_bytes(opt)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma list of optimizer names to run")
    parser.add_argument("--out", default=str(out_dir() / "cpu_step.md"),
                        help="result file (default bench/out/; bench/results/cpu_step.md is the committed one)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = None if args.only is None else {s.strip().lower() for s in args.only.split(",")}
    param_bytes = sum(a * b * 4 for a, b in SHAPES)
    rows = []
    for name, fast_cls, ref_cls in PAIRS:
        if wanted is not None and name.lower() not in wanted:
            continue
        fast_times, fast_bytes = time_optimizer(fast_cls, args.steps)
        ref_times, ref_bytes = time_optimizer(ref_cls, args.steps)
        row = dict(
            optimizer=name,
            klkern_median_ms=1e3 * statistics.median(fast_times),
            reference_median_ms=1e3 * statistics.median(ref_times),
            klkern_mean_ms=1e3 * statistics.fmean(fast_times),
            reference_mean_ms=1e3 * statistics.fmean(ref_times),
            klkern_state_bytes=fast_bytes,
            reference_state_bytes=ref_bytes,
        )
        row["median_ratio"] = row["klkern_median_ms"] / row["reference_median_ms"]
        row["mean_ratio"] = row["klkern_mean_ms"] / row["reference_mean_ms"]
        rows.append(row)
        print(
            f"{name:10s} klkern {row['klkern_median_ms']:8.1f} ms  reference {row['reference_median_ms']:8.1f} ms  "
            f"ratio {row['median_ratio']:.2f} (mean ratio {row['mean_ratio']:.2f})  state {fast_bytes / 2**20:.1f} MiB",
            flush=True,
        )

    meta = dict(
        date=utc_now(),
        commit=git_commit(),
        device=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cores",
        torch=torch.__version__,
        python=platform.python_version(),
        shapes=SHAPES,
        timed_steps=args.steps,
        param_bytes=param_bytes,
    )
    lines = [
        "# CPU step benchmark: klkern vs reference.py (GPT-2-small block shapes)",
        "",
        f"- date: {meta['date']}; commit: {meta['commit']}",
        f"- device: {meta['device']}; torch {meta['torch']}; python {meta['python']}",
        f"- parameters: (768, 768) x 4, (3072, 768), (768, 3072), float32 ({param_bytes / 2**20:.1f} MiB)",
        f"- {args.steps} timed steps after the initialisation step and one warm-up step; "
        "precondition_frequency 10 (the mean includes one refresh); command: `python bench/cpu_step.py`",
        "",
        "| optimizer | klkern median ms | reference median ms | median ratio | klkern mean ms | reference mean ms "
        "| mean ratio | klkern state MiB | state - params MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['klkern_median_ms']:.1f} | {r['reference_median_ms']:.1f} | "
            f"{r['median_ratio']:.2f} | {r['klkern_mean_ms']:.1f} | {r['reference_mean_ms']:.1f} | "
            f"{r['mean_ratio']:.2f} | {r['klkern_state_bytes'] / 2**20:.2f} | "
            f"{(r['klkern_state_bytes'] - param_bytes) / 2**20:.2f} |"
        )
    by_name = {r["optimizer"]: r for r in rows}
    if "KL-Shampoo" in by_name and "SOAP" in by_name:
        saved = by_name["SOAP"]["klkern_state_bytes"] - by_name["KL-Shampoo"]["klkern_state_bytes"]
        lines += [
            "",
            f"KL-Shampoo state is smaller than SOAP's by {saved} bytes = {saved / param_bytes:.4f} x the "
            f"parameters' size ({param_bytes} bytes): SOAP's second moment minus KL-Shampoo's eigenvalue "
            "vectors (m + n floats per block).",
        ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=2)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
