"""klkern's amortised step against other public implementations, side by side in one process.

    python bench/peer_step.py [--frequencies 1,10] [--rounds 2] [--out FILE]   # default bench/out/peer_step_cpu.md
    python bench/peer_step.py --source soap=/path/to/SOAP         # the public SOAP's soap.py
    python bench/peer_step.py --model tiny --steps 2 --rounds 1   # smoke run
    python bench/peer_step.py --device cuda                       # on a GPU: bench/out/peer_step_cuda.md

``--out bench/results/peer_step_cpu.md`` refreshes the committed result (bench/out/ is ignored by git).

Workload: one GPT-2-small layer, (768, 768) x 4, (3072, 768), (768, 3072), float32, the same
seeded gradients for every implementation. Each runs at its defaults except the learning rate,
the refresh period (``precondition_frequency``: 1 and 10) and the largest preconditioned
dimension (large enough to precondition every mode; HeavyBall's schedule of refresh periods is
off). Reported: amortised ms per step over the timed steps (``--steps``, rounded up per refresh
period to a whole number of periods, so every refresh is counted; default 3 at period 1, else one
period), the better of ``--rounds`` interleaved rounds, the ratio
to klkern, and the optimizer state in MiB. klkern's refresh is also profiled (where its time
goes, per phase).

Peers are optional and never a dependency; each absent one is skipped with a line:

* HeavyBall (``pip install heavyball``): SOAP, KLShampoo, KLSOAP; its default torch.compile
  is kept (compilation happens in the untimed warm-up steps);
* pytorch-optimizer (``pip install pytorch-optimizer``): SOAP;
* Emerging-Optimizers (``emerging_optimizers``, Python >= 3.12): SOAP;
* ISTA-DASLab-Optimizers (``ista_daslab_optimizers``): DASH, a Shampoo with stacked blocks, against
  klkern's Shampoo (Adam grafting) at the same block size (DASH_BLOCK: DASH needs every dimension
  a multiple of it); only its ``dash`` subpackage is imported (the package's own ``__init__``
  imports kernels of a separate CUDA package), and its logging imports (wandb, gpustat), when
  absent, get inert stand-ins;
* the public SOAP release, not a package: ``--source soap=DIR`` (DIR holds soap.py).

``python bench/fetch_peers.py`` fetches the packaged peers into ``peers/`` where there is
network, and ``--install`` installs them on a machine without it (the GPU machine). ``--device
cuda`` runs everything on the GPU at ``--matmul-precision`` (torch's setting for every
implementation; klkern follows it), synchronised around the timed steps, and reports peak memory;
the refresh's profile and kernels alone are CPU-only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, out_dir, times_ms, utc_now  # noqa: E402
from klkern.engine._optimizer import tensor_bytes  # noqa: E402

SHAPES = {"gpt2-layer": [(768, 768)] * 4 + [(3072, 768), (768, 3072)],
          "tiny": [(24, 24)] * 2 + [(40, 24), (24, 40)]}
LR = 1e-3
ALGORITHMS = ("KL-Shampoo", "KL-SOAP", "SOAP", "Shampoo")
DASH_BLOCK = {"gpt2-layer": 768, "tiny": 8}  # a divisor of every dimension of the workload
_MODEL = {"name": "gpt2-layer"}  # the workload of this run (DASH's block size follows it)


def _klkern(cls):
    def make(params, freq):
        return cls(params, lr=LR, precondition_frequency=freq, max_precond_dim=1 << 20)
    return make


def _heavyball(name):
    def make(params, freq):
        hb = importlib.import_module("heavyball")
        return getattr(hb, name)(params, lr=LR, precondition_frequency=freq, max_precond_dim=1 << 20,
                                 use_precond_schedule=False)
    return make


def _klkern_blocked(cls):
    def make(params, freq):
        return cls(params, lr=LR, precondition_frequency=freq, block_size=DASH_BLOCK[_MODEL["name"]])
    return make


class _Inert(types.ModuleType):
    """A stand-in for a logging module that is imported but not used on this path."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _import_dash():
    """ista_daslab_optimizers.dash without the package's __init__ (see the module docstring)."""
    if "ista_daslab_optimizers.dash" in sys.modules:
        return sys.modules["ista_daslab_optimizers.dash"]
    spec = importlib.util.find_spec("ista_daslab_optimizers")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'ista_daslab_optimizers'")
    for name in ("wandb", "gpustat"):
        if importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, _Inert(name))
    package = types.ModuleType("ista_daslab_optimizers")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["ista_daslab_optimizers"] = package
    return importlib.import_module("ista_daslab_optimizers.dash")


