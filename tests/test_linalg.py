"""klkern.linalg: QR sign convention and descending eigendecomposition."""

import pytest
import torch

from klkern import linalg
from klkern.linalg import batched_qr, eigh_descending

ORTH_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (7, 7), (3, 17, 9), (2, 4, 1)])
def test_batched_qr_convention(shape, dtype):
    A = torch.randn(*shape, dtype=dtype)
    Q = batched_qr(A)
    n = shape[-1]
    eye = torch.eye(n, dtype=dtype)
    assert (Q.mT @ Q - eye).abs().max() < ORTH_TOL[dtype]
    Rm = Q.mT @ A
    assert torch.all(torch.diagonal(Rm, dim1=-2, dim2=-1) >= -ORTH_TOL[dtype])
    assert (Q @ Rm - A).norm() / A.norm() < ORTH_TOL[dtype] * 10
    assert torch.allclose(torch.triu(Rm), Rm, atol=ORTH_TOL[dtype] * 10)


def test_batched_qr_non_contiguous_and_rank_deficient():
    A = torch.randn(6, 4).T.contiguous().T  # non-contiguous view
    A = A[:, :3]
    A[:, 2] = A[:, 0]
    Q = batched_qr(A)
    assert (Q.T @ Q - torch.eye(3)).abs().max() < 1e-5
    assert torch.allclose(Q @ (Q.T @ A), A, atol=1e-5)


def test_batched_qr_rejects_wide():
    with pytest.raises(ValueError, match="m >= n"):
        batched_qr(torch.randn(2, 3))


def test_eigh_descending_order():
    A = torch.randn(3, 6, 6)
    S = A @ A.mT
    evals, Q = eigh_descending(S)
    assert torch.all(evals[:, :-1] >= evals[:, 1:])
    torch.testing.assert_close(Q @ torch.diag_embed(evals) @ Q.mT, S, atol=1e-4, rtol=1e-4)


def test_eigh_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(x):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated float32 failure")
        return real(x)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    S = torch.eye(3) * torch.tensor([1.0, 3.0, 2.0])
    evals, Q = eigh_descending(S)
    assert calls == [torch.float32, torch.float64]
    assert evals.dtype == torch.float32
    torch.testing.assert_close(evals, torch.tensor([3.0, 2.0, 1.0]))


# --------------------------------------------------------------------------
# power_step: the refresh computed in the factor's eigenbasis, qr(Q R Pi) = Q qr(R Pi)

def _factor_in_basis(B, d, dtype, generator, rank=None):
    """(Q, R): a random orthogonal Q and R = Q^T S Q for a random PSD S of the given rank."""
    X = torch.randn(B, d, rank or d, generator=generator, dtype=dtype)
    S = X @ X.mT / d
    Q = torch.linalg.qr(torch.randn(B, d, d, generator=generator, dtype=dtype))[0]
    return Q, Q.mT @ S @ Q


