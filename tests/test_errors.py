"""Bad input, non-finite gradients and failing eigendecompositions."""

import re
import warnings

import pytest
import torch
from _helpers import PAIRS, clone_params, make_params, quadratic_grads, rel_err

import klkern

ALL = [klkern.KLShampoo, klkern.KLSOAP, klkern.SOAP, klkern.Shampoo]


def _p():
    return [torch.nn.Parameter(torch.randn(3, 3))]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(1.0, 0.9)), "betas[0]"),
        (dict(betas=(0.9, -0.1)), "betas[1]"),
        (dict(betas=0.9), "betas"),
        (dict(shampoo_beta=1.5), "shampoo_beta"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(precondition_frequency=2.5), "precondition_frequency"),
        (dict(max_precond_dim=-1), "max_precond_dim"),
        (dict(block_size=0), "block_size"),
        (dict(merge_dims="yes"), "merge_dims"),
        (dict(data_format="nhwc"), "data_format"),
        (dict(state_dtype=torch.int8), "state_dtype"),
        (dict(large_dim_policy="drop"), "large_dim_policy"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match="invalid " + re.escape(name) + "="):
        cls(_p(), **kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (klkern.KLShampoo, dict(init_factor=0.0), "init_factor"),
        (klkern.KLSOAP, dict(eigval_clamp=-1.0), "eigval_clamp"),
        (klkern.KLShampoo, dict(eigenbasis="svd"), "eigenbasis"),
        (klkern.SOAP, dict(correct_bias=1), "correct_bias"),
        (klkern.Shampoo, dict(exponent=0.0), "exponent"),
        (klkern.Shampoo, dict(grafting="sgd"), "grafting"),
    ],
)
def test_invalid_specific_hyperparameters(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"invalid {name}="):
        cls(_p(), **kwargs)


@pytest.mark.parametrize("cls", [klkern.KLShampoo, klkern.KLSOAP, klkern.SOAP, klkern.Shampoo])
def test_float16_state_is_refused_with_the_reason_and_the_fix(cls):
    """float16 flushes squared gradients to zero (second moments, factors): refused, bfloat16 named."""
    with pytest.raises(ValueError, match=r"invalid state_dtype=torch.float16.*underflows.*torch.bfloat16"):
        cls(_p(), state_dtype=torch.float16)


def test_invalid_param_group_value_is_caught():
    with pytest.raises(ValueError, match="invalid lr="):
        klkern.SOAP([{"params": _p(), "lr": -3.0}])


def test_unknown_argument_and_backend():
    with pytest.raises(TypeError, match="exponent"):
        klkern.KLShampoo(_p(), exponent=0.5)
    with pytest.raises(ValueError, match="backend"):
        klkern.KLShampoo(_p(), backend="cuda")
    # backend="triton" is valid; on CPU tensors outside the interpreter the step says why it cannot run.
    opt = klkern.KLShampoo(_p(), backend="triton")
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        opt.step()  # the initialisation step runs in torch on every backend
        with pytest.raises(RuntimeError, match="backend='triton'"):
            opt.step()


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradient_raises(cls):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_complex_parameters_and_gradients_raise():
    with pytest.raises(ValueError, match="complex"):
        klkern.KLShampoo([torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))])


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_parameter_and_state(name, bad):
    """A NaN/Inf gradient leaves that parameter and its whole state untouched (its step count,
    which schedules refreshes and bias corrections, advances with the others'), is counted and
    warned once (at the next refresh step: the step decides on the device), and the run continues
    exactly as the reference run in which that parameter had no gradient on those steps and its
    step count was advanced."""
    fast_cls, ref_cls = PAIRS[name]
    shapes = [(5, 5), (5, 5), (4,)]
    p_fast = make_params(shapes)
    p_ref = clone_params(p_fast)
    targets = [torch.randn(*s) for s in shapes]
    opt_f, opt_r = fast_cls(p_fast, precondition_frequency=3), ref_cls(p_ref, precondition_frequency=3)
    caught = []
    for t in range(12):
        quadratic_grads(p_fast, targets, t)
        quadratic_grads(p_ref, targets, t)
        if t in (4, 7):
            p_fast[1].grad[2, 3] = bad
            p_ref[1].grad = None
            before_param = p_fast[1].detach().clone()
            before_state = {k: v.clone() for k, v in opt_f.state[p_fast[1]]["blocks"][0].items()}
            before_step = opt_f.state[p_fast[1]]["step"]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            opt_f.step()
        caught += [w for w in rec if "NaN/Inf" in str(w.message)]
        opt_r.step()
        if t in (4, 7):
            opt_r.state[p_ref[1]]["step"] += 1  # a skipped step counts, as in the fast run
            assert torch.equal(p_fast[1], before_param)
            assert opt_f.state[p_fast[1]]["step"] == before_step + 1
            for k, v in opt_f.state[p_fast[1]]["blocks"][0].items():
                assert torch.equal(v, before_state[k]), k
    assert len(caught) == 1
    assert opt_f.nonfinite_skipped == 2
    for a, b in zip(p_fast, p_ref):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-5


