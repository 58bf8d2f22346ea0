"""klkern.reference against the 2-D formulas of the specification (docs/spec.md) written out by
hand, and against the claims of the paper (Claim 3's optimum)."""

import pytest
import torch

from klkern import linalg
from klkern import reference as R

ATOL = 1e-5  # float32 products of O(1) numbers, a few hundred terms


def _orth(d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g))[0]


@pytest.fixture
def block():
    g = torch.Generator().manual_seed(5)
    m, n = 5, 7
    return dict(
        G=torch.randn(m, n, generator=g),
        M=torch.randn(m, n, generator=g),
        Qa=_orth(m, 1),
        Qb=_orth(n, 2),
        la=torch.rand(m, generator=g) + 0.5,
        lb=torch.rand(n, generator=g) + 0.5,
        Sa=torch.eye(m) * 0.3,
        Sb=torch.eye(n) * 0.2,
    )


def test_kl_init_factors_2d(block):
    G, beta2 = block["G"], 0.9
    Sa, Sb = R.kl_init_factors(G, (True, True), beta2)
    m, n = G.shape
    torch.testing.assert_close(Sa, (1 - beta2) * G @ G.T / n, atol=ATOL, rtol=0)
    torch.testing.assert_close(Sb, (1 - beta2) * G.T @ G / m, atol=ATOL, rtol=0)


def test_rotated_precondition_2d(block):
    b = block
    D = R.kl_scaling([b["la"], b["lb"]], 2, 1e-8)
    expected_D = 1.0 / (torch.sqrt(b["la"][:, None] * b["lb"][None, :]) + 1e-8)
    torch.testing.assert_close(D, expected_D)
    U = R.rotated_precondition(b["M"], [b["Qa"], b["Qb"]], D)
    expected = b["Qa"] @ ((b["Qa"].T @ b["M"] @ b["Qb"]) * expected_D) @ b["Qb"].T
    torch.testing.assert_close(U, expected, atol=ATOL, rtol=0)


def test_kl_factor_update_2d(block):
    b, beta2 = block, 0.95
    m, n = b["G"].shape
    Sa, Sb = R.kl_factor_update([b["Sa"], b["Sb"]], b["G"], [b["Qa"], b["Qb"]], [b["la"], b["lb"]], beta2)
    Pb = b["Qb"] @ torch.diag(1 / b["lb"]) @ b["Qb"].T
    Pa = b["Qa"] @ torch.diag(1 / b["la"]) @ b["Qa"].T
    torch.testing.assert_close(Sa, beta2 * b["Sa"] + (1 - beta2) / n * b["G"] @ Pb @ b["G"].T, atol=ATOL, rtol=0)
    torch.testing.assert_close(Sb, beta2 * b["Sb"] + (1 - beta2) / m * b["G"].T @ Pa @ b["G"], atol=ATOL, rtol=0)


def test_eigenvalue_update_2d_and_identity(block):
    """Step 5 as written, and SPEC's identity mean_j(Gr_ij^2/lam_b_j) = diag(Q_a^T Delta_a Q_a)/n."""
    b, beta2 = block, 0.9
    m, n = b["G"].shape
    la, lb = R.eigenvalue_update([b["la"], b["lb"]], b["G"], [b["Qa"], b["Qb"]], beta2)
    Gr = b["Qa"].T @ b["G"] @ b["Qb"]
    torch.testing.assert_close(la, beta2 * b["la"] + (1 - beta2) * (Gr**2 / b["lb"][None, :]).mean(1))
    torch.testing.assert_close(lb, beta2 * b["lb"] + (1 - beta2) * (Gr**2 / b["la"][:, None]).mean(0))
    delta_a = b["G"] @ b["Qb"] @ torch.diag(1 / b["lb"]) @ b["Qb"].T @ b["G"].T
    torch.testing.assert_close((Gr**2 / b["lb"][None, :]).mean(1), torch.diag(b["Qa"].T @ delta_a @ b["Qa"]) / n,
                               atol=ATOL, rtol=0)


def test_eigval_floor():
    lam = torch.tensor([1e-9, 1.0, 1e-3])
    c = 10.0  # d = 3 < 10, so c = 10
    torch.testing.assert_close(R.eigval_floor(lam, 4000), torch.tensor([1 / c**2, 1.0, 1e-2]))
    big = torch.full((5000,), 1e-12)
    assert R.eigval_floor(big, 4000)[0] == pytest.approx(1 / 4000**2)
    assert R.eigval_floor(big, 50)[0] == pytest.approx(1 / 50**2)


