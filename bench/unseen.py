"""mask_unseen: how far each optimizer moves weight entries that never had a gradient.

    python bench/unseen.py [--out bench/results/unseen_cpu.md] [--main-job]

A small model with the three kinds of dead direction the report named: input features that are
zero in every batch (dead columns of the first layer's weight), outputs left out of the loss
(dead rows of the last layer's weight) and embedding rows never looked up, each spread among
the live ones. After 25 steps (5 refreshes, weight decay off, so AdamW moves a dead entry by
exactly 0) the figure is the largest step of the dead entries over the largest step of the live
ones, for klkern's default (``mask_unseen=True``) and the SPEC's step (``mask_unseen=False``).
tests/test_unseen.py runs the same measurement. With ``--main-job`` it also trains the main job
(bench/train_lm.py, seed 0) with KL-Shampoo and KL-SOAP under both settings and compares every
logged loss and KL figure (a run where every direction sees a gradient is the same to the bit).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(ROOT))
import klkern  # noqa: E402
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402

OPTIMIZERS = [klkern.KLShampoo, klkern.KLSOAP, klkern.SOAP, klkern.Shampoo]


class Model(torch.nn.Module):
    """An MLP with dead input features (zero in every batch) and masked outputs (not in the loss),
    and an embedding with rows never looked up, each spread among the live ones (dead directions
    that are the last rows and columns of a factor stay exactly decoupled by its eigensolver)."""

    def __init__(self, dead_inputs: int, masked_outputs: int, unseen_rows: int):
        super().__init__()
        torch.manual_seed(0)
        self.vocab, self.unseen_rows = 12, unseen_rows
        self.emb = torch.nn.Embedding(self.vocab, 16)
        self.fc1 = torch.nn.Linear(16, 24)
        self.fc2 = torch.nn.Linear(24, 10)
        self.dead_inputs, self.masked_outputs = dead_inputs, masked_outputs

    def unseen(self) -> torch.Tensor:
        return torch.arange(1, self.vocab, 3)[: self.unseen_rows]  # tokens 1, 4, ...

    def dead(self) -> torch.Tensor:
        return torch.arange(0, 16, 3)[: self.dead_inputs]  # input features 0, 3, ...

    def masked(self) -> torch.Tensor:
        return torch.arange(1, 10, 3)[: self.masked_outputs]  # outputs 1, 4, ...

    def loss(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        seen = torch.tensor([i for i in range(self.vocab) if i not in self.unseen().tolist()])
        tokens = seen[torch.randint(0, len(seen), (32,), generator=gen)]
        x = self.emb(tokens.to(self.emb.weight.device)) + torch.randn(32, 16, generator=gen).to(self.emb.weight.device)
        x = x * self.input_mask().to(x.device)
        y = self.fc2(torch.tanh(self.fc1(x)))
        target = torch.randn(32, 10, generator=gen).to(y.device)
        out = torch.ones(10, dtype=torch.bool)
        out[self.masked()] = False
        return (y[:, out.to(y.device)] - target[:, out.to(y.device)]).pow(2).mean()

    def input_mask(self) -> torch.Tensor:
        m = torch.ones(16)
        m[self.dead()] = 0.0
        return m


CASES = {  # (dead inputs of fc1 (its dead columns), masked outputs of fc2 (its dead rows), unseen embedding rows)
    "dead-columns": (5, 0, 0),
    "dead-rows": (0, 3, 0),
    "both": (5, 3, 0),
    "embedding-row": (0, 0, 2),
}


def dead_entries(model: Model) -> dict:
    """name -> boolean mask of the weight entries whose gradient is zero at every step."""
    out = {}
    if model.dead_inputs:
        m = torch.zeros(model.fc1.weight.shape, dtype=torch.bool)
        m[:, model.dead()] = True
        out["fc1.weight"] = m
    if model.masked_outputs:
        m = torch.zeros(model.fc2.weight.shape, dtype=torch.bool)
        m[model.masked(), :] = True
        out["fc2.weight"] = m
    if model.unseen_rows:
        m = torch.zeros(model.emb.weight.shape, dtype=torch.bool)
        m[model.unseen(), :] = True
        out["emb.weight"] = m
    return out


def ratio(cls, case: str, device, **kw) -> float:
    """max |step| of the dead entries / max |step| of the live ones, over the weights with dead entries."""
    model = Model(*CASES[case]).to(device)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.0, precondition_frequency=5, **kw)
    for step in range(25):
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()
    worst = 0.0
    for name, dead in dead_entries(model).items():
        moved = (dict(model.named_parameters())[name].detach() - start[name]).abs().cpu()
        live = float(moved[~dead].max())
        if live == 0:
            raise RuntimeError(f"{name}: the live entries did not move")
        worst = max(worst, float(moved[dead].max()) / live)
    return worst


def main_job_lines() -> str:
    """The main job, seed 0, KL-Shampoo and KL-SOAP, with and without mask_unseen: every row."""
    import csv
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "bench" / "train_lm.py")
    train_lm = importlib.util.module_from_spec(spec)
    sys.modules["train_lm"] = train_lm  # its dataclasses look their module up there
    spec.loader.exec_module(train_lm)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, sets in (("on", []), ("off", ["--set", "klshampoo.mask_unseen=False", "--set",
                                                 "klsoap.mask_unseen=False"])):
            out = Path(tmp) / label
            train_lm.main(["--optimizers", "klshampoo,klsoap", "--seeds", "0", "--no-progress", "--out", str(out),
                           *sets])
            with open(out / "runs.csv") as fh:
                rows[label] = [(r["optimizer"], r["step"], r["train_loss"], r["val_loss"], r["kl"])
                               for r in csv.DictReader(fh)]
    same = rows["on"] == rows["off"]
    return (f"Main job (bench/train_lm.py, seed 0, KL-Shampoo and KL-SOAP, {len(rows['on'])} logged rows of "
            f"train loss, validation loss and KL objective): mask_unseen=False against the default: "
            + ("identical in every row." if same else "DIFFERENT."))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(out_dir() / "unseen_cpu.md"),
                    help="result file (default bench/out/; bench/results/unseen_cpu.md is the committed one)")
    ap.add_argument("--main-job", action="store_true", help="also compare the main job under both settings")
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    lines = ["# Entries that never had a gradient: their largest step over the live entries'", "",
             "`python bench/unseen.py" + (" --main-job" if args.main_job else "") + "`. "
             + __doc__.split("\n\n")[2].replace("\n", " "), "",
             f"- {platform.machine()} CPU; torch {torch.__version__}; commit {git_commit()}; {utc_now()}", "",
             "| case | " + " | ".join(c.__name__ for c in OPTIMIZERS) + " | AdamW |",
             "|---|" + "---|" * (len(OPTIMIZERS) + 1)]
    for case in CASES:
        for label, kw in (("mask_unseen=True (default)", {}), ("mask_unseen=False (SPEC)", {"mask_unseen": False})):
            cells = [f"{ratio(cls, case, cpu, backend='torch', **kw):.2g}" for cls in OPTIMIZERS]
            adamw = ratio(lambda params, **o: torch.optim.AdamW(params, lr=o["lr"], weight_decay=0.0), case, cpu)
            lines.append(f"| {case}, {label} | " + " | ".join(cells) + f" | {adamw:.2g} |")
    if args.main_job:
        lines += ["", main_job_lines()]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