def test_nonfinite_first_gradient_creates_no_state():
    params = make_params([(3, 3)])
    opt = klkern.KLShampoo(params)
    params[0].grad = torch.full((3, 3), float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    assert params[0] not in opt.state


def _failing_eigh(fail_float64: bool):
    real = torch.linalg.eigh

    def eigh(x):
        if x.dtype == torch.float32 or fail_float64:
            raise torch.linalg.LinAlgError("simulated failure")
        return real(x)

    return eigh


@pytest.mark.parametrize("name", ["klshampoo", "soap"])
def test_eigh_float32_failure_retries_in_float64(monkeypatch, name):
    fast_cls, ref_cls = PAIRS[name]
    p_fast = make_params([(4, 4)])
    p_ref = clone_params(p_fast)
    targets = [torch.randn(4, 4)]
    opt_f, opt_r = fast_cls(p_fast), ref_cls(p_ref)
    quadratic_grads(p_ref, targets, 0)
    opt_r.step()
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(fail_float64=False))
    quadratic_grads(p_fast, targets, 0)
    opt_f.step()  # initialisation needs an eigendecomposition
    Q_fast = opt_f.state[p_fast[0]]["blocks"][0]["Q0"]
    Q_ref = opt_r.state[p_ref[0]]["blocks"][0]["Q"][0]
    torch.testing.assert_close(Q_fast.abs(), Q_ref.abs(), atol=1e-4, rtol=0)


def test_eigh_total_failure_keeps_previous_basis(monkeypatch):
    """Idealized KL-Shampoo refreshes by eigh every step: when it fails in
    float32 and float64 the previous basis and eigenvalues are kept."""
    params = make_params([(4, 4)])
    opt = klkern.KLShampoo(params, eigenbasis="eigh", precondition_frequency=1)
    targets = [torch.randn(4, 4)]
    for t in range(3):
        quadratic_grads(params, targets, t)
        opt.step()
    block = opt.state[params[0]]["blocks"][0]
    Q_before, lam_before = block["Q0"].clone(), block["lam0"].clone()
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(fail_float64=True))
    quadratic_grads(params, targets, 3)
    opt.step()
    torch.testing.assert_close(block["Q0"], Q_before, atol=1e-6, rtol=0)
    assert torch.equal(block["lam0"], lam_before)
    assert torch.isfinite(params[0]).all()


def test_shampoo_root_failure_keeps_previous_root(monkeypatch):
    params = make_params([(4, 4)])
    opt = klkern.Shampoo(params, precondition_frequency=2)
    targets = [torch.randn(4, 4)]
    for t in range(2):
        quadratic_grads(params, targets, t)
        opt.step()
    root_before = opt.state[params[0]]["blocks"][0]["root0"].clone()
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(fail_float64=True))
    for t in range(2, 4):
        quadratic_grads(params, targets, t)
        opt.step()
    assert torch.equal(opt.state[params[0]]["blocks"][0]["root0"], root_before)
    assert torch.isfinite(params[0]).all()
