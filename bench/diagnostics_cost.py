"""What optimizer.diagnostics() and the per-step KL tracking cost.

    python bench/diagnostics_cost.py [--device cpu|cuda] [--steps 6]

On one GPT-2-small layer's parameters ((768, 768) x 4, (3072, 768),
(768, 3072) and the biases), for each optimizer: the median step time, the
same with the per-step KL tracking replaced by a no-op (its overhead), and the
median time of one ``diagnostics()`` call (which the main job makes every 50
steps). Side by side in one process. Writes
bench/results/diagnostics_cost_<device>.json and .md.
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
import klkern  # noqa: E402
from bench._meta import git_commit, median_ms, utc_now  # noqa: E402
from klkern import _functional  # noqa: E402

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)] + [(768,)] * 4 + [(3072,), (768,)]


def measure(name: str, device, steps: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, device=device, generator=gen) * 0.02) for s in SHAPES]
    grads = [torch.randn(*s, device=device, generator=gen) * 1e-3 for s in SHAPES]
    # precondition_frequency 1000: no refresh in the timed steps (its cost is the same either way)
    opt = getattr(klkern, name)(params, precondition_frequency=1000)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    opt.step()
    with_kl = median_ms(opt.step, device, steps)
    saved = (_functional.track_kl_, _functional.kl_from_projection_)
    _functional.track_kl_ = lambda *a, **k: None
    _functional.kl_from_projection_ = lambda *a, **k: None
    try:
        without_kl = median_ms(opt.step, device, steps)
    finally:
        _functional.track_kl_, _functional.kl_from_projection_ = saved
    diag = median_ms(opt.diagnostics, device, max(3, steps // 2))
    return {"optimizer": name, "step_ms": with_kl, "step_without_kl_tracking_ms": without_kl,
            "tracking_overhead": with_kl / without_kl - 1, "diagnostics_ms": diag,
            "diagnostics_over_step": diag / with_kl}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(name, device, args.steps) for name in ("KLShampoo", "KLSOAP", "SOAP", "Shampoo")]
    commit = git_commit()
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    meta = {"device": name, "torch": torch.__version__, "commit": commit, "steps": args.steps,
            "date": utc_now()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if device.type == "cpu" else "cuda"
    (out / f"diagnostics_cost_{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# diagnostics() and KL tracking cost ({meta['device']})", "",
             f"- one GPT-2-small layer's parameters; torch {meta['torch']}; commit {commit}; {meta['date']}; "
             "`python bench/diagnostics_cost.py`; medians, side by side in one process", "",
             "| optimizer | step ms | step ms without KL tracking | tracking overhead | diagnostics() ms | "
             "diagnostics() / step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['step_ms']:.1f} | {r['step_without_kl_tracking_ms']:.1f} | "
                     f"{100 * r['tracking_overhead']:+.1f}% | {r['diagnostics_ms']:.1f} | "
                     f"{r['diagnostics_over_step']:.2f} |")
    (out / f"diagnostics_cost_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
