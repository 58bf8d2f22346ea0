"""Distributed step benchmark (gloo, CPU) and a projection to many GPUs.

    python bench/dist_step.py [--worlds 1,2,4] [--steps 8] [--optimizers KLShampoo,SOAP]

Part 1, measured: the matrices of one GPT-2-small layer ((768, 768) x 4,
(3072, 768), (768, 3072)) and its biases (also with ``block_size=768``,
which cuts the two large matrices into 768 x 768 blocks), stepped by klkern with
``process_group`` over 1, 2 and 4 processes (gloo on 127.0.0.1, one thread
each, the same gradients on every rank as after DDP's all-reduce): the
median step time (precondition_frequency 10; the first two steps are not
timed), the state bytes on each rank, and the bytes each rank receives per
step in the all-gather of new parameter values. World size 1 is the
single-process optimizer. This machine has 2 cores: at world size 4 two
processes share a core, so that row's time is not a speedup measurement.

Part 2, projected: the optimizer's step time at 64 and 1024 GPUs for a
1B-parameter GPT (24 layers, d_model 2048, 4x MLP, 50304-token vocabulary),
split across ranks against replicated on every rank, from the cost model
that assigns blocks to ranks (klkern.distributed._distributed.block_cost: 6 N d per
preconditioned mode and step plus 10 d^3 per refresh), calibrated by per-block
step times measured here, and a stated network model (see --help). Writes
dist_step_cpu.json and .md into ``--out`` (default bench/out/; ``--out bench/results`` refreshes
the committed files).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402
from klkern.distributed._distributed import assign, block_cost  # noqa: E402

LAYER = [(768, 768)] * 4 + [(3072, 768), (768, 3072)] + [(768,)] * 4 + [(3072,), (768,)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(name: str):
    """"KLShampoo" or "KLShampoo:block_size=768" -> (class, options)."""
    cls, _, opts = name.partition(":")
    options = {k: int(v) for k, v in (o.split("=") for o in opts.split(",") if o)}
    return getattr(klkern, cls), options


def _measure(rank, world, port, name, steps, out):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in LAYER]
    grads = [[torch.randn(*s, generator=gen) * 1e-3 for s in LAYER] for _ in range(3)]
    kw = {"process_group": dist.group.WORLD} if world > 1 else {}
    cls, options = _spec(name)
    opt = cls(params, backend="torch", **options, **kw)
    times = []
    for i in range(steps + 2):
        for p, g in zip(params, grads[i % 3]):
            p.grad = g
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        opt.step()
        if world > 1:
            dist.barrier()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    result = {"rank": rank, "median_ms": statistics.median(times), "state_bytes": opt.state_bytes(),
              "recv_bytes_per_step": opt._split.bytes_per_step() if world > 1 else 0,
              "load": opt._split.load if world > 1 else None}
    torch.save(result, Path(out) / f"{name.replace(':', '_')}-{world}-{rank}.pt")
    if world > 1:
        dist.barrier()
        del opt  # it holds the process group: freed before the group is torn down, not at exit
        gc.collect()
        dist.destroy_process_group()


def measure(name, world, steps, out) -> list:
    if world == 1:
        _measure(0, 1, 0, name, steps, out)
    else:
        mp.start_processes(_measure, args=(world, _free_port(), name, steps, str(out)), nprocs=world,
                           join=True, start_method="spawn")
    return [torch.load(Path(out) / f"{name.replace(':', '_')}-{world}-{r}.pt") for r in range(world)]


# ---------------------------------------------------------------- projection


def gpt_1b_shapes():
    d, layers, vocab = 2048, 24, 50304
    shapes = [(vocab, d), (2048, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] + [(d,)] * 4 + [(3 * d,), (4 * d,)]
    return shapes


def blocks_of(shapes, algorithm, block_size, frequency=10, max_precond_dim=10000):
    """(cost, numel) of every block, as the assignment sees them."""
    from klkern.algorithms._blocking import make_plan

    out = []
    for s in shapes:
        plan = make_plan(tuple(s), merge_dims=False, max_precond_dim=max_precond_dim, block_size=block_size,
                         precondition_1d=False, data_format="channels_first", large_dim_policy="adamw")
        path = "adamw" if plan.adamw else algorithm
        for i in range(len(plan.masks)):
            shape = plan.block_shape(i)
            out.append((block_cost(algorithm, path, shape, plan.masks[i], frequency), math.prod(shape)))
    return out


def calibrate(name, shapes=((256, 256), (512, 512), (1024, 256), (768, 768)), steps=6):
    """Measured single-process step time per block against the cost model (one thread)."""
    torch.set_num_threads(1)
    rows = []
    for s in shapes:
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(*s, generator=gen))
        opt = getattr(klkern, name)([p], backend="torch")
        times = []
        for i in range(steps + 2):
            p.grad = torch.randn(*s, generator=gen)
            start = time.perf_counter()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        cost = block_cost(opt.algorithm, opt.algorithm, s, (True, True), 10)
        rows.append({"shape": list(s), "cost": cost, "seconds": statistics.fmean(times),
                     "flops_per_s": cost / statistics.fmean(times)})
    return rows


def project(algorithm, gpus, block_size, rate, bandwidth, comm_bytes):
    blocks = blocks_of(gpt_1b_shapes(), algorithm, block_size)
    costs = [c for c, _ in blocks]
    params = sum(n for _, n in blocks)
    owner = assign(costs, gpus)
    load = [0.0] * gpus
    for c, o in zip(costs, owner):
        load[o] += c
    replicated = sum(costs) / rate
    compute = max(load) / rate
    comm = (gpus - 1) / gpus * params * comm_bytes / bandwidth  # ring all-gather of the new values
    return {"gpus": gpus, "block_size": block_size, "blocks": len(blocks), "params": params,
            "replicated_ms": replicated * 1e3, "split_compute_ms": compute * 1e3, "split_comm_ms": comm * 1e3,
            "split_ms": (compute + comm) * 1e3, "largest_block_ms": max(costs) / rate * 1e3,
            "busy_ranks": sum(1 for x in load if x > 0), "comm_bytes": comm_bytes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Network model: ring all-gather at --bandwidth bytes/s per GPU "
                                        "(default 50e9: one 400 Gb/s InfiniBand NIC per GPU, the limit once "
                                        "ranks span nodes). Throughput: --gpu-rate flop/s achieved on the "
                                        "optimizer's products (default 27e12: 40%% of an H100's fp32 FMA peak).")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--optimizers", default="KLShampoo,KLShampoo:block_size=768,SOAP")
    ap.add_argument("--gpu-rate", type=float, default=27e12)
    ap.add_argument("--bandwidth", type=float, default=50e9)
    ap.add_argument("--out", default=str(out_dir()),
                    help="folder (default bench/out/; bench/results: the committed files)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".dist_step_tmp"
    scratch.mkdir(exist_ok=True)
    measured = []
    for name in args.optimizers.split(","):
        for world in map(int, args.worlds.split(",")):
            ranks = measure(name, world, args.steps, scratch)
            row = {"optimizer": name, "world": world, "median_ms": max(r["median_ms"] for r in ranks),
                   "state_mib_per_rank": [r["state_bytes"] / 2**20 for r in ranks],
                   "recv_mib_per_step": ranks[0]["recv_bytes_per_step"] / 2**20}
            measured.append(row)
            print(json.dumps(row), flush=True)
    for f in scratch.glob("*.pt"):
        f.unlink()
    scratch.rmdir()
    calibration = calibrate(args.optimizers.split(",")[0].partition(":")[0])
    projections = [project("klshampoo", gpus, bs, args.gpu_rate, args.bandwidth, cb)
                   for gpus in (64, 1024) for bs in (None, 1024) for cb in (4, 2)]
    commit = git_commit()
    meta = {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), gloo, 1 thread per process",
            "torch": torch.__version__, "commit": commit, "python": platform.python_version(),
            "date": utc_now(),
            "steps": args.steps, "gpu_rate": args.gpu_rate, "bandwidth": args.bandwidth}
    (out / "dist_step_cpu.json").write_text(json.dumps(
        {"meta": meta, "measured": measured, "calibration": calibration, "projection": projections}, indent=1) + "\n")
    lines = ["# Distributed step: measured on this CPU (gloo) and projected to many GPUs", "",
             f"- {meta['device']}; torch {meta['torch']}; commit {commit}; {meta['date']}; "
             f"`python bench/dist_step.py`", "",
             "## Measured: one GPT-2-small layer's parameters, `process_group` over N processes", "",
             "| optimizer | processes | step ms (slowest rank, median) | state MiB per rank | "
             "received MiB per step |", "|---|---|---|---|---|"]
    for r in measured:
        lines.append(f"| {r['optimizer']} | {r['world']} | {r['median_ms']:.1f} | "
                     f"{' / '.join(f'{x:.1f}' for x in r['state_mib_per_rank'])} | {r['recv_mib_per_step']:.2f} |")
    lines += ["", "(2 cores: at 4 processes two share a core.)", "",
              "## Cost model against measured per-block step times (one thread, single process)", "",
              "| block | model cost (flop) | measured s | model flop per s |", "|---|---|---|---|"]
    for c in calibration:
        lines.append(f"| {tuple(c['shape'])} | {c['cost']:.3g} | {c['seconds']:.4f} | {c['flops_per_s']:.3g} |")
    lines += ["", f"## Projection: KL-Shampoo, 1B-parameter GPT, at {args.gpu_rate:.3g} flop/s per GPU and "
              f"{args.bandwidth:.3g} B/s all-gather bandwidth per GPU", "",
              "| GPUs | block_size | blocks | busy ranks | replicated ms | split: compute ms | split: all-gather ms "
              "(bytes/value) | split ms | largest block ms |", "|---|---|---|---|---|---|---|---|---|"]
    for p in projections:
        lines.append(f"| {p['gpus']} | {p['block_size']} | {p['blocks']} | {p['busy_ranks']} | "
                     f"{p['replicated_ms']:.0f} | {p['split_compute_ms']:.1f} | {p['split_comm_ms']:.1f} "
                     f"({p['comm_bytes']}) | {p['split_ms']:.1f} | {p['largest_block_ms']:.1f} |")
    (out / "dist_step_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
