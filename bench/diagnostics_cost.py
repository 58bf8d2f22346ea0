"""What optimizer.diagnostics() and the per-step KL tracking cost.

    python bench/diagnostics_cost.py [--device cpu|cuda] [--steps 12] [--model tiny]
    python bench/diagnostics_cost.py --model tiny --steps 2   # smoke run

On one GPT-2-small layer's parameters ((768, 768) x 4, (3072, 768),
(768, 3072) and the biases), for each optimizer: the median step time, the
same with the per-step KL tracking replaced by a no-op (its overhead; the two
interleaved), the median time of one ``diagnostics()`` call (which the main
job makes every 50 steps), and for scale the time of a step that refreshes
the eigenbasis (Shampoo: its inverse roots). Side by side in one process.
Writes diagnostics_cost_<device>.json and .md into ``--out`` (default bench/out/;
``--out bench/results`` refreshes the committed files; ``--model tiny``: a smoke test's shapes,
written with a ``_tiny`` suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, median_ms, out_dir, utc_now  # noqa: E402
from klkern.algorithms import _functional, _tracking  # noqa: E402

SHAPES = {"gpt2-layer": [(768, 768)] * 4 + [(3072, 768), (768, 3072)] + [(768,)] * 4 + [(3072,), (768,)],
          "tiny": [(16, 16), (24, 8), (8,)]}  # tiny: the smoke test


def _optimizer(name: str, device, frequency: int, shapes: list):
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, device=device, generator=gen) * 0.02) for s in shapes]
    grads = [torch.randn(*s, device=device, generator=gen) * 1e-3 for s in shapes]
    opt = getattr(klkern, name)(params, precondition_frequency=frequency)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    opt.step()
    return opt


def measure(name: str, device, steps: int, shapes: list) -> dict:
    # precondition_frequency 1000: no refresh in the timed steps (its cost is the same either way)
    opt = _optimizer(name, device, 1000, shapes)
    # the two entry points of the tracking: track_kl_ as the torch path's building blocks call it,
    # kl_from_projection_ as the steady steps do
    saved = (_functional.track_kl_, _tracking.kl_from_projection_)

    def without_tracking():
        _functional.track_kl_ = lambda *a, **k: None
        _tracking.kl_from_projection_ = lambda *a, **k: None
        try:
            opt.step()
        finally:
            _functional.track_kl_, _tracking.kl_from_projection_ = saved

    # interleaved, so that the machine's drift falls on both alike
    with_kl, without_kl = [], []
    for _ in range(steps):
        with_kl.append(median_ms(opt.step, device, 1))
        without_kl.append(median_ms(without_tracking, device, 1))
    with_kl, without_kl = statistics.median(with_kl), statistics.median(without_kl)
    diag = median_ms(opt.diagnostics, device, max(3, steps // 2))
    # for scale: a step that refreshes the eigenbasis (Shampoo: the roots), what a refresh costs
    refreshing = median_ms(_optimizer(name, device, 1, shapes).step, device, 3)
    return {"optimizer": name, "step_ms": with_kl, "step_without_kl_tracking_ms": without_kl,
            "tracking_overhead": with_kl / without_kl - 1, "diagnostics_ms": diag,
            "diagnostics_over_step": diag / with_kl, "refreshing_step_ms": refreshing,
            "diagnostics_over_refreshing_step": diag / refreshing}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--model", choices=sorted(SHAPES), default="gpt2-layer")
    ap.add_argument("--out", default=str(out_dir()),
                    help="folder (default bench/out/; bench/results: the committed files)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(name, device, args.steps, SHAPES[args.model])
            for name in ("KLShampoo", "KLSOAP", "SOAP", "Shampoo")]
    commit = git_commit()
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    meta = {"device": name, "torch": torch.__version__, "commit": commit, "steps": args.steps, "model": args.model,
            "date": utc_now()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = ("cpu" if device.type == "cpu" else "cuda") + ("" if args.model == "gpt2-layer" else f"_{args.model}")
    (out / f"diagnostics_cost_{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# diagnostics() and KL tracking cost ({meta['device']})", "",
             f"- one GPT-2-small layer's parameters; torch {meta['torch']}; commit {commit}; {meta['date']}; "
             "`python bench/diagnostics_cost.py`; medians, side by side in one process (steps with and "
             f"without the tracking interleaved, {meta['steps']} each); a refreshing step: "
             "precondition_frequency=1 (for Shampoo, the inverse roots)", "",
             "| optimizer | step ms | step ms without KL tracking | tracking overhead | diagnostics() ms | "
             "diagnostics() / step | refreshing step ms | diagnostics() / refreshing step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['step_ms']:.1f} | {r['step_without_kl_tracking_ms']:.1f} | "
                     f"{100 * r['tracking_overhead']:+.1f}% | {r['diagnostics_ms']:.1f} | "
                     f"{r['diagnostics_over_step']:.2f} | {r['refreshing_step_ms']:.1f} | "
                     f"{r['diagnostics_over_refreshing_step']:.2f} |")
    (out / f"diagnostics_cost_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
