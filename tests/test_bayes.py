"""Bayes-optimal GAMP-RIE and its state evolution (docs/theory.md §6, §7 and §8.5).

References are independent of the code under test where possible: Gaussian conditioning written
out with redundant constraints taken straight from ``log y`` (softmax) or in precision form
(linear), finite differences, sampled random matrices, closed forms for a semicircle teacher, and
the counting bound for perfect recovery.
"""

from __future__ import annotations

import numpy as np
import pytest

import amp_attention as aa
from amp_attention.bayes_outputs import BayesLinearOutput, BayesSoftmaxOutput, bayes_output
from amp_attention.denoisers import RIEDenoiser, rie_derivative
from amp_attention.estimators import BayesAttention
from amp_attention.se import bayes_state_evolution
from amp_attention.thresholds import perfect_recovery_threshold
from amp_attention.model import row_softmax
from amp_attention.operator import adjoint_whitened, sample_gram
from amp_attention.spectral import SpectralLaw, free_input_side, r_density, rie_mmse, sample_goe
from amp_attention.whitening import flat_direction, unwhiten, whiten

# ----------------------------------------------------------------------------------------------
# helpers (independent references)
# ----------------------------------------------------------------------------------------------


def sym_preacts(n, T, rng, scale=1.0):
    h = rng.standard_normal((n, T, T)) * scale
    return h + np.swapaxes(h, 1, 2)


def random_spd(n, K, rng):
    A = rng.standard_normal((n, K, K))
    return A @ np.swapaxes(A, 1, 2) / K + 0.3 * np.eye(K)


def unwhiten_matrix(T):
    """``U (T*T, K)`` with ``vec(h) = U z`` (h_ab = c_k z_k)."""
    K = T * (T + 1) // 2
    return np.stack([unwhiten(np.eye(K)[k][None], T)[0].ravel() for k in range(K)], axis=1)


def softmax_posterior_reference(y, beta, omega, V):
    """g, dg from conditioning N(omega, V) on the row differences ``h_ab - h_a0`` read off log y.

    T(T-1) redundant constraints ``C z = c`` (rank K-1), pseudo-inverse Gaussian conditioning,
    ``g = V^-1 (mean - omega)``, ``dg = V^-1 - V^-1 Cov V^-1``.
    """
    T = y.shape[0]
    U = unwhiten_matrix(T)
    rows, rhs = [], []
    for a in range(T):
        for b in range(1, T):
            rows.append(U[a * T + b] - U[a * T])
            rhs.append((np.log(y[a, b]) - np.log(y[a, 0])) / beta)
    C, c = np.array(rows), np.array(rhs)
    M = np.linalg.pinv(C @ V @ C.T, rcond=1e-10)
    mean = omega + V @ C.T @ M @ (c - C @ omega)
    cov = V - V @ C.T @ M @ C @ V
    Vi = np.linalg.inv(V)
    return Vi @ (mean - omega), Vi - Vi @ cov @ Vi


# ----------------------------------------------------------------------------------------------
# output side
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("beta", [0.3, 1.0, 6.0])
def test_softmax_target_fixes_z_up_to_the_flat_direction(T, beta, rng):
    h = sym_preacts(40, T, rng)
    zy = BayesSoftmaxOutput(beta).z_target(row_softmax(h, beta))
    u = flat_direction(T)
    P = np.eye(u.size) - np.outer(u, u)
    assert np.max(np.abs((zy - whiten(h)) @ P)) < 1e-12 * (1 + beta)
    assert np.max(np.abs(zy @ u)) < 1e-12


@pytest.mark.parametrize("T", [2, 3, 4])
def test_softmax_g_out_equals_explicit_conditioning(T, rng):
    beta, n = 1.7, 5
    K = T * (T + 1) // 2
    y = row_softmax(sym_preacts(n, T, rng), beta)
    omega = rng.standard_normal((n, K))
    V = random_spd(n, K, rng)
    g, dg, info = BayesSoftmaxOutput(beta).g_out(y, omega, V)
    assert g.shape == (n, K) and dg.shape == (n, K, K) and info["n_failed"] == 0
    for i in range(n):
        g_ref, dg_ref = softmax_posterior_reference(y[i], beta, omega[i], V[i])
        np.testing.assert_allclose(g[i], g_ref, atol=1e-9, rtol=1e-8)
        np.testing.assert_allclose(dg[i], dg_ref, atol=1e-9, rtol=1e-8)
    # flat direction: g . u = 0, dg u = 0 (the global shift is not observed)
    u = flat_direction(T)
    assert np.max(np.abs(g @ u)) < 1e-10 and np.max(np.abs(dg @ u)) < 1e-10


