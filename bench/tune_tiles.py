"""Choose each kernel's tiles on the GPU: time every candidate, keep the fastest per size class.

    python bench/tune_tiles.py [--out DIR] [--budget SECONDS] [--dots tf32x3,tf32,bf16,ieee]
    python bench/tune_tiles.py --device cpu --kernels product --dots tf32   # smoke run (interpreter, no GPU)

On a GPU. For each fused operation (triton_kernels/: product, rotate, precondition, factor_ema),
each product arithmetic (``DOT``) and each size class of its tile table (sizes below 1024, and
1024 and up), every candidate of triton_kernels/_config.py's ``CANDIDATES`` (each compiled for
sm_80 and sm_90 without spills by the slow compile test) is timed on a GPT-2-small-sized stack
(12 blocks of 768 x 768, or 2048 x 2048 for the large class; the factor EMA on 768- and
2048-wide factors), median of triton.testing.do_bench's timings, with the operation's heaviest
epilogue (KL-SOAP's rotation: Gr, m, v, the projections and the direction; the parameter write).
Writes ``tiles_<device>.json`` under ``--out``: the device, its compute capability, versions,
commit and date, every timing, and ``tables`` ({kernel: {dot: [[least size, config], ...]}}),
which ``python bench/gpu_suite.py decide`` carries into klkern/runtime/_gpu_decisions.py for the
kernels to use on that device. A run cut by ``--budget`` lists what it did not time (``not_run``)
and tables only for what it finished. ``--device cpu`` runs the same pipeline under Triton's
interpreter on tiny stacks (the interpreter's own tiles: its timings choose nothing), to check it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402

# (least size of the class, the stack timed): the tables' two classes
CLASSES = {"product": ((0, (12, 768, 768)), (1024, (12, 2048, 2048))),
           "rotate": ((0, (12, 768, 768)), (1024, (12, 2048, 2048))),
           "precondition": ((0, (12, 768, 768)), (1024, (12, 2048, 2048))),
           "factor_ema": ((0, (12, 768, 768)), (1024, (12, 2048, 2048)))}
DOT_PRECISION = {"tf32x3": "highest", "ieee": "highest", "tf32": "high", "bf16": "medium"}


# the smoke run's stacks (the interpreter runs about a millisecond per program)
SMOKE_CLASSES = ((0, (1, 32, 32)), (1024, (1, 48, 48)))


def operation(kernel: str, shape: tuple, dot: str, dev: torch.device):
    """A function running ``kernel`` once on a stack of ``shape`` at ``dot`` (inputs made once)."""
    from klkern import triton_kernels as K

    B, m, n = shape
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*s):
        return torch.randn(*s, device=dev, generator=gen)

    precision = DOT_PRECISION[dot]
    G, Qa, Qb = rand(B, m, n) * 1e-3, rand(B, m, m) / m**0.5, rand(B, n, n) / n**0.5
    betas = torch.full((B,), 0.95, device=dev)
    keep = torch.ones(B, dtype=torch.bool, device=dev)
    if kernel == "product":
        return lambda: K.batched_product(G, Qb, precision=precision)
    if kernel == "rotate":
        M, V, X = rand(B, m, n), rand(B, m, n).abs(), torch.empty(B, m, n, device=dev)
        w = (torch.rand(B, m, device=dev) + 0.1, torch.rand(B, n, device=dev) + 0.1)
        return lambda: K.rotate(G, Qa, Qb, keep, projection=w, adam=(M, betas, V, betas), betas=(0.05, 0.05),
                                eps=1e-8, direction=X, precision=precision)
    if kernel == "precondition":
        W = rand(B, m, n)
        table = K.ParamTable(list(W.unbind(0)))
        live = (torch.ones(B, m, device=dev), torch.ones(B, n, device=dev))
        return lambda: K.precondition(G, Qa, Qb, live=live, params=table, update=betas * -1e-3,
                                      decay=betas * -1e-5, precision=precision)
    R = rand(B, m, m)
    R = R + R.mT
    w = torch.rand(B, n, device=dev) + 0.1
    return lambda: K.factor_ema_(R, G, w, betas, 0.05 / n, keep=keep, precision=precision)


def time_candidate(kernel: str, shape: tuple, dot: str, cfg: dict, dev: torch.device) -> float:
    """Median ms of the operation with ``kernel``'s tiles forced to ``cfg``."""
    from klkern.triton_kernels import _config

    fn = operation(kernel, shape, dot, dev)
    with _config.forced_tiles(kernel, cfg):
        fn()  # compile
        if dev.type != "cuda":  # the interpreter: triton's do_bench needs a GPU
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        import triton

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(out_dir()))
    ap.add_argument("--budget", type=float, default=0.0, help="seconds: time no candidate past this (0: no limit)")
    ap.add_argument("--dots", default="tf32x3,tf32,bf16,ieee")
    ap.add_argument("--kernels", default=",".join(CLASSES))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune_tiles.py needs a CUDA GPU (bench/gpu_suite.sh runs it there), or --device cpu "
                         "for a smoke run")
    if dev.type == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import triton

    from klkern.runtime._decisions import device_key
    from klkern.triton_kernels import _config

    if dev.type == "cuda":
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
    else:
        name, major, minor = f"cpu ({platform.machine()}, smoke run)", 0, 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tiles_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json"
    result = {"device": name, "device_key": device_key(name), "capability": f"{major}.{minor}",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "commit": git_commit(), "date": utc_now(), "timings": [], "tables": {}, "not_run": []}
    started = time.monotonic()
    last = 0.0
    for kernel in args.kernels.split(","):
        for dot in args.dots.split(","):
            table = []
            classes = CLASSES[kernel] if dev.type == "cuda" else SMOKE_CLASSES
            for least, shape in classes:
                best = None
                for cfg in _config.CANDIDATES[kernel][dot]:
                    label = f"{kernel} {dot} {least} {json.dumps(cfg, sort_keys=True)}"
                    if args.budget and time.monotonic() - started + last > args.budget:
                        result["not_run"].append(label)
                        continue
                    t0 = time.monotonic()
                    try:
                        ms = time_candidate(kernel, shape, dot, cfg, dev)
                    except Exception as err:  # noqa: BLE001 - a candidate that fails here is not chosen
                        result["timings"].append({"kernel": kernel, "dot": dot, "class": least, "shape": shape,
                                                  "tiles": cfg, "error": f"{type(err).__name__}: {err}"[:300]})
                        continue
                    last = time.monotonic() - t0
                    result["timings"].append({"kernel": kernel, "dot": dot, "class": least, "shape": shape,
                                              "tiles": cfg, "ms": ms})
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is not None:
                    table.append([least, best[1]])
                    print(f"{kernel:13s} {dot:7s} >= {least:5d}: {best[0]:.3f} ms {best[1]}", flush=True)
            if len(table) == len(classes):  # a table only where every class was measured
                result["tables"].setdefault(kernel, {})[dot] = table
            path.write_text(json.dumps(result, indent=1) + "\n")
    summary = [f"# Tiles tuned on {name} (capability {major}.{minor})", "",
               f"- torch {torch.__version__}, triton {triton.__version__}, commit {result['commit']}, {result['date']}",
               "", "| kernel | dot | size class | tiles | median ms | default ms |", "|---|---|---|---|---|---|"]
    for kernel, dots in result["tables"].items():
        for dot, table in dots.items():
            for least, cfg in table:
                ms = [t["ms"] for t in result["timings"] if t.get("ms") is not None and t["kernel"] == kernel
                      and t["dot"] == dot and t["class"] == least]
                default = next((t["ms"] for t in result["timings"] if t.get("ms") is not None
                                and t["kernel"] == kernel and t["dot"] == dot and t["class"] == least
                                and t["tiles"] == _config.pick_tiles(kernel, dot, max(least, 1))), None)
                summary.append(f"| {kernel} | {dot} | >= {least} | {json.dumps(cfg, sort_keys=True)} | "
                               f"{min(ms) if ms else float('nan'):.3f} | "
                               f"{f'{default:.3f}' if default is not None else '-'} |")
    path.with_suffix(".md").write_text("\n".join(summary) + "\n")
    print(f"tune_tiles: {len(result['timings'])} timings -> {path}" +
          (f"; not run (budget): {len(result['not_run'])}" if result["not_run"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
