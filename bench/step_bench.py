"""Whole-step GPU benchmark on a GPT-2-small (124M) parameter set, at every matmul precision.

    python bench/step_bench.py [--steps 20] [--precisions highest,high,medium] [--out DIR]
    python bench/step_bench.py --device cpu --model tiny --steps 2   # smoke run (interpreter, no GPU)
    python bench/step_bench.py --count                                # what a GPU pays, counted on the CPU

``--count`` (no GPU needed, a few minutes on 2 cores): per optimizer, precision and path (torch;
kernels, the Triton path as a GPU launches it) one line with the launches, host reads and bytes a
steady step of the GPT-2-small set moves, split into the products' own operands and results and
everything else (element-wise, reduction, copy and cast operations, and what the kernels' prologues
and epilogues move besides their products): klkern.tools._dispatch.DispatchCounter(dry=True),
which counts at full size without computing the products. Writes ``count_<device>.json``/``.md``.

For each matmul precision (SPEC "Precision": "highest" true fp32, "high"
TF32, "medium" bf16 operands) and each optimizer, the torch path and the
Triton path step the same parameter set (12 layers of (2304, 768),
(768, 768), (3072, 768), (768, 3072) weights, biases and LayerNorms,
position embeddings (1024, 768); token embeddings (50257, 768), which take
the AdamW path, or for SOAP an unrotated 50257 side) with random gradients,
side by side in one process, at the same precision, and (on CUDA) the torch path
with klkern's own CUDA graph of the steady step (``cuda_graph=True``). Reported per row:
median and mean step time over ``--steps`` timed steps (precondition
frequency 10: the mean includes refreshes), the Triton/torch speedup, the
achieved TFLOP/s of the step's matrix products (counted from the shapes: per
preconditioned mode of size d of a block of N entries, 2 N d for each
rotation, each rotation back and each factor product; refreshes not counted)
against the device's peak at that precision, peak memory above the
parameters and gradients, and the cuBLAS time of the same products at the
same precision (the "GEMM floor"), and the aten operations one steady step dispatches
(each a launch when it computes) and the values it reads back to the host
(klkern.tools._dispatch.DispatchCounter, counted once per row on the torch path). A second table times
``precondition_frequency=1`` (an eigenbasis refresh every step, the setting of
recent KL-SOAP speedrun records), and a third the refresh of the KL optimizers at the middle
precision: the step that refreshes every basis against the steady step and against the
refresh's products through cuBLAS, the amortised step, and the largest and mean step with
``stagger_refresh=True``. ``--qr-method`` picks the refreshes' QR
(klkern.linalg.preferred_qr_method). Writes ``step_<device>.json`` and ``.md``
under ``--out`` as each table completes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, median_ms, out_dir, sync, utc_now  # noqa: E402
from klkern import linalg  # noqa: E402
from klkern.algorithms._blocking import plan_for  # noqa: E402
from klkern.runtime import _precision  # noqa: E402
from klkern.tools._dispatch import DispatchCounter  # noqa: E402

# Dense peak TFLOP/s per precision (vendor data sheets; fp32 = FMA units, no sparsity).
PEAKS = {
    "H100 SXM": {"highest": 67.0, "high": 494.7, "medium": 989.4},
    "H100 PCIe": {"highest": 51.2, "high": 378.0, "medium": 756.0},
    "H200": {"highest": 67.0, "high": 494.7, "medium": 989.4},
    "A100": {"highest": 19.5, "high": 156.0, "medium": 312.0},
}


def device_peaks(name: str) -> dict | None:
    if "H200" in name:
        return PEAKS["H200"]
    if "H100" in name:
        return PEAKS["H100 PCIe"] if "PCIe" in name else PEAKS["H100 SXM"]
    if "A100" in name:
        return PEAKS["A100"]
    return None


def tiny_shapes():
    """A few small blocks (aligned, unaligned, a bias) for the CPU smoke run."""
    return [(32, 32), (32,), (20, 24), (48, 32)]


def gpt2_small_shapes(layers: int = 12):
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(layers):
        shapes += [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,),
                   (3072, 768), (3072,), (768, 3072), (768,)]
    return shapes + [(768,), (768,)]


def workload(model: str, device: torch.device, script: str, layers: int = 12):
    """(shapes, parameters, gradients) of ``model`` ("gpt2-small", with ``layers`` layers, or
    "tiny") on ``device``, seeded; a clear exit when CUDA is asked for and absent."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU (run bench/gpu_suite.sh on a GPU machine), "
                         "or --device cpu for a smoke run")
    shapes = gpt2_small_shapes(layers) if model == "gpt2-small" else tiny_shapes()
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, device=device, generator=g) * 0.02) for s in shapes]
    grads = [torch.randn(*s, device=device, generator=g) * 1e-3 for s in shapes]
    return shapes, params, grads


