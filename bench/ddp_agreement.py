"""DDP against one process: how far a DDP run's parameters end from one process's.

    python bench/ddp_agreement.py [--worlds 2,3] [--steps 30] [--out FILE] [--json FILE]

An MLP 16 -> 32 -> 32 -> 8 (non-square weights: at the first step the larger factor of each has
no energy in half of its directions or more) trained on batches of 60 rows with lr 1e-2 and
precondition_frequency 5: under DDP on each of ``--worlds`` gloo processes (127.0.0.1, one thread each),
each rank its share of the rows and the gradients all-reduced, with ``process_group`` (the ranks
split the preconditioner work, docs/distributed.md), against one process on the whole batch. The
two runs differ only in the order the gradients' sums are rounded in. Reported per optimizer:
the largest relative difference of a parameter, max |a - b| / max |b|, after ``--steps`` steps,
and how far the one-process run moved from the start on the same scale; torch.optim.AdamW for
scale. tests/test_distributed.py runs it and bounds the difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, utc_now  # noqa: E402

OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo", "AdamW"]
WIDTHS = (16, 32, 32, 8)
ROWS = 60
DEADLINE_S = 300.0


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list = []
    for a, b in zip(WIDTHS, WIDTHS[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(ROWS, WIDTHS[0], generator=gen), torch.randn(ROWS, WIDTHS[-1], generator=gen)


def optimizer(name: str, params, group=None):
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-2)
    return getattr(klkern, name)(params, lr=1e-2, precondition_frequency=5,
                                 **({"process_group": group} if group is not None else {}))


def train(net, opt, steps: int, data) -> list:
    for t in range(steps):
        X, Y = data(t)
        opt.zero_grad()
        (net(X) - Y).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _worker(rank: int, world: int, port: int, steps: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for name in OPTIMIZERS:
            net = torch.nn.parallel.DistributedDataParallel(model())
            shard = lambda t: tuple(x.chunk(world)[rank] for x in batch(t))  # noqa: E731
            out[name] = {"ddp": train(net, optimizer(name, net.parameters(), dist.group.WORLD), steps, shard)}
            if rank == 0:
                single = model()
                out[name]["single"] = train(single, optimizer(name, single.parameters()), steps, batch)
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative(a: list, b: list) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


def measure(world: int, steps: int) -> dict:
    """{optimizer: {"ddp_vs_single": ..., "moved": ..., "ranks_equal": bool}}."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), steps, tmp), nprocs=world, join=False,
                                 start_method="spawn")
        stop = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=5):
            if time.monotonic() > stop:
                for process in ctx.processes:
                    process.kill()
                raise RuntimeError(f"bench/ddp_agreement.py: {world} processes did not finish in {DEADLINE_S} s")
        runs = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    start = [p.detach() for p in model().parameters()]
    return {name: {"ddp_vs_single": _relative(runs[0][name]["ddp"], runs[0][name]["single"]),
                   "moved": _relative(runs[0][name]["single"], start),
                   "ranks_equal": all(all(torch.equal(a, b) for a, b in zip(runs[r][name]["ddp"], runs[0][name]["ddp"]))
                                      for r in range(world))}
            for name in OPTIMIZERS}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,3", help="comma-separated numbers of processes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", help="also write the markdown report here")
    p.add_argument("--json", help="write the figures here as JSON ({world: {optimizer: ...}})")
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    result = {str(w): measure(w, args.steps) for w in worlds}
    lines = ["# DDP against one process", "",
             f"`python bench/ddp_agreement.py --worlds {args.worlds} --steps {args.steps}`: "
             + " ".join(__doc__.split("\n\n")[2].split()), "",
             f"- {platform.machine()} CPU; torch {torch.__version__}; commit {git_commit()}; {utc_now()}", "",
             "| optimizer | " + " | ".join(f"DDP on {w} against one process" for w in worlds)
             + " | one process moved | ranks bit-identical |", "|---|" + "---|" * (len(worlds) + 2)]
    for name in OPTIMIZERS:
        rows = [result[str(w)][name] for w in worlds]
        same = "yes" if all(r["ranks_equal"] for r in rows) else "NO"
        lines.append(f"| {name} | " + " | ".join(f"{r['ddp_vs_single']:.1e}" for r in rows)
                     + f" | {rows[0]['moved']:.2f} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
