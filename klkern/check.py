"""Self-check: every available path against klkern.reference, as a table.

    python -m klkern.check [--json PATH] [--quick]
    klkern.check()          # the same check; returns the rows (a list of dicts)

On whatever is present here, it runs, on small shapes:

* the torch path of each optimizer (CPU, and CUDA when present) for 12 steps
  with 4 eigenbasis refreshes, against the reference optimizer;
* the Triton kernels (on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
  each fused operation against the reference step at every matmul precision,
  and the Triton path of each optimizer against the reference;
* each batched-QR method (torch, CholeskyQR2, the CUDA extension on CUDA)
  against the QR contract (orthonormal Q, Q^T A upper triangular with
  diag >= 0, Q R = A).

It prints a table (path, device, dtype, max error, tolerance, time, status)
and exits non-zero when a path that ran disagrees with the reference (or
raised). Paths that cannot run here (no GPU, no triton, no extension) are
listed as skipped with the reason; they do not fail the check.

Tolerances (relative to the largest magnitude of the reference result):
fp32 paths 2e-5 for one operation, 3e-5 for 12-step trajectories on blocks
with full-rank factors (roundoff of two fp32 implementations, measured up to
6e-6 on the CPU; room for another BLAS's summation order); "high" (TF32
operands) 5e-3 and "medium" (bf16 operands) 3e-2 for one operation, a few
units of the operands' roundoff (2^-11, 2^-9) over products of up to 40 terms;
QR 1e-5 (float32) and 1e-12 (float64).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch

from .runtime._errors import describe, summary

__all__ = ["check", "main"]

OP_TOL = {"highest": 2e-5, "high": 5e-3, "medium": 3e-2}
TRAJ_TOL = 3e-5
QR_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
_SHAPES = [(8, 8), (12, 12), (5,), (4, 3, 4)]  # full-rank factors under a fresh regression batch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


class _Table:
    def __init__(self):
        self.rows: list[dict] = []

    def run(self, path: str, device: str, dtype: str, tol: float, fn) -> None:
        """``fn()`` returns the max error; exceptions become failing rows."""
        start = time.perf_counter()
        row = {"path": path, "device": device, "dtype": dtype, "tolerance": tol}
        try:
            err = float(fn())
            row.update(max_error=err, status="ok" if err <= tol else "MISMATCH")
        except Exception as exc:  # noqa: BLE001 - the check reports, it does not crash
            row.update(max_error=None, status=f"ERROR {summary(exc)}"[:300], error=describe(exc))
        row["time_ms"] = (time.perf_counter() - start) * 1e3
        self.rows.append(row)

    def error(self, path: str, device: str, dtype: str, status: str, error: str | None = None) -> None:
        """A failing row for a path that could not run at all (no driver, no extension)."""
        self.rows.append({"path": path, "device": device, "dtype": dtype, "tolerance": None, "max_error": None,
                          "time_ms": 0.0, "status": f"ERROR {status}"[:300], "error": error})

    def skip(self, path: str, device: str, reason: str) -> None:
        self.rows.append({"path": path, "device": device, "dtype": "-", "tolerance": None, "max_error": None,
                          "time_ms": 0.0, "status": f"skipped ({reason})"})


# ------------------------------------------------------------------ optimizers


def _quadratic_grad(p: torch.Tensor, target: torch.Tensor, step: int) -> torch.Tensor:
    """The gradient of a separable quartic-ish loss at ``p`` plus seeded noise (on the CPU)."""
    diff = p.detach().cpu().float() - target
    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + step))
    return diff * (1 + diff.abs()) + 0.05 * noise


def _trajectory_error(name: str, device: torch.device, backend: str, steps: int = 12) -> float:
    """Max relative parameter difference after ``steps`` steps against the reference optimizer."""
    import klkern

    from . import reference as R

    ref_cls = {"KLShampoo": R.ReferenceKLShampoo, "KLSOAP": R.ReferenceKLSOAP, "SOAP": R.ReferenceSOAP,
               "Shampoo": R.ReferenceShampoo}[name]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(*s, generator=gen) for s in _SHAPES]
    targets = [torch.randn(*s, generator=gen) for s in _SHAPES]
    fast = [torch.nn.Parameter(p.clone().to(device)) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    kw = dict(lr=1e-2, precondition_frequency=3, matmul_precision="highest")
    opt = getattr(klkern, name)(fast, backend=backend, **kw)
    opt_ref = ref_cls(ref, **{k: v for k, v in kw.items() if k != "matmul_precision"})
    for t in range(steps):
        for pf, pr, tgt in zip(fast, ref, targets):
            pr.grad = _quadratic_grad(pr, tgt, t)
            pf.grad = _quadratic_grad(pf, tgt, t).to(device)
        opt.step()
        opt_ref.step()
    return max(_rel(a, b) for a, b in zip(fast, ref))


# ------------------------------------------------------------------ kernels


def _kernel_errors(device: torch.device, mode: str) -> dict:
    """Max relative error of each fused operation against the reference step at ``mode``."""
    from . import reference as R
    from . import triton_kernels as K

    gen = torch.Generator().manual_seed(1)
    B, m, n = 2, 17, 40
    G = torch.randn(B, m, n, generator=gen)
    Qa = torch.linalg.qr(torch.randn(B, m, m, generator=gen))[0]
    Qb = torch.linalg.qr(torch.randn(B, n, n, generator=gen))[0]
    lam_a, lam_b = torch.rand(B, m, generator=gen) + 0.05, torch.rand(B, n, generator=gen) + 0.05
    M = torch.randn(B, m, n, generator=gen)
    dev = [t.to(device) for t in (G, Qa, Qb, lam_a, lam_b)]
    mom = M.clone().to(device)
    X = torch.empty(B, m, n, device=device)
    keep = torch.ones(B, dtype=torch.bool, device=device)
    Gr, (pa, pb) = K.rotate(*dev[:3], keep, projection=(1 / (m * dev[3]), 1 / (n * dev[4])),
                            momentum=(mom, torch.full((B,), 0.9, device=device)), betas=(0.1, 0.0), eps=1e-8,
                            sqrt_lam=(dev[3].sqrt(), dev[4].sqrt()), direction=X, precision=mode)
    errs = {"rotate": 0.0, "factor_ema_": 0.0, "precondition": 0.0}
    for b in range(B):
        Qs, Gb = [Qa[b], Qb[b]], G[b]
        Gr_ref = R.rotate(Gb, Qs)
        new_a, new_b = R.eigenvalue_update([lam_a[b], lam_b[b]], Gb, Qs, 0.0)
        M_ref = R.momentum_update(M[b], Gr_ref, 0.9)
        errs["rotate"] = max(errs["rotate"], _rel(Gr[b], Gr_ref), _rel(mom[b], M_ref), _rel(pa[b], new_a),
                             _rel(pb[b], new_b), _rel(X[b], M_ref * R.kl_scaling([lam_a[b], lam_b[b]], 2, 1e-8)))
    S = [torch.eye(m).expand(B, m, m) * 0.5, torch.eye(n).expand(B, n, n) * 0.5]
    Rk = (Qa.mT @ S[0] @ Qa).to(device).contiguous()
    Gr_exact = torch.stack([R.rotate(G[b], [Qa[b], Qb[b]]) for b in range(B)]).to(device)
    K.factor_ema_(Rk, Gr_exact, (1.0 / lam_b).to(device), 0.95, 0.05 / n, precision=mode)
    for b in range(B):
        new = R.kl_factor_update([S[0][b], S[1][b]], G[b], [Qa[b], Qb[b]], [lam_a[b], lam_b[b]], 0.95)
        errs["factor_ema_"] = max(errs["factor_ema_"], _rel(Rk[b], Qa[b].mT @ new[0] @ Qa[b]))
    D = torch.stack([R.kl_scaling([lam_a[b], lam_b[b]], 2, 1e-8) for b in range(B)])
    U = K.precondition(((Qa.mT @ M @ Qb) * D).to(device), *dev[1:3], precision=mode)
    for b in range(B):
        errs["precondition"] = max(errs["precondition"], _rel(U[b], R.rotated_precondition(M[b], [Qa[b], Qb[b]], D[b])))
    return errs


# ------------------------------------------------------------------ QR


def _qr_error(method: str, device: torch.device, dtype: torch.dtype) -> float:
    from .linalg import batched_qr

    gen = torch.Generator().manual_seed(2)
    A = (torch.randn(3, 40, 33, generator=gen, dtype=torch.float64) / 40**0.5
         + 4 * torch.eye(40, 33, dtype=torch.float64)).to(dtype=dtype, device=device)
    Q = batched_qr(A, method=method).double().cpu()
    Ad = A.double().cpu()
    Rm = Q.mT @ Ad
    eye = torch.eye(33, dtype=torch.float64)
    ref_Q, ref_R = torch.linalg.qr(Ad)
    ref_Q = ref_Q * torch.sign(torch.diagonal(ref_R, dim1=-2, dim2=-1)).unsqueeze(-2)
    return max(float((Q.mT @ Q - eye).abs().max()),
               float((Q @ Rm - Ad).norm() / Ad.norm()),
               float(torch.tril(Rm, -1).abs().max() / Ad.abs().max()),
               float((-torch.diagonal(Rm, dim1=-2, dim2=-1)).clamp(min=0).max()),
               float((Q - ref_Q).abs().max()) / 10)  # Q itself, to 10x the bound (cond <= 3)


# ------------------------------------------------------------------ driver


def check(quick: bool = False) -> list[dict]:
    """Run every available path against the reference; return the table's rows."""
    from .linalg import _ext
    from .runtime import _backend, _precision

    table = _Table()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    names = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]
    for device in devices:
        for name in names:
            table.run(f"torch path: {name} (12 steps)", device.type, "float32", TRAJ_TOL,
                      lambda name=name, device=device: _trajectory_error(name, device, "torch"))
    triton_devices = []
    if _backend.triton_import_error() is not None:
        table.skip("triton kernels", "-", f"triton not importable: {_backend.triton_import_error()}")
    else:
        for device in devices:
            if device.type == "cuda":
                try:
                    _backend.resolve("triton", device)
                    triton_devices.append(device)
                except RuntimeError as err:  # triton imports but has no usable driver: a row, not a crash
                    table.error("triton kernels", "cuda", "-", str(err))
            elif device.type == "cpu" and _backend.interpreting():
                problem = _backend.interpreter_problem()
                if problem:
                    table.skip("triton kernels", "cpu (interpreter)", problem)
                else:
                    triton_devices.append(device)
        if not triton_devices and not torch.cuda.is_available() and not _backend.interpreting():
            table.skip("triton kernels", "cpu", "no GPU; set TRITON_INTERPRET=1 to check them in the interpreter")
    for device in triton_devices:
        label = "cuda" if device.type == "cuda" else "cpu (interpreter)"
        for mode in _precision.PRECISIONS:
            results: dict = {}

            def kernels(mode=mode, device=device, results=results):
                results.update(_kernel_errors(device, mode))
                return max(results.values())

            table.run(f"triton kernels at {mode}", label, "float32", OP_TOL[mode], kernels)
            for op, op_err in results.items():
                table.rows.append({"path": f"  {op} ({mode})", "device": label, "dtype": "float32",
                                   "tolerance": OP_TOL[mode], "max_error": op_err, "time_ms": 0.0,
                                   "status": "ok" if op_err <= OP_TOL[mode] else "MISMATCH"})
        for name in names[: 1 if quick else 4]:
            table.run(f"triton path: {name} (12 steps)", label, "float32", TRAJ_TOL,
                      lambda name=name, device=device: _trajectory_error(name, device, "triton"))
    for device in devices:
        for dtype in (torch.float32, torch.float64):
            dname = str(dtype).replace("torch.", "")
            for method in ("torch", "cholqr2", "shifted_cholqr3"):
                table.run(f"qr: {method}", device.type, dname, QR_TOL[dtype],
                          lambda method=method, device=device, dtype=dtype: _qr_error(method, device, dtype))
            if device.type == "cuda":
                if os.environ.get("KLKERN_NO_EXT", "0") not in ("", "0"):
                    table.skip("qr: extension", "cuda", "disabled by KLKERN_NO_EXT")
                elif _ext.qr_extension() is None:  # on a GPU machine a failed build is a failure
                    table.error("qr: extension", "cuda", dname, "the CUDA extension could not be built or "
                                f"loaded: {summary(_ext.LAST_ERROR or 'unknown cause')}", _ext.LAST_ERROR)
                else:
                    table.run("qr: extension", "cuda", dname, QR_TOL[dtype],
                              lambda device=device, dtype=dtype: _qr_error("extension", device, dtype))
    if not torch.cuda.is_available():
        table.skip("cuda paths (torch, triton, qr extension)", "cuda", "no CUDA device")
    return table.rows