def step_flops(opt) -> float:
    """Matrix-product FLOPs of one (non-refresh) step, from the block plans of ``opt``."""
    total = 0.0
    per_mode = 4.0 if opt.algorithm == "shampoo" else 6.0  # products of 2 N d per preconditioned mode
    for group in opt.param_groups:
        for p in group["params"]:
            plan = plan_for(p.shape, group)
            if plan.adamw:
                continue
            for block, mask in zip(plan.extract(p.detach()), plan.masks):
                n = block.numel()
                total += sum(per_mode * n * d for d, on in zip(block.shape, mask) if on)
    return total


def time_steps(opt, params, grads, steps, warmup=2):
    """Wall times (ms) of ``steps`` steps after ``warmup`` untimed ones (the initialisation, if
    the optimizer has not stepped, and one that compiles the kernels)."""
    device = params[0].device
    times = []
    for i in range(steps + warmup):
        for p, g in zip(params, grads):
            p.grad = g
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def gemm_floor_ms(shapes, mode, device, reps=5):
    """cuBLAS time of the 6 products per 2-D preconditioned block at ``mode`` (operand casts
    included, as the torch path does them), stacked per shape."""
    groups = {}
    for s in shapes:
        if len(s) == 2 and max(s) <= 10000:
            groups[s] = groups.get(s, 0) + 1
    tensors = [[torch.randn(B, m, n, device=device), torch.randn(B, m, m, device=device),
                torch.randn(B, n, n, device=device)] for (m, n), B in groups.items()]
    mm = _precision.bmm

    def run():
        for G, Qa, Qb in tensors:
            Gr = mm(Qa.mT, mm(G, Qb, mode), mode)
            mm(Gr, Gr.mT, mode)
            mm(Gr.mT, Gr, mode)
            mm(Qa, mm(Gr, Qb.mT, mode), mode)

    with _precision.torch_precision("highest"):
        run()
        return median_ms(run, device, reps)


def refresh_floor_ms(name, mode, params, device, reps=3):
    """cuBLAS time (float32 at "highest", as the refresh runs them) of the three d^3 products a
    refresh does per preconditioned factor (``Q V``, ``V^T R``, ``(V^T R) V``; linalg.power_step),
    stacked per factor size; the QR itself is not included (bench/qr_bench.py times it)."""
    opt = getattr(klkern, name)([torch.nn.Parameter(p.detach()) for p in params], backend="torch",
                                matmul_precision=mode)
    sizes: dict = {}
    for group in opt.param_groups:
        for p in group["params"]:
            plan = plan_for(p.shape, group)
            if plan.adamw:
                continue
            for i, mask in enumerate(plan.masks):
                for d, on in zip(plan.block_shape(i), mask):
                    if on:
                        sizes[d] = sizes.get(d, 0) + 1
    del opt
    tensors = [(torch.randn(B, d, d, device=device), torch.randn(B, d, d, device=device))
               for d, B in sizes.items()]

    def run():
        for Q, V in tensors:
            torch.bmm(Q, V)
            torch.bmm(torch.bmm(V.mT, Q), V)

    with _precision.torch_precision("highest"):
        run()
        return median_ms(run, device, reps), sizes


_INITIALISED: dict = {}


def initialised(name, mode, params, grads, **kw):
    """(parameters, state dict) of ``name`` after its first step (the initialisation: every
    factor's eigendecomposition, seconds on a GPT-2-small set), computed once and loaded by every
    measurement it serves. The KL optimizers' and SOAP's first step only initialises, in fp32,
    whatever the path and precision; Shampoo's first step is an update (its key has the precision)."""
    key = (name, mode if name == "Shampoo" else None, tuple(sorted(kw.items())))
    if key not in _INITIALISED:
        work = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = getattr(klkern, name)(work, backend="torch", matmul_precision=mode, **kw)
        for p, g in zip(work, grads):
            p.grad = g
        opt.step()
        _INITIALISED[key] = ([p.detach().clone() for p in work], copy.deepcopy(opt.state_dict()))
        del opt, work
    return _INITIALISED[key]


