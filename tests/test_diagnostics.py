"""optimizer.diagnostics(): finite, correct against independent computations, cheap.

Tolerances: KL_RTOL = 1e-5 relative plus KL_ATOL = 1e-6 absolute: the
tracked KL objective against the same objective computed independently (in
float64) with klkern.analysis from the state before each step; the tracked one
is a difference of O(1) float32 terms; UPDATE_RTOL =
1e-5: the reported update RMS against the parameter change of a step
(float32 roundoff of W - lr U)."""

from __future__ import annotations

import math

import pytest
import torch

import klkern
from klkern import analysis, linalg

KL_RTOL = 1e-5
KL_ATOL = 1e-6  # the objective is a difference of O(1) float32 terms
UPDATE_RTOL = 1e-5
OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]


def _model():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(10, 6) * 0.3)
    bias = torch.nn.Parameter(torch.zeros(10))
    cube = torch.nn.Parameter(torch.randn(3, 4, 5) * 0.3)
    return [("weight", weight), ("bias", bias), ("cube", cube)]


def _loss(params, X):
    (_, weight), (_, bias), (_, cube) = params
    h = torch.tanh(X @ weight.T + bias)
    return h.pow(2).mean() + (cube * h[:, :3, None, None]).pow(2).mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_three_parameter_model_gives_finite_values(name, backend):
    from klkern.runtime import _backend

    if backend == "triton" and (_backend.triton_import_error() is not None or not _backend.interpreting()):
        pytest.skip("needs the Triton interpreter")
    params = _model()
    opt = getattr(klkern, name)([p for _, p in params], lr=1e-2, precondition_frequency=5, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        opt.zero_grad()
        _loss(params, torch.randn(32, 6, generator=gen)).backward()
        opt.step()
    d = opt.diagnostics(params)
    assert set(d) == {"weight", "bias", "cube"}
    for key in ("weight", "cube"):
        assert set(d[key]) == {"kl", "eig_min", "eig_max", "staleness", "update_rms"}
        assert all(math.isfinite(v) for v in d[key].values()), (key, d[key])
        assert 0 < d[key]["eig_min"] <= d[key]["eig_max"] or name == "Shampoo"
        assert d[key]["staleness"] >= 0 and d[key]["update_rms"] > 0
    assert set(d["bias"]) == {"update_rms"} and d["bias"]["update_rms"] > 0
    assert set(opt.diagnostics()) == {0, 1, 2}  # keyed by index without names


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP", "SOAP"])
def test_tracked_kl_equals_an_independent_computation(name):
    """The tracked EMA (from the kernels' projection shortcut for the KL variants) against
    klkern.analysis.kl_objective on the state before each step that tracks it (the first update
    and every refresh step: no update reads it, so the steady steps between leave it), at the
    KL-optimal scale, relative to the isotropic estimate."""
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(7, 6))
    opt = getattr(klkern, name)([p], lr=1e-2, precondition_frequency=4)
    ema, weight = 0.0, 0.0
    for t in range(15):
        G = torch.randn(7, 6)
        block = opt.state[p]["blocks"][0] if p in opt.state else None
        t = opt.state[p]["step"] + 1 if block is not None else 0  # this step's count
        if block is not None and (t == 1 or t % 4 == 0):  # the estimate before the step
            Qa, Qb = block["Q0"], block["Q1"]
            if name == "SOAP":  # its Gram factors' eigenvalues, floored as the library does (at the factor's
                # float32 resolution, linalg.null_rtol(d) of the largest, and 1e-30)
                la, lb = (torch.diagonal(block[f"R{k}"]).clamp(min=float(torch.diagonal(block[f"R{k}"]).max())
                                                                 * linalg.null_rtol(block[f"R{k}"].shape[0]))
                          .clamp(min=1e-30) for k in (0, 1))
            else:
                la, lb = block["lam0"], block["lam1"]
            Gr = (Qa.mT @ G @ Qb).double()
            la, lb = la.double(), lb.double()
            q = float((Gr**2 / (la[:, None] * lb[None, :])).sum())
            N = G.numel()
            logdet = float(2 * analysis.kl_objective(Gr, la, lb)) - q  # kl_objective = 0.5 (logdet + q)
            # per entry, at the best scale, minus the same for the isotropic estimate c I
            per_entry = 0.5 * (math.log(q / N) + logdet / N + 1) - 0.5 * (math.log(float((Gr**2).sum()) / N) + 1)
            ema, weight = 0.9 * ema + 0.1 * per_entry, 0.9 * weight + 0.1
        p.grad = G
        opt.step()
    tracked = opt.diagnostics()[0]["kl"]
    assert abs(tracked - ema / weight) <= KL_RTOL * abs(ema / weight) + KL_ATOL


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP", "SOAP"])
def test_a_gradient_with_nothing_measurable_leaves_the_tracked_kl(name):
    """Found by a new user: one gradient of ~1e-30 (its squares underflow float32 in the KL
    variants' projection) folded log(1e-300) into the EMA, ~0.04 -> -53. A step whose objective
    measures nothing (a zero gradient, or such an underflow) now leaves the EMA exactly. SOAP's
    tracking is float64 throughout, so there the tiny gradient is measured, scale-free: the same
    EMA as the gradient at scale 1 (1e-6 relative)."""
    def run(grad_scale):
        torch.manual_seed(4)
        p = torch.nn.Parameter(torch.randn(7, 6))
        opt = getattr(klkern, name)([p], lr=1e-2, precondition_frequency=3)
        for _ in range(6):
            p.grad = torch.randn(7, 6)
            opt.step()
        before = opt.diagnostics()[0]["kl"]
        p.grad = torch.randn(7, 6) * grad_scale
        opt.step()
        return opt, p, before, opt.diagnostics()[0]["kl"]

    opt, p, before, tiny = run(1e-30)
    _, _, _, unit = run(1.0)
    assert unit != before
    if name == "SOAP":
        assert abs(tiny - unit) <= 1e-6 * abs(unit)
    else:
        assert tiny == before
    p.grad = torch.zeros(7, 6)
    opt.step()
    assert opt.diagnostics()[0]["kl"] == tiny


