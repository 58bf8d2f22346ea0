"""A plain training loop with klkern, a checkpoint, and a resume.

    python examples/train_loop.py [--optimizer KLShampoo] [--steps 200]

A small MLP learns a fixed random classification task. Every 50 steps the model and the
optimizer are checkpointed (``torch.save`` of both state dicts); the script then resumes from
the last checkpoint into a fresh model and optimizer and checks that the resumed run continues
exactly like the uninterrupted one.
"""

import argparse
import os
import tempfile

import torch

import klkern


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))


def batch(step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(64, 32, generator=gen)
    y = (x[:, :10] * torch.linspace(1, 2, 10)).argmax(1)  # a fixed rule the model can learn
    return x, y


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the first step of KL-Shampoo, KL-SOAP and SOAP only initialises their state
    return loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="KLShampoo", choices=["KLShampoo", "KLSOAP", "SOAP", "Shampoo"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = make_model()
    opt = getattr(klkern, args.optimizer)(model.parameters(), lr=args.lr, weight_decay=0.01)
    first = train(model, opt, 1)
    half = args.steps // 2
    train(model, opt, half - 1, start=1)
    path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": half}, path)
    final = train(model, opt, args.steps - half, start=half)
    print(f"{args.optimizer}: loss {first:.3f} at step 0, {final:.3f} at step {args.steps}")

    ckpt = torch.load(path)
    resumed = make_model()
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = getattr(klkern, args.optimizer)(resumed.parameters(), lr=args.lr, weight_decay=0.01)
    resumed_opt.load_state_dict(ckpt["optim"])
    train(resumed, resumed_opt, args.steps - ckpt["step"], start=ckpt["step"])
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    print(f"resumed from step {ckpt['step']}: {'identical to' if same else 'DIFFERENT from'} the uninterrupted run")
    if not same or not final < first:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
