"""Tests for amp_attention.spectral (docs/theory.md §6 and §7).

Every check compares against an independent reference: sampled random matrices, closed forms,
free-cumulant moment formulas, an independent subordination solve (Marchenko-Pastur quadratic +
Biane parametrisation with scipy root finding), finite differences, or the NumPy twin of a Numba
kernel.  Nothing is compared with numbers produced by the code under test itself.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize

from amp_attention import spectral as sp
from amp_attention.spectral import (
    LinearShrinkage,
    SoftThreshold,
    SpectralLaw,
    free_input_side,
    r_density,
    rie_denoiser,
    rie_mmse,
    shat_spectrum,
)
from amp_attention.spectral._kernels import biane_nodes, biane_nodes_numpy
from amp_attention.spectral.backends import AtomsBackend
from amp_attention.denoisers import spectral_divergence
from amp_attention.factors import InputFactor
from amp_attention.spectral.scalar_maps import denoiser_derivative
from naive import sym_basis


class _MapFactor(InputFactor):
    """An input factor defined by nothing but a scalar map (tests the generic finite-d path)."""

    def __init__(self, f):
        self.f = f

    def scalar_map(self, A_hat):
        return self.f


def finite_input_side(lam, a, Delta, f, A_hat, **kw):
    """The finite-d SE input side of the generic input factor with scalar map ``f``."""
    return _MapFactor(f).se_overlaps_finite(lam, a, Delta, A_hat, **kw)


def _divergence(L, f):
    return spectral_divergence(L, f(L), denoiser_derivative(f, L))

# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------


def goe(d, rng):
    """GOE with off-diagonal variance 1/d and diagonal variance 2/d (test's own sampler)."""
    A = rng.standard_normal((d, d))
    return (A + A.T) / np.sqrt(2 * d)


def wishart_teacher_eigs(d, rho, rng):
    """Eigenvalues of S* = W W^T / sqrt(r d), W in R^{d x r} (via the smaller Gram matrix)."""
    r = max(1, round(rho * d))
    W = rng.standard_normal((d, r))
    if r >= d:
        return np.linalg.eigvalsh(W @ W.T / np.sqrt(r * d))
    nz = np.linalg.eigvalsh(W.T @ W / np.sqrt(r * d))
    return np.sort(np.concatenate([np.zeros(d - r), nz]))


def sample_R_eigs(lam, a, Delta, rng):
    R = np.sqrt(Delta) * goe(lam.size, rng)
    R[np.diag_indices(lam.size)] += a * lam
    return np.linalg.eigvalsh(R)


def mp_G(z, rho):
    """Stieltjes transform of S* = sqrt(rho) X, X Marchenko-Pastur of ratio y = 1/rho (variance 1).

    Textbook form G_X(w) = (w + y - 1 - sqrt(w - l-) sqrt(w - l+)) / (2 y w), l+- = (1 +- sqrt(y))^2
    (product of principal square roots: correct branch off [l-, l+], includes the zero atom).
    """
    y = 1.0 / rho
    s = np.sqrt(rho)
    w = np.asarray(z, complex) / s
    lm, lp = (1 - np.sqrt(y)) ** 2, (1 + np.sqrt(y)) ** 2
    G = (w + y - 1 - np.sqrt(w - lm) * np.sqrt(w - lp)) / (2 * y * w)
    return G / s


def reference_subordination_mp(rho, a, Delta, u):
    """Biane/subordination solve for R = a S* + sqrt(Delta) W with the continuous MP law of S*.

    For each u: v > 0 solves int dmu(y) / ((u - y)^2 + v^2) = -Im G_mu(u + iv) / v = 1/Delta
    (mu = law of a S*, G_mu(w) = G_{S*}(w/a)/a); then x = u + Delta Re G_mu(u + iv) and
    G_R(x) = G_mu(u + iv).  Returns (x, G) for the u inside the support.
    """
    xs, Gs = [], []
    for uu in u:
        h = lambda v: -(mp_G((uu + 1j * v) / a, rho) / a).imag / v - 1.0 / Delta  # noqa: E731
        if h(1e-13) <= 0:
            continue
        v = optimize.brentq(h, 1e-13, 10 * np.sqrt(Delta) + 1, xtol=1e-15, rtol=1e-15, maxiter=500)
        Gm = mp_G((uu + 1j * v) / a, rho) / a
        xs.append(uu + Delta * Gm.real)
        Gs.append(Gm)
    return np.array(xs), np.array(Gs)


def free_moments(m, Delta):
    """Moments 1..4 of mu (+) semicircle(Delta) from the moments m[1..4] of mu (free cumulants)."""
    m1, m2, m3, m4 = m
    k1 = m1
    k2 = m2 - m1**2
    k3 = m3 - 3 * k2 * k1 - k1**3
    k4 = m4 - 4 * k3 * k1 - 2 * k2**2 - 6 * k2 * k1**2 - k1**4
    k2 += Delta
    return (k1, k2 + k1**2, k3 + 3 * k2 * k1 + k1**3,
            k4 + 4 * k3 * k1 + 2 * k2**2 + 6 * k2 * k1**2 + k1**4)


def mp_moments(rho):
    """Moments 1..4 of S* = sqrt(rho) X, X ~ MP(y = 1/rho): Narayana polynomials."""
    y = 1.0 / rho
    mx = (1.0, 1 + y, 1 + 3 * y + y**2, 1 + 6 * y + 6 * y**2 + y**3)
    return tuple(rho ** (k / 2) * mx[k - 1] for k in range(1, 5))


def model_cdf(dn, xs):
    """CDF of rho_R from the quadrature (midpoint rule at nodes, exact values at the edges)."""
    g = dn.grid()
    c = np.cumsum(g.weights) - 0.5 * g.weights
    cm = np.concatenate([[0.0], np.cumsum(dn.masses)])
    pts = np.concatenate([g.x, dn.intervals[:, 0], dn.intervals[:, 1]])
    val = np.concatenate([c, cm[:-1], cm[1:]])
    o = np.argsort(pts, kind="stable")
    return np.interp(xs, pts[o], val[o])


def ks_distance(eigs, dn):
    """KS distance between the empirical spectral CDF and the model (midpoint CDF of nodes)."""
    e = np.sort(eigs)
    F = model_cdf(dn, e)
    n = e.size
    emp_hi = np.arange(1, n + 1) / n
    emp_lo = np.arange(0, n) / n
    return max(np.max(np.abs(F - emp_hi)), np.max(np.abs(F - emp_lo)))


def semicircle_quantiles(K, var):
    """Midpoint quantiles of the semicircle of variance var (closed-form CDF inverted by brentq)."""
    r = 2 * np.sqrt(var)
    cdf = lambda x: 0.5 + (x * np.sqrt(r * r - x * x) / r**2 + np.arcsin(x / r)) / np.pi  # noqa: E731
    return np.array([optimize.brentq(lambda x: cdf(x) - (k + 0.5) / K, -r, r, xtol=1e-14) for k in range(K)])


# ----------------------------------------------------------------------------------------------
# laws and validation
# ----------------------------------------------------------------------------------------------


def test_law_moments_and_wishart_against_sampled_teacher():
    for rho in (0.3, 2.0):
        law = SpectralLaw.wishart(rho)
        assert law.mean == pytest.approx(np.sqrt(rho)) and law.Q == pytest.approx(1 + rho)
        lam = wishart_teacher_eigs(600, rho, np.random.default_rng(1))
        assert np.mean(lam) == pytest.approx(law.mean, abs=0.01)
        assert np.mean(lam**2) == pytest.approx(law.Q, abs=0.03)
        if rho < 1:
            assert np.mean(np.abs(lam) < 1e-8) == pytest.approx(1 - rho, abs=2e-3)
    at = SpectralLaw.atoms([3.0, 1.0, 1.0], weights=[1, 1, 2])
    assert at.mean == pytest.approx((3 + 1 + 2) / 4) and at.Q == pytest.approx((9 + 1 + 2) / 4)
    sc = SpectralLaw.semicircle(0.5, mean=1.0)
    assert sc.mean == 1.0 and sc.Q == pytest.approx(1.5) and sc.variance == pytest.approx(0.5)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: SpectralLaw.wishart(0.0), "rho"),
        (lambda: SpectralLaw.wishart(float("nan")), "rho"),
        (lambda: SpectralLaw.atoms([]), "eigenvalues"),
        (lambda: SpectralLaw.atoms([1.0, np.inf]), "eigenvalues"),
        (lambda: SpectralLaw.atoms([1.0, 2.0], weights=[1.0]), "weights"),
        (lambda: SpectralLaw.atoms([1.0, 2.0], weights=[1.0, -1.0]), "weights"),
        (lambda: SpectralLaw.semicircle(-1.0), "variance"),
        (lambda: r_density(SpectralLaw.wishart(1.0), -1.0, 1.0), "a"),
        (lambda: r_density(SpectralLaw.wishart(1.0), 1.0, 0.0), "Delta"),
        (lambda: r_density("wishart", 1.0, 1.0), "law"),
        (lambda: r_density(SpectralLaw.wishart(1.0), 1.0, 1.0, n_nodes=2), "n_nodes"),
        (lambda: free_input_side(SpectralLaw.wishart(1.0), 1.0, 1.0, SoftThreshold(0.1), 0.0), "A_hat"),
        (lambda: free_input_side(SpectralLaw.wishart(1.0), 1.0, 1.0, 3.0, 1.0), "f"),
        (lambda: finite_input_side([1.0, 2.0], 1.0, 1.0, SoftThreshold(0.1), 1.0, n_draws=0), "n_draws"),
        (lambda: SoftThreshold(float("inf")), "tau"),
        (lambda: rie_denoiser([0.0], SpectralLaw.wishart(1.0), -2.0), "Delta"),
        (lambda: r_density(SpectralLaw.wishart(1.0), 0.0, 1.0).rie([0.0]), "a"),
    ],
)
def test_validation_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ----------------------------------------------------------------------------------------------
# the Wishart cubic (docs/theory.md §7(b)) against independent references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho, a, Delta", [(0.5, 1.0, 0.05), (0.2, 2.0, 0.5), (2.0, 0.7, 0.3), (1.0, 1.0, 1.0)])
def test_wishart_cubic_matches_mp_subordination(rho, a, Delta):
    # support of a S*: [0] u a s [l-, l+]; scan u across it
    s = np.sqrt(rho)
    lp = a * s * (1 + 1 / s) ** 2
    u = np.linspace(-2 * np.sqrt(Delta), lp + 2 * np.sqrt(Delta), 70)
    x, G_ref = reference_subordination_mp(rho, a, Delta, u)
    assert x.size > 20
    dn = r_density(SpectralLaw.wishart(rho), a, Delta)
    G = dn.stieltjes(x)
    np.testing.assert_allclose(G.real, G_ref.real, atol=1e-8 * (1 + np.abs(G_ref).max()))
    np.testing.assert_allclose(G.imag, G_ref.imag, atol=1e-8 * (1 + np.abs(G_ref).max()))
    assert np.all(G.imag <= 0)
    # support edges are where the reference density vanishes: every reference point is inside
    inside = np.zeros(x.size, bool)
    for lo, hi in dn.intervals:
        inside |= (x >= lo - 1e-9) & (x <= hi + 1e-9)
    assert inside.all()
    # outside the support: u real with 1 - Delta F(u) > 0, F = -G_mu'(u) (Biane's "good" set);
    # then x = u + Delta G_mu(u) is outside the support and G_R(x) = G_mu(u) is real
    u = np.concatenate([np.linspace(-6, 0, 400)[:-1], np.linspace(0, lp + 6, 800)[1:]])
    Gmu = lambda uu: (mp_G(uu / a + 0j, rho) / a).real  # noqa: E731
    h = 1e-6
    good = 1 + Delta * (Gmu(u + h) - Gmu(u - h)) / (2 * h) > 1e-3
    good &= np.abs(mp_G(u / a + 0j, rho).imag) < 1e-12
    u = u[good]
    x_out = u + Delta * Gmu(u)
    G_out = dn.stieltjes(x_out)
    assert np.all(G_out.imag == 0)
    np.testing.assert_allclose(G_out.real, Gmu(u), rtol=1e-8, atol=1e-8)
    gaps = [(-np.inf, dn.intervals[0, 0])] + list(zip(dn.intervals[:-1, 1], dn.intervals[1:, 0])) + \
        [(dn.intervals[-1, 1], np.inf)]
    assert all(any(lo <= xx <= hi for lo, hi in gaps) for xx in x_out)


