"""The refresh's QR on real factors: what each QR method makes of them.

    python bench/refresh_factors.py [--steps 60] [--optimizers klshampoo,soap] [--save FILE.pt]

Trains the main job's model (bench/train_lm.py, preset cpu, the stdlib corpus, seed 0) for
``--steps`` steps with each optimizer and captures every matrix the refresh factors (the
rotated factor R, the input of linalg.power_step's QR). For each QR method it reports, against
the exact Q (Householder in float64 on the same float32 input, diag(R) >= 0): the largest entry
of Q - Q_exact, the orthogonality max|Q^T Q - I|, and for the product-built methods
(CholeskyQR2, shifted CholeskyQR3) how many matrices each answered itself (the others fall
back to Householder). Also the eigenvalue span of the factors
(how ill-conditioned real refresh inputs are). Writes a Markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._meta import git_commit, out_dir, utc_now  # noqa: E402
from klkern import linalg  # noqa: E402
from klkern.algorithms import _functional as F  # noqa: E402


def _train_lm():
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "bench" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_lm"] = module
    spec.loader.exec_module(module)
    return module


def capture(names: list, steps: int) -> dict:
    """{optimizer: [R stacks (B, d, d) float32]} captured at the refreshes of a short run."""
    train_lm = _train_lm()
    cfg = dataclasses.replace(train_lm.PRESETS["cpu"], steps=steps, eval_every=steps)
    data = train_lm.load_data(argparse.Namespace(data=None, max_bytes=0), cfg)
    out = {}
    inner = F.power_step
    for name in names:
        captured = []

        def recording(R, *args, **kwargs):
            captured.append(R.detach().float().clone())
            return inner(R, *args, **kwargs)

        F.power_step = recording
        try:
            train_lm.train_one(name, 0, 1e-2, cfg, data, torch.device("cpu"), progress=False)
        finally:
            F.power_step = inner
        out[name] = captured
    return out


# A column of Q is determined by its matrix when its R_jj is at least this fraction of the largest:
# below, the column spans (nearly) a null space, where any orthonormal completion is a QR.
DETERMINED = 1e-4


PRODUCT_BUILT = {"cholqr2": linalg.cholqr2, "shifted_cholqr3": linalg.shifted_cholqr3}


def evaluate(stacks: list) -> dict:
    rows = {}
    worst = {m: [0.0, 0.0, 0.0] for m in ("torch", *PRODUCT_BUILT)}
    answered = dict.fromkeys(PRODUCT_BUILT, 0)
    total = 0
    span = [float("inf"), 0.0]
    for R in stacks:
        exact, T = torch.linalg.qr(R.double())
        signs = torch.where(torch.diagonal(T, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(torch.float64)
        exact = exact * signs.unsqueeze(-2)
        diag = torch.diagonal(T, dim1=-2, dim2=-1).abs()
        determined = diag >= DETERMINED * diag.amax(-1, keepdim=True)  # (B, d) columns
        eye = torch.eye(R.shape[-1], dtype=torch.float64)
        ev = torch.linalg.eigvalsh(R.double()).abs()
        span = [min(span[0], ev.min().item()), max(span[1], ev.max().item())]
        total += R.shape[0]
        for method in worst:
            if method in PRODUCT_BUILT:
                Q, used = PRODUCT_BUILT[method](R)
                answered[method] += int(used.sum())
            else:
                Q = linalg.batched_qr(R, method="torch")
            Q = Q.double()
            error = (Q - exact).abs().amax(-2)  # per column
            worst[method][0] = max(worst[method][0], error.max().item())
            worst[method][1] = max(worst[method][1], torch.where(determined, error, 0.0).max().item())
            worst[method][2] = max(worst[method][2], (Q.mT @ Q - eye).abs().max().item())
    rows["worst"] = worst
    rows["answered"] = (answered, total)
    rows["span"] = span
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--optimizers", default="klshampoo,soap")
    ap.add_argument("--save", help="also save the captured factors (torch.save) here")
    ap.add_argument("--out", default=str(out_dir() / "refresh_factors_cpu.md"),
                    help="result file (default bench/out/; bench/results/refresh_factors_cpu.md is the committed one)")
    args = ap.parse_args(argv)
    captured = capture(args.optimizers.split(","), args.steps)
    if args.save:
        torch.save(captured, args.save)
    lines = ["# The refresh's QR on real factors", "",
             f"- commit {git_commit()}, {utc_now()}; torch {torch.__version__}; "
             f"`python bench/refresh_factors.py --steps {args.steps} --optimizers {args.optimizers}`",
             f"- factors: every refresh input of the main job's model (preset cpu, seed 0) over {args.steps} steps",
             "- error: largest entry of Q - Q_exact (Q_exact: float64 Householder of the same float32 input), over "
             f"all columns / over the determined ones (|R_jj| >= {DETERMINED:g} max |R_jj|: the others span a "
             "near null space, where any orthonormal completion is a QR); orthogonality: max |Q^T Q - I|", "",
             "- answered: the matrices the method factored itself (the others it hands to Householder)", "",
             "| optimizer | matrices | eigenvalue span | Householder fp32: error all / determined / orthogonality | "
             "CholeskyQR2: error all / determined / orthogonality | CholeskyQR2 answered | "
             "shifted CholeskyQR3: error all / determined / orthogonality | shifted CholeskyQR3 answered |",
             "|---|---|---|---|---|---|---|---|"]
    for name, stacks in captured.items():
        r = evaluate(stacks)
        answered, total = r["answered"]
        cells = [f"{name}", f"{total}", f"{r['span'][0]:.1e} .. {r['span'][1]:.1e}"]
        for method in r["worst"]:
            e = r["worst"][method]
            cells.append(f"{e[0]:.1e} / {e[1]:.1e} / {e[2]:.1e}")
            if method in answered:
                cells.append(f"{answered[method]} of {total}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
