"""docs/theory.md §8.1: the matrix-free sensing operator (§3, §5) against the materialised naive
references of ``tests/naive.py``; its kernels against their NumPy twins; the
:class:`SensingOperator` object."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import amp_attention as aa
from amp_attention import _operator_kernels as kern
from amp_attention.operator import SensingOperator, whitened_to_G
from amp_attention.whitening import n_pairs, pair_indices, unwhiten, whiten
from naive import naive_adjoint, naive_backproject, naive_forward, naive_preactivations


def random_symmetric(d, rng):
    A = rng.standard_normal((d, d))
    return (A + A.T) / 2


def syrk_path(X, G):
    """Adjoint by symmetric rank-k updates, G unvalidated (as GAMP calls it), fresh operator."""
    return SensingOperator(X).backproject(G, method="syrk", check=False)


def gemm_path(X, G):
    """Adjoint in GEMM form, G unvalidated, fresh operator."""
    return SensingOperator(X).backproject(G, method="gemm", check=False)


def whiten_pairs(H):
    """``(n, T, T) -> (n, K)`` pair coordinates (as the whitened maps take them)."""
    ia, ib, c = pair_indices(H.shape[1])
    return H[:, ia, ib] / c


def preactivations_allocating(X, S):
    """The dense forward in plain NumPy: one GEMM ``X S``, then the pair contractions (twin)."""
    n, T, d = X.shape
    H = kern.pair_contract_numpy(X, (X.reshape(n * T, d) @ S).reshape(n, T, d))
    tr = np.trace(S)
    for a in range(T):
        H[:, a, a] -= tr
    H *= 1.0 / np.sqrt(d)
    return H


def preactivations_factored_allocating(X, F, sigma):
    """The factored forward in plain NumPy: ``Y = X F``, then the weighted contractions (twin)."""
    n, T, d = X.shape
    r = F.shape[1]
    sigma = np.ascontiguousarray(sigma, dtype=np.float64)
    H = kern.pair_contract_weighted_numpy((X.reshape(n * T, d) @ F).reshape(n, T, r), sigma)
    tr = float(np.einsum("ij,ij->j", F, F) @ sigma)
    for a in range(T):
        H[:, a, a] -= tr
    H *= 1.0 / np.sqrt(d)
    return H


dims = st.tuples(st.integers(1, 12), st.integers(1, 8), st.integers(1, 14), st.integers(0, 2**31))


@given(dims)
def test_forward_equals_einsum_twin(args):
    n, T, d, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    S = random_symmetric(d, rng)
    H = aa.preactivations(X, S)
    H_naive = naive_preactivations(X, S)
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
    M_naive = naive_backproject(X, G)
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
    z_naive = naive_forward(X, S)
    np.testing.assert_allclose(z, z_naive, atol=1e-12 * max(1.0, np.abs(z_naive).max()))
    M = aa.adjoint_whitened(X, w)
    # A*(w) = sum_k w_k A_k with A_k = (sym(x_a x_b^T) - delta_ab I)/(c_k sqrt(d))
    M_naive = naive_adjoint(X, w)
    np.testing.assert_allclose(M, M_naive, atol=1e-12 * max(1.0, np.abs(M_naive).max()))
    assert abs(np.sum(z * w) - np.trace(S @ M)) <= 1e-9 * max(1.0, np.abs(z).sum() + np.abs(M).sum())


@given(st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 9), st.integers(0, 2**31)))
def test_sample_gram_equals_materialised_twin(args):
    n, T, d, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    np.testing.assert_allclose(aa.sample_gram(X), kern.sample_gram_numpy(X), atol=1e-12 * d)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_kernels_equal_numpy_twins(T, rng):
    X = rng.standard_normal((7, T, 11))
    Y = rng.standard_normal((7, T, 11))
    G = rng.standard_normal((7, T, T))
    S = random_symmetric(11, rng)
    F = rng.standard_normal((11, 4))
    sigma = rng.standard_normal(4)
    for block in (1, 3, 100):
        np.testing.assert_allclose(kern.forward_blocked(X, S, block),
                                   kern.pair_contract_numpy(X, np.einsum("nai,ij->naj", X, S)), atol=1e-12)
        np.testing.assert_allclose(kern.forward_factored_blocked(X, F, sigma, block),
                                   kern.pair_contract_weighted_numpy(X @ F, sigma), atol=1e-12)
        np.testing.assert_allclose(kern.backproject_gemm_blocked(G, X, block, 4),
                                   np.einsum("nai,naj->ij", X, kern.mix_tokens_numpy(G, X)), atol=1e-12)
    np.testing.assert_allclose(np.triu(kern.pair_contract_numpy(X, Y)), np.triu(np.einsum("nai,nbi->nab", X, Y)),
                               atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_float32_kernels_equal_float64_twins(T, rng):
    """float32 tokens: GEMMs in float32, sums over samples in float64 -> relative error ~1e-7."""
    n, d = 40, 13
    X = rng.standard_normal((n, T, d)).astype(np.float32)
    X64 = X.astype(np.float64)
    S = random_symmetric(d, rng)
    F = rng.standard_normal((d, 5))
    sigma = rng.standard_normal(5)
    G = rng.standard_normal((n, T, T))
    lam, V = kern.sym_eig(G)
    pairs = [
        (kern.forward_blocked(X, S.astype(np.float32), 7), kern.pair_contract_numpy(X64, X64 @ S)),
        (kern.forward_factored_blocked(X, F.astype(np.float32), sigma, 7),
         kern.pair_contract_weighted_numpy(X64 @ F, sigma)),
        (kern.backproject_gemm_blocked(G, X, 7, 4), np.einsum("nai,naj->ij", X64, kern.mix_tokens_numpy(G, X64))),
        (kern.backproject_syrk_blocked(X, lam, V, 7, 4, kern.SYRK_ADDRESS[X.dtype]),
         np.einsum("nai,nab,nbj->ij", X64, 0.5 * (G + np.swapaxes(G, 1, 2)), X64)),
    ]
    for got, ref in pairs:
        assert got.dtype == np.float64
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert 0 < err < 1e-5  # not zero: the GEMMs really ran in float32


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
    """Var z_k = Tr(S^2)/d for every pair k, and z_k uncorrelated (docs/theory.md §2)."""
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


def test_results_do_not_depend_on_block_size_or_thread_count(rng):
    """Blocks of any size give the twins' result; the thread count changes nothing, bit for bit."""
    import numba

    n, T, d = 23, 3, 9
    X = rng.standard_normal((n, T, d))
    S = random_symmetric(d, rng)
    G = rng.standard_normal((n, T, T))
    F, sigma = random_factor(d, 4, rng)
    ref_H = kern.pair_contract_numpy(X, (X.reshape(n * T, d) @ S).reshape(n, T, d))
    ref_M = np.einsum("nai,nab,nbj->ij", X, G, X)
    lam, V = kern.sym_eig(G)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            for block in (1, 4, n, 10 * n):
                H = kern.forward_blocked(X, S, block)
                np.testing.assert_allclose(H, ref_H, rtol=0, atol=1e-12 * np.abs(ref_H).max())
                Mg = kern.backproject_gemm_blocked(G, X, block, kern.ADJOINT_CHUNKS)
                np.testing.assert_allclose(Mg, ref_M, rtol=0, atol=1e-12 * np.abs(ref_M).max())
                Ms = kern.backproject_syrk_blocked(X, lam, V, block, kern.ADJOINT_CHUNKS,
                                                   kern.SYRK_ADDRESS[X.dtype])
                np.testing.assert_allclose(Ms, 0.5 * (ref_M + ref_M.T), rtol=0, atol=1e-12 * np.abs(ref_M).max())
            sop = SensingOperator(X)
            results.append([sop.preactivations(S), sop.preactivations_factored(F, sigma),
                            sop.backproject(G, method="syrk"), sop.backproject(G, method="gemm")])
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for one, many in zip(*results):
        np.testing.assert_array_equal(one, many)


