"""K-FAC / EK-FAC on one layer (the LDS benchmark's research code) against explicit float64 matrices."""

from __future__ import annotations

import numpy as np
import pytest

from proponent.analysis.lds import KfacBlock, kronecker_factors


def _setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, t, q, d_in, d_out = 9, 3, 4, 3, 2  # in = d_in + 1 with the bias column
    a = rng.normal(size=(n, t, d_in))
    d = rng.normal(size=(n, t, d_out)) * np.array([1.0, 3.0])
    a1 = np.concatenate([a, np.ones((n, t, 1))], axis=2)
    g = np.einsum("nto,nti->noi", d, a1)  # per-sample G = Σ_t δ_t [a_t, 1]ᵀ
    qg = rng.normal(size=(q, d_out, d_in + 1))
    return a, d, a1, g, qg


def test_factors_are_the_explicit_means():
    a, d, a1, _, _ = _setup()
    acov, scov = kronecker_factors(a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1]))
    rows_a, rows_d = a1.reshape(-1, a1.shape[-1]), d.reshape(-1, d.shape[-1])
    ea = sum(np.outer(r, r) for r in rows_a) / len(rows_a)
    es = sum(np.outer(r, r) for r in rows_d) / len(rows_d)
    np.testing.assert_allclose(acov, ea, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scov, es, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 10.0])
def test_kfac_is_the_damped_kronecker_inverse(alpha):
    a, d, _, g, qg = _setup(1)
    acov, scov = kronecker_factors(a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1]))
    blk = KfacBlock(acov, scov, g, qg, ekfac=False)
    s, lev, qpq = blk.apply(alpha)
    kron = np.kron(scov, acov)  # acts on the row-major vec(G [out, in])
    lam = alpha * np.trace(scov) * np.trace(acov) / kron.shape[0]  # α · mean(e_S e_Aᵀ)
    p = np.linalg.inv(kron + lam * np.eye(kron.shape[0]))
    f, qq = g.reshape(len(g), -1), qg.reshape(len(qg), -1)
    np.testing.assert_allclose(s, qq @ p @ f.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lev, np.einsum("ni,ij,nj->n", f, p, f), rtol=1e-9)
    np.testing.assert_allclose(qpq, np.einsum("ni,ij,nj->n", qq, p, qq), rtol=1e-9)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 10.0])
def test_ekfac_uses_the_fitted_eigenvalues(alpha):
    a, d, _, g, qg = _setup(2)
    acov, scov = kronecker_factors(a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1]))
    blk = KfacBlock(acov, scov, g, qg, ekfac=True)
    s, lev, qpq = blk.apply(alpha)
    _, qa = np.linalg.eigh(acov)
    _, qs = np.linalg.eigh(scov)
    basis = np.kron(qs, qa)  # columns: the Kronecker eigenvectors on the row-major vec(G)
    f, qq = g.reshape(len(g), -1), qg.reshape(len(qg), -1)
    lam_fit = ((f @ basis) ** 2).mean(0)  # Λ_jk = E[(Q_Sᵀ G Q_A)_jk²]
    for i in range(len(g)):  # the same, one sample at a time, in matrix form
        np.testing.assert_allclose((qs.T @ g[i] @ qa).reshape(-1), (f @ basis)[i], rtol=1e-9, atol=1e-12)
    p = basis @ np.diag(1.0 / (lam_fit + alpha * lam_fit.mean())) @ basis.T
    np.testing.assert_allclose(s, qq @ p @ f.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lev, np.einsum("ni,ij,nj->n", f, p, f), rtol=1e-9)
    np.testing.assert_allclose(qpq, np.einsum("ni,ij,nj->n", qq, p, qq), rtol=1e-9)
    # EK-FAC is not K-FAC here (the fitted eigenvalues are not e_S e_Aᵀ)
    s_k, _, _ = KfacBlock(acov, scov, g, qg, ekfac=False).apply(alpha)
    assert not np.allclose(s, s_k)
