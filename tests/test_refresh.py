"""The eigenbasis refresh (klkern.algorithms._functional.refresh_): what it preserves and how Q stays orthogonal.

The refresh computes qr(Q R) as Q qr(R) (linalg.power_step), so it composes Q with the refresh's V;
every REORTHOGONALIZE_EVERY-th refresh forms Q R and its QR instead, which returns an orthogonal Q
whatever rounding has done to the old one. Both must leave the factor S = Q R Q^T and the momentum
in the parameter's basis (Q_0 M Q_1^T) unchanged; the refresh only changes the basis they are in.
"""

import dataclasses
import warnings

import pytest
import torch

import klkern
from klkern import linalg
from klkern.algorithms import _functional as F
from klkern.algorithms import _stacked
from klkern.algorithms._hyper import hyper

ALGOS = {"klshampoo": klkern.KLShampoo, "klsoap": klkern.KLSOAP, "soap": klkern.SOAP}


def _state(algorithm, shape, steps=3, seed=0):
    """Stacked state of ``algorithm`` for a stack of 2 blocks of ``shape`` after a few steps (two
    parameters of that shape, stepped by the optimizer without a refresh)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for _ in range(2)]
    opt = ALGOS[algorithm](params, precondition_frequency=10**9)
    for _ in range(steps + 1):  # the first step initialises
        for p in params:
            p.grad = torch.randn(*shape, generator=g)
        opt.step()
    (stack,) = [st for plan in opt._engine.plans for st in plan.stacks]
    hp = hyper(dict(opt.param_groups[0], precondition_frequency=1), rotation_mode="highest", factor_mode="highest")
    return stack.bufs, stack.mask, hp


def _in_parameter_basis(bufs, mask):
    """Every factor S_k = Q_k R_k Q_k^T and the momentum rotated back to the parameter's basis."""
    Qs = _stacked._bases(bufs, mask)
    S = [Qs[k] @ bufs[f"R{k}"] @ Qs[k].mT for k in _stacked._modes(mask)]
    return S, _stacked._rotate_back(bufs["exp_avg"], Qs)


def _orthogonality(bufs, mask):
    return max((bufs[f"Q{k}"].mT @ bufs[f"Q{k}"] - torch.eye(bufs[f"Q{k}"].shape[-1])).abs().max().item()
               for k in _stacked._modes(mask))


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
@pytest.mark.parametrize("shape", [(6, 4), (9, 16), (5, 3, 7), (12, 12)])
@pytest.mark.parametrize("direct", [False, True], ids=["power_step", "qr-of-QR"])
@pytest.mark.parametrize("explicit", [False, True], ids=["reflectors", "explicit-V"])
def test_refresh_keeps_the_factors_and_the_momentum(algorithm, shape, direct, explicit, monkeypatch):
    """Both routes leave S_k and the momentum in the parameter's basis unchanged (1e-5 relative,
    float32) and return orthogonal bases (1e-5). Shapes: 2-D, odd, 3-D (a middle mode), equal
    sizes (with an explicit V, CUDA's route, modes of one size share one QR call; with LAPACK's
    reflectors each mode is refreshed on its own, in place in the state)."""
    monkeypatch.setattr(linalg, "applies_reflectors", lambda A: not explicit and A.numel() > 0)
    bufs, mask, hp = _state(algorithm, shape)
    S_before, M_before = _in_parameter_basis(bufs, mask)
    t = F.REORTHOGONALIZE_EVERY if direct else 1
    F.refresh_(bufs, mask, hp, t, sort_v=algorithm == "soap")
    S_after, M_after = _in_parameter_basis(bufs, mask)
    for a, b in zip(S_after, S_before):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert (M_after - M_before).abs().max() <= 1e-5 * M_before.abs().max()
    assert _orthogonality(bufs, mask) < 1e-5


