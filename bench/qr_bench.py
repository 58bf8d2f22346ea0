"""Batched QR on CUDA: the four methods of klkern.linalg.batched_qr and torch's other route.

    python bench/qr_bench.py [--quick] [--dtype float32] [--shapes 24x768x768,48x1024x1024]
                             [--input random|factor]
    python bench/qr_bench.py --device cpu --quick   # smoke run (small shapes, seconds)

For each batch shape (default on CUDA: (24, 768, 768), (48, 1024, 1024),
(12, 3072, 3072), (8, 4096, 4096); on the CPU, a smoke run's: (4, 64, 64), (2, 160, 96)) it
times, with CUDA events (warm-up calls, then the median of --reps calls):

* ``klkern``: torch.ops.klkern.batched_qr, the CUDA extension (one call for
  the whole batch; the JIT build, if any, happens in the warm-up), i.e.
  ``batched_qr(method="extension")``; skipped, with the reason, when the
  extension cannot be loaded;
* ``torch``: torch.linalg.qr plus the sign fix (``method="torch"``);
* ``cholqr2``: CholeskyQR2 in float64 with the Householder fallback
  (``method="cholqr2"``), on batched cuBLAS/cuSOLVER routines;
* ``shifted_cholqr3``: shifted CholeskyQR3 on the column-scaled matrix in
  float64 with the same fallback (``method="shifted_cholqr3"``); the number of
  matrices it handed to Householder is recorded (``qr_fallbacks``);
* ``householder``: torch.geqrf + torch.linalg.householder_product plus the
  sign fix, the other torch route to an explicit Q.

``--input random`` (default) times standard normal matrices; ``--input factor``
what a refresh factors: square, symmetric, ``V diag(lam) V^T`` with eigenvalues
log-spaced from 1 to 1e-12 (the main job's factors reach 1e-15 of their largest:
bench/results/refresh_factors_cpu.md) and V a random rotation by about 1e-2 of
the identity (a factor in a basis one refresh stale), where CholeskyQR2's Gram
matrix is singular in float64 and it falls back. Every result is checked:
||Q^T Q - I||_max and ||Q R - A||_F / ||A||_F with R = Q^T A (in float64),
against the issue's 1e-5 bound for float32. Writes qr_<device>.json and .md
(qr_<device>_factor.* for ``--input factor``) with device, torch/CUDA versions, commit and date
into ``--out-dir`` (default bench/out/, ignored by git). Targets (H100, float32): klkern at least 5x faster than
torch.linalg.qr on the first two shapes, at least 2x on (8, 4096, 4096).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402
from klkern.linalg import _ext  # noqa: E402

DEFAULT_SHAPES = [(24, 768, 768), (48, 1024, 1024), (12, 3072, 3072), (8, 4096, 4096)]
SMOKE_SHAPES = [(4, 64, 64), (2, 160, 96)]  # --device cpu: the script's logic, not the GPU's sizes
TARGETS = {(24, 768, 768): 5.0, (48, 1024, 1024): 5.0, (8, 4096, 4096): 2.0}  # speedup vs torch.linalg.qr
ACCURACY_BOUND = {torch.float32: 1e-5, torch.float64: 1e-12}


def sign_fix(Q: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    return Q * torch.where(diag < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(-2)


def torch_qr(A: torch.Tensor) -> torch.Tensor:
    Q, R = torch.linalg.qr(A)
    return sign_fix(Q, torch.diagonal(R, dim1=-2, dim2=-1))


def householder_qr(A: torch.Tensor) -> torch.Tensor:
    H, tau = torch.geqrf(A)
    return sign_fix(torch.linalg.householder_product(H, tau), torch.diagonal(H, dim1=-2, dim2=-1))


def factor_like(shape: tuple, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """(B, n, n) V diag(lam) V^T: lam log-spaced 1 .. 1e-12, V = qr(I + 1e-2 N) (see the docstring)."""
    B, m, n = shape
    if m != n:
        raise SystemExit(f"qr_bench: --input factor needs square shapes, got {shape}")
    noise = torch.randn(B, n, n, device=device, dtype=torch.float64, generator=gen)
    V = torch.linalg.qr(torch.eye(n, device=device, dtype=torch.float64) + 1e-2 * noise)[0]
    lam = torch.logspace(0, -12, n, device=device, dtype=torch.float64)
    return ((V * lam) @ V.mT).to(dtype)


def time_ms(fn, A: torch.Tensor, reps: int, warmup: int) -> tuple[float, torch.Tensor]:
    out = None
    cuda = A.is_cuda
    for _ in range(warmup):
        t0 = time.perf_counter()
        out = fn(A)
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - t0 > 2.0:  # slow route: one timed call is enough to rank it
            reps = 1
            break
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(A)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn(A)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


@torch.no_grad()
def accuracy(Q: torch.Tensor, A: torch.Tensor) -> dict:
    Qd, Ad = Q.double(), A.double()
    n = A.shape[-1]
    orth = (Qd.mT @ Qd - torch.eye(n, dtype=torch.float64, device=A.device)).abs().amax().item()
    R = Qd.mT @ Ad
    recon = ((Qd @ R - Ad).norm() / Ad.norm()).item()
    min_diag = torch.diagonal(R, dim1=-2, dim2=-1).amin().item()
    return {"orth_max": orth, "recon_rel": recon, "min_diag_R": min_diag, "finite": bool(torch.isfinite(Q).all())}



def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = tuple(int(x) for x in item.lower().split("x"))
        if len(parts) != 3 or parts[1] < parts[2]:
            raise argparse.ArgumentTypeError(f"shape {item!r}: expected BxMxN with M >= N")
        shapes.append(parts)
    return shapes


def write(args, rows, routes, device, device_name, reps, warmup, not_run, fallbacks=None) -> None:
    """The result files (rewritten after each shape, so that a run cut short keeps what it measured)."""
    meta = {
        "date": utc_now(),
        "commit": git_commit(full=True),
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "reps": reps,
        "warmup": warmup,
        "timing": ("CUDA events" if device.type == "cuda" else "wall clock") + " around one call, median of reps, "
                  "after warm-up calls",
        "command": "python bench/qr_bench.py" + (" --quick" if args.quick else "")
                   + (f" --input {args.input}" if args.input != "random" else ""),
        "input": args.input,
        "fallbacks": fallbacks,
        "not_run": not_run,
    }
    base = os.path.join(args.out_dir, f"qr_{slug(device_name)}" + ("_factor" if args.input == "factor" else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(base + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    names = list(routes)
    lines = [
        f"# Batched QR methods ({device_name})",
        "",
        f"- device: {device_name}; torch {meta['torch']}; CUDA {meta['cuda']}; {args.dtype}; input: "
        + ("standard normal" if args.input == "random" else "refresh-like factors (eigenvalues 1 .. 1e-12, "
           "a basis one refresh stale)"),
        f"- matrices handed to Householder in the timed and warm-up calls: {fallbacks}",
        f"- date: {meta['date']}; commit: {meta['commit']}",
        f"- {meta['timing']} ({reps} reps, {warmup} warm-up); command: `{meta['command']}`",
        "- every route includes the sign fix (diag(R) >= 0); accuracy in float64: "
        "orth = max|Q^T Q - I|, recon = ||Q Q^T A - A|| / ||A||"
        + ("" if "klkern" in routes else "; the extension was unavailable, so its column is missing"),
    ] + ([f"- not run (budget): {', '.join(not_run)}"] if not_run else []) + [
        "",
        "| batch shape | " + " | ".join(f"{n} ms" for n in names) + " | "
        + " | ".join(f"{n} vs torch" for n in names if n != "torch") + " | worst orth | worst recon |",
        "|---" * (1 + 2 * len(names)) + "|---|",
    ]
    for r in rows:
        worst_orth = max(r[f"{n}_accuracy"]["orth_max"] for n in names)
        worst_recon = max(r[f"{n}_accuracy"]["recon_rel"] for n in names)
        lines.append(f"| {tuple(r['shape'])} | " + " | ".join(f"{r[f'{n}_ms']:.2f}" for n in names) + " | "
                     + " | ".join(f"{r[f'{n}_speedup_vs_torch']:.2f}x" for n in names if n != "torch")
                     + f" | {worst_orth:.1e} | {worst_recon:.1e} |")
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up call and 3 timed calls per route")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per route (default 7, --quick 3)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma list of BxMxN (default: the GPU shapes above on CUDA, small ones on the CPU)")
    parser.add_argument("--input", choices=["random", "factor"], default="random",
                        help="random: standard normal; factor: what a refresh factors (see above)")
    parser.add_argument("--no-householder", action="store_true", help="skip the geqrf + householder_product route")
    parser.add_argument("--out-dir", default=str(out_dir()),
                    help="folder (default bench/out/; bench/results: the committed files)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds: start no further shape after this (0: no limit); a route whose "
                             "warm-up call takes over 2 s is timed once")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.shapes is None:
        args.shapes = DEFAULT_SHAPES if device.type == "cuda" else SMOKE_SHAPES
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("qr_bench: needs a CUDA device (torch.cuda.is_available() is False; torch "
                 f"{torch.__version__}, CUDA {torch.version.cuda}); nothing measured")
    op = _ext.qr_extension() if device.type == "cuda" else None
    if op is None and device.type == "cuda":
        print("qr_bench: the klkern CUDA extension is unavailable (see the warning above, or KLKERN_NO_EXT "
              "is set); measuring the other methods", file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    reps = args.reps or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)"
    from klkern.linalg import batched_qr

    routes = {"klkern": op} if op is not None else {}
    routes["torch"] = torch_qr
    routes["cholqr2"] = lambda A: batched_qr(A, method="cholqr2")
    routes["shifted_cholqr3"] = lambda A: batched_qr(A, method="shifted_cholqr3")
    from klkern.linalg import qr_fallbacks
    qr_fallbacks(reset=True)
    if not args.no_householder:
        routes["householder"] = householder_qr

    rows, not_run = [], []
    started = time.monotonic()
    for shape in args.shapes:
        if args.budget and time.monotonic() - started > args.budget:
            not_run.append("x".join(map(str, shape)))
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        if args.input == "factor":
            A = factor_like(shape, device, dtype, gen)
        else:
            A = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
        row = {"shape": list(shape), "dtype": args.dtype}
        results = {}
        for name, fn in routes.items():
            ms, Q = time_ms(fn, A, reps, warmup)
            row[f"{name}_ms"] = ms
            row[f"{name}_accuracy"] = accuracy(Q, A)
            results[name] = Q
            del Q
        for name in routes:
            row[f"{name}_speedup_vs_torch"] = row["torch_ms"] / row[f"{name}_ms"]
            row[f"{name}_max_abs_diff_vs_torch"] = (results[name] - results["torch"]).abs().amax().item()
        row["accurate"] = {name: row[f"{name}_accuracy"]["finite"] and max(
            row[f"{name}_accuracy"]["orth_max"], row[f"{name}_accuracy"]["recon_rel"]) < ACCURACY_BOUND[dtype]
            for name in routes}
        target = TARGETS.get(tuple(shape)) if dtype == torch.float32 and "klkern" in routes else None
        row["target_speedup"] = target
        row["meets_target"] = None if target is None else row["klkern_speedup_vs_torch"] >= target
        rows.append(row)
        write(args, rows, routes, device, device_name, reps, warmup, not_run, qr_fallbacks())
        print(f"{str(tuple(shape)):20s} " + "  ".join(
            f"{name} {row[f'{name}_ms']:9.2f} ms (orth {row[f'{name}_accuracy']['orth_max']:.1e})" for name in routes),
            flush=True)
        del A, results
        if device.type == "cuda":
            torch.cuda.empty_cache()

    write(args, rows, routes, device, device_name, reps, warmup, not_run, qr_fallbacks())
    suffix = "_factor" if args.input == "factor" else ""
    print(f"wrote {os.path.join(args.out_dir, 'qr_' + slug(device_name) + suffix)}.json and .md")
    bad = [(tuple(r["shape"]), n) for r in rows for n, ok in r["accurate"].items() if not ok]
    if bad:
        print(f"qr_bench: results above the accuracy bound for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