def count_dispatches(opt, params, grads) -> dict:
    """Aten operations and host reads of one steady step (after a warm-up step)."""
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g
        if _ == 0:
            opt.step()
    with DispatchCounter() as counter:
        opt.step()
    return {"ops": counter.total, "host_reads": counter.host_reads}


_DRY: dict = {}


def dry_state(name, params, grads):
    """(parameters, state dict) of ``name`` after its initialisation, made without computing its
    products or eigendecompositions (DispatchCounter(dry=True)): the state's shapes and dtypes are
    a real run's, its values are not (a count needs only the former)."""
    if name not in _DRY:
        work = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = getattr(klkern, name)(work, backend="torch")
        with DispatchCounter(dry=True):
            for p, g in zip(work, grads):
                p.grad = g
            opt.step()
        # no copy: a count reads shapes and dtypes, and the optimizers loading it may share its tensors
        _DRY[name] = ([p.detach() for p in work], opt.state_dict())
        del opt, work
    return _DRY[name]


def count_step(name, backend, mode, params, grads, **kw) -> dict:
    """Launches, host reads and bytes of one steady step at full size, counted without a GPU (the
    products not computed, the kernels recorded as a GPU launches them: DispatchCounter(dry=True))."""
    start, state = dry_state(name, params, grads)
    work = [torch.nn.Parameter(p.clone()) for p in start]
    opt = getattr(klkern, name)(work, backend=backend, matmul_precision=mode, **kw)
    settings = [dict(g) for g in opt.param_groups]
    opt.load_state_dict(state)  # shared with the other counts: their values do not matter
    for group, own in zip(opt.param_groups, settings):
        group.update({k: v for k, v in own.items() if k != "params"})
    for _ in range(3):  # the first update, a step with the plan as it stays (kernels proven), the counted one
        for p, g in zip(work, grads):
            p.grad = g
        with DispatchCounter(dry=True) as counter:
            opt.step()
    top = [(k, round(v / 1e9, 3)) for k, v in counter.op_bytes.most_common(8)]
    return {"optimizer": name, "precision": mode, "path": "torch" if backend == "torch" else "kernels",
            "launches": counter.launches, "aten_ops": counter.total, "kernels": sum(counter.kernels.values()),
            "host_reads": counter.host_reads, "gb_other": counter.bytes["other"] / 1e9,
            "gb_product": counter.bytes["product"] / 1e9, "gb_total": counter.gigabytes, "top": top}