def test_staleness_is_zero_for_an_exact_basis_and_grows_with_a_stale_one():
    torch.manual_seed(3)
    fresh = torch.nn.Parameter(torch.randn(6, 6))
    stale = torch.nn.Parameter(fresh.detach().clone())
    exact = klkern.KLShampoo([fresh], eigenbasis="eigh", precondition_frequency=1)
    old = klkern.KLShampoo([stale], precondition_frequency=1000)
    for _ in range(30):
        g = torch.randn(6, 6)
        fresh.grad, stale.grad = g, g.clone()
        exact.step()
        old.step()
    assert exact.diagnostics()[0]["staleness"] < 1e-6  # float32 eigendecomposition roundoff (measured 4e-8)
    assert old.diagnostics()[0]["staleness"] > 1e-2


@pytest.mark.parametrize("name", ["KLSOAP", "SOAP", "Shampoo"])
def test_update_rms_is_the_step_taken(name):
    """weight decay 0, no refresh in the measured step: W_t - W_{t+1} = lr * U."""
    torch.manual_seed(4)
    w, b = torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))
    lr = 1e-2
    opt = getattr(klkern, name)([w, b], lr=lr, weight_decay=0.0, precondition_frequency=4)
    for t in range(7):  # the last step, t = 6, refreshes nothing (and Shampoo has roots from t = 4)
        before = [w.detach().clone(), b.detach().clone()]
        w.grad, b.grad = torch.randn(8, 5), torch.randn(5)
        opt.step()
    d = opt.diagnostics()
    for index, (param, old) in enumerate(zip((w, b), before)):
        taken = float(((old - param.detach()) / lr).pow(2).mean().sqrt())
        assert abs(d[index]["update_rms"] - taken) <= UPDATE_RTOL * taken + 1e-7, (name, index)


def test_one_host_sync(monkeypatch):
    params = _model()
    opt = klkern.KLShampoo([p for _, p in params], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _loss(params, torch.randn(16, 6)).backward()
        opt.step()
    calls = {"tolist": 0, "item": 0}
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counted(fn, key):
        def wrapper(self, *args, **kwargs):
            calls[key] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "tolist", counted(tolist, "tolist"))
    monkeypatch.setattr(torch.Tensor, "item", counted(item, "item"))
    opt.diagnostics()
    assert calls == {"tolist": 1, "item": 0}
