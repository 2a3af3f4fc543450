"""DESIGN.md section 8.1: the matrix-free operator against a materialised einsum twin."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import amp_attention as aa
from amp_attention import operator as op
from amp_attention.whitening import n_pairs, pair_indices, unwhiten, whiten


def naive_sensing(X):
    """Materialised sensing tensor Z[mu, a, b] = (x_a x_b^T - delta_ab I)/sqrt(d), shape (n,T,T,d,d)."""
    n, T, d = X.shape
    Z = np.einsum("nai,nbj->nabij", X, X)
    Z -= np.eye(T)[None, :, :, None, None] * np.eye(d)[None, None, None, :, :]
    return Z / np.sqrt(d)


def random_symmetric(d, rng):
    A = rng.standard_normal((d, d))
    return (A + A.T) / 2


dims = st.tuples(st.integers(1, 12), st.integers(1, 8), st.integers(1, 14), st.integers(0, 2**31))


@given(dims)
def test_forward_equals_einsum_twin(args):
    n, T, d, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    S = random_symmetric(d, rng)
    H = aa.preactivations(X, S)
    H_naive = np.einsum("nabij,ij->nab", naive_sensing(X), S)
    assert H.shape == (n, T, T)
    np.testing.assert_allclose(H, H_naive, rtol=0, atol=1e-12 * max(1.0, np.abs(H_naive).max()))
    np.testing.assert_array_equal(H, np.swapaxes(H, 1, 2))


@given(dims)
def test_backproject_equals_einsum_twin_and_is_adjoint(args):
    n, T, d, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    G = rng.standard_normal((n, T, T))
    S = random_symmetric(d, rng)
    M = aa.backproject(X, G)
    M_naive = np.einsum("nab,nabij->ij", G, naive_sensing(X))
    M_naive = (M_naive + M_naive.T) / 2
    scale = max(1.0, np.abs(M_naive).max())
    np.testing.assert_allclose(M, M_naive, rtol=0, atol=1e-12 * scale)
    np.testing.assert_array_equal(M, M.T)
    lhs = np.sum(aa.preactivations(X, S) * G)
    rhs = np.trace(S @ M)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs), np.abs(S).sum() * scale)


@given(dims)
def test_whitened_maps_are_adjoint_and_match_twin(args):
    n, T, d, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    S = random_symmetric(d, rng)
    K = n_pairs(T)
    w = rng.standard_normal((n, K))
    z = aa.forward_whitened(X, S)
    ia, ib, c = pair_indices(T)
    z_naive = np.einsum("nabij,ij->nab", naive_sensing(X), S)[:, ia, ib] / c
    np.testing.assert_allclose(z, z_naive, atol=1e-12 * max(1.0, np.abs(z_naive).max()))
    M = aa.adjoint_whitened(X, w)
    # A*(w) = sum_k w_k A_k with A_k = sym(Z_ab)/c_k
    Z = naive_sensing(X)
    Zs = 0.5 * (Z[:, ia, ib] + Z[:, ib, ia]) / c[None, :, None, None]
    M_naive = np.einsum("nk,nkij->ij", w, Zs)
    np.testing.assert_allclose(M, M_naive, atol=1e-12 * max(1.0, np.abs(M_naive).max()))
    assert abs(np.sum(z * w) - np.trace(S @ M)) <= 1e-9 * max(1.0, np.abs(z).sum() + np.abs(M).sum())


@given(st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 9), st.integers(0, 2**31)))
def test_sample_gram_equals_materialised_twin(args):
    n, T, d, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    np.testing.assert_allclose(aa.sample_gram(X), op._sample_gram_numpy(X), atol=1e-12 * d)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_kernels_equal_numpy_twins(T, rng):
    X = rng.standard_normal((7, T, 11))
    Y = rng.standard_normal((7, T, 11))
    G = rng.standard_normal((7, T, T))
    np.testing.assert_allclose(op._pair_contract(X, Y), op._pair_contract_numpy(X, Y), atol=1e-12)
    np.testing.assert_allclose(op._mix_tokens(G, X), op._mix_tokens_numpy(G, X), atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_expected_gram_is_identity(T, rng):
    d, n = 20, 40000
    X = rng.standard_normal((n, T, d))
    Gam = aa.sample_gram(X)
    mean = Gam.mean(axis=0)
    se = Gam.std(axis=0) / np.sqrt(n)
    K = n_pairs(T)
    # within 5 standard errors entrywise
    assert np.all(np.abs(mean - np.eye(K)) <= 5 * se + 1e-12)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_whitened_variances_equal_q(T, rng):
    """Var z_k = Tr(S^2)/d for every pair k, and z_k uncorrelated (DESIGN.md section 2)."""
    d, n = 40, 20000
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    X = rng.standard_normal((n, T, d))
    z = aa.forward_whitened(X, teacher.S)
    q = np.trace(teacher.S @ teacher.S) / d
    var = z.var(axis=0)
    # standard error of a Gaussian sample variance: q sqrt(2/n); z is not exactly Gaussian at
    # finite d, so allow 6 standard errors.
    assert np.all(np.abs(var - q) <= 6 * q * np.sqrt(2 / n) * 2)
    corr = np.corrcoef(z.T) if z.shape[1] > 1 else np.ones((1, 1))
    off = corr[~np.eye(corr.shape[0], dtype=bool)]
    assert np.all(np.abs(off) <= 6 / np.sqrt(n))


def test_whiten_round_trip_and_square_loss_identity(rng):
    T = 4
    H = rng.standard_normal((5, T, T))
    H = H + np.swapaxes(H, 1, 2)
    Y = rng.standard_normal((5, T, T))
    Y = Y + np.swapaxes(Y, 1, 2)
    np.testing.assert_allclose(unwhiten(whiten(H), T), H)
    lhs = 0.5 * np.sum((Y - H) ** 2, axis=(1, 2))
    rhs = np.sum((whiten(Y) - whiten(H)) ** 2, axis=1)
    np.testing.assert_allclose(lhs, rhs)


# ------------------------------------------------------------------ validation


def test_operator_validation_errors(rng):
    X = rng.standard_normal((4, 2, 5))
    S = random_symmetric(5, rng)
    with pytest.raises(ValueError, match="X"):
        aa.preactivations(X[0], S)
    with pytest.raises(ValueError, match="T must be"):
        aa.preactivations(rng.standard_normal((2, 9, 5)), S)
    with pytest.raises(ValueError, match="S"):
        aa.preactivations(X, S[:4, :4])
    with pytest.raises(ValueError, match="symmetric"):
        aa.preactivations(X, rng.standard_normal((5, 5)))
    Xn = X.copy()
    Xn[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aa.preactivations(Xn, S)
    Sinf = S.copy()
    Sinf[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        aa.preactivations(X, Sinf)
    with pytest.raises(ValueError, match="empty"):
        aa.preactivations(np.zeros((0, 2, 5)), S)
    with pytest.raises(ValueError, match="G"):
        aa.backproject(X, rng.standard_normal((4, 3, 3)))
    with pytest.raises(ValueError, match="G"):
        aa.backproject(X, rng.standard_normal((3, 2, 2)))
    with pytest.raises(ValueError, match="dtype"):
        aa.preactivations(X.astype(complex), S)
    with pytest.raises(ValueError, match="w"):
        aa.adjoint_whitened(X, rng.standard_normal((4, 2)))


def test_work_buffer_gives_identical_results(rng):
    """GAMP passes one reusable (n, T, d) buffer to the private forward/adjoint."""
    X = rng.standard_normal((9, 3, 7))
    S = random_symmetric(7, rng)
    G = rng.standard_normal((9, 3, 3))
    work = np.full(X.shape, np.nan)  # stale content must not leak into the results
    np.testing.assert_array_equal(op._preactivations(X, S, work), op._preactivations(X, S))
    np.testing.assert_array_equal(op._backproject(X, G, work), op._backproject(X, G))