def test_wishart_cubic_a_to_zero_is_semicircle_and_a_zero_works():
    Delta = 0.7
    x = np.array([-3.0, -1.2, 0.0, 0.5, 1.6, 2.5])
    sc = (x - np.sign(x + 1e-300) * np.sqrt(np.maximum(x * x - 4 * Delta, 0) + 0j)) / (2 * Delta)
    sc = np.where(np.abs(x) < 2 * np.sqrt(Delta), (x - 1j * np.sqrt(4 * Delta - x * x + 0j)) / (2 * Delta), sc)
    for a in (0.0, 1e-9):
        dn = r_density(SpectralLaw.wishart(0.5), a, Delta)
        np.testing.assert_allclose(dn.intervals, [[-2 * np.sqrt(Delta), 2 * np.sqrt(Delta)]], atol=1e-6)
        np.testing.assert_allclose(dn.stieltjes(x), sc, atol=1e-6)


@pytest.mark.parametrize("rho, a, Delta", [(0.3, 1.0, 0.01), (2.0, 1.0, 0.25)])
def test_wishart_density_matches_sampled_spectrum(rho, a, Delta):
    rng = np.random.default_rng(7)
    d = 800
    lam = wishart_teacher_eigs(d, rho, rng)
    eigs = sample_R_eigs(lam, a, Delta, rng)
    dn = r_density(SpectralLaw.wishart(rho), a, Delta)
    assert ks_distance(eigs, dn) < 0.02
    # fractions per support interval (rho = 0.3, small Delta: zero-atom bulk + MP bulk)
    if rho < 1:
        assert len(dn.intervals) == 2
        frac = np.mean(eigs < 0.5 * (dn.intervals[0, 1] + dn.intervals[1, 0]))
        assert frac == pytest.approx(dn.masses[0], abs=0.01)
        assert dn.masses[0] == pytest.approx(1 - rho, abs=0.01)
    lo, hi = dn.intervals[0, 0], dn.intervals[-1, 1]
    assert eigs.min() > lo - 0.1 and eigs.max() < hi + 0.1