@pytest.mark.parametrize("explicit", [False, True], ids=["reflectors", "explicit-V"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d,sort", [(1, 1, False), (3, 5, False), (2, 17, True), (4, 64, True), (1, 96, False)])
def test_power_step_equals_the_qr_of_q_r(B, d, sort, dtype, explicit, monkeypatch):
    """Q V equals batched_qr(Q R Pi) and R_new = Q_new^T S Q_new, by both routes (LAPACK's
    reflectors on the CPU, the explicit V that CUDA uses), tiny to non-power-of-two sizes, stacks.
    Tolerance: float32 1e-3 on Q (the QR's own conditioning: measured up to 2e-4 on one CPU and 6e-4
    on another, whose BLAS kernels round differently; a wrong V differs by O(1)), 1e-5 on R_new;
    float64 1e-10."""
    monkeypatch.setattr(linalg, "applies_reflectors", lambda A: not explicit and A.numel() > 0)
    g = torch.Generator().manual_seed(d)
    Q, R = _factor_in_basis(B, d, dtype, g)
    order = torch.argsort(torch.diagonal(R, dim1=-2, dim2=-1), dim=-1, descending=True) if sort else None
    change, R_new = linalg.power_step(R, order)
    Y = Q @ R if order is None else (Q @ R).gather(-1, order.unsqueeze(-2).expand(B, d, d))
    Q_ref = batched_qr(Y)
    Q_new = change.apply(Q)
    tol_q, tol_r = (1e-3, 1e-5) if dtype == torch.float32 else (1e-10, 1e-10)
    assert (Q_new - Q_ref).abs().max() < tol_q
    S = Q @ R @ Q.mT
    R_ref = Q_ref.mT @ S @ Q_ref
    assert ((R_new - R_ref).abs().max() / R_ref.abs().max()) < tol_r
    assert (R_new - R_new.mT).abs().max() <= tol_r * R_ref.abs().max()  # symmetric up to rounding
    X = torch.randn(B, 7, d, dtype=dtype, generator=g)  # the carry: X x_k V^T
    V = Q.mT @ Q_new
    assert (change.mode_product(X.mT.contiguous().mT, 1) - X @ V).abs().max() < 10 * tol_r * X.abs().max()
    assert (change.mode_product(X.mT.contiguous(), 0) - V.mT @ X.mT).abs().max() < 10 * tol_r * X.abs().max()


def test_power_step_rank_deficient_and_non_finite():
    """A rank-deficient factor keeps an orthogonal basis and its R; a non-finite matrix of a stack
    gives an all-NaN V and R_new for that matrix only (batched_qr's rule)."""
    g = torch.Generator().manual_seed(0)
    Q, R = _factor_in_basis(3, 12, torch.float32, g, rank=2)
    R[1, 3, 4] = float("nan")
    change, R_new = linalg.power_step(R)
    Q_new = change.apply(Q)
    assert torch.isnan(Q_new[1]).all() and torch.isnan(R_new[1]).all()
    for b in (0, 2):
        assert (Q_new[b].T @ Q_new[b] - torch.eye(12)).abs().max() < 1e-5
        S = Q[b] @ R[b] @ Q[b].T
        assert (Q_new[b] @ R_new[b] @ Q_new[b].T - S).abs().max() < 1e-5 * S.abs().max()


def test_power_step_split_matches_the_parts():
    g = torch.Generator().manual_seed(1)
    Q, R = _factor_in_basis(5, 9, torch.float64, g)
    change, _ = linalg.power_step(R)
    X = torch.randn(5, 4, 9, dtype=torch.float64, generator=g)
    parts = change.split([2, 3])
    joined = torch.cat([parts[0].apply(X[:2]), parts[1].apply(X[2:])])
    assert torch.equal(joined, change.apply(X))


def test_rows_gather_is_a_batched_row_gather():
    """rows_gather(X, index) == X.gather over rows, for tiny, odd and partial (r < n) indexes."""
    g = torch.Generator().manual_seed(2)
    for B, n, d, r in [(1, 1, 1, 1), (3, 5, 7, 5), (2, 9, 4, 3)]:
        X = torch.randn(B, n, d, generator=g)
        index = torch.stack([torch.randperm(n, generator=g)[:r] for _ in range(B)])
        want = X.gather(1, index.unsqueeze(-1).expand(B, r, d))
        assert torch.equal(linalg.rows_gather(X, index), want)


@pytest.mark.parametrize("explicit", [False, True], ids=["reflectors", "explicit-V"])
@pytest.mark.parametrize("sort", [False, True])
def test_power_step_and_apply_write_into_out_exactly(explicit, sort, monkeypatch):
    """The refresh writes R_new and Q V into the state itself (``out``, which may be the input):
    the values are bit-equal to the results as new tensors, for out = the input, out = another
    tensor, and row- or column-major layouts (LAPACK's column-major one is written in place)."""
    monkeypatch.setattr(linalg, "applies_reflectors", lambda A: not explicit and A.numel() > 0)
    g = torch.Generator().manual_seed(3)
    Q, R = _factor_in_basis(3, 33, torch.float32, g)
    order = torch.argsort(torch.diagonal(R, dim1=-2, dim2=-1), dim=-1, descending=True) if sort else None
    change, R_new = linalg.power_step(R.clone(), order)
    R_in = R.clone()
    change_in, R_into = linalg.power_step(R_in, order, out=R_in)
    assert R_into.data_ptr() == R_in.data_ptr() and torch.equal(R_into, R_new)
    other = torch.empty_like(R)
    assert torch.equal(linalg.power_step(R.clone(), order, out=other)[1], R_new)
    Q_new = change.apply(Q)
    assert torch.equal(change_in.apply(Q), Q_new)
    for X in (Q.clone(), Q.mT.contiguous().mT):  # row-major, column-major
        ptr = X.data_ptr()
        Y = change_in.apply(X, out=X)
        assert Y.data_ptr() == ptr and torch.equal(Y, Q_new)


# --------------------------------------------------------------------------
# Directions without energy (klkern/linalg/_canonical.py): the fast path against the reference's
# own transcription of the convention, in float64 (both are Gram-Schmidt of the same candidates:
# measured to agree to ~1e-15; a different candidate or order differs by O(1)).
CANONICAL_ATOL = 1e-10


@pytest.mark.parametrize("d,rank,candidates", [(6, 2, False), (9, 4, True), (12, 1, False), (5, 5, False)])
def test_complete_null_equals_the_reference_transcription(d, rank, candidates):
    from klkern import reference as R

    g = torch.Generator().manual_seed(d + rank)
    X = torch.randn(3, d, rank, generator=g, dtype=torch.float64)
    S = X @ X.mT
    C = torch.linalg.qr(torch.randn(3, d, d, generator=g, dtype=torch.float64))[0] if candidates else None
    rtol = linalg.null_rtol(d, gram=True)
    evals, Q = eigh_descending(S, rtol, C)
    for b in range(3):
        e_ref, Q_ref = R.canonical_null(*eigh_descending(S[b]), rtol, None if C is None else C[b])
        assert (evals[b] - e_ref).abs().max() <= CANONICAL_ATOL * float(e_ref.abs().max())
        assert float((Q[b, :, rank:] - Q_ref[:, rank:]).abs().sum()) <= CANONICAL_ATOL * d  # the canonical ones
        # the eigenvectors (their signs are free)
        assert ((Q[b, :, :rank].abs() - Q_ref[:, :rank].abs())).abs().max() <= CANONICAL_ATOL
        assert (Q[b].T @ Q[b] - torch.eye(d, dtype=torch.float64)).abs().max() <= CANONICAL_ATOL
        assert bool((evals[b, rank:] == 0).all())


@pytest.mark.parametrize("explicit", [False, True], ids=["reflectors", "explicit-V"])
@pytest.mark.parametrize("d,rank,sort", [(8, 3, False), (10, 4, True), (16, 15, False)])
def test_power_step_of_a_rank_deficient_factor_equals_the_reference(d, rank, sort, explicit, monkeypatch):
    """power_step's rtol: the columns of R Pi the QR cannot determine keep their old basis vectors
    (the QR taken again), as the reference's canonical_qr of S Q Pi; R_new = V^T R V."""
    from klkern import reference as Ref

    monkeypatch.setattr(linalg, "applies_reflectors", lambda A: not explicit and A.numel() > 0)
    g = torch.Generator().manual_seed(d)
    Q, R = _factor_in_basis(2, d, torch.float64, g, rank=rank)
    order = torch.argsort(torch.diagonal(R, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True) if sort else None
    rtol = linalg.null_rtol(d)
    change, R_new = linalg.power_step(R.clone(), order, rtol=rtol)
    Q_new = change.apply(Q)
    for b in range(2):
        perm = torch.arange(d) if order is None else order[b]
        S = Q[b] @ R[b] @ Q[b].T
        Q_ref = Ref.canonical_qr(S @ Q[b][:, perm], Q[b][:, perm])
        assert (Q_new[b] - Q_ref).abs().max() <= CANONICAL_ATOL
        assert (R_new[b] - Q_ref.T @ S @ Q_ref).abs().max() <= CANONICAL_ATOL * float(S.abs().max())