def test_softmax_scalar_variance_is_projector_over_v(rng):
    T, beta, v = 3, 1.0, 0.7
    y = row_softmax(sym_preacts(6, T, rng), beta)
    out = BayesSoftmaxOutput(beta)
    omega = rng.standard_normal((6, 6))
    g, dg, _ = out.g_out(y, omega, v)
    u = flat_direction(T)
    P = np.eye(6) - np.outer(u, u)
    np.testing.assert_allclose(g, (out.z_target(y) - omega) @ P / v, atol=1e-13)
    np.testing.assert_allclose(dg, np.broadcast_to(P / v, dg.shape), atol=1e-13)
    # scalar, shared (K, K) and stacked (n, K, K) forms agree
    g2, dg2, _ = out.g_out(y, omega, v * np.eye(6))
    g3, dg3, _ = out.g_out(y, omega, np.broadcast_to(v * np.eye(6), (6, 6, 6)).copy())
    for a, b in ((g, g2), (g, g3), (dg, dg2), (dg, dg3)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    tr = out.g_out(y, omega, v, jacobian="trace")[1]
    np.testing.assert_allclose(tr, np.full(6, 5 / v))


def test_linear_g_out_equals_precision_form_posterior(rng):
    T, n, noise = 3, 5, 0.4
    K = 6
    y = sym_preacts(n, T, rng)
    omega = rng.standard_normal((n, K))
    V = random_spd(n, K, rng)
    g, dg, _ = BayesLinearOutput(noise).g_out(y, omega, V)
    zy = whiten(y)
    for i in range(n):
        Vi = np.linalg.inv(V[i])
        Lam = Vi + np.eye(K) / noise  # posterior precision
        C = np.linalg.inv(Lam)
        mean = C @ (Vi @ omega[i] + zy[i] / noise)
        np.testing.assert_allclose(g[i], Vi @ (mean - omega[i]), atol=1e-10)
        np.testing.assert_allclose(dg[i], Vi - Vi @ C @ Vi, atol=1e-10)
    # scalar V, T = 1, noise = 0
    y1 = rng.standard_normal((4, 1, 1))
    g1, dg1, _ = BayesLinearOutput(0.0).g_out(y1, np.zeros((4, 1)), 2.0)
    np.testing.assert_allclose(g1[:, 0], y1[:, 0, 0] / np.sqrt(2) / 2.0)
    np.testing.assert_allclose(dg1, 0.5)


@pytest.mark.parametrize("output", [BayesSoftmaxOutput(2.0), BayesLinearOutput(0.3)])
def test_dg_is_minus_finite_difference_of_g(output, rng):
    T, n = 3, 4
    K = 6
    h = sym_preacts(n, T, rng)
    y = row_softmax(h, 2.0) if isinstance(output, BayesSoftmaxOutput) else h
    omega = rng.standard_normal((n, K))
    V = random_spd(n, K, rng)
    _, dg, _ = output.g_out(y, omega, V)
    eps = 1e-5
    for j in range(K):
        e = np.zeros(K)
        e[j] = eps
        gp = output.g_out(y, omega + e, V)[0]
        gm = output.g_out(y, omega - e, V)[0]
        np.testing.assert_allclose(-(gp - gm) / (2 * eps), dg[:, :, j], atol=1e-7)


def test_output_rejections(rng):
    h = sym_preacts(3, 2, rng, scale=400.0)
    y = row_softmax(h, 10.0)
    assert np.any(y == 0.0)
    with pytest.raises(ValueError, match="zero"):
        BayesSoftmaxOutput(10.0).g_out(y, np.zeros((3, 3)), 1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        BayesSoftmaxOutput(1.0).g_out(np.ones((3, 1, 1)), np.zeros((3, 1)), 1.0)
    with pytest.raises(NotImplementedError, match="hardmax"):
        bayes_output(aa.HardmaxChannel())
    with pytest.raises(NotImplementedError, match="hardmax"):
        bayes_state_evolution(0.3, 2, SpectralLaw.wishart(0.5), aa.HardmaxChannel())
    with pytest.raises(ValueError, match="T >= 2"):
        bayes_state_evolution(0.3, 1, SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0))
    with pytest.raises(ValueError):
        BayesLinearOutput(-1.0)
    assert np.all(np.isnan(BayesSoftmaxOutput().value_z(y, np.zeros((3, 3)))))
    assert np.isnan(RIEDenoiser(SpectralLaw.wishart(0.5)).penalty(np.eye(3)))


# ----------------------------------------------------------------------------------------------
# input side: the RIE denoiser
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def laws():
    rng = np.random.default_rng(3)
    return [
        SpectralLaw.wishart(0.5),
        SpectralLaw.wishart(2.0),
        SpectralLaw.semicircle(1.0, 0.5),
        SpectralLaw.atoms(aa.Teacher.wishart(150, 0.3, rng).eigenvalues),
        SpectralLaw.atoms(aa.Teacher.powerlaw(150, 1.0, rng).eigenvalues),
    ]


@pytest.mark.parametrize("Delta", [0.1, 1.0])
def test_rie_derivative_matches_finite_differences(laws, Delta):
    for law in laws:
        dens = r_density(law, 1.0, Delta)
        x = np.concatenate([np.linspace(lo, hi, 30)[2:-2] for lo, hi in dens.intervals]
                           + [[dens.intervals[0, 0] - 0.3, dens.intervals[-1, 1] + 0.3]])
        h = 1e-6
        fd = (dens.rie(x + h) - dens.rie(x - h)) / (2 * h)
        fp = rie_derivative(x, dens)
        err = np.abs(fp - fd) / (1 + np.abs(fd))
        assert np.max(err) < 1e-5, (law, np.max(err))
        assert np.all(fp > -1e-8)  # the Bayes estimator is non-decreasing


def test_bayes_input_side_nishimori_identities(laws):
    """free_input_side of the RIE: q = Q* - rie_mmse and V = rie_mmse (two independent formulas)."""
    for law in laws[:3]:
        for Delta in (0.05, 0.7):
            dens = r_density(law, 1.0, Delta)
            ins = free_input_side(law, 1.0, Delta, dens.rie, 1.0 / (2 * Delta), density=dens)
            mm = rie_mmse(law, Delta, dens)
            assert abs(ins.q - (law.Q - mm)) < 1e-9 and abs(ins.V - mm) < 1e-9


@pytest.mark.parametrize("Delta", [0.1, 0.5, 2.0])
def test_rie_denoiser_on_sampled_R_reaches_the_mmse(Delta):
    rng = np.random.default_rng(11)
    d = 500
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    R = teacher.S + np.sqrt(Delta) * sample_goe(d, rng)
    for law in (SpectralLaw.wishart(0.5), SpectralLaw.atoms(teacher.eigenvalues)):
        S, div = RIEDenoiser(law)(R, 1.0 / (2 * Delta))
        assert np.allclose(S, S.T)
        err = np.sum((S - teacher.S) ** 2) / d
        mm = rie_mmse(law, Delta)
        V = div * 2 * Delta / d**2  # V = div / (d^2 A_hat), Bayes: V = mse
        assert abs(err - mm) < 0.03 * mm, (law, err, mm)
        assert abs(V - mm) < 0.03 * mm, (law, V, mm)
    # the RIE beats the best linear shrinkage towards the prior mean
    s0 = teacher.trace_mean
    var = teacher.Q - s0**2
    lin = s0 * np.eye(d) + (var / (var + Delta)) * (R - s0 * np.eye(d))
    assert err < np.sum((lin - teacher.S) ** 2) / d


# ----------------------------------------------------------------------------------------------
# Bayes-optimal state evolution
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("law", [SpectralLaw.wishart(0.3), SpectralLaw.wishart(0.5), SpectralLaw.wishart(2.0),
                                 SpectralLaw.atoms(aa.Teacher.powerlaw(100, 0.7, 1).eigenvalues)])
def test_bayes_se_small_alpha_gives_the_prior_variance(law):
    """alpha -> 0: mse -> Q* - (Tr S*/d)^2 (= 1 for any Wishart rho), the prior-mean estimate."""
    res = bayes_state_evolution(1e-4, 2, law, aa.SoftmaxChannel(1.0))
    target = law.Q - law.mean**2
    assert res.converged and abs(res.mse - target) < 1e-3 * target
    assert res.mse0 == law.Q  # starts from q = 0
    if law.kind == "wishart":
        assert abs(target - 1.0) < 1e-12


@pytest.mark.parametrize("rho,T", [(0.5, 2), (0.3, 3)])
def test_bayes_se_perfect_recovery_threshold(rho, T):
    """Noiseless softmax: mse -> 0 iff alpha > (rho - rho^2/2)/(K-1) (docs/theory.md §7, §8.5); above it the
    mse decays geometrically at the linearised rate alpha_c/alpha."""
    law = SpectralLaw.wishart(rho)
    ac = perfect_recovery_threshold(rho, T)
    K = T * (T + 1) // 2
    assert np.isclose(ac, 2 * (rho - rho**2 / 2) / (T**2 + T - 2)) and np.isclose(ac, (rho - rho**2 / 2) / (K - 1))
    below = bayes_state_evolution(0.95 * ac, T, law, aa.SoftmaxChannel(1.0), max_iter=3000, tol=1e-9)
    assert below.converged and not below.perfect_recovery and below.mse > 1e-2
    # the plain iteration's own decay (Anderson mixing would jump to mse = 0 in a few steps)
    above = bayes_state_evolution(1.05 * ac, T, law, aa.SoftmaxChannel(1.0), max_iter=3000, acceleration=None)
    assert above.perfect_recovery and above.mse < 1e-11
    mse = above.history["mse"]
    assert np.all(np.diff(mse) < 0)
    assert abs(mse[-1] / mse[-2] - 1 / 1.05) < 2e-3


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_bayes_se_semicircle_teacher_closed_form(noise):
    """Semicircle teacher (variance s2): the Bayes denoiser is linear, mmse_den = s2 Delta/(s2 + Delta);
    fixed point mse = s2 D/(s2 + D) with D = (mse + noise)/(2 alpha k_eff)."""
    s2, alpha, T = 0.8, 0.2, 3
    law = SpectralLaw.semicircle(s2, 0.4)
    for ch, k in ((aa.LinearChannel(noise), 6), (aa.SoftmaxChannel(3.0), 5)):
        if isinstance(ch, aa.SoftmaxChannel) and noise > 0:
            continue
        res = bayes_state_evolution(alpha, T, law, ch, tol=1e-13)
        D = (res.mse + noise) / (2 * alpha * k)
        assert res.converged and abs(res.mse - s2 * D / (s2 + D)) < 1e-10
        assert abs(res.q - (law.Q - res.mse)) < 1e-14 and res.m == res.q


# ----------------------------------------------------------------------------------------------
# BO-AMP
# ----------------------------------------------------------------------------------------------


def test_bayes_amp_initialisation_is_v0_equal_q_star():
    """BayesAttention's first iterate is GAMP from S^0 = 0, V^0 = Q* (written out by hand)."""
    rng = np.random.default_rng(4)
    d, T = 40, 2
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    data = aa.sample_data(int(0.4 * d * d), T, teacher, aa.SoftmaxChannel(1.0), rng)
    law = SpectralLaw.atoms(teacher.eigenvalues)
    est = BayesAttention(aa.SoftmaxChannel(1.0), teacher, max_iter=1, tol=0).fit(data.X, data.y)
    Gamma = sample_gram(data.X)
    g, dg, _ = BayesSoftmaxOutput(1.0).g_out(data.y, np.zeros((data.n, 3)), law.Q * Gamma)
    A_hat = np.einsum("nkl,nkl->", Gamma, dg) / d**2
    S1, div = RIEDenoiser(law)(adjoint_whitened(data.X, g) / (d * A_hat), A_hat)
    np.testing.assert_allclose(est.S_, S1, atol=1e-12)
    assert np.isclose(est.V_, div / (d**2 * A_hat))


@pytest.fixture(scope="module")
def softmax_instance():
    rng = np.random.default_rng(1)
    d = 200
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    return d, teacher, rng


def check_bo_amp_tracks_bo_se(instance, ch, alpha, T=2, n_it=12):
    """BO-AMP on sampled data against BO-SE from the same start, §8.5 bounds; returns the law."""
    d, teacher, rng = instance
    data = aa.sample_data(int(alpha * d * d), T, teacher, ch, rng)
    law = SpectralLaw.atoms(teacher.eigenvalues)  # exact spectrum in both (Q* fluctuates ~7/d)
    se = bayes_state_evolution(alpha, T, law, ch, max_iter=n_it, tol=0, acceleration=None)  # step by step
    est = BayesAttention(ch, law, max_iter=n_it, tol=0).fit(data.X, data.y, S_star=teacher.S)
    assert est.n_iter_ == n_it and not est.diverged_
    gap = np.abs(est.history_["mse"] - se.history["mse"])
    assert np.all(gap <= 0.03), gap
    assert gap[-1] <= 0.01
    # the Bayes variance is the mse (Nishimori) in AMP as in the SE
    assert np.all(np.abs(est.history_["V"] - se.history["V"]) <= 0.03)
    assert np.all(np.isnan(est.history_["objective"]))
    return law


@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_bayes_amp_tracks_bayes_se_softmax(softmax_instance, alpha):
    check_bo_amp_tracks_bo_se(softmax_instance, aa.SoftmaxChannel(1.0), alpha)


def test_bayes_amp_tracks_bayes_se_linear():
    rng = np.random.default_rng(2)
    d, T, alpha = 150, 2, 0.4
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    ch = aa.LinearChannel(0.5)
    data = aa.sample_data(int(alpha * d * d), T, teacher, ch, rng)
    se = bayes_state_evolution(alpha, T, teacher, ch, max_iter=10, tol=0, acceleration=None)
    est = BayesAttention(ch, teacher, max_iter=10, tol=0).fit(data.X, data.y, S_star=teacher.S)
    gap = np.abs(est.history_["mse"] - se.history["mse"])
    assert np.all(gap <= 0.03) and gap[-1] <= 0.01, gap


def test_bayes_attention_api():
    rng = np.random.default_rng(6)
    d, T = 30, 3
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    ch = aa.SoftmaxChannel(2.0)
    data = aa.sample_data(int(0.3 * d * d), T, teacher, ch, rng)
    est = BayesAttention(ch, SpectralLaw.wishart(0.5), max_iter=300, tol=1e-7)
    with pytest.raises(ValueError, match="not fitted"):
        est.predict(data.X)
    est.fit(data.X, data.y)
    assert est.converged_ and est.S_.shape == (d, d)
    assert np.all(np.isnan(est.history_["mse"]))  # no S_star given
    p = est.predict(data.X[:5])
    assert p.shape == (5, T, T) and np.allclose(p.sum(-1), 1.0)
    assert est.score(data.X, data.y) <= 0
    assert est.set_params(max_iter=3).get_params()["max_iter"] == 3
    with pytest.raises(ValueError, match="Invalid parameter 'foo'"):  # scikit-learn's message
        est.set_params(foo=1)
    with pytest.raises(NotImplementedError):
        BayesAttention(aa.HardmaxChannel(), teacher).fit(data.X, data.y)
    with pytest.raises(ValueError, match="teacher_spectrum"):
        BayesAttention(ch, "wishart").fit(data.X, data.y)
    with pytest.raises(ValueError, match="variance"):
        BayesAttention(ch, teacher, variance="diag").fit(data.X, data.y)
    y0 = data.y.copy()
    y0[0, 0, 0] = 0.0
    with pytest.raises(ValueError, match="zero"):
        BayesAttention(ch, teacher).fit(data.X, y0)
    lin = BayesAttention(aa.LinearChannel(0.1), teacher, max_iter=3, tol=0)
    lin_data = aa.sample_data(200, T, teacher, aa.LinearChannel(0.1), rng)
    lin.fit(lin_data.X, lin_data.y)
    np.testing.assert_allclose(lin.predict(lin_data.X[:3]), lin.decision_function(lin_data.X[:3]))
    assert "BayesAttention(" in repr(est)


def test_bayes_amp_small_n_instability_is_flagged_and_damping_cures_it():
    """d = 100, alpha = 0.1 (n = 1000): undamped BO-GAMP blows up (flagged), damping 0.5 converges
    near the SE fixed point."""
    rng = np.random.default_rng(5)
    d, T, alpha = 100, 2, 0.1
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    ch = aa.SoftmaxChannel(1.0)
    data = aa.sample_data(int(alpha * d * d), T, teacher, ch, rng)
    law = SpectralLaw.atoms(teacher.eigenvalues)
    bad = BayesAttention(ch, law, max_iter=60, tol=0, damping=0.0).fit(data.X, data.y, S_star=teacher.S)
    assert bad.diverged_ and bad.n_iter_ < 60 and "unstable" in bad.message_
    good = BayesAttention(ch, law, max_iter=60, tol=0, damping=0.5).fit(data.X, data.y, S_star=teacher.S)
    se = bayes_state_evolution(alpha, T, law, ch)
    assert not good.diverged_ and abs(good.history_["mse"][-1] - se.mse) < 0.03
    # the default adaptive damping needs no help here
    auto = BayesAttention(ch, law, max_iter=60, tol=0).fit(data.X, data.y, S_star=teacher.S)
    assert not auto.diverged_ and abs(auto.history_["mse"][-1] - se.mse) < 0.03


def test_softmax_output_does_not_depend_on_beta(rng):
    """y = softmax(beta h*) fixes the same P z* for every beta (y down to 1e-100 at beta = 20)."""
    h = sym_preacts(50, 4, rng)
    omega = rng.standard_normal((50, 10))
    V = random_spd(50, 10, rng)
    ref = BayesSoftmaxOutput(1.0).g_out(row_softmax(h, 1.0), omega, V)
    for beta in (0.05, 20.0):
        g, dg, _ = BayesSoftmaxOutput(beta).g_out(row_softmax(h, beta), omega, V)
        np.testing.assert_allclose(g, ref[0], atol=1e-9)
        np.testing.assert_allclose(dg, ref[1], atol=1e-12)


@pytest.mark.parametrize("reg", ["nuclear", "frobenius"])
def test_bayes_se_mse_below_erm_se_for_every_lam(reg):
    """docs/theory.md §8.5: the Bayes-optimal mse lower-bounds the ERM mse at the same alpha (SE)."""
    from amp_attention.se import state_evolution

    law = SpectralLaw.wishart(0.5)
    T = 2
    for channel, loss in ((aa.SoftmaxChannel(1.0), "cross_entropy"), (aa.LinearChannel(0.2), "square")):
        for alpha in (0.15, 0.4):
            bo = aa.bayes_state_evolution(alpha, T, law, channel)
            assert bo.converged
            for lam in (0.003, 0.03, 0.3, 3.0):
                erm = state_evolution(alpha, T, law, channel, loss, reg, lam, n_mc=20_000, max_iter=300,
                                      tol=1e-7, predictions=False)
                assert bo.mse <= erm.mse + 1e-3, (channel, alpha, lam, bo.mse, erm.mse)


# ------------------------------------------------------------------ noisy softmax (issue 10)


@pytest.mark.parametrize("T", [2, 3, 5])
def test_noisy_softmax_observes_the_noisy_preactivations_up_to_the_flat_direction(T):
    """y = rowsoftmax(beta (h* + sqrt(noise) xi)) with xi symmetric determines h~ = h* + sqrt(noise) xi
    up to a global shift: B z_target(y) = B whiten(h~) (the linear Gaussian observation of §6)."""
    from amp_attention.bayes_outputs import BayesSoftmaxOutput
    from amp_attention.model import row_softmax
    from amp_attention.whitening import unwhiten, whiten

    rng = np.random.default_rng(T)
    n, K, beta, noise = 50, T * (T + 1) // 2, 1.7, 0.3
    h_star = unwhiten(rng.standard_normal((n, K)), T)
    xi = unwhiten(rng.standard_normal((n, K)), T)  # symmetric, whitened entries iid N(0, 1)
    h_tilde = h_star + np.sqrt(noise) * xi
    y = row_softmax(h_tilde, beta)
    out = BayesSoftmaxOutput(beta, noise)
    B = out.basis(T)
    np.testing.assert_allclose(out.z_target(y) @ B.T, whiten(h_tilde) @ B.T, atol=1e-10)
    # and the channel object draws exactly this kind of noise
    assert out.channel() == aa.SoftmaxChannel(beta, noise=noise)


@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("Vkind", ["scalar", "stack"])
def test_noisy_softmax_g_out_equals_gaussian_conditioning(T, Vkind):
    """g and dg against Gaussian conditioning written from the joint law of (z, o), o = B z + e,
    e ~ N(0, noise I_{K-1}): E[z|o] and Cov[z|o] by the Schur complement of the joint covariance,
    then g = V^{-1}(E[z|o] - omega), dg = V^{-1} - V^{-1} Cov V^{-1}."""
    from amp_attention.bayes_outputs import BayesSoftmaxOutput
    from amp_attention.model import row_softmax
    from amp_attention.whitening import unwhiten

    rng = np.random.default_rng(10 + T)
    n, K, noise = 6, T * (T + 1) // 2, 0.4
    out = BayesSoftmaxOutput(1.3, noise)
    y = row_softmax(unwhiten(rng.standard_normal((n, K)), T), 1.3)
    omega = rng.standard_normal((n, K))
    if Vkind == "scalar":
        V, Vs = 0.7, np.broadcast_to(0.7 * np.eye(K), (n, K, K))
    else:
        A = rng.standard_normal((n, K, K))
        V = Vs = A @ np.swapaxes(A, 1, 2) + 0.5 * np.eye(K)
    g, dg, _ = out.g_out(y, omega, V)
    B = out.basis(T)
    o = out.z_target(y) @ B.T
    for mu in range(n):
        Vm = Vs[mu]
        C = np.block([[Vm, Vm @ B.T], [B @ Vm, B @ Vm @ B.T + noise * np.eye(K - 1)]])  # Cov(z, o)
        mean = np.concatenate([omega[mu], B @ omega[mu]])
        Czo, Coo = C[:K, K:], C[K:, K:]
        post_mean = mean[:K] + Czo @ np.linalg.solve(Coo, o[mu] - mean[K:])
        post_cov = Vm - Czo @ np.linalg.solve(Coo, Czo.T)
        Vinv = np.linalg.inv(Vm)
        np.testing.assert_allclose(g[mu], Vinv @ (post_mean - omega[mu]), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dg[mu], Vinv - Vinv @ post_cov @ Vinv, rtol=1e-9, atol=1e-10)
    # noise -> 0 is the noiseless output
    g0, dg0, _ = BayesSoftmaxOutput(1.3).g_out(y, omega, V)
    g1, dg1, _ = BayesSoftmaxOutput(1.3, 1e-14).g_out(y, omega, V)
    np.testing.assert_allclose(g1, g0, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dg1, dg0, rtol=1e-8, atol=1e-10)


def test_bayes_amp_tracks_bayes_se_noisy_softmax(softmax_instance):
    """The paper's noisy labels (noise 0.25, softmax beta = 1): BO-AMP tracks BO-SE at d = 200
    with the §8.5 bounds, and the Bayes SE beats the ERM SE of cross-entropy + nuclear."""
    T, alpha = 2, 0.4
    ch = aa.SoftmaxChannel(1.0, noise=0.25)
    law = check_bo_amp_tracks_bo_se(softmax_instance, ch, alpha, T)
    bo = bayes_state_evolution(alpha, T, law, ch)
    noiseless = bayes_state_evolution(alpha, T, law, aa.SoftmaxChannel(1.0))
    erm = aa.state_evolution(alpha, T, law, ch, "cross_entropy", "nuclear", 0.05, 1.0, n_mc=40_000,
                             predictions=False)
    assert noiseless.mse < bo.mse <= erm.mse + 1e-3
