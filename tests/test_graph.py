"""klkern's own CUDA graph of the steady step (cuda_graph=True, klkern/engine/_graph.py), without a GPU.

The graph is emulated (klkern.engine._graph.EMULATE): capturing runs the step's function once and each
replay calls that same function again, with the hyperparameters it was built with, as a graph
replays the kernels it recorded with the numbers baked into them. A run with the graph must
equal the eager run exactly, whatever changes between steps: the learning rate (uploaded every
step), refresh steps (eager), a hyperparameter (captured again), a load (a new plan), a NaN
gradient (masked on the device). A replay that used anything stale would differ.
On a GPU, bench/step_bench.py times the captured step and tests/test_gpu.py runs it.
"""

from __future__ import annotations

import pytest
import torch

import klkern
from klkern.engine import _graph

OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(_graph, "EMULATE", True)
    replays = []
    original = _graph.EmulatedGraph.replay

    def counting(self):
        replays.append(1)
        original(self)

    monkeypatch.setattr(_graph.EmulatedGraph, "replay", counting)
    return replays


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))


def _train(name, cuda_graph, steps=24, events=None, **options):
    model = _model()
    opt = getattr(klkern, name)(model.parameters(), lr=1e-2, precondition_frequency=5, cuda_graph=cuda_graph,
                                **options)
    gen = torch.Generator().manual_seed(3)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 + t) / steps  # a schedule: lr changes every step
        X = torch.randn(32, 12, generator=gen)
        opt.zero_grad()  # new .grad tensors every step
        model(X).pow(2).mean().backward()
        if events and t in events:
            events[t](model, opt)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_graph_replays_and_equals_the_eager_run(name, emulated):
    eager, _ = _train(name, False)
    graphed, _ = _train(name, True)
    assert len(emulated) >= 10  # most steady steps were replays
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


def _change_betas(model, opt):
    opt.param_groups[0]["betas"] = (0.9, 0.99)


def _nan(model, opt):
    model[0].weight.grad[0, 0] = float("nan")


def _reload(model, opt):
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("event", [_change_betas, _nan, _reload], ids=["betas", "nan", "reload"])
@pytest.mark.parametrize("name", ["KLShampoo", "SOAP"])
def test_what_changes_between_steps_is_never_replayed_stale(name, event, emulated):
    events = {13: event}
    eager, eager_opt = _train(name, False, events=events)
    graphed, graphed_opt = _train(name, True, events=events)
    assert emulated
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)
    assert graphed_opt.nonfinite_skipped == eager_opt.nonfinite_skipped


@pytest.mark.parametrize("name", ["KLShampoo", "SOAP"])
def test_a_replaced_storage_is_captured_again_not_replayed(name, emulated):
    """``p.data = ...`` (SAM): the plan stays and its write-back is re-pointed at the new storage;
    a captured step writes where the parameters were at capture, so that step runs eagerly (a
    replay there would write the old storage) and the run equals the eager one."""
    def mark(replays):
        return lambda model, opt: replays.append(len(emulated))

    def replaced(replays):
        def event(model, opt):
            replays.append(len(emulated))
            for p in model.parameters():
                p.data = p.data.clone()
        return event

    control: list = []
    _train(name, True, events={13: mark(control), 14: mark(control)})
    assert control[1] == control[0] + 1  # step 13 is a replay without the replacement
    marks: list = []
    graphed, _ = _train(name, True, events={13: replaced(marks), 14: mark(marks)})
    eager, _ = _train(name, False, events={13: replaced([])})
    assert marks[1] == marks[0]
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


def test_cuda_graph_needs_cuda_parameters():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = klkern.KLShampoo([p], cuda_graph=True, precondition_frequency=10)
    with pytest.raises(ValueError, match="cuda_graph=True needs the parameters on a CUDA device"):
        for _ in range(4):
            p.grad = torch.randn(4, 4)
            opt.step()
    with pytest.raises(ValueError, match="invalid cuda_graph"):
        klkern.SOAP([p], cuda_graph="yes")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_compiled_step_equals_the_eager_one(name):
    """torch.compile(opt.step), PyTorch's recipe for compiled optimizers (it crashed KL-Shampoo and
    KL-SOAP at the first refresh of a model with two or more layers): klkern excludes its step from
    tracing, so the compiled step runs and equals the eager one exactly, refresh steps included."""
    runs = []
    for compiled in (False, True):
        model = _model()
        opt = getattr(klkern, name)(model.parameters(), lr=1e-2, precondition_frequency=3)
        step = torch.compile(opt.step) if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(16, 12, generator=gen)).pow(2).mean().backward()
            step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_real_cuda_graph_equals_the_eager_run(name):
    """On a GPU: the captured steady step replayed through a learning-rate schedule and refreshes
    gives the eager run's parameters (the same kernels on the same inputs: 1e-6 relative)."""
    runs = []
    for cuda_graph in (False, True):
        model = _model().cuda()
        opt = getattr(klkern, name)(model.parameters(), lr=1e-2, precondition_frequency=5, cuda_graph=cuda_graph)
        gen = torch.Generator().manual_seed(3)
        for t in range(24):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 + t) / 24
            opt.zero_grad()
            model(torch.randn(32, 12, generator=gen).cuda()).pow(2).mean().backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