def count_main(args) -> None:
    """``--count``: one line per optimizer, precision and path; count_<device>.json/.md."""
    if args.device == "cpu":
        # the kernel path on CPU tensors, recorded as a GPU launches it (nothing executes, so an
        # interpreter that cannot run kernels here does not matter)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from klkern.runtime import _backend

        _backend.interpreter_problem = lambda: None
    device = torch.device(args.device)
    shapes, params, grads = workload(args.model, device, "step_bench.py")
    meta = meta_info(args, sum(p.numel() for p in params), device)
    meta["device"] = f"{args.device} (counted, dry: a GPU's launches and bytes)"
    rows = []
    print(f"{'optimizer':10s} {'precision':8s} {'path':8s} {'launches':>8s} {'reads':>5s} {'GB other':>8s} "
          f"{'GB products':>11s} {'GB total':>8s}")
    for name in args.optimizers.split(","):
        _DRY.clear()  # one optimizer's initialised state at a time (each is GBs at this size)
        for mode in args.precisions.split(","):
            for backend in ("torch", "triton"):
                row = count_step(name, backend, mode, params, grads)
                rows.append(row)
                print(f"{name:10s} {mode:8s} {row['path']:8s} {row['launches']:8d} {row['host_reads']:5d} "
                      f"{row['gb_other']:8.2f} {row['gb_product']:11.2f} {row['gb_total']:8.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "count_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# What a steady step moves, counted without a GPU (GPT-2-small parameter set, "
             f"{meta['params'] / 1e6:.1f}M)", "",
             f"- torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, {meta['date']}; "
             "`python bench/step_bench.py --count`",
             "- launches: aten operations that compute plus kernel launches; other: element-wise, reduction, "
             "copy and cast bytes and what kernels move besides their products' operands and results; "
             "products: the products' operands and results (each once); GB/s-bound time at 4.8 TB/s",
             "- torch path as dispatched on the CPU (its \"medium\" products round operands in two casts "
             "where CUDA casts once)", "",
             "| optimizer | precision | path | launches | host reads | GB other | GB products | GB total | "
             "total at 4.8 TB/s ms | largest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in r["top"][:4])
        lines.append(f"| {r['optimizer']} | {r['precision']} | {r['path']} | {r['launches']} | {r['host_reads']} | "
                     f"{r['gb_other']:.2f} | {r['gb_product']:.2f} | {r['gb_total']:.2f} | "
                     f"{r['gb_total'] / 4.8:.2f} | {top} |")
    (out / "count_cpu.md").write_text("\n".join(lines) + "\n")


def measure(name, backend, mode, params, grads, steps, graph=False, count=False, **kw):
    start, state = initialised(name, mode, params, grads, **kw)
    work = [torch.nn.Parameter(p.clone()) for p in start]
    opt = getattr(klkern, name)(work, backend=backend, matmul_precision=mode, cuda_graph=graph, **kw)
    settings = [dict(g) for g in opt.param_groups]
    opt.load_state_dict(copy.deepcopy(state))
    for group, own in zip(opt.param_groups, settings):  # the loaded groups carry the defaults
        group.update({k: v for k, v in own.items() if k != "params"})
    cuda = work[0].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = time_steps(opt, work, grads, steps, warmup=3 if graph else 1)  # a graph: eager, capture, replay
    row = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "max_ms": max(times),
           "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else 0.0,
           "state_mib": opt.state_bytes() / 2**20, "flops": step_flops(opt)}
    if count:
        row.update(count_dispatches(opt, work, grads))
    del opt, work
    if cuda:
        torch.cuda.empty_cache()
    return row


def meta_info(args, n_params, device):
    commit = git_commit()
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, smoke run)"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(), "commit": commit,
            "date": utc_now(),
            "params": n_params, "steps": args.steps}


_ORDER = {name: i for i, name in enumerate(["highest", "high", "medium", "KLShampoo", "KLSOAP", "SOAP", "Shampoo"])}


def _sorted(rows: list) -> list:
    return sorted(rows, key=lambda r: (_ORDER.get(r["precision"], 9), _ORDER.get(r["optimizer"], 9)))