def test_a_drifted_basis_is_made_orthogonal_again_by_the_periodic_qr():
    """Q made non-orthogonal by 1e-3 (what many refreshes of rounding would do over a long run):
    the power_step route keeps the drift (it only composes Q with an orthogonal V), the periodic
    QR of Q R removes it, and both keep S = Q R Q^T. Fails if the periodic QR is dropped."""
    bufs, mask, hp = _state("klshampoo", (24, 16))
    g = torch.Generator().manual_seed(5)
    for k in _stacked._modes(mask):
        bufs[f"Q{k}"].add_(1e-3 * torch.randn(bufs[f"Q{k}"].shape, generator=g))
    drift = _orthogonality(bufs, mask)
    assert drift > 5e-4
    S_before, _ = _in_parameter_basis(bufs, mask)
    F.refresh_(bufs, mask, hp, 1)
    assert _orthogonality(bufs, mask) > 0.5 * drift  # composing with V does not repair it
    F.refresh_(bufs, mask, hp, F.REORTHOGONALIZE_EVERY)
    assert _orthogonality(bufs, mask) < 1e-5
    S_after, _ = _in_parameter_basis(bufs, mask)
    for a, b in zip(S_after, S_before):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("direct", [False, True], ids=["composed", "direct"])
def test_the_idealized_refresh_keeps_the_factor_and_repairs_a_drifted_basis(direct):
    """eigenbasis="eigh": the exact refresh composes Q with R's eigenvectors, and every
    REORTHOGONALIZE_EVERY-th refresh decomposes S = Q R Q^T itself. Both keep S and the momentum
    in the parameter's basis (1e-5 on an orthogonal Q) and make R diagonal; only the direct one
    repairs a Q drifted by 1e-3."""
    bufs, mask, hp = _state("klshampoo", (24, 16))
    hp = dataclasses.replace(hp, eigenbasis="eigh")
    S_before, M_before = _in_parameter_basis(bufs, mask)
    F._refresh_exact(bufs, mask, _stacked._bases(bufs, mask), hp.eigval_clamp, direct=direct)
    S_after, M_after = _in_parameter_basis(bufs, mask)
    for a, b in zip(S_after, S_before):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert (M_after - M_before).abs().max() <= 1e-5 * M_before.abs().max()
    for k in _stacked._modes(mask):
        R = bufs[f"R{k}"]
        assert (R - torch.diag_embed(torch.diagonal(R, dim1=-2, dim2=-1))).abs().max() <= 1e-5 * R.abs().max()
    g = torch.Generator().manual_seed(5)
    for k in _stacked._modes(mask):
        bufs[f"Q{k}"].add_(1e-3 * torch.randn(bufs[f"Q{k}"].shape, generator=g))
    drift = _orthogonality(bufs, mask)
    F._refresh_exact(bufs, mask, _stacked._bases(bufs, mask), hp.eigval_clamp, direct=direct)
    if direct:
        assert _orthogonality(bufs, mask) < 1e-5
    else:
        assert _orthogonality(bufs, mask) > 0.5 * drift


def test_orthogonality_stays_bounded_over_many_refreshes():
    """1000 refreshes (every step) of a (32, 24) KL-Shampoo block: |Q^T Q - I| over the last 200
    stays below 5e-6 (measured 3.1e-6; without the periodic QR it had grown to 1.1e-5 by then)."""
    g = torch.Generator().manual_seed(9)
    params = [torch.nn.Parameter(torch.randn(32, 24, generator=g)) for _ in range(2)]
    opt = klkern.KLShampoo(params, lr=0.0, weight_decay=0.0, precondition_frequency=1)
    late = 0.0
    for t in range(0, 1001):
        for p in params:
            p.grad = torch.randn(32, 24, generator=g)
        opt.step()
        if t > 800:
            (stack,) = opt._engine.plans[0].stacks
            late = max(late, _orthogonality(stack.bufs, stack.mask))
    assert late < 5e-6, late


# --------------------------------------------------------------------------
# staleness_threshold: refresh only the bases that have gone stale


