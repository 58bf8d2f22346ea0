"""torch.distributed.checkpoint's state-dict API resumes klkern, as trainers call it (one process;
FSDP2 is tests/test_distributed.py's ``dcp_api`` scenario).

torchtitan, OLMo-core and other trainers never call ``opt.state_dict()``: they save
``get_optimizer_state_dict(model, opt, options)`` and resume by filling a template taken the same
way from the fresh optimizer (``dcp.load``, or a ``torch.load`` of a full state dict) and handing
it to ``set_optimizer_state_dict``. torch makes the template by stepping the fresh optimizer once
with zero gradients at lr 0 (``_init_optim_state``), and with ``flatten_optimizer_state_dict``
flattens nested dicts of tensors and numbers (a list raises NotImplementedError). Faults: the
KL variants and SOAP created no state from a zero gradient ("Missing optimizer state for
parameter"), and a parameter's blocks were a list.

A resumed run must equal the uninterrupted one bit for bit (parameters and state), with no
klkern-specific call, under every option setting of the API.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import assert_same_state, mlp

import klkern

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

OPTIMIZERS = ["KLShampoo", "KLSOAP", "SOAP", "Shampoo"]
# what trainers pass: torchtitan and OLMo-core flatten; a full state dict (gathered, on the CPU) is
# the single-file form a trainer writes with torch.save. (flatten with full_state_dict is left out:
# torch 2.13's set_optimizer_state_dict raises KeyError 'param_groups.0.params.0' there for
# torch.optim.AdamW too.)
OPTIONS = {
    "default": dict(),
    "flatten": dict(flatten_optimizer_state_dict=True),
    "flatten_cpu": dict(flatten_optimizer_state_dict=True, cpu_offload=True),
    "full_cpu": dict(full_state_dict=True, cpu_offload=True),
}


def _batch(t):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen)


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        X, Y = _batch(t)
        opt.zero_grad()
        (model(X) - Y).pow(2).mean().backward()
        opt.step()


def _make(name, seed=0):
    """Two groups: the weights in 8 x 8 blocks with bfloat16 state (the template must have each
    block's dtype), the biases (AdamW path) in float32."""
    model = mlp(seed)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = getattr(klkern, name)([{"params": weights, "block_size": 8, "state_dtype": torch.bfloat16},
                                 {"params": biases}], lr=1e-2, precondition_frequency=3)
    return model, opt


def _save(model, opt, options, path):
    sd = {"model": get_model_state_dict(model, options=options),
          "optim": get_optimizer_state_dict(model, opt, options=options)}
    if options.full_state_dict:
        torch.save(sd, path / "full.pt")
    else:
        dcp.save(sd, checkpoint_id=str(path))


def _resume(name, options, path):
    """The trainers' recipe: a fresh model and optimizer (other weights), a template taken from
    them, filled from the checkpoint, handed back."""
    model, opt = _make(name, seed=1)
    if options.full_state_dict:
        sd = torch.load(path / "full.pt", weights_only=True)
    else:
        sd = {"model": get_model_state_dict(model, options=options),
              "optim": get_optimizer_state_dict(model, opt, options=options)}
        dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"], options=options)
    set_optimizer_state_dict(model, opt, sd["optim"], options=options)
    return model, opt


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trainer_recipe_resumes_bit_identically(name, option, tmp_path):
    options = StateDictOptions(**OPTIONS[option])
    model, opt = _make(name)
    _train(model, opt, 5)
    _save(model, opt, options, tmp_path)
    _train(model, opt, 5, start=5)
    resumed, ropt = _resume(name, options, tmp_path)
    _train(resumed, ropt, 5, start=5)
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert_same_state(ropt.state_dict()["state"], opt.state_dict()["state"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_template_step_has_every_block_and_moves_nothing(name):
    """torch's template (one step, zero gradients, lr 0) allocates every block's state with the
    names, shapes and dtypes of a trained one and leaves the parameters as they were."""
    model, opt = _make(name)
    trained, topt = _make(name)
    _train(trained, topt, 1)
    before = copy.deepcopy(model.state_dict())
    template = get_optimizer_state_dict(model, opt)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    expected = get_optimizer_state_dict(trained, topt)
    assert template["state"].keys() == expected["state"].keys()
    for fqn, state in template["state"].items():
        blocks = expected["state"][fqn]["blocks"]
        assert state["blocks"].keys() == blocks.keys()
        for key, block in state["blocks"].items():
            assert {n: (t.shape, t.dtype) for n, t in block.items()} == \
                   {n: (t.shape, t.dtype) for n, t in blocks[key].items()}


@pytest.mark.parametrize("name", ["KLShampoo", "KLSOAP", "SOAP"])
def test_blocks_of_a_template_step_still_wait_for_scale(name):
    """Stepped on without a load, the blocks the template allocated start from their first
    gradient with scale (SPEC's initialisation), as a fresh optimizer's do: the runs are equal.
    (A weight-only model: the AdamW path, like torch.optim.AdamW, counts the zero step.)"""
    runs = []
    for template in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16, bias=False)
        opt = getattr(klkern, name)(model.parameters(), lr=1e-2, block_size=8, precondition_frequency=3)
        if template:
            get_optimizer_state_dict(model, opt)
        _train(model, opt, 5)
        runs.append((model.weight.detach().clone(), opt.state_dict()["state"]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_same_state(runs[0][1], runs[1][1])


def test_blocks_are_keyed_by_string_and_old_lists_load():
    """The state dict holds a parameter's blocks as a dict keyed "0", "1", ... (no list, so
    flatten_optimizer_state_dict takes it); the list form of earlier releases still loads, and a
    block index the parameter does not have is refused, naming it."""
    model, opt = _make("KLShampoo")
    _train(model, opt, 3)
    sd = opt.state_dict()
    weight = sd["state"][0]
    assert list(weight["blocks"]) == ["0", "1", "2", "3"]
    old = copy.deepcopy(sd)
    for state in old["state"].values():
        state["blocks"] = list(state["blocks"].values())
    _, fresh = _make("KLShampoo", seed=1)
    fresh.load_state_dict(old)
    assert_same_state(fresh.state_dict()["state"], sd["state"])
    bad = copy.deepcopy(sd)
    bad["state"][0]["blocks"]["7"] = bad["state"][0]["blocks"]["0"]
    with pytest.raises(ValueError, match=r"blocks \['7'\].*has 4 blocks"):
        _make("KLShampoo", seed=1)[1].load_state_dict(bad)


@pytest.mark.parametrize("flatten", [False, True])
def test_a_parameter_without_blocks_resumes(flatten, tmp_path):
    """A 0-element parameter has no blocks (klkern skips it) but requires a gradient: torch's
    set_optimizer_state_dict wants state for it, which the state dict gives as an empty entry (the
    same mechanism as an empty FSDP2 shard or another rank's parameter under process_group)."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.randn(6, 6)),
                                        "empty": torch.nn.Parameter(torch.zeros(0, 4))})
        return model, klkern.KLShampoo(model.parameters(), lr=1e-2, precondition_frequency=2)

    model, opt = make(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model["w"].grad, model["empty"].grad = torch.randn(6, 6, generator=gen), torch.zeros(0, 4)
        opt.step()
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=str(tmp_path))
    resumed, ropt = make(1)
    sd = {"optim": get_optimizer_state_dict(resumed, ropt, options=options)}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(resumed, ropt, sd["optim"], options=options)
    assert_same_state(ropt.state_dict()["state"], opt.state_dict()["state"])