def test_claim3_eigenvalue_projection_minimises_kl(block):
    """With beta2 = 0 the eigenvalue update is the minimiser of the KL
    objective in lam_a for fixed lam_b (Claim 3): the gradient vanishes there,
    and perturbing lam_a in any direction increases the objective."""
    b = block
    Qs = [b["Qa"], b["Qb"]]
    la_star, _ = R.eigenvalue_update([b["la"], b["lb"]], b["G"], Qs, 0.0)
    Gr = R.rotate(b["G"], Qs).double()
    lam = la_star.double().clone().requires_grad_(True)
    obj = R.kl_objective(Gr, [lam, b["lb"].double()])
    (grad,) = torch.autograd.grad(obj, lam)
    assert grad.abs().max() < 1e-6 * obj.abs()
    with torch.no_grad():
        for scale in (0.9, 1.1):
            assert R.kl_objective(Gr, [la_star.double() * scale, b["lb"].double()]) > obj


def test_tensor_factor_update_reduces_to_2d(block):
    """The N-mode formula on a 2-D block is the 2-D formula (d_k/N = 1/n)."""
    b = block
    S_nd = R.kl_factor_update([b["Sa"], None], b["G"], [b["Qa"], b["Qb"]], [b["la"], b["lb"]], 0.5)[0]
    n = b["G"].shape[1]
    Pb = b["Qb"] @ torch.diag(1 / b["lb"]) @ b["Qb"].T
    torch.testing.assert_close(S_nd, 0.5 * b["Sa"] + 0.5 / n * b["G"] @ Pb @ b["G"].T, atol=ATOL, rtol=0)


def test_tensor_factor_update_3d_explicit_kron():
    g = torch.Generator().manual_seed(0)
    d = (2, 3, 4)
    G = torch.randn(*d, generator=g, dtype=torch.float64)
    Qs = [torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0] for k in d]
    lams = [torch.rand(k, generator=g, dtype=torch.float64) + 0.5 for k in d]
    Ss = [torch.zeros(k, k, dtype=torch.float64) for k in d]
    out = R.kl_factor_update(Ss, G, Qs, lams, 0.0)
    P = [Q @ torch.diag(1 / lam) @ Q.T for Q, lam in zip(Qs, lams)]
    N = G.numel()
    # mode 0: G_(0) (P_1 kron P_2) G_(0)^T with row-major unfolding
    expected0 = G.reshape(2, 12) @ torch.kron(P[1], P[2]) @ G.reshape(2, 12).T * (2 / N)
    torch.testing.assert_close(out[0], expected0)
    G2 = G.permute(2, 0, 1).reshape(4, 6)
    expected2 = G2 @ torch.kron(P[0], P[1]) @ G2.T * (4 / N)
    torch.testing.assert_close(out[2], expected2)


def test_soap_refresh_sorts_and_permutes_v():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, generator=g)
    GG = A @ A.T
    Q = torch.eye(4)[:, [2, 0, 3, 1]]
    v = torch.arange(12.0).reshape(4, 3)
    Qs, v_new = R.soap_refresh([GG, None], [Q, None], v)
    order = torch.argsort(torch.diag(Q.T @ GG @ Q), descending=True)
    torch.testing.assert_close(v_new, v[order])
    torch.testing.assert_close(Qs[0], linalg.batched_qr(GG @ Q[:, order]))


def test_inverse_root():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    L = A @ A.T
    root = R.inverse_root(L, 1e-3, 0.5)
    torch.testing.assert_close(root @ root, torch.linalg.inv(L + 1e-3 * torch.eye(5, dtype=torch.float64)))
    quarter = R.inverse_root(L, 1e-3, 0.25)
    torch.testing.assert_close(quarter @ quarter, root)


def test_graft_norm_and_zero():
    P, A = torch.randn(3, 4), torch.randn(3, 4)
    U = R.graft(P, A)
    assert torch.linalg.norm(U).item() == pytest.approx(torch.linalg.norm(A).item(), rel=1e-6)
    assert torch.equal(R.graft(torch.zeros(3, 4), A), torch.zeros(3, 4))


def test_kl_objective_2d_formula(block):
    b = block
    Gr = torch.randn(5, 7)
    m, n = Gr.shape
    expected = 0.5 * (n * torch.log(b["la"]).sum() + m * torch.log(b["lb"]).sum()
                      + (Gr**2 / (b["la"][:, None] * b["lb"][None, :])).sum())
    torch.testing.assert_close(R.kl_objective(Gr, [b["la"], b["lb"]]), expected)