# ------------------------------------------------------------------ adjoint by rank-k updates


def special_symmetric(T, kind, rng):
    """Symmetric T x T test matrices with awkward spectra."""
    Q = np.linalg.qr(rng.standard_normal((T, T)))[0]
    if kind == "random":
        return random_symmetric(T, rng)
    if kind == "zero":
        return np.zeros((T, T))
    if kind == "scaled_identity":
        return -2.5 * np.eye(T)
    if kind == "degenerate":  # two repeated eigenvalues, rotated
        lam = np.where(np.arange(T) < T // 2, 1.0, -3.0)
        return (Q * lam) @ Q.T
    if kind == "near_degenerate":
        lam = 1.0 + 1e-9 * np.arange(T)
        return (Q * lam) @ Q.T
    if kind == "rank_one":
        v = rng.standard_normal(T)
        return np.outer(v, v)
    if kind == "diagonal":
        return np.diag(rng.standard_normal(T))
    if kind == "graded":  # entries spanning many orders of magnitude
        lam = 10.0 ** rng.uniform(-12, 3, T) * rng.choice([-1.0, 1.0], T)
        return (Q * lam) @ Q.T
    if kind == "huge":
        return 1e250 * random_symmetric(T, rng)
    if kind == "tiny":
        return 1e-250 * random_symmetric(T, rng)
    raise ValueError(kind)


def fro(A):
    """Frobenius norm without overflow / underflow (the test matrices reach 1e+-250)."""
    m = np.abs(A).max()
    return 0.0 if m == 0 else m * np.linalg.norm(A / m)


SPECIAL_KINDS = ["random", "zero", "scaled_identity", "degenerate", "near_degenerate", "rank_one",
                 "diagonal", "graded", "huge", "tiny"]


@pytest.mark.parametrize("T", range(1, 9))
def test_jacobi_eig_matches_eigh_twin(T, rng):
    """Jacobi kernel vs LAPACK eigh: reconstruction, orthogonality, sorted eigenvalues."""
    G = np.stack([special_symmetric(T, k, rng) for k in SPECIAL_KINDS for _ in range(3)])
    # a non-symmetric input: only its symmetric part may matter
    skew = rng.standard_normal((T, T))
    G = np.concatenate([G, (random_symmetric(T, rng) + skew - skew.T)[None]])
    lam, V = kern.sym_eig(G)
    lam_ref, V_ref = kern.sym_eig_numpy(G)
    Gs = 0.5 * (G + np.swapaxes(G, 1, 2))
    assert lam.shape == (len(G), T) and V.shape == (len(G), T, T)
    for mu in range(len(G)):
        nrm = fro(Gs[mu])
        rec = (V[mu] * lam[mu]) @ V[mu].T
        assert fro(rec - Gs[mu]) <= 1e-13 * nrm
        np.testing.assert_allclose(V[mu].T @ V[mu], np.eye(T), rtol=0, atol=1e-13)
        np.testing.assert_allclose(np.sort(lam[mu]), lam_ref[mu], rtol=0, atol=1e-13 * nrm)
    # the twin's own reconstruction (guards the twin)
    for mu in range(len(G)):
        assert fro((V_ref[mu] * lam_ref[mu]) @ V_ref[mu].T - Gs[mu]) <= 1e-13 * fro(Gs[mu])
    zero = [i for i, k in enumerate(SPECIAL_KINDS) if k == "zero"][0] * 3
    np.testing.assert_array_equal(lam[zero], 0.0)
    np.testing.assert_array_equal(V[zero], np.eye(T))


@pytest.mark.parametrize("T", [1, 3, 8])
def test_jacobi_eig_is_independent_of_lane_blocking(T, rng):
    """Samples run in SIMD lock-step; a converged lane is frozen, so a sample's result must not
    depend on how many samples share its block (or on which)."""
    G = rng.standard_normal((37, T, T))
    G[5] = 0.0
    G[6] = np.diag(np.arange(T, dtype=float))  # already diagonal: 0 sweeps, next to busy lanes
    ref = kern.sym_eig_kernel(G, 1, kern.JACOBI_MAX_SWEEPS)
    for lanes in (3, 8, 32, 64):
        out = kern.sym_eig_kernel(G, lanes, kern.JACOBI_MAX_SWEEPS)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])