def _count_refreshed(monkeypatch):
    """Record how many bases each power_step / periodic QR refreshes."""
    counts = []
    inner = F.power_step

    def counting(R, *args, **kwargs):
        counts.append(R.shape[0])
        return inner(R, *args, **kwargs)
    monkeypatch.setattr(F, "power_step", counting)
    return counts


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_staleness_threshold_matches_the_reference_and_refreshes_fewer_bases(algorithm, monkeypatch):
    """With a threshold the fast path refreshes the same bases as reference.refresh_wanted (so the
    trajectories agree to 1e-3 of the parameters' movement over 40 steps with a refresh every 2
    steps: measured up to 1.3e-4; of the parameters' size 1e-7..1.8e-5 by the draw, where one
    basis refreshed on one side only gives ~1e-3, some 70x more of the movement) and
    fewer of them than
    without one; a threshold of 0 refreshes every basis that is not exactly diagonal (all of them
    here), an infinite one only at every REORTHOGONALIZE_EVERY-th refresh."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_optimizers import assert_trajectories_match, run_pair

    name = algorithm
    torch.manual_seed(0)
    shapes = [(8, 8), (16, 16), (8, 8), (4, 5, 6)]
    counts = _count_refreshed(monkeypatch)
    seen = []
    measure = F.staleness
    monkeypatch.setattr(F, "staleness", lambda R: seen.append(measure(R)) or seen[-1])
    run_pair(name, shapes, steps=40, precondition_frequency=2)
    every = sum(counts)
    totals = {}
    for threshold in (0.0, "median", float(1e30)):
        if threshold == "median":  # of the staleness values the threshold-0 run met
            threshold = float(torch.cat(seen).median())
        counts.clear()
        p_fast, p_ref, _ = run_pair(name, shapes, steps=40, precondition_frequency=2, staleness_threshold=threshold)
        assert_trajectories_match(p_fast, p_ref, rtol=1e-3)
        totals[threshold] = sum(counts)
    assert totals[0.0] == every
    median = [t for t in totals if 0 < t < 1e30][0]
    assert 0 < totals[median] < every, (totals, every)
    assert totals[float(1e30)] == 0  # 19 refreshes: none is a 32nd


def test_staleness_is_never_negative_and_is_zero_only_for_a_diagonal_factor():
    """Summing the off-diagonal squares directly: ||R||^2 - ||diag||^2 cancels to negative values
    in float32 for a nearly diagonal R (which made a threshold of 0 skip such bases)."""
    g = torch.Generator().manual_seed(0)
    D = torch.diag_embed(torch.rand(64, 32, generator=g) + 1.0)
    for scale in (0.0, 1e-7, 1e-5, 1e-3):
        E = scale * torch.randn(64, 32, 32, generator=g)
        R = D + 0.5 * (E + E.mT) * (1 - torch.eye(32))
        s = F.staleness(R)
        assert (s >= 0).all()
        assert (s == 0).all() if scale == 0 else (s > 0).all()
        expect = (R - D).pow(2).double().sum((-2, -1)) / D.diagonal(dim1=-2, dim2=-1).double().pow(2).sum(-1)
        assert torch.allclose(s.double(), expect, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------
# The CPU's bases are stored column-major (LAPACK's layout: the refresh updates them in place)

def _bases_of(opt):
    return [block[name] for st in opt.state.values() for block in st.get("blocks", [])
            if block is not None for name in block if name.startswith("Q")]


def _run(algorithm, steps, column_major, monkeypatch, opt_state=None):
    monkeypatch.setattr(F, "BASES_COLUMN_MAJOR", column_major)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(12, 12), (12, 12), (7, 20), (20, 7)]]
    opt = ALGOS[algorithm](params, lr=1e-2, precondition_frequency=2, max_precond_dim=64)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_cpu_bases_are_column_major_and_either_layout_gives_the_same_run(algorithm, monkeypatch):
    """New CPU state holds its bases column-major, and they stay so through refreshes (square
    parameters: two modes of one size share a QR call) and a state_dict round trip. A run with
    row-major bases (a checkpoint written before, or BASES_COLUMN_MAJOR off) follows the same
    trajectory: 1e-5 relative over 12 steps with a refresh every 2 steps (the products' rounding
    may differ with the layout), and a checkpoint whose bases are row-major loads and continues."""
    params, opt = _run(algorithm, 12, True, monkeypatch)
    bases = _bases_of(opt)
    assert bases and all(F.column_major(Q) for Q in bases)
    row_params, row_opt = _run(algorithm, 12, False, monkeypatch)
    assert all(Q.is_contiguous() for Q in _bases_of(row_opt))
    for p, q in zip(params, row_params):
        assert (p - q).abs().max() <= 1e-5 * q.abs().max()
    # a state_dict round trip keeps the layout; row-major bases loaded from an older checkpoint work
    saved = opt.state_dict()
    rowmajor = {**saved, "state": {i: {**st, "blocks": [
        {n: (v.contiguous() if n.startswith("Q") else v) for n, v in block.items()} if block else block
        for block in st["blocks"].values()]} for i, st in saved["state"].items()}}  # that release's list form
    for state, layout in ((saved, F.column_major), (rowmajor, lambda Q: Q.is_contiguous())):
        _, reopened = _run(algorithm, 4, True, monkeypatch, opt_state=state)
        assert all(layout(Q) for Q in _bases_of(reopened))
    cont, _ = _run(algorithm, 4, True, monkeypatch, opt_state=saved)
    cont_row, _ = _run(algorithm, 4, True, monkeypatch, opt_state=rowmajor)
    for p, q in zip(cont, cont_row):
        assert (p - q).abs().max() <= 1e-5 * q.abs().max()


# --------------------------------------------------------------------------
# stagger_refresh: each block refreshed every T steps at its own offset (klkern/engine/_schedule.py)

STAGGER_SHAPES = [(8, 8), (16, 16), (8, 8), (12, 20), (4, 5, 6), (16, 16), (9,)]


def _refreshed(opt, params, before):
    """{parameter index: bases changed by this step} (a basis changes only when it is refreshed)."""
    out = {}
    for j, p in enumerate(params):
        blocks = opt.state.get(p, {}).get("blocks") or []
        for block, old in zip(blocks, before.get(j, [])):
            out[j] = any(not torch.equal(block[n], old[n]) for n in old)
    return out


def _bases_now(opt, params):
    return {j: [{n: v.clone() for n, v in b.items() if n.startswith("Q")} for b in opt.state[p]["blocks"]]
            for j, p in enumerate(params) if p in opt.state and "blocks" in opt.state[p]}


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_staggered_refresh_matches_the_reference(algorithm):
    """The fast path and the reference, which follows the same schedule block by block, agree
    over 24 steps with T = 4 (6 periods, every offset) as closely as they do without staggering:
    per parameter within 3x the synchronous run's difference or 1e-4. The (12, 20) weight's
    float32 rounding grows over these steps, by how much depends on the CPU's BLAS kernels: to
    1e-4..4e-3 on both schedules on one machine, to 4e-8 synchronous and 1.5e-5 staggered on
    another; a block refreshed at another step than the reference's differs by far more (1e-1)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from _helpers import rel_err
    from test_optimizers import run_pair

    errors = {}
    for stagger in (False, True):
        p_fast, p_ref, _ = run_pair(algorithm, STAGGER_SHAPES, steps=24, precondition_frequency=4,
                                    stagger_refresh=stagger)
        errors[stagger] = [rel_err(a, b) for a, b in zip(p_fast, p_ref)]
    for shape, synchronous, staggered in zip(STAGGER_SHAPES, errors[False], errors[True]):
        assert staggered <= max(1e-4, 3 * synchronous), (shape, staggered, synchronous)


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_each_block_is_refreshed_every_period_at_its_own_offset(algorithm):
    """Every block's bases change exactly every T steps (T = 4), not all at the same step, and
    every step of a period refreshes some block; without staggering all change together."""
    for stagger in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in STAGGER_SHAPES if len(s) > 1]
        opt = ALGOS[algorithm](params, lr=1e-2, precondition_frequency=4, stagger_refresh=stagger)
        g = torch.Generator().manual_seed(1)
        steps_of: dict = {j: [] for j in range(len(params))}
        for step in range(20):
            before = _bases_now(opt, params)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            for j, changed in _refreshed(opt, params, before).items():
                if changed:
                    steps_of[j].append(opt.state[params[j]]["step"])
        for j, steps in steps_of.items():
            assert len(steps) >= 4 and all(b - a == 4 for a, b in zip(steps, steps[1:])), (j, steps)
        phases = {steps[0] % 4 for steps in steps_of.values()}
        assert phases == ({0, 1, 2, 3} if stagger else {0}), phases