def format_table(rows: list[dict]) -> str:
    header = f"{'path':42s} {'device':18s} {'dtype':8s} {'max error':>10s} {'tolerance':>9s} {'ms':>8s}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        err = "-" if r["max_error"] is None else f"{r['max_error']:.2e}"
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.0e}"
        lines.append(f"{r['path']:42s} {r['device']:18s} {r['dtype']:8s} {err:>10s} {tol:>9s} "
                     f"{r['time_ms']:8.1f}  {r['status']}")
    return "\n".join(lines)


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not (r["status"] == "ok" or r["status"].startswith("skipped"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m klkern.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--quick", action="store_true", help="one optimizer on the Triton path instead of four")
    args = ap.parse_args(argv)
    import klkern

    start = time.perf_counter()
    rows = check(quick=args.quick)
    print(f"klkern {klkern.__version__}, torch {torch.__version__}"
          + (f", CUDA device {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA device"))
    print(format_table(rows))
    bad = failed(rows)
    print(f"{len(rows) - len(bad)} of {len(rows)} rows ok or skipped; {len(bad)} failed; "
          f"{time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "failed": len(bad)}, fh, indent=1)
    return 1 if bad else 0


class _CallableModule(types.ModuleType):
    """``klkern.check()`` calls :func:`check` (the module is also ``python -m klkern.check``)."""

    def __call__(self, quick: bool = False) -> list[dict]:
        return check(quick=quick)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