def test_jacobi_eig_nonfinite_input_terminates_with_nan(rng):
    T = 4
    G = rng.standard_normal((6, T, T))
    G[1, 0, 2] = np.nan
    G[3, 1, 1] = np.inf
    G[4, 3, 0] = -np.inf
    lam, V = kern.sym_eig(G)
    for mu in (1, 3, 4):
        assert np.all(np.isnan(lam[mu])) and np.all(np.isnan(V[mu]))
    good = [0, 2, 5]
    lam_ref = kern.sym_eig_numpy(G[good])[0]
    np.testing.assert_allclose(np.sort(lam[good], axis=1), lam_ref, atol=1e-13 * np.abs(lam_ref).max())
    X = rng.standard_normal((6, T, 5))
    assert np.all(np.isnan(syrk_path(X, G)))
    # the sweep cap bounds the work even if convergence were never reached
    lam0, V0 = kern.sym_eig_kernel(G[good], 8, 0)
    np.testing.assert_array_equal(V0, np.broadcast_to(np.eye(T), V0.shape))
    np.testing.assert_array_equal(lam0, 0.5 * np.diagonal(G[good] + np.swapaxes(G[good], 1, 2), axis1=1, axis2=2))


@pytest.mark.parametrize("T", range(1, 9))
def test_syrk_blocked_equals_packed_rows_twin(T, rng):
    """The per-block packing by eigenvalue sign (zeros dropped) + syrk == P^T P - N^T N of the twin."""
    n, d = 13, 6
    X = rng.standard_normal((n, T, d))
    lam, V = kern.sym_eig_numpy(rng.standard_normal((n, T, T)))
    lam = lam.copy()
    lam[rng.random(lam.shape) < 0.25] = 0.0  # dropped rows
    lam[2] = np.abs(lam[2])  # a sample without negative rows
    lam[4] = -np.abs(lam[4])  # a sample without positive rows
    lam[6:9] = 0.0  # a block without any row (block = 3)
    P, N = kern.pack_eig_rows_numpy(X, lam, np.ascontiguousarray(V))
    ref = P.T @ P - N.T @ N
    for block in (1, 3, n):
        M = kern.backproject_syrk_blocked(X, lam, np.ascontiguousarray(V), block, 2, kern.SYRK_ADDRESS[X.dtype])
        np.testing.assert_allclose(M, ref, rtol=0, atol=1e-13 * max(1.0, np.abs(ref).max()))
        np.testing.assert_array_equal(M, M.T)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_syrk_into_is_blas_syrk_on_the_upper_triangle(dtype, rng):
    for p, d in ((17, 7), (1, 1), (300, 40)):
        P = rng.standard_normal((p, d)).astype(dtype)
        C = np.full((d, d), 7.0, dtype=dtype)
        kern.syrk_into(P, C, -2.0, kern.SYRK_ADDRESS[np.dtype(dtype)])
        ref = -2.0 * (P.astype(np.float64).T @ P.astype(np.float64))
        tol = 1e-12 if dtype == np.float64 else 1e-5
        iu = np.triu_indices(d)
        np.testing.assert_allclose(C[iu], ref[iu], rtol=0, atol=tol * np.abs(ref).max())
        np.testing.assert_array_equal(C[np.tril_indices(d, -1)], 7.0)  # lower triangle untouched