# ----------------------------------------------------------------------------------------------
# density of R: moments (free cumulants), support, G outside the support
# ----------------------------------------------------------------------------------------------


def _check_moments(law, a, Delta, m_law, tol):
    dn = r_density(law, a, Delta)
    g = dn.grid()
    mom = [np.dot(g.weights, g.x**k) for k in range(5)]
    ref = free_moments(tuple(a**k * m_law[k - 1] for k in range(1, 5)), Delta)
    assert mom[0] == pytest.approx(1.0, abs=tol)
    assert mom[1] == pytest.approx(a * law.mean, abs=tol)
    assert mom[2] == pytest.approx(a * a * law.Q + Delta, abs=tol * (1 + a * a * law.Q + Delta))
    for k in (3, 4):
        assert mom[k] == pytest.approx(ref[k - 1], abs=tol * (1 + abs(ref[k - 1]))), k
    assert dn.masses.sum() == pytest.approx(1.0, abs=tol)
    assert np.all(g.weights >= 0) and np.all(np.diff(dn.intervals.ravel()) > 0)


@settings(max_examples=max(25, settings().max_examples), deadline=None)
@given(rho=st.floats(0.05, 4.0), a=st.floats(0.0, 3.0), Delta=st.floats(1e-3, 5.0))
def test_wishart_density_moments(rho, a, Delta):
    _check_moments(SpectralLaw.wishart(rho), a, Delta, mp_moments(rho), 1e-7)


