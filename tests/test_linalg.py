"""klkern.linalg: QR sign convention and descending eigendecomposition."""

import pytest
import torch

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