def _dash(params, freq):
    dash = _import_dash()
    config = dash.DashConfig(inv_root_freq=freq, block_size=DASH_BLOCK[_MODEL["name"]])
    return dash.DashGpu([{"params": params}], lr=LR, weight_decay=0.0, config=config)


def _pytorch_optimizer(params, freq):
    po = importlib.import_module("pytorch_optimizer")
    return po.SOAP(params, lr=LR, precondition_frequency=freq, max_precondition_dim=1 << 20)


def _emerging(params, freq):
    eo = importlib.import_module("emerging_optimizers.soap")
    return eo.SOAP(params, lr=LR, precondition_frequency=freq)


def _public_soap(path):
    def make(params, freq):
        if path not in sys.path:
            sys.path.insert(0, path)
        return importlib.import_module("soap").SOAP(params, lr=LR, precondition_frequency=freq,
                                                    max_precond_dim=1 << 20)
    return make


def implementations(sources: dict) -> list:
    """(algorithm, implementation, distribution for its version or None, factory) rows."""
    rows = [("KL-Shampoo", "klkern", None, _klkern(klkern.KLShampoo)),
            ("KL-SOAP", "klkern", None, _klkern(klkern.KLSOAP)),
            ("SOAP", "klkern", None, _klkern(klkern.SOAP)),
            ("KL-Shampoo", "HeavyBall", "heavyball", _heavyball("KLShampoo")),
            ("KL-SOAP", "HeavyBall", "heavyball", _heavyball("KLSOAP")),
            ("SOAP", "HeavyBall", "heavyball", _heavyball("SOAP")),
            ("SOAP", "pytorch-optimizer", "pytorch_optimizer", _pytorch_optimizer),
            ("SOAP", "Emerging-Optimizers", "emerging_optimizers", _emerging),
            ("Shampoo", "klkern", None, _klkern_blocked(klkern.Shampoo)),
            ("Shampoo", "ISTA-DASLab DASH", "ista_daslab_optimizers", _dash)]
    if "soap" in sources:
        rows.append(("SOAP", "public SOAP release", None, _public_soap(sources["soap"])))
    return rows


def available(dist: str | None) -> str | None:
    """Why an implementation cannot run here (None: it can)."""
    if dist is None:
        return None
    try:
        _import_dash() if dist == "ista_daslab_optimizers" else importlib.import_module(dist)
    except Exception as err:  # noqa: BLE001 - any import failure means "skip, say why"
        return f"{dist} not importable ({type(err).__name__}: {err})"
    return None


def version_of(impl: str, dist: str | None, sources: dict) -> str:
    if impl == "klkern":
        return f"klkern {git_commit()}"
    if dist is None:
        return f"source {sources.get('soap')}"
    for name in (dist, dist.replace("_", "-")):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{name} {importlib.metadata.version(name)}"
    return dist