def test_staggered_offsets_balance_the_refresh_work():
    """Offsets deal blocks largest first onto the least-loaded step of the period: eight equal
    blocks with T = 4 refresh two per step; one large block and several small ones put the large
    one alone."""
    from klkern.engine import _schedule

    group = dict(klkern.KLShampoo([torch.nn.Parameter(torch.zeros(1, 1))]).defaults, stagger_refresh=True,
                 precondition_frequency=4)
    equal = [torch.nn.Parameter(torch.zeros(16, 16)) for _ in range(8)]
    offsets = _schedule.refresh_offsets(dict(group, params=equal))
    assert sorted(list(offsets.values()).count(s) for s in range(4)) == [2, 2, 2, 2]
    mixed = [torch.nn.Parameter(torch.zeros(64, 64))] + [torch.nn.Parameter(torch.zeros(16, 16)) for _ in range(6)]
    offsets = _schedule.refresh_offsets(dict(group, params=mixed))
    big = offsets[(id(mixed[0]), 0)]
    assert all(offsets[(id(p), 0)] != big for p in mixed[1:])


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_a_resumed_run_keeps_the_staggered_schedule(algorithm):
    """Stopped after 7 steps (mid-period) and resumed from a state dict into a new optimizer:
    the next 9 steps equal the uninterrupted run exactly (the offsets follow from the shapes)."""
    def fresh():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(*s)) for s in STAGGER_SHAPES]

    def run(params, opt, steps, g):
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    kw = dict(lr=1e-2, precondition_frequency=4, stagger_refresh=True)
    whole = fresh()
    g = torch.Generator().manual_seed(2)
    run(whole, ALGOS[algorithm](whole, **kw), 16, g)
    first = fresh()
    g = torch.Generator().manual_seed(2)
    opt = ALGOS[algorithm](first, **kw)
    run(first, opt, 7, g)
    saved = opt.state_dict()
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = ALGOS[algorithm](second, **kw)
    resumed.load_state_dict(saved)
    run(second, resumed, 9, g)
    for a, b in zip(whole, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stagger", [False, True])
def test_refresh_selected_on_the_device_equals_the_host_choice(stagger, monkeypatch):
    """On a GPU a refresh step keeps the result only where the block stepped, decided on the
    device; the CPU reads keep back and refreshes in place. Both give the same run, a NaN
    gradient at a refresh step included."""
    from klkern.engine import _refresh

    runs = []
    for device_choice in (False, True):
        monkeypatch.setattr(_refresh, "SELECT_ON_DEVICE", ("cpu",) if device_choice else ("cuda",))
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in STAGGER_SHAPES]
        opt = klkern.KLShampoo(params, lr=1e-2, precondition_frequency=4, stagger_refresh=stagger)
        g = torch.Generator().manual_seed(3)
        for step in range(14):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            if step in (4, 8):
                params[1].grad[0, 0] = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
