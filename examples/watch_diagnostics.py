"""Watching a run with ``optimizer.diagnostics()``.

    python examples/watch_diagnostics.py [--optimizer KLShampoo] [--steps 100] [--every 25]

Every ``--every`` steps it prints, per weight (by name): ``kl`` (the KL objective of the
block's covariance estimate against an isotropic one: 0 is no better than a scaled identity,
lower fits the gradients better), the range of the eigenvalue estimates, ``staleness`` (how far
the eigenbasis is from diagonalising the current factor; it grows between refreshes) and the
RMS of the update direction the state gives, before the learning rate (about the last step's;
docs/diagnostics.md says exactly). A call costs one host synchronisation.
"""

import argparse
import math

import torch

import klkern


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="KLShampoo", choices=["KLShampoo", "KLSOAP", "SOAP", "Shampoo"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 12))
    target = torch.randn(24, 12)
    opt = getattr(klkern, args.optimizer)(model.parameters(), lr=1e-2, precondition_frequency=10)
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 24)
        loss = (model(x) - torch.tanh(x @ target)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            print(f"step {step}: loss {loss.item():.4f}")
            for name, d in opt.diagnostics(model.named_parameters()).items():
                if "kl" not in d:  # biases take the AdamW path: update size only
                    continue
                print(f"  {name:10s} kl {d['kl']:+.3f}  eig [{d['eig_min']:.2e}, {d['eig_max']:.2e}]  "
                      f"staleness {d['staleness']:.2e}  update rms {d['update_rms']:.2e}")
                if not all(math.isfinite(v) for v in d.values()):
                    raise SystemExit(f"non-finite diagnostics for {name}: {d}")


if __name__ == "__main__":
    main()