def workload(model: str, steps: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = SHAPES[model]
    init = [(torch.randn(*s, generator=g) * 0.02).to(device) for s in shapes]
    grads = [[(torch.randn(*s, generator=g) * 1e-3).to(device) for s in shapes] for _ in range(4)]
    return init, grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(factory, freq: int, init, grads, warmup: int, steps: int) -> dict:
    """Amortised ms per step over ``steps`` timed steps after ``warmup``; state MiB; on CUDA the
    peak memory above the parameters and gradients."""
    device = init[0].device
    params = [torch.nn.Parameter(p.clone()) for p in init]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    opt = factory(params, freq)

    def step(i):
        for p, g in zip(params, grads[i % len(grads)]):
            p.grad = g.clone()
        opt.step()

    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3 / steps
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    row = {"ms": ms, "state_mib": tensor_bytes(opt.state) / 2**20, "finite": finite}
    if device.type == "cuda":
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


QR_OPS = ("aten::geqrf", "aten::ormqr", "aten::linalg_qr", "aten::linalg_householder_product")
PRODUCT_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
MEMORY_OPS = ("aten::copy_", "aten::clone", "aten::triu", "aten::tril", "aten::cat", "aten::gather",
              "aten::scatter_", "aten::index", "aten::index_select", "aten::index_copy_", "aten::where",
              "aten::mul_", "aten::mul")


def factor_sizes(model: str) -> dict:
    """{d: number of d x d factors} of the workload (every mode is preconditioned)."""
    sizes: dict = {}
    for shape in SHAPES[model]:
        for d in shape:
            sizes[d] = sizes.get(d, 0) + 1
    return dict(sorted(sizes.items()))


def refresh_floor(model: str, reps: int = 3) -> dict:
    """The dense kernels a refresh is made of, timed alone on this machine (best of ``reps``, ms)
    for each factor size d of the workload, on a stack of all its d x d factors: geqrf (LAPACK's
    Householder QR, reflectors only), ormqr (the reflectors applied from the right to a
    column-major d x d matrix: klkern's Q V and T V), one d x d product, and torch.linalg.qr
    (geqrf then orgqr, forming Q: what the peers call). Per factor set, klkern's refresh of a
    factor is one geqrf and two ormqr; the peers' is one product (S Q) and one linalg.qr."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for d, count in factor_sizes(model).items():
        X = torch.randn(count, d, d, generator=g)
        S = X @ X.mT / d
        A = S.mT.contiguous().mT  # column-major, LAPACK's layout
        reflectors, tau = torch.geqrf(A)
        kernels = {"geqrf": lambda: torch.geqrf(A),
                   "ormqr": lambda: torch.ormqr(reflectors, tau, A, left=False),
                   "product": lambda: torch.bmm(S, X),
                   "linalg_qr": lambda: torch.linalg.qr(S)}
        row = {"d": d, "factors": count}
        for name, fn in kernels.items():
            fn()  # warm-up
            row[f"{name}_ms"] = min(times_ms(fn, "cpu", reps))
        row["klkern_ms"] = row["geqrf_ms"] + 2 * row["ormqr_ms"]
        row["peers_ms"] = row["product_ms"] + row["linalg_qr_ms"]
        rows.append(row)
    return {"rows": rows, "klkern_ms": sum(r["klkern_ms"] for r in rows),
            "peers_ms": sum(r["peers_ms"] for r in rows)}


def profile_refresh(model: str, reps: int = 3) -> dict:
    """Where klkern's refresh time goes: each algorithm's refreshing steps, with torch.profiler
    around klkern.algorithms._functional.refresh_ only. Per refresh (best of ``reps``): its wall time, the
    step's wall time without it, and the self time of the QR (geqrf/ormqr), the matrix products,
    the memory passes (copies, triangles, gathers, sign scalings) and the rest."""
    from torch.profiler import ProfilerActivity, profile

    from klkern.algorithms import _functional as F

    init, grads = workload(model, 1)
    out = {}
    for name, cls in (("KL-Shampoo", klkern.KLShampoo), ("KL-SOAP", klkern.KLSOAP), ("SOAP", klkern.SOAP)):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = cls(params, lr=LR, precondition_frequency=1, max_precond_dim=1 << 20)
        inner, seen = F.refresh_, []

        def profiled(*args, **kwargs):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                inner(*args, **kwargs)
                wall = time.perf_counter() - t0
            seen.append((wall, prof.key_averages()))
        F.refresh_ = profiled
        try:
            best = None
            for i in range(reps + 2):
                for p, g in zip(params, grads[i % len(grads)]):
                    p.grad = g.clone()
                seen.clear()
                t0 = time.perf_counter()
                opt.step()
                step = time.perf_counter() - t0
                if i < 2 or not seen:  # initialisation and warm-up
                    continue
                wall = sum(w for w, _ in seen)
                groups = {"qr": 0.0, "products": 0.0, "memory": 0.0}
                for _, events in seen:
                    for e in events:
                        key = "qr" if e.key in QR_OPS else "products" if e.key in PRODUCT_OPS else (
                            "memory" if e.key in MEMORY_OPS else None)
                        if key:
                            groups[key] += e.self_cpu_time_total / 1e3
                row = {"refresh_ms": wall * 1e3, "step_ms": (step - wall) * 1e3,
                       **{f"{k}_ms": v for k, v in groups.items()}}
                if best is None or row["refresh_ms"] < best["refresh_ms"]:
                    best = row
        finally:
            F.refresh_ = inner
        best["other_ms"] = best["refresh_ms"] - best["qr_ms"] - best["products_ms"] - best["memory_ms"]
        out[name] = best
    return out


def timed_steps(requested: int, period: int) -> int:
    """Timed steps of a run at refresh ``period``: ``requested`` rounded up to a whole number of
    periods (amortised: every refresh counted), or by default 3 at period 1, else one period."""
    if not requested:
        return 3 if period == 1 else period
    return -(-requested // period) * period


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="gpt2-layer")
    ap.add_argument("--frequencies", default="1,10", help="refresh periods, comma separated")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed steps per run, rounded up to a whole number of refresh periods so that every "
                         "refresh is counted (default: 3 at period 1, else one period)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (initialisation, compilation)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the better is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=DIR",
                    help="a peer that is not a package: soap=DIR (the public SOAP's soap.py)")
    ap.add_argument("--only", default="", help="comma-separated implementations to run (default: all)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profile of klkern's refresh and the timing of its kernels alone")
    ap.add_argument("--profile-only", action="store_true", help="only the profile of klkern's refresh (no peers)")
    ap.add_argument("--out", type=Path, help="result file (default bench/out/peer_step_<cpu|cuda>.md; "
                                             "bench/results/peer_step_cpu.md is the committed one)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda")
    ap.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                    help="torch.set_float32_matmul_precision for every implementation (klkern follows it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("peer_step: --device cuda needs a CUDA GPU")
    torch.set_float32_matmul_precision(args.matmul_precision)
    _MODEL["name"] = args.model
    sources = dict(s.split("=", 1) for s in args.source)
    freqs = [int(f) for f in args.frequencies.split(",")]
    if args.steps < 0 or any(f < 1 for f in freqs):
        ap.error(f"--steps must be >= 0 and every refresh period >= 1; got --steps {args.steps}, --frequencies "
                 f"{args.frequencies}")
    if args.out is None:
        args.out = out_dir() / f"peer_step_{device.type}.md"
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    impls, skipped = [], []
    for algo, impl, dist, factory in ([] if args.profile_only else implementations(sources)):
        if only and impl not in only:
            continue
        why = available(dist)
        if why:
            skipped.append(f"{impl} ({algo}): {why}")
            print(f"skip {impl} {algo}: {why}", flush=True)
        else:
            impls.append((algo, impl, dist, factory))
    best: dict = {}
    for freq in ([] if args.profile_only else freqs):
        steps = timed_steps(args.steps, freq)
        if args.steps and steps != args.steps:
            print(f"period {freq}: {steps} timed steps (--steps {args.steps} rounded up to whole periods)", flush=True)
        init, grads = workload(args.model, steps, device=args.device)
        for rnd in range(args.rounds):
            for algo, impl, dist, factory in impls:
                key = (freq, algo, impl)
                try:
                    r = run_one(factory, freq, init, grads, args.warmup, steps)
                except Exception as err:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    r = {"error": " ".join(f"{type(err).__name__}: {err}".split())[:300]}
                print(f"period {freq} round {rnd} {algo:10s} {impl:22s} "
                      + (f"{r['ms']:9.1f} ms  {r['state_mib']:7.1f} MiB" if "ms" in r else r["error"]), flush=True)
                if key not in best or ("ms" in r and r["ms"] < best[key].get("ms", float("inf"))):
                    best[key] = r
    cpu_parts = not args.no_profile and device.type == "cpu"  # LAPACK's kernels: the CPU's refresh
    profile = profile_refresh(args.model) if cpu_parts else {}
    floor = refresh_floor(args.model) if cpu_parts else {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"date": utc_now(), "commit": git_commit(), "device": name, "device_type": device.type,
            "matmul_precision": args.matmul_precision, "dash_block": DASH_BLOCK[args.model],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "model": args.model, "shapes": SHAPES[args.model], "rounds": args.rounds, "warmup": args.warmup,
            "timed_steps": {f: timed_steps(args.steps, f) for f in freqs},
            "versions": {impl: version_of(impl, dist, sources) for _, impl, dist, _ in impls}, "skipped": skipped}
    rows = [{"period": f, "algorithm": a, "implementation": i, **r} for (f, a, i), r in best.items()]
    write(args.out, meta, rows, profile, floor)
    print(f"wrote {args.out}")
    return 0


def write(out: Path, meta: dict, rows: list, profile: dict, floor: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "refresh_profile": profile,
                                                    "refresh_floor": floor}, indent=1) + "\n")
    title = "Amortised step against peers" if rows else "Where klkern's eigenbasis refresh goes"
    kind = meta.get("device_type", "cpu")
    lines = [f"# {title} ({meta['model']}, float32, {kind.upper()})", "",
             f"{meta['date']}, klkern {meta['commit']}, torch {meta['torch']}, Python {meta['python']}, "
             f"{meta['threads']} threads, {meta['device']}, matmul precision "
             f"{meta.get('matmul_precision', 'highest')} for every implementation"
             + (f"; better of {meta['rounds']} interleaved rounds." if rows else "."), ""]
    if any(r["algorithm"] == "Shampoo" for r in rows):
        lines += [f"Shampoo rows: klkern's Shampoo (Adam grafting) and DASH both precondition blocks of "
                  f"{meta.get('dash_block')} (DASH's block size, which must divide every dimension).", ""]
    if rows:
        lines += ["Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items()) + ".", ""]
    if meta["skipped"]:
        lines += ["Skipped: " + "; ".join(meta["skipped"]) + ".", ""]
    if rows:
        lines += ["| refresh period | algorithm | implementation | ms / step | ratio to klkern | state MiB "
                  "| peak extra MiB |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["period"], ALGORITHMS.index(r["algorithm"]), r["implementation"] != "klkern",
                                         r.get("ms", float("inf")))):
        ours = next((x for x in rows if x["period"] == r["period"] and x["algorithm"] == r["algorithm"]
                     and x["implementation"] == "klkern" and "ms" in x), None)
        if "ms" not in r:
            lines.append(f"| {r['period']} | {r['algorithm']} | {r['implementation']} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['ms'] / ours['ms']:.2f}x" if ours else ""
        flag = "" if r["finite"] else " (non-finite parameters)"
        peak = f"{r['peak_extra_mib']:.0f}" if "peak_extra_mib" in r else "-"
        lines.append(f"| {r['period']} | {r['algorithm']} | {r['implementation']}{flag} | {r['ms']:.1f} | {ratio} | "
                     f"{r['state_mib']:.1f} | {peak} |")
    if profile:
        lines += ["", "## Where klkern's refresh goes (ms, one refresh of every factor, best of 3; torch.profiler "
                  "self time around the refresh only)", "",
                  "| algorithm | step without the refresh | refresh | QR (geqrf, ormqr) | products | memory passes "
                  "(copies, triangles, gathers, sign scalings) | other |",
                  "|---|---|---|---|---|---|---|"]
        for name, p in profile.items():
            lines.append(f"| {name} | {p['step_ms']:.0f} | {p['refresh_ms']:.0f} | {p['qr_ms']:.0f} | "
                         f"{p['products_ms']:.0f} | {p['memory_ms']:.0f} | {p['other_ms']:.0f} |")
    if floor:
        lines += ["", "## The refresh's kernels alone (ms, best of 3, each on the stack of all factors of one size)",
                  "", "klkern refreshes a factor with one geqrf and two ormqr (Q V, and T V for the factor in its "
                  "new basis); the peers with one product S Q and one torch.linalg.qr (geqrf, then orgqr to form "
                  "Q). Neither sum counts the momentum's carry or the step's own products.", "",
                  "| d | factors | geqrf | ormqr | product | linalg.qr | klkern: geqrf + 2 ormqr | "
                  "peers: product + linalg.qr |", "|---|---|---|---|---|---|---|---|"]
        for r in floor["rows"]:
            lines.append(f"| {r['d']} | {r['factors']} | {r['geqrf_ms']:.0f} | {r['ormqr_ms']:.0f} | "
                         f"{r['product_ms']:.0f} | {r['linalg_qr_ms']:.0f} | {r['klkern_ms']:.0f} | "
                         f"{r['peers_ms']:.0f} |")
        lines.append(f"| all | | | | | | {floor['klkern_ms']:.0f} | {floor['peers_ms']:.0f} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