def make_G(n, T, kind, rng):
    """G with a chosen sign structure of its symmetric part (G itself is not symmetric)."""
    A = rng.standard_normal((n, T, T))
    skew = rng.standard_normal((n, T, T))
    skew = skew - np.swapaxes(skew, 1, 2)
    if kind == "random":
        return A
    if kind == "positive":  # Gs positive definite
        return A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(T) + skew
    if kind == "negative":
        return -(A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(T)) + skew
    if kind == "zero":
        return np.zeros((n, T, T))
    if kind == "skew":  # symmetric part exactly zero
        return skew
    if kind == "psd_rank_one":  # many zero eigenvalues
        v = rng.standard_normal((n, T, 1))
        return v @ np.swapaxes(v, 1, 2)
    raise ValueError(kind)


G_KINDS = ["random", "positive", "negative", "zero", "skew", "psd_rank_one"]


@given(st.tuples(st.integers(1, 12), st.integers(1, 8), st.integers(1, 14), st.sampled_from(G_KINDS),
                 st.integers(0, 2**31)))
def test_backproject_syrk_equals_gemm_path_and_einsum_twin(args):
    n, T, d, kind, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    G = make_G(n, T, kind, rng)
    M = syrk_path(X, G)
    M_naive = naive_backproject(X, G)
    scale = max(1.0, np.abs(M_naive).max())
    np.testing.assert_allclose(M, M_naive, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(M, gemm_path(X, G), rtol=0, atol=1e-12 * scale)
    np.testing.assert_array_equal(M, M.T)
    assert M.flags.c_contiguous
    if kind in ("zero", "skew"):  # Gs = 0 and Tr G = 0: nothing at all
        np.testing.assert_array_equal(M, 0.0)


@pytest.mark.parametrize("kind", ["positive", "negative", "psd_rank_one", "zero"])
@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_backproject_syrk_one_sided_spectra(kind, T, rng):
    """Only positive / only negative / no eigenvalues: one or both syrk blocks are empty."""
    n, d = 9, 5
    X = rng.standard_normal((n, T, d))
    G = make_G(n, T, kind, rng)
    lam = kern.sym_eig(G)[0]
    n_pos, n_neg = int(np.sum(lam > 0)), int(np.sum(lam < 0))
    # (rank one: the T - 1 zero eigenvalues come out as +-eps-sized rows of either sign)
    expected = {"positive": (n * T, 0), "negative": (0, n * T), "zero": (0, 0)}.get(kind)
    if expected is not None:
        assert (n_pos, n_neg) == expected
    M = syrk_path(X, G)
    np.testing.assert_allclose(M, naive_backproject(X, G), rtol=0, atol=1e-12 * max(1.0, np.abs(M).max()))


def test_backproject_dispatch_and_edge_shapes(rng):
    # d = 1, n = 1, T = 1
    for n, T, d in ((1, 1, 1), (1, 8, 1), (3, 1, 1), (1, 3, 9)):
        X = rng.standard_normal((n, T, d))
        G = rng.standard_normal((n, T, T))
        M_naive = naive_backproject(X, G)
        for method in ("auto", "syrk", "gemm"):
            np.testing.assert_allclose(SensingOperator(X).backproject(G, method=method, check=False), M_naive,
                                       atol=1e-13 * max(1, np.abs(M_naive).max()))
    # auto picks syrk at large d, gemm at small d (the two agree only to rounding)
    X = rng.standard_normal((30, 2, SensingOperator.SYRK_MIN_D + 2 * SensingOperator.SYRK_MIN_D_PER_T))
    G = rng.standard_normal((30, 2, 2))
    assert SensingOperator(X).adjoint_method == "syrk"
    np.testing.assert_array_equal(aa.backproject(X, G), syrk_path(X, G))
    Xs = X[:, :, :10]
    assert SensingOperator(Xs).adjoint_method == "gemm"
    np.testing.assert_array_equal(aa.backproject(Xs, G), gemm_path(Xs, G))
    with pytest.raises(ValueError, match="method"):
        SensingOperator(X).backproject(G, method="lu")


# ------------------------------------------------------------------ factored forward


def random_factor(d, r, rng, signs=True):
    F = rng.standard_normal((d, r))
    sigma = rng.choice([-1.0, 1.0], r) if signs else rng.standard_normal(r)
    return F, sigma


@given(st.tuples(st.integers(1, 10), st.integers(1, 8), st.integers(1, 12), st.integers(0, 14),
                 st.booleans(), st.integers(0, 2**31)))
def test_factored_forward_equals_einsum_twin_and_dense_forward(args):
    n, T, d, r, signs, seed = args
    r = min(r, d + 2)  # r in 0..d+2
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    F, sigma = random_factor(d, r, rng, signs)
    S = (F * sigma) @ F.T
    H = SensingOperator(X).preactivations_factored(F, sigma)
    H_naive = naive_preactivations(X, S)
    scale = max(1.0, np.abs(H_naive).max())
    assert H.shape == (n, T, T)
    np.testing.assert_allclose(H, H_naive, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(H, SensingOperator(X).preactivations(S, check=False), rtol=0, atol=1e-12 * scale)
    np.testing.assert_array_equal(H, np.swapaxes(H, 1, 2))
    z = SensingOperator(X).forward_factored(F, sigma)
    ia, ib, c = pair_indices(T)
    np.testing.assert_allclose(z, H_naive[:, ia, ib] / c, rtol=0, atol=1e-12 * scale)


def test_factored_forward_rank_zero_and_layouts(rng):
    X = rng.standard_normal((5, 3, 6))
    H = SensingOperator(X).preactivations_factored(np.zeros((6, 0)), np.zeros(0))
    np.testing.assert_array_equal(H, 0.0)
    # non-contiguous factor (a slice of an eigenbasis, as a denoiser returns) and integer signs
    U = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    F = U[:, 2:5] * 1.5
    sigma = np.array([1, -1, 1])
    S = (F * sigma) @ F.T
    sop = SensingOperator(X)
    np.testing.assert_allclose(sop.preactivations_factored(F, sigma, check=False), sop.preactivations(S, check=False),
                               atol=1e-13)


@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_forward_factored_blocked_equals_numpy_twin(T, rng):
    for r in (0, 1, 7):
        Y = rng.standard_normal((6, T, r))
        sigma = rng.standard_normal(r)
        X = rng.standard_normal((6, T, 9))
        F = rng.standard_normal((9, r))
        for block in (1, 4):
            np.testing.assert_allclose(kern.forward_factored_blocked(X, F, sigma, block),
                                       kern.pair_contract_weighted_numpy(X @ F, sigma), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("d", [6, SensingOperator.SYRK_MIN_D + 5 * SensingOperator.SYRK_MIN_D_PER_T])
def test_sensing_operator_methods_equal_free_functions(T, d, rng):
    n = 13
    X = rng.standard_normal((n, T, d))
    S = random_symmetric(d, rng)
    G = rng.standard_normal((n, T, T))
    K = n_pairs(T)
    w = rng.standard_normal((n, K))
    sop = SensingOperator(X)
    assert (sop.n, sop.T, sop.d, sop.K) == (n, T, d, K)
    assert sop.X is X  # float64 C-contiguous input: validated, not copied
    assert sop.adjoint_method == ("syrk" if d >= 60 + 10 * T else "gemm")
    for _ in range(2):  # the second round runs on a used buffer
        np.testing.assert_array_equal(sop.preactivations(S), aa.preactivations(X, S))
        np.testing.assert_array_equal(sop.forward(S), aa.forward_whitened(X, S))
        np.testing.assert_array_equal(sop.backproject(G), aa.backproject(X, G))
        np.testing.assert_array_equal(sop.adjoint(w), aa.adjoint_whitened(X, w))
        np.testing.assert_array_equal(sop.gram(), aa.sample_gram(X))
        # check=False (the GAMP hot path) computes the same thing
        np.testing.assert_array_equal(sop.forward(S, check=False), aa.forward_whitened(X, S))
        np.testing.assert_array_equal(sop.adjoint(w, check=False), aa.adjoint_whitened(X, w))
    # the whitened maps are the (n, T, T) maps in pair coordinates
    np.testing.assert_array_equal(sop.forward(S), whiten_pairs(sop.preactivations(S)))
    np.testing.assert_array_equal(sop.adjoint(w), sop.backproject(whitened_to_G(w, T)))
    # factored forward: sigma=None means ones
    F = rng.standard_normal((d, 3))
    np.testing.assert_array_equal(sop.forward_factored(F), sop.forward_factored(F, np.ones(3)))
    np.testing.assert_array_equal(sop.forward_factored(F, check=False), sop.forward_factored(F))
    np.testing.assert_array_equal(sop.forward_factored(F), whiten_pairs(sop.preactivations_factored(F)))
    assert "n=13" in repr(sop)


def test_sensing_operator_gram_is_cached(rng):
    X = rng.standard_normal((6, 3, 5))
    sop = SensingOperator(X)
    Gam = sop.gram()
    assert Gam.shape == (6, n_pairs(3), n_pairs(3))
    assert sop.gram() is Gam
    np.testing.assert_array_equal(Gam, kern.sample_gram(X))
    np.testing.assert_allclose(Gam, kern.sample_gram_numpy(X), atol=1e-12 * 5)


_MEMORY_SCRIPT = """
import resource, sys
import numpy as np
from amp_attention.operator import SensingOperator
n, T, d = {n}, 2, {d}
rng = np.random.default_rng(0)
X = rng.standard_normal((n, T, d)).astype({dtype!r})
S = rng.standard_normal((d, d)); S = S + S.T
F = rng.standard_normal((d, d // 2))
w = rng.standard_normal((n, 3))
sop = SensingOperator(X)
small = SensingOperator(X[:50])
for call in (small.forward, small.adjoint):  # compile on a small operator
    call(S if call == small.forward else w[:50], check=False)
small.forward_factored(F, check=False)
small.backproject(rng.standard_normal((50, T, T)), method="gemm", check=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sop.forward(S, check=False); sop.forward_factored(F, check=False); sop.adjoint(w, check=False)
sop.backproject(rng.standard_normal((n, T, T)), method="gemm", check=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / X.nbytes)
"""


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sensing_operator_forms_no_n_T_d_intermediate(dtype):
    """Peak resident memory of forward, factored forward and both adjoints beyond X and their
    results (n T T, n K, d d) stays a small fraction of X: nothing of X's size is allocated."""
    import subprocess
    import sys

    n, d = 60000, 100  # X = 96 MB in float64
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(n=n, d=d, dtype=dtype)],
                         capture_output=True, text=True, check=True)
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < 0.25, f"peak memory grew by {growth:.2f} x X"


@given(st.tuples(st.integers(1, 9), st.integers(1, 8), st.integers(1, 12), st.integers(0, 2**31)))
def test_sensing_operator_forward_and_adjoint_are_adjoint(args):
    """<A S, w> == <S, A* w> and <H(S), G> == Tr(S M(G)) through one object (both adjoint paths)."""
    n, T, d, seed = args
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    S = random_symmetric(d, rng)
    sop = SensingOperator(X)
    w = rng.standard_normal((n, sop.K))
    G = rng.standard_normal((n, T, T))
    z, M = sop.forward(S), sop.adjoint(w)
    assert z.shape == (n, sop.K) and M.shape == (d, d)
    np.testing.assert_array_equal(M, M.T)
    lhs, rhs = np.sum(z * w), np.sum(S * M)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, np.abs(z).sum() * np.abs(w).max() + np.abs(S).sum() * np.abs(M).max())
    H = sop.preactivations(S)
    for method in ("syrk", "gemm"):
        Mg = sop.backproject(G, method=method)
        lhs, rhs = np.sum(H * G), np.sum(S * Mg)
        assert abs(lhs - rhs) <= 1e-10 * max(1.0, np.abs(H).sum() * np.abs(G).max() + np.abs(S).sum() * np.abs(Mg).max())
    # factored S = F diag(sigma) F^T
    F, sigma = random_factor(d, max(1, d // 2), rng)
    zf = sop.forward_factored(F, sigma)
    Sf = (F * sigma) @ F.T
    assert abs(np.sum(zf * w) - np.sum(Sf * M)) <= 1e-10 * max(1.0, np.abs(zf).sum() * np.abs(w).max()
                                                               + np.abs(Sf).sum() * np.abs(M).max())


def test_sensing_operator_validation_errors_name_the_argument(rng):
    n, T, d = 4, 3, 5
    X = rng.standard_normal((n, T, d))
    S = random_symmetric(d, rng)
    for bad in (X[0], np.zeros((0, T, d)), rng.standard_normal((2, 9, d)), X.astype(complex)):
        with pytest.raises(ValueError, match="X|T must be"):
            SensingOperator(bad)
    Xn = X.copy()
    Xn[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        SensingOperator(Xn)
    sop = SensingOperator(X)
    for method in (sop.preactivations, sop.forward):
        with pytest.raises(ValueError, match="S must have shape"):
            method(S[:4, :4])
        with pytest.raises(ValueError, match="S must be symmetric"):
            method(rng.standard_normal((d, d)))
        with pytest.raises(ValueError, match="S contains NaN or inf"):
            method(np.full((d, d), np.inf))
        with pytest.raises(ValueError, match="S must be 2-dimensional"):
            method(np.ones(d))
    with pytest.raises(ValueError, match="G must have shape"):
        sop.backproject(rng.standard_normal((n, T + 1, T + 1)))
    with pytest.raises(ValueError, match="G must be 3-dimensional"):
        sop.backproject(rng.standard_normal((T, T)))
    with pytest.raises(ValueError, match="w must have shape"):
        sop.adjoint(rng.standard_normal((n, sop.K + 1)))
    with pytest.raises(ValueError, match="w contains NaN"):
        sop.adjoint(np.full((n, sop.K), np.nan))
    with pytest.raises(ValueError, match="F must have shape"):
        sop.forward_factored(rng.standard_normal((d + 1, 2)))
    with pytest.raises(ValueError, match="F must be 2-dimensional"):
        sop.preactivations_factored(rng.standard_normal(d))
    with pytest.raises(ValueError, match="sigma must have shape"):
        sop.forward_factored(rng.standard_normal((d, 2)), np.ones(3))
    with pytest.raises(ValueError, match="sigma contains NaN"):
        sop.forward_factored(rng.standard_normal((d, 2)), np.array([1.0, np.nan]))
    # the checks the methods run, for validating once up front
    np.testing.assert_array_equal(sop.check_S(S), S)
    with pytest.raises(ValueError, match="S must be symmetric"):
        sop.check_S(rng.standard_normal((d, d)))
    # check=False skips validation (the caller vouches for the argument): no error, same formula
    A = rng.standard_normal((d, d))
    np.testing.assert_allclose(sop.preactivations(A, check=False), preactivations_allocating(X, A), rtol=0, atol=1e-12)

