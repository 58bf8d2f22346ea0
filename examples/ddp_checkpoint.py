"""Data-parallel training with klkern's split, a distributed checkpoint, and a resume.

    torchrun --nproc_per_node=2 examples/ddp_checkpoint.py [--steps 20] [--dir /tmp/klkern_ckpt]

Each rank trains the same DDP model on its share of every batch; ``process_group=`` makes the
ranks split the preconditioner work (each block is stepped by one rank, then the new values are
all-gathered). Halfway, model and optimizer are saved with torch.distributed.checkpoint (each
block written once, by its rank); a fresh model and optimizer then load it (``init_state()``
first, so that the load has tensors to fill) and continue. The script checks that every rank
holds the same weights and that the resumed run matches the uninterrupted one: exactly on 2
ranks; on more, to float32 rounding (DDP's gradient all-reduce may sum in another order in a
freshly wrapped model, as it does for torch.optim.AdamW). NCCL on GPUs, gloo on the CPU
(docs/distributed.md).
"""

import argparse
import gc
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import klkern


def make(seed, device):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = klkern.KLShampoo(ddp.parameters(), lr=1e-2, precondition_frequency=5,
                           process_group=dist.group.WORLD)
    return ddp, opt


def train(model, opt, steps, start, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen)
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)  # this rank's share
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        opt.step()
    return loss.item()


def run(args, device) -> bool:
    """Train, checkpoint, resume; True when the resumed run and every rank agree."""
    rank = dist.get_rank()
    path = args.dir or (tempfile.mkdtemp(prefix="klkern_ckpt_") if rank == 0 else None)
    holder = [path]
    dist.broadcast_object_list(holder)  # every rank writes into the same folder
    path = holder[0]

    model, opt = make(0, device)
    half = args.steps // 2
    train(model, opt, half, 0, device)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    loss = train(model, opt, args.steps - half, half, device)

    resumed, resumed_opt = make(1, device)  # other initial weights: everything comes from the checkpoint
    resumed_opt.init_state()
    state = {"model": resumed.state_dict(), "optim": resumed_opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optim"])
    train(resumed, resumed_opt, args.steps - half, half, device)

    gap = max(float(((a - b).abs().max() / b.abs().max()).item()) for a, b in zip(model.parameters(),
                                                                                resumed.parameters()))
    same = gap == 0 or (dist.get_world_size() > 2 and gap < 1e-5)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
    dist.barrier()  # every rank is done with the checkpoint
    if rank == 0:
        if args.dir is None:  # the temporary folder this run made: removed before it is reported
            shutil.rmtree(path, ignore_errors=True)
            where = f"checkpoint was in {path} (temporary, now deleted; --dir keeps one)"
        else:
            where = f"checkpoint in {path}"
        result = "identical" if gap == 0 else (f"equal to {gap:.1e}" if same else f"DIFFERENT ({gap:.1e})")
        print(f"{dist.get_world_size()} ranks, loss {loss:.4f} after {args.steps} steps; resumed run "
              f"{result}; ranks {'in sync' if in_sync else 'OUT OF SYNC'}; {where}")
    return same and in_sync


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dir", default=None, help="checkpoint folder (default: a new temporary one)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        ok = run(args, device)
    finally:
        # The models and optimizers hold the process group: free them while it is alive (DDP's
        # reference cycles wait for a collection), so that nothing of it is torn down at exit
        gc.collect()
        dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