def write(out: Path, slug: str, meta: dict, rows: list, freq1: list, refresh: list | None = None) -> None:
    rows, freq1, refresh = _sorted(rows), _sorted(freq1), _sorted(refresh or [])
    (out / f"step_{slug}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "freq1": freq1, "refresh": refresh}, indent=1) + "\n")
    peaks = device_peaks(meta["device"]) or {}
    lines = [f"# Whole-step benchmark, GPT-2-small parameter set ({meta['params'] / 1e6:.1f}M), {meta['device']}",
             "", f"- torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, commit {meta['commit']}, "
             f"{meta['date']}; {meta['steps']} timed steps; `python bench/step_bench.py`; refresh QR: "
             f"{meta.get('qr_method', 'auto')}",
             "- TFLOP/s: the step's matrix products (6 per preconditioned mode, 4 for Shampoo; refreshes not "
             "counted) over the median step time; peak: dense vendor figure at that precision"
             + (f" ({peaks})" if peaks else " (unknown device: no peak)"),
             "- floor: cuBLAS time of the same products for the 2-D blocks, at the same precision"]
    if meta.get("not_run"):
        lines.append(f"- not run (budget): {', '.join(meta['not_run'])}")
    variants = [("torch", "torch"), ("triton", "triton"), ("triton_ieee", "triton ieee"), ("graph", "torch graph"),
                ("triton_graph", "triton graph")]
    lines += ["",
              "## precondition_frequency 10", "",
              "Median step ms of each path and its ratio to the GEMM floor: torch; triton (the fused kernels; "
              "\"highest\" by 3xTF32); triton ieee (\"highest\" by fp32 FMA products); torch graph and "
              "triton graph (captured, `cuda_graph=True`).", "",
              "| precision | optimizer | " + " | ".join(f"{label} ms" for _, label in variants)
              + " | GEMM floor ms | " + " | ".join(f"{label} / floor" for _, label in variants)
              + " | torch mean ms (amortised) | best TFLOP/s | % of peak | ops / step | host reads "
              "| peak extra MiB torch / triton |",
              "|" + "---|" * (2 * len(variants) + 9)]
    for r in rows:
        measured = {k: r[k]["median_ms"] for k, _ in variants if r.get(k)}
        best = min(measured.values())
        tflops = r["flops"] / (best * 1e-3) / 1e12
        pct = f"{100 * tflops / peaks[r['precision']]:.1f}" if peaks else "-"
        times = " | ".join(f"{measured[k]:.2f}" if k in measured else "-" for k, _ in variants)
        ratios = " | ".join(f"{measured[k] / r['floor_ms']:.2f}" if k in measured else "-" for k, _ in variants)
        lines.append(f"| {r['precision']} | {r['optimizer']} | {times} | {r['floor_ms']:.2f} | {ratios} | "
                     f"{r['torch']['mean_ms']:.2f} | {tflops:.1f} | {pct} | {r['torch'].get('ops', '-')} | "
                     f"{r['torch'].get('host_reads', '-')} | {r['torch']['peak_extra_mib']:.0f} / "
                     f"{r['triton']['peak_extra_mib']:.0f} |")
    if refresh:
        lines += ["", "## The refresh (torch path, precondition_frequency 10)", "",
                  "steady: median step; refresh step: the largest step of the synchronous schedule (every "
                  "basis refreshed); products floor: the refresh's three d^3 products per factor through "
                  "cuBLAS in float32 (its QR not included); amortised: the mean over the timed steps; "
                  "staggered: `stagger_refresh=True` (each block refreshed every 10 steps, at its own offset).",
                  "",
                  "| precision | optimizer | steady ms | refresh step ms | refresh - steady ms | products floor ms "
                  "| (refresh - steady) / floor | amortised ms | amortised / steady | staggered largest ms "
                  "| staggered mean ms | largest / mean |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in refresh:
            sync_, stag = r["sync"], r["stagger"]
            extra = sync_["max_ms"] - sync_["median_ms"]
            lines.append(
                f"| {r['precision']} | {r['optimizer']} | {sync_['median_ms']:.2f} | {sync_['max_ms']:.2f} | "
                f"{extra:.2f} | {r['floor_ms']:.2f} | {extra / r['floor_ms']:.2f} | {sync_['mean_ms']:.2f} | "
                f"{sync_['mean_ms'] / sync_['median_ms']:.2f} | {stag['max_ms']:.2f} | {stag['mean_ms']:.2f} | "
                f"{stag['max_ms'] / stag['mean_ms']:.2f} |")
    if freq1:
        lines += ["", "## precondition_frequency 1 (a refresh every step)", "",
                  "| precision | optimizer | torch median ms | triton median ms | speedup |", "|---|---|---|---|---|"]
        for r in freq1:
            lines.append(f"| {r['precision']} | {r['optimizer']} | {r['torch']['median_ms']:.2f} | "
                         f"{r['triton']['median_ms']:.2f} | {r['torch']['median_ms'] / r['triton']['median_ms']:.2f} |")
    (out / f"step_{slug}.md").write_text("\n".join(lines) + "\n")


def jobs(optimizers: list, precisions: list, freq1_optimizers: list, refresh: bool = True) -> list:
    """(kind, precision, optimizer) in the order a budget should cut them: the KL optimizers at
    every precision, then the refresh-every-step case at the middle precision, then the refresh
    (synchronous and staggered) of the KL optimizers there, then the baselines, then the rest of
    the refresh-every-step case."""
    kl = [o for o in optimizers if o in ("KLShampoo", "KLSOAP")]
    rest = [o for o in optimizers if o not in kl]
    middle = "high" if "high" in precisions else precisions[0]
    out = [("freq10", mode, name) for name in kl for mode in precisions]
    out += [("freq1", middle, name) for name in freq1_optimizers]
    out += [("refresh", middle, name) for name in kl if refresh]
    out += [("freq10", mode, name) for name in rest for mode in precisions]
    out += [("freq1", mode, name) for name in freq1_optimizers for mode in precisions if mode != middle]
    return out


def _config():
    from klkern.triton_kernels import _config as config

    return config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--optimizers", default="KLShampoo,KLSOAP,SOAP,Shampoo")
    ap.add_argument("--precisions", default="highest,high,medium")
    ap.add_argument("--freq1-optimizers", default="KLSOAP,KLShampoo")
    ap.add_argument("--freq1-steps", type=int, default=10)
    ap.add_argument("--out", default=str(out_dir()))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")
    ap.add_argument("--model", choices=("gpt2-small", "tiny"), default="gpt2-small")
    ap.add_argument("--no-graph", action="store_true", help="skip the cuda_graph=True columns")
    ap.add_argument("--no-refresh", action="store_true", help="skip the refresh table")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds: start no measurement that would likely end past this (0: no limit)")
    ap.add_argument("--count", action="store_true",
                    help="count a steady step's launches, host reads and bytes without a GPU (--device cpu)")
    ap.add_argument("--qr-method", choices=linalg.QR_METHODS, default="auto",
                    help="the refreshes' QR (klkern.linalg.preferred_qr_method); the result files get "
                         "its name when it is not auto")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # the Triton path on CPU tensors runs in the interpreter (set before it is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.count:
        if args.device == "cuda" and not torch.cuda.is_available():
            args.device = "cpu"
        count_main(args)
        return
    linalg.preferred_qr_method(args.qr_method)
    device = torch.device(args.device)
    shapes, params, grads = workload(args.model, device, "step_bench.py")
    meta = meta_info(args, sum(p.numel() for p in params), device)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    meta["qr_method"] = args.qr_method
    if args.qr_method != "auto":
        slug += f"_qr-{args.qr_method}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, freq1, refresh = [], [], []
    floors: dict = {}
    started = time.monotonic()
    last = 0.0
    not_run = []
    for kind, mode, name in jobs(args.optimizers.split(","), args.precisions.split(","),
                                 list(filter(None, args.freq1_optimizers.split(","))), not args.no_refresh):
        elapsed = time.monotonic() - started
        if args.budget and elapsed + last > args.budget:  # the next job would likely end past it
            not_run.append(f"{kind} {mode} {name}")
            continue
        t0 = time.monotonic()
        row = {"precision": mode, "optimizer": name}
        if kind == "refresh":
            row["floor_ms"], row["factor_sizes"] = refresh_floor_ms(name, mode, params, device)
            row["sync"] = measure(name, "torch", mode, params, grads, args.steps)
            row["stagger"] = measure(name, "torch", mode, params, grads, args.steps, stagger_refresh=True)
            refresh.append(row)
            last = time.monotonic() - t0
            print(json.dumps(row), flush=True)
            meta["not_run"] = not_run
            write(out, slug, meta, rows, freq1, refresh)
            continue
        if kind == "freq10":
            if mode not in floors:
                floors[mode] = gemm_floor_ms(shapes, mode, device)
            row["floor_ms"] = floors[mode]
        for backend in ("torch", "triton"):
            if kind == "freq10":
                row[backend] = measure(name, backend, mode, params, grads, args.steps, count=backend == "torch")
            else:
                row[backend] = measure(name, backend, mode, params, grads, args.freq1_steps,
                                       precondition_frequency=1)
        if kind == "freq10" and mode == "highest":  # "highest" by fp32 FMA products instead of 3xTF32
            previous = _config().highest_dot("ieee")
            try:
                row["triton_ieee"] = measure(name, "triton", mode, params, grads, args.steps)
            finally:
                _config().highest_dot(previous)
        if kind == "freq10" and device.type == "cuda" and not args.no_graph:
            for key, backend in (("graph", "torch"), ("triton_graph", "triton")):
                try:
                    row[key] = measure(name, backend, mode, params, grads, args.steps, graph=True)
                except Exception as err:  # noqa: BLE001 - a result row saying what failed beats no file
                    row[f"{key}_error"] = f"{type(err).__name__}: {err}"[:300]
        row["flops"] = row["triton"]["flops"]
        (rows if kind == "freq10" else freq1).append(row)
        last = time.monotonic() - t0
        print(json.dumps(row), flush=True)
        meta["not_run"] = not_run
        write(out, slug, meta, rows, freq1, refresh)
    meta["not_run"] = not_run
    write(out, slug, meta, rows, freq1, refresh)
    if not_run:
        print(f"step_bench: budget of {args.budget} s reached; not run: {', '.join(not_run)}")
    print((out / f"step_{slug}.md").read_text())


if __name__ == "__main__":
    main()