@settings(max_examples=max(20, settings().max_examples), deadline=None)
@given(
    lam=st.lists(st.floats(-3, 3), min_size=1, max_size=40),
    a=st.floats(0.0, 2.0),
    Delta=st.floats(1e-3, 2.0),
)
def test_atoms_density_moments(lam, a, Delta):
    lam = np.array(lam)
    law = SpectralLaw.atoms(lam)
    _check_moments(law, a, Delta, tuple(np.mean(lam**k) for k in range(1, 5)), 1e-7)


def test_powerlaw_and_semicircle_moments():
    lam = np.arange(1, 301) ** -0.7
    lam /= np.sqrt(np.mean(lam**2))
    for Delta in (1e-4, 1e-2, 0.5):
        _check_moments(SpectralLaw.atoms(lam), 1.0, Delta, tuple(np.mean(lam**k) for k in range(1, 5)), 1e-7)
    v, c = 0.6, 0.4
    sc_mom = (c, v + c * c, c**3 + 3 * v * c, c**4 + 6 * v * c * c + 2 * v * v)
    _check_moments(SpectralLaw.semicircle(v, c), 0.8, 0.3, sc_mom, 1e-10)


def test_multi_interval_support_matches_sampled_matrix():
    # spikes far apart: one small support interval per spike cluster
    d = 600
    lam = np.repeat([-4.0, 0.0, 4.0], d // 3)
    law = SpectralLaw.atoms(lam)
    Delta = 0.2
    dn = r_density(law, 1.0, Delta)
    assert len(dn.intervals) == 3
    np.testing.assert_allclose(dn.masses, 1 / 3, atol=1e-10)
    # each cluster is a semicircle of radius 2 sqrt(Delta/3) around the spike (independent blocks
    # of size d/3 with GOE variance Delta/d -> semicircle variance Delta/3), up to O(gap^-1) shifts
    for (lo, hi), c in zip(dn.intervals, (-4, 0, 4)):
        assert hi - lo == pytest.approx(4 * np.sqrt(Delta / 3), rel=0.05)
        assert 0.5 * (lo + hi) == pytest.approx(c, abs=0.05)
    rng = np.random.default_rng(3)
    eigs = sample_R_eigs(lam, 1.0, Delta, rng)
    for lo, hi in dn.intervals:
        assert np.mean((eigs > lo - 0.03) & (eigs < hi + 0.03)) == pytest.approx(1 / 3, abs=1e-9)
    assert ks_distance(eigs, dn) < 0.02
    # power-law teacher at finite d: many separated outliers + a bulk
    rng = np.random.default_rng(4)
    lam = np.arange(1, d + 1) ** -1.0
    lam /= np.sqrt(np.mean(lam**2))
    dn = r_density(SpectralLaw.atoms(lam), 1.0, 0.01)
    assert len(dn.intervals) > 5
    eigs = sample_R_eigs(lam, 1.0, 0.01, rng)
    assert ks_distance(eigs, dn) < 0.02
    # every top eigenvalue (outlier) lies in (or within finite-d fluctuations of) the support
    top = eigs[-5:]
    dist = np.min(np.maximum(dn.intervals[:, :1] - top, top - dn.intervals[:, 1:]).clip(0), axis=0)
    assert np.all(dist < 0.02)


@pytest.mark.parametrize("kind", ["wishart", "atoms"])
def test_stieltjes_outside_support_matches_sampled_resolvent(kind):
    rng = np.random.default_rng(11)
    d = 700
    lam = wishart_teacher_eigs(d, 0.4, rng)
    law = SpectralLaw.wishart(0.4) if kind == "wishart" else SpectralLaw.atoms(lam)
    a, Delta = 1.2, 0.02
    dn = r_density(law, a, Delta)
    eigs = sample_R_eigs(lam, a, Delta, rng)
    I = dn.intervals
    k = np.argmax(I[1:, 0] - I[:-1, 1])  # widest gap (zero-atom bulk | MP bulk)
    gap_mid = 0.5 * (I[k, 1] + I[k + 1, 0])
    xs = np.array([I[0, 0] - 1.0, I[0, 0] - 0.1, gap_mid, I[-1, 1] + 0.2, 8.0])
    G = dn.stieltjes(xs)
    assert np.all(G.imag == 0)
    G_emp = np.mean(1.0 / (xs[:, None] - eigs[None, :]), axis=1)
    np.testing.assert_allclose(G.real, G_emp, rtol=0.02, atol=0.02)
    # G is decreasing outside the support, and continuous across the edges
    xx = np.linspace(I[-1, 1] + 1e-6, I[-1, 1] + 1, 50)
    assert np.all(np.diff(dn.stieltjes(xx).real) < 0)
    for e in I.ravel()[:6]:
        Gp = dn.stieltjes(np.array([e - 1e-12, e + 1e-12]))
        assert abs(Gp[0] - Gp[1]) < 1e-3 * (1 + abs(Gp[0]))


@pytest.mark.parametrize(
    "law, a, Delta",
    [(SpectralLaw.wishart(0.5), 1.0, 0.1), (SpectralLaw.atoms([-2.0, 0.0, 0.3, 2.5], [1, 2, 1, 1]), 1.0, 0.3)],
)
def test_re_g_is_hilbert_transform_of_density(law, a, Delta):
    """Kramers-Kronig: Re G_R = PV int rho_R(y)/(x - y) dy (scipy's Cauchy-weight quadrature)."""
    dn = r_density(law, a, Delta)
    (lo, hi) = dn.intervals[0, 0], dn.intervals[-1, 1]
    rho = lambda y: float(dn.density_at(np.array([y]))[0])  # noqa: E731
    for x in np.linspace(lo, hi, 7)[1:-1]:
        pv = integrate.quad(rho, lo, hi, weight="cauchy", wvar=x, limit=400,
                            points=None, epsabs=1e-10)[0]
        assert dn.re_stieltjes(np.array([x]))[0] == pytest.approx(-pv, abs=2e-6)


def test_semicircle_law_closed_forms():
    v, c, a, Delta = 0.5, 0.3, 1.5, 0.2
    dn = r_density(SpectralLaw.semicircle(v, c), a, Delta)
    s2 = a * a * v + Delta
    x = np.linspace(a * c - 3, a * c + 3, 41)
    y = x - a * c
    dens = np.sqrt(np.maximum(4 * s2 - y * y, 0)) / (2 * np.pi * s2)
    np.testing.assert_allclose(dn.density_at(x), dens, atol=1e-12)
    inside = np.abs(y) < 2 * np.sqrt(s2)
    np.testing.assert_allclose(dn.re_stieltjes(x)[inside], y[inside] / (2 * s2), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Numba kernels vs NumPy twins
# ----------------------------------------------------------------------------------------------


def test_numba_kernels_match_numpy_twins():
    rng = np.random.default_rng(5)
    lam = np.sort(np.concatenate([rng.standard_normal(60), [5.0, 5.01, 9.0]]))
    w = rng.uniform(0.5, 1.5, lam.size)
    w /= w.sum()
    for Delta in (1e-4, 0.01, 1.0):
        b_nb = AtomsBackend(lam, w, 1.0, Delta, use_numba=True)
        b_np = AtomsBackend(lam, w, 1.0, Delta, use_numba=False)
        np.testing.assert_allclose(b_nb.t_intervals, b_np.t_intervals, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b_nb._dips, b_np._dips, rtol=1e-9, atol=1e-12)
        u = np.concatenate([np.linspace(lo, hi, 40) for lo, hi in b_nb.t_intervals])
        o1 = biane_nodes(u, b_nb.alpha, b_nb.w, Delta)
        o2 = biane_nodes_numpy(u, b_nb.alpha, b_nb.w, Delta)
        # (near the edges v = O(sqrt(distance)) is only determined to ~sqrt(eps): compare absolutely)
        np.testing.assert_allclose(o1[:, 1:], o2[:, 1:], rtol=1e-10, atol=1e-7 * np.abs(o2[:, 1:]).max())
        x = np.linspace(b_nb.x_intervals[0, 0] - 1, b_nb.x_intervals[-1, 1] + 1, 57)
        np.testing.assert_allclose(b_nb.stieltjes(x), b_np.stieltjes(x), rtol=1e-9, atol=1e-9)
        # kernels against a direct definition: the u-support is where sum w/(u - lam)^2 > 1/Delta
        F = lambda uu: np.sum(w / (uu - lam) ** 2)  # noqa: E731
        for lo, hi in b_nb.t_intervals:
            assert F(lo) * Delta == pytest.approx(1.0, rel=1e-9) and F(hi) * Delta == pytest.approx(1.0, rel=1e-9)
        # and v solves the defining equation
        V = o1[:, 0]
        res = np.sum(w / ((u[:, None] - lam) ** 2 + V[:, None]), axis=1) * Delta
        np.testing.assert_allclose(res[V > 1e-20], 1.0, rtol=1e-12)


def test_rdensity_numba_and_numpy_paths_agree():
    lam = np.arange(1, 151) ** -0.8
    law = SpectralLaw.atoms(lam)
    for Delta in (1e-3, 0.1):
        d1 = sp.RDensity(law, 1.3, Delta, use_numba=True)
        d2 = sp.RDensity(law, 1.3, Delta, use_numba=False)
        np.testing.assert_allclose(d1.intervals, d2.intervals, rtol=1e-12, atol=1e-13)
        f = SoftThreshold(0.2)
        np.testing.assert_allclose(free_input_side(law, 1.3, Delta, f, 1.0, density=d1),
                                   free_input_side(law, 1.3, Delta, f, 1.0, density=d2), rtol=1e-9, atol=1e-12)
        x = np.linspace(-1, 3, 31)
        np.testing.assert_allclose(d1.rie(x), d2.rie(x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("law, a, Delta", [(SpectralLaw.wishart(0.4), 1.0, 0.05),
                                           (SpectralLaw.atoms([0.0, 0.5, 2.0], [2, 1, 1]), 1.0, 0.02)])
def test_kinked_integrals_match_adaptive_quadrature(law, a, Delta):
    """Soft-threshold integrals on the split grid vs scipy.quad of the same density."""
    dn = r_density(law, a, Delta)
    rho = lambda y: float(dn.density_at(np.array([y]))[0])  # noqa: E731
    for tau in (0.1, 0.6, 1.5):
        f = SoftThreshold(tau)
        ref = 0.0
        for lo, hi in dn.intervals:
            if hi > tau:
                ref += integrate.quad(lambda y: (y - tau) ** 2 * rho(y), max(lo, tau), hi,
                                      epsabs=1e-12, epsrel=1e-10, limit=200)[0]
        assert dn.integrate(lambda y: f(y) ** 2, kinks=f.kinks) == pytest.approx(ref, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# spectral divergence (docs/theory.md §5.6) vs finite differences
# ----------------------------------------------------------------------------------------------




def _spectral_map(R, f):
    L, U = np.linalg.eigh(R)
    return (U * f(L)) @ U.T


@pytest.mark.parametrize("f", [SoftThreshold(0.2), LinearShrinkage(0.7), np.tanh])
def test_spectral_divergence_matches_finite_differences(f):
    rng = np.random.default_rng(2)
    d = 6
    R = goe(d, rng) + np.diag(np.linspace(-1, 1, d))
    L = np.linalg.eigvalsh(R)
    assert np.min(np.abs(L - 0.2)) > 1e-3
    h = 1e-6
    div_fd = 0.0
    for E in sym_basis(d):
        dF = (_spectral_map(R + h * E, f) - _spectral_map(R - h * E, f)) / (2 * h)
        div_fd += np.sum(dF * E)
    assert _divergence(L, f) == pytest.approx(div_fd, rel=1e-6, abs=1e-8)
    # degenerate eigenvalues: R = c I -> F(R) = f(c) I + f'(c) H + ..., div = N f'(c)
    c = 0.9
    N = d * (d + 1) // 2
    fp = (f(np.array([c + h])) - f(np.array([c - h])))[0] / (2 * h)
    assert _divergence(np.full(d, c), f) == pytest.approx(N * fp, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# SE input side
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "law",
    [SpectralLaw.wishart(0.5), SpectralLaw.wishart(3.0), SpectralLaw.semicircle(0.8, 0.2),
     SpectralLaw.atoms(np.arange(1, 201) ** -0.6)],
)
@pytest.mark.parametrize("a", [0.0, 0.4, 1.7])
def test_free_input_side_linear_shrinkage_closed_form(law, a):
    """docs/theory.md §7(b): c = A/(A+lam), m = c a Q*, q = c^2 (a^2 Q* + Delta), V = c/(2 A)."""
    A_hat, lam_reg, Delta = 1.3, 0.4, 0.35
    c = A_hat / (A_hat + lam_reg)
    m, q, V = free_input_side(law, a, Delta, LinearShrinkage(c), A_hat)
    # at a = 0: m = mean(f) mean(S*) = c E[x] mean = 0 since E x = a mean = 0 -> c a Q* = 0 too
    assert m == pytest.approx(c * a * law.Q, abs=1e-10)
    assert q == pytest.approx(c * c * (a * a * law.Q + Delta), rel=1e-10)
    assert V == pytest.approx(c / (2 * A_hat), rel=1e-10)


def test_free_input_side_at_a_zero():
    """a = 0: R independent of S*, E S = (int f rho_sc) I, so m = mean(S*) int f rho_sc."""
    law = SpectralLaw.wishart(0.5)
    Delta, tau, A_hat = 0.6, 0.3, 1.0
    f = SoftThreshold(tau)
    m, q, V = free_input_side(law, 0.0, Delta, f, A_hat)
    sc = lambda x: np.sqrt(np.maximum(4 * Delta - x * x, 0)) / (2 * np.pi * Delta)  # noqa: E731
    r = 2 * np.sqrt(Delta)
    mean_f = integrate.quad(lambda x: (x - tau) * sc(x), tau, r, epsabs=1e-13)[0]
    q_ref = integrate.quad(lambda x: (x - tau) ** 2 * sc(x), tau, r, epsabs=1e-13)[0]
    V_ref = integrate.quad(lambda x: (x - tau) * sc(x) * x / (2 * Delta), tau, r, epsabs=1e-13)[0] / A_hat
    assert m == pytest.approx(law.mean * mean_f, rel=1e-9)
    assert q == pytest.approx(q_ref, rel=1e-9)
    assert V == pytest.approx(V_ref, rel=1e-9)
    # continuity: the a > 0 formula (1/a) int f rho (x - 2 Delta Re G) tends to it
    m_small = free_input_side(law, 1e-6, Delta, f, A_hat).m
    assert m_small == pytest.approx(m, rel=1e-4)
    # finite d at a = 0 (teacher enters only through Tr S*/d)
    rng = np.random.default_rng(0)
    lam = wishart_teacher_eigs(400, 0.5, rng)
    fin = finite_input_side(lam, 0.0, Delta, f, A_hat, n_draws=3, rng=rng)
    assert fin.m == pytest.approx(np.mean(lam) * mean_f, abs=0.01)
    assert fin.q == pytest.approx(q_ref, abs=0.01)


def test_free_vs_finite_input_side_gap_shrinks_with_d():
    """SE input side (a) finite d vs (b) free probability at the teacher's exact spectrum: the
    per-draw gap shrinks ~1/d (d = 200, 400, 800); and both approach the Wishart limit law."""
    rho, a, Delta, A_hat, tau = 0.5, 1.0, 0.2, 2.0, 0.3
    f = SoftThreshold(tau)
    rms = {}
    draws = {200: 12, 400: 6, 800: 4}
    free_w = np.array(free_input_side(SpectralLaw.wishart(rho), a, Delta, f, A_hat))
    for d, nd in draws.items():
        rng = np.random.default_rng(100 + d)
        lam = wishart_teacher_eigs(d, rho, rng)
        free_a = np.array(free_input_side(SpectralLaw.atoms(lam), a, Delta, f, A_hat))
        gaps = []
        for _ in range(nd):
            gaps.append(np.array(finite_input_side(lam, a, Delta, f, A_hat, n_draws=1, rng=rng)) - free_a)
        gaps = np.array(gaps)
        rms[d] = np.sqrt(np.mean(gaps**2, axis=0))
        assert np.all(rms[d] * d < 3.0), (d, rms[d])
        if d == 800:
            assert np.all(np.abs(gaps.mean(0)) < 3e-3)
            # the exact-spectrum free solution is within the teacher's own finite-d fluctuations
            # (std of Tr S*^2/d is ~7/d) of the d -> infinity Wishart law
            assert np.all(np.abs(free_a - free_w) < 0.03), (free_a, free_w)
    # per-draw gaps ~ c/d: expected ratio 1/4 between d = 800 and d = 200
    assert np.all(rms[800] < 0.75 * rms[200]), rms


def test_finite_input_side_stderr_and_reproducibility():
    lam = np.linspace(0, 2, 100)
    f = SoftThreshold(0.5)
    m1, se = finite_input_side(lam, 1.0, 0.3, f, 1.5, n_draws=3, rng=5, return_stderr=True)
    m2 = finite_input_side(lam, 1.0, 0.3, f, 1.5, n_draws=3, rng=5)
    assert tuple(m1) == tuple(m2)
    assert all(0 < v < 0.05 for v in se)


def test_free_vs_finite_input_side_linear_shrinkage():
    """Linear shrinkage at finite d: m, q are exact quadratic forms; compare to the closed form."""
    rng = np.random.default_rng(9)
    d, rho, a, Delta, A_hat, c = 600, 1.5, 0.8, 0.4, 1.0, 0.6
    lam = wishart_teacher_eigs(d, rho, rng)
    fin = finite_input_side(lam, a, Delta, LinearShrinkage(c), A_hat, n_draws=2, rng=rng)
    Q = np.mean(lam**2)
    assert fin.m == pytest.approx(c * a * Q, abs=2e-3)
    assert fin.q == pytest.approx(c * c * (a * a * Q + Delta * (1 + 1 / d)), abs=5e-3)
    # finite-d divergence of c R is exactly c N: V = c (d+1)/(2 d A_hat)
    assert fin.V == pytest.approx(c * (d + 1) / (2 * d * A_hat), rel=1e-9)
    free = free_input_side(SpectralLaw.atoms(lam), a, Delta, LinearShrinkage(c), A_hat)
    assert free.m == pytest.approx(c * a * Q, rel=1e-10)


# ----------------------------------------------------------------------------------------------
# Bayes RIE (docs/theory.md §6)
# ----------------------------------------------------------------------------------------------


def test_rie_semicircle_teacher_closed_forms():
    s2 = 0.7
    for Delta in (0.05, 0.5, 3.0):
        assert rie_mmse(SpectralLaw.semicircle(s2), Delta) == pytest.approx(Delta * s2 / (Delta + s2), rel=1e-10)
        # on the support the RIE is the Wiener filter x s2/(s2 + Delta); outside it uses the real
        # Stieltjes transform G(x) = (x - sign(x) sqrt(x^2 - 4 v)) / (2 v), v = s2 + Delta
        v = s2 + Delta
        x = np.linspace(-4, 4, 17)
        ins = np.abs(x) < 2 * np.sqrt(v)
        G_out = (x - np.sign(x) * np.sqrt(np.maximum(x * x - 4 * v, 0))) / (2 * v)
        ref = np.where(ins, x * s2 / v, x - 2 * Delta * G_out)
        np.testing.assert_allclose(rie_denoiser(x, SpectralLaw.semicircle(s2), Delta), ref, atol=1e-12)
    # the same through subordination with a discrete teacher at semicircle quantiles
    lam = semicircle_quantiles(600, s2)
    for Delta in (0.1, 1.0):
        assert rie_mmse(SpectralLaw.atoms(lam), Delta) == pytest.approx(Delta * s2 / (Delta + s2), abs=2e-3)
        x = np.linspace(-1.5, 1.5, 7)
        np.testing.assert_allclose(rie_denoiser(x, SpectralLaw.atoms(lam), Delta), x * s2 / (s2 + Delta),
                                   atol=5e-3)


@pytest.mark.parametrize("law", [SpectralLaw.wishart(0.5), SpectralLaw.wishart(2.0),
                                 SpectralLaw.atoms([0.0, 0.0, 1.0, 3.0])])
def test_rie_mmse_limits(law):
    prior_var = law.Q - law.mean**2
    # Delta -> infinity: no information beyond the (known) mean of the spectrum
    for Delta in (100.0, 1000.0):
        mm = rie_mmse(law, Delta)
        assert mm == pytest.approx(prior_var, rel=3 * prior_var / Delta + 1e-6)
        assert mm <= prior_var + 1e-9
    # mmse <= Delta (R itself has error Delta), increasing in Delta, -> 0 as Delta -> 0
    Ds = np.array([1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0])
    mm = np.array([rie_mmse(law, D) for D in Ds])
    assert np.all(mm <= Ds * (1 + 1e-9)) and np.all(mm > 0)
    assert np.all(np.diff(mm) > 0)
    if law.kind == "wishart" and law.rho > 1:  # bounded teacher density: mmse/Delta -> 1
        assert mm[0] / Ds[0] == pytest.approx(1.0, abs=0.01)


def test_rie_scaling_in_a():
    """R = a S* + sqrt(Delta) W  <=>  R/a = S* + sqrt(Delta/a^2) W: same Bayes estimate."""
    x = np.linspace(-1.0, 6.0, 29)
    for law in (SpectralLaw.wishart(0.6), SpectralLaw.atoms([0.0, 0.4, 0.4, 2.0])):
        for a in (0.5, 2.0):
            np.testing.assert_allclose(rie_denoiser(x, law, 0.3, a=a), rie_denoiser(x / a, law, 0.3 / a**2),
                                       rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8])
def test_rie_mmse_small_noise_slope_counts_degrees_of_freedom(rho):
    """mmse(Delta)/Delta -> 2 rho - rho^2 for a rank-rho d PSD teacher: the fraction of the
    d^2/2 coordinates of Sym_d that a rank-r matrix has (r d - r^2/2), i.e. the perfect-recovery
    threshold alpha = (rho - rho^2/2)/(K-1) of docs/theory.md §7."""
    slope = rie_mmse(SpectralLaw.wishart(rho), 1e-7) / 1e-7
    assert slope == pytest.approx(rho * (2 - rho), abs=1e-3)


@pytest.mark.parametrize("kind", ["wishart", "atoms"])
def test_rie_on_sampled_matrix_matches_mmse(kind):
    rng = np.random.default_rng(21)
    d, rho, Delta = 700, 0.5, 0.4
    r = round(rho * d)
    W = rng.standard_normal((d, r))
    S = W @ W.T / np.sqrt(r * d)
    R = S + np.sqrt(Delta) * goe(d, rng)
    L, U = np.linalg.eigh(R)
    law = SpectralLaw.wishart(rho) if kind == "wishart" else SpectralLaw.atoms(np.linalg.eigvalsh(S))
    S_hat = (U * rie_denoiser(L, law, Delta)) @ U.T
    err = np.sum((S_hat - S) ** 2) / d
    assert err == pytest.approx(rie_mmse(law, Delta), abs=0.015)
    # and it beats the best linear shrinkage (oracle over the coefficient, with known mean)
    m0 = np.trace(S) / d
    Rc = R - m0 * np.eye(d)
    Sc = S - m0 * np.eye(d)
    c = np.sum(Rc * Sc) / np.sum(Rc * Rc)
    assert err < np.sum((c * Rc - Sc) ** 2) / d


# ----------------------------------------------------------------------------------------------
# spectrum of S_hat
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f", [SoftThreshold(0.6), LinearShrinkage(0.5)])
def test_shat_spectrum_matches_sampled(f):
    rng = np.random.default_rng(31)
    d, rho, a, Delta = 800, 0.5, 1.0, 0.15
    lam = wishart_teacher_eigs(d, rho, rng)
    eigs = f(sample_R_eigs(lam, a, Delta, rng))
    atom, y, dens = shat_spectrum(SpectralLaw.wishart(rho), a, Delta, f)
    if isinstance(f, SoftThreshold):
        assert atom == pytest.approx(np.mean(eigs == 0.0), abs=0.015)
        assert 0.2 < atom < 0.9
        pos = eigs[eigs > 0]
    else:
        assert atom == 0.0
        pos = eigs
    assert np.trapezoid(dens, y) == pytest.approx(1 - atom, abs=1e-3)
    cdf = atom + np.concatenate([[0], integrate.cumulative_trapezoid(dens, y)])
    F = np.interp(np.sort(pos), y, cdf)
    emp = atom + np.arange(1, pos.size + 1) / d
    assert np.max(np.abs(F - emp)) < 0.02
    assert np.dot(y, np.gradient(y) * dens) == pytest.approx(np.mean(eigs), abs=0.02)


def test_shat_spectrum_of_a_rie_map_at_tiny_delta_keeps_the_zero_atom():
    """At (near) perfect recovery the RIE map is the identity off the zero atom and flat on it up
    to rounding (|f'| ~ 1e-11 of either sign): the pushforward must be Wishart's own spectrum, zero
    atom mass 1 - rho, not a 'decreasing f' error (the Bayes SE's A_hat = 1 / (2 Delta))."""
    import amp_attention as aa
    from amp_attention.spectral import shat_spectrum

    rho, Delta = 0.5, 1.7e-12
    law = aa.SpectralLaw.wishart(rho)
    pf = shat_spectrum(law, 1.0, Delta, aa.RIEDenoiser(law).scalar_map(1.0 / (2 * Delta)))
    assert abs(pf.atom_mass - (1 - rho)) < 1e-3
    assert abs(np.trapezoid(pf.density, pf.y) - rho) < 1e-2
