"""docs/theory.md §8.2 for the input side: spectral prox, shrinkage and divergence."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize

from amp_attention import denoisers as dn
from amp_attention._spectral_kernels import spectral_divergence_numpy
from naive import sym_basis




def fd_divergence(eta, R, eps=1e-6):
    return sum(np.sum(B * (eta(R + eps * B) - eta(R - eps * B))) / (2 * eps) for B in sym_basis(R.shape[0]))


def random_symmetric(d, rng):
    A = rng.standard_normal((d, d))
    return (A + A.T) / np.sqrt(2 * d)


@given(st.integers(2, 7), st.floats(0.0, 1.0), st.integers(0, 2**31))
def test_nuclear_divergence_matches_finite_differences(d, lam, seed):
    rng = np.random.default_rng(seed)
    R = random_symmetric(d, rng) + 0.3 * np.eye(d)
    A_hat = 0.7
    den = dn.NuclearDenoiser(lam)
    L = np.linalg.eigvalsh(R)
    if np.min(np.abs(L - lam / A_hat)) < 1e-3:  # f is not differentiable at the threshold
        return
    S, div = den(R, A_hat)
    assert abs(div - fd_divergence(lambda M: den(M, A_hat)[0], R)) <= 1e-5 * max(1.0, div)


def test_nuclear_divergence_with_width_matches_finite_differences(rng):
    d = 6
    R = random_symmetric(d, rng) + np.diag(np.linspace(0, 2, d))
    den = dn.NuclearDenoiser(0.1, width=2)
    S, div = den(R, 1.0)
    assert np.linalg.matrix_rank(S, tol=1e-10) <= 2
    assert abs(div - fd_divergence(lambda M: den(M, 1.0)[0], R)) <= 1e-5 * max(1.0, div)


def test_frobenius_shrinkage_and_divergence(rng):
    d = 5
    R = random_symmetric(d, rng)
    den = dn.FrobeniusDenoiser(0.3)
    S, div = den(R, 1.2)
    np.testing.assert_allclose(S, 1.2 / 1.5 * R)
    assert abs(div - fd_divergence(lambda M: den(M, 1.2)[0], R)) <= 1e-6 * div
    assert np.isclose(div, d * (d + 1) / 2 * 1.2 / 1.5)


def test_nuclear_prox_is_the_proximal_map(rng):
    """eta(R) = argmin_{S PSD} lam d Tr S + (d A/2)||S - R||^2, checked with scipy on S = W W^T."""
    d, lam, A_hat = 5, 0.15, 0.8
    R = random_symmetric(d, rng) + 0.2 * np.eye(d)
    S, _, _, _ = dn.nuclear_prox(R, lam / A_hat)

    def obj(w):
        W = w.reshape(d, d)
        S_ = W @ W.T
        G = lam * d * np.eye(d) + d * A_hat * (S_ - R)
        return lam * d * np.trace(S_) + 0.5 * d * A_hat * np.sum((S_ - R) ** 2), (2 * G @ W).ravel()

    best = min((minimize(obj, rng.standard_normal(d * d), jac=True, method="L-BFGS-B",
                         options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}) for _ in range(3)),
               key=lambda r: r.fun)
    W = best.x.reshape(d, d)
    np.testing.assert_allclose(S, W @ W.T, atol=1e-6)
    assert np.linalg.eigvalsh(S).min() >= -1e-12


@given(st.integers(1, 40), st.integers(0, 2**31))
def test_divergence_kernel_equals_numpy_twin(d, seed):
    rng = np.random.default_rng(seed)
    l = np.sort(rng.standard_normal(d))
    if d > 3:
        l[1] = l[2]  # an exactly repeated eigenvalue uses f'
    f, fp = dn.soft_threshold_spectrum(l, 0.2)
    a = dn.spectral_divergence(l, f, fp)
    b = spectral_divergence_numpy(l, f, fp)
    assert abs(a - b) <= 1e-10 * max(1.0, abs(b))


def test_divergence_of_identity_and_linear_maps():
    l = np.array([0.0, 0.5, 0.5, 2.0])
    d = l.size
    assert np.isclose(dn.spectral_divergence(l, l, np.ones(d)), d * (d + 1) / 2)
    assert np.isclose(dn.spectral_divergence(l, 3 * l, 3 * np.ones(d)), 3 * d * (d + 1) / 2)


def test_denoiser_validation():
    with pytest.raises(ValueError, match="lam"):
        dn.NuclearDenoiser(-1.0)
    with pytest.raises(ValueError, match="width"):
        dn.NuclearDenoiser(0.1, width=0)
    with pytest.raises(ValueError, match="lam"):
        dn.FrobeniusDenoiser(float("nan"))
