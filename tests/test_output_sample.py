"""The SE output-side integration rules (amp_attention.output_sample; docs/theory.md §7.1).

What is checked:

* ``method='mc'`` reproduces the historical draw sequence and estimator exactly (a hand-written
  copy of the old code is the reference);
* the default rule ('auto' = scrambled-Sobol RQMC with a fixed internal seed) does not depend on
  ``seed``; its weights sum to one; Gauss-Hermite integrates polynomials exactly;
* Gaussian moments of ``(z*, omega)`` and of the channel input are right on every rule and view;
* softmax expectations (test error, square-loss channel constants) agree with 2-d references
  computed independently by ``scipy.integrate`` (T = 2);
* closed-form conjugates (square loss, Bayes softmax output) equal the generic weighted path to
  the rule's error estimate, including the channel-noise conditioning and the flat-direction
  reduction;
* two accuracy settings of the cross-entropy conjugates agree to the stated error estimates, and
  those estimates are far below the Monte Carlo standard errors at the same cost.
"""

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.special import expit

import amp_attention as aa
from amp_attention.bayes_outputs import BayesSoftmaxOutput
from amp_attention.factors import OutputFactor
from amp_attention.losses import CrossEntropyLoss, SquareLoss
from amp_attention.output_sample import OutputSample, has_smooth_g_out, is_flat_invariant
from amp_attention.whitening import flat_direction, n_pairs, unwhiten, whiten

Q = 1.5


def _old_sample(alpha, T, Q, channel, n_mc, seed):
    """The historical draw sequence of OutputSample (before the rules existed)."""
    rng = np.random.default_rng(seed)
    K = n_pairs(T)
    xi1 = rng.standard_normal((n_mc, K))
    xi2 = rng.standard_normal((n_mc, K))
    z_star = math.sqrt(Q) * xi1
    y = channel(unwhiten(z_star, T), rng)
    return xi1, xi2, z_star, y


def _old_conjugates(loss, xi1, xi2, z_star, y, alpha, Q, m, q, V, p0=None):
    """The historical OutputFactor.se_conjugates, written out."""
    omega = (m / math.sqrt(Q)) * xi1 + math.sqrt(max(q - m * m / Q, 0.0)) * xi2
    g, dg, info = loss.g_out(y, omega, float(V), p0=p0, jacobian="trace")
    tr = dg if dg.ndim == 1 else np.trace(dg, axis1=1, axis2=2)
    gg = np.sum(g * g, axis=1)
    if q > 0:
        resid, denom = z_star - (m / q) * omega, Q - m * m / q
    else:
        resid, denom = z_star, Q
    gz = np.sum(g * resid, axis=1) / denom
    sq = math.sqrt(xi1.shape[0])
    vals = (alpha * tr.mean(), alpha * gz.mean(), alpha * gg.mean())
    err = {"A_hat": alpha * tr.std() / sq, "m_hat": alpha * gz.std() / sq, "q_hat": alpha * gg.std() / sq}
    return vals, err, info["p"]


# --------------------------------------------------------------------------------------------
# 'mc' is the old rule, bit for bit; the default does not depend on the seed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,channel", [(2, aa.SoftmaxChannel(1.0)), (3, aa.LinearChannel(0.3)),
                                       (2, aa.HardmaxChannel())])
def test_mc_reproduces_the_historical_draws_exactly(T, channel):
    n, seed, alpha = 2000, 11, 0.7
    s = OutputSample(alpha, T, Q, channel, n_mc=n, seed=seed, method="mc")
    assert s._draws is None                                   # lazy
    old = _old_sample(alpha, T, Q, channel, n, seed)
    for got, want in zip((s.xi1, s.xi2, s.z_star, s.y), old):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(s.omega(0.4, 0.9),
                                  (0.4 / math.sqrt(Q)) * old[0] + math.sqrt(0.9 - 0.16 / Q) * old[1])
    assert s.weights.shape == (n,) and np.all(s.weights == 1.0 / n)
    # square-loss channel constants and the test error, as the old code computed them
    if not isinstance(channel, aa.LinearChannel):
        zy = whiten(old[3])
        assert s.square_moments() == (float(np.mean(np.sum(zy * zy, axis=1))) / s.K,
                                      float(np.mean(np.sum(zy * old[2], axis=1))) / s.K)
    z_hat = s.omega(0.4, 0.9)
    diff = channel.phi(unwhiten(old[2], T)) - channel.phi(unwhiten(z_hat, T))
    assert s.test_error(0.4, 0.9) == float(np.mean(np.sum(diff * diff, axis=(1, 2))))


def test_mc_conjugates_and_warm_start_are_the_old_ones():
    T, alpha, n, seed = 2, 0.5, 3000, 4
    ch = aa.SoftmaxChannel(1.0)
    loss = CrossEntropyLoss(1.0)
    s = OutputSample(alpha, T, Q, ch, n_mc=n, seed=seed, method="mc")
    xi1, xi2, z, y = _old_sample(alpha, T, Q, ch, n, seed)
    p0 = None
    for m, q, V in [(0.0, 0.0, 1.0), (0.5, 0.6, 0.8), (1.2, 1.1, 0.3)]:
        got = loss.se_conjugates(s, m, q, V)
        want, err, p0 = _old_conjugates(loss, xi1, xi2, z, y, alpha, Q, m, q, V, p0=p0)
        assert (got.A_hat, got.m_hat, got.q_hat) == tuple(float(v) for v in want)
        assert got.stderr == err
        np.testing.assert_array_equal(s.warm_start, p0)
    omega = s.omega(1.2, 1.1)
    p, _ = loss.prox(y, omega, 0.3)
    assert loss.se_train_loss(s, 1.2, 1.1, 0.3) == float(np.mean(loss.value_z(y, p)))


def test_default_rule_is_qmc_and_does_not_depend_on_the_seed():
    ch, loss = aa.SoftmaxChannel(1.0), CrossEntropyLoss(1.0)
    a = OutputSample(0.5, 2, Q, ch, n_mc=4000, seed=0)
    b = OutputSample(0.5, 2, Q, ch, n_mc=4000, seed=12345)
    c = OutputSample(0.5, 2, Q, ch, n_mc=4000, seed=np.random.default_rng(7), method="auto")
    assert a.method == b.method == c.method == "qmc"
    ref = loss.se_conjugates(a, 0.8, 1.0, 0.5)
    for s in (b, c):
        np.testing.assert_array_equal(s.xi1, a.xi1)
        np.testing.assert_array_equal(s.y, a.y)
        assert loss.se_conjugates(s, 0.8, 1.0, 0.5) == ref
        assert s.test_error(0.8, 1.0) == a.test_error(0.8, 1.0)
    # the internal seed does change the scrambling (so it can be used to check accuracy)
    d = OutputSample(0.5, 2, Q, ch, n_mc=4000, qmc_seed=1)
    assert not np.array_equal(d.xi1, a.xi1)


def test_rule_layout_and_validation():
    s = OutputSample(0.5, 3, Q, aa.SoftmaxChannel(1.0), n_mc=100_000)
    assert s.xi1.shape[0] == 12 * 2**13 <= s.n_mc                     # R = 12 scramblings of 8192
    assert s.rule.kind == "replicates" and len(s.rule.groups) == 12
    assert math.isclose(s.weights.sum(), 1.0, rel_tol=1e-12)
    g = OutputSample(0.5, 2, Q, aa.SoftmaxChannel(1.0), n_mc=100_000, method="gauss_hermite")
    v = g.view(CrossEntropyLoss(1.0))
    assert v.reduced and math.isclose(v.weights.sum(), 1.0, rel_tol=1e-12)
    assert v.N <= 100_000
    with pytest.raises(ValueError, match="method"):
        OutputSample(0.5, 2, Q, aa.SoftmaxChannel(1.0), method="sobol")
    with pytest.raises(ValueError, match="gauss_hermite"):
        OutputSample(0.5, 3, Q, aa.SoftmaxChannel(1.0), n_mc=100_000, method="gauss_hermite").view(
            CrossEntropyLoss(1.0)).y
    with pytest.raises(ValueError, match="qmc_seed"):
        OutputSample(0.5, 2, Q, aa.SoftmaxChannel(1.0), qmc_seed=-1)
    # resized: the same problem and rule settings at another budget; each replicate's points extend
    small = OutputSample(0.5, 2, Q, aa.SoftmaxChannel(1.0), n_mc=4_000, qmc_seed=5, n_replicates=8)
    big = small.resized(16_000)
    assert (big.n_mc, big.method, big.qmc_seed, big.n_replicates) == (16_000, "qmc", 5, 8)
    assert (big.alpha, big.T, big.Q, big.channel) == (small.alpha, small.T, small.Q, small.channel)
    np.testing.assert_array_equal(big.xi1[: 2**8], small.xi1[: 2**8])   # replicate 0: 2^8 of 2^10 points


def test_flat_reduction_is_used_exactly_where_it_is_exact():
    ce, sq, bayes = CrossEntropyLoss(1.0), SquareLoss(), BayesSoftmaxOutput(1.0)
    assert is_flat_invariant(ce) and is_flat_invariant(bayes) and not is_flat_invariant(sq)
    assert has_smooth_g_out(ce) and has_smooth_g_out(sq)
    soft = OutputSample(0.5, 3, Q, aa.SoftmaxChannel(1.0), n_mc=2000)
    lin = OutputSample(0.5, 3, Q, aa.LinearChannel(0.0), n_mc=2000)
    u = flat_direction(3)
    v = soft.view(ce)
    assert v.reduced and np.max(np.abs(v.xi1 @ u)) < 1e-12 and np.max(np.abs(v.xi2 @ u)) < 1e-12
    assert not soft.view(sq).reduced and not lin.view(ce).reduced
    assert v is soft.view(bayes)                                     # shared nodes and labels


# --------------------------------------------------------------------------------------------
# Gaussian moments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,T", [("qmc", 2), ("qmc", 3), ("gauss_hermite", 2)])
def test_rules_integrate_gaussian_moments(method, T):
    m, q = 0.9, 1.1
    s = OutputSample(0.5, T, Q, aa.LinearChannel(0.0), n_mc=20_000, method=method)
    K = s.K
    z, w = s.z_star, s.omega(m, q)
    exact = {"z2": Q * K, "zw": m * K, "w2": q * K, "z4": 3 * Q**2 * K, "z2w2": (Q * q + 2 * m * m) * K,
             "z1": 0.0, "z3w": 3 * Q * m * K}
    vals = {"z2": np.sum(z * z, 1), "zw": np.sum(z * w, 1), "w2": np.sum(w * w, 1), "z4": np.sum(z**4, 1),
            "z2w2": np.sum(z * z * w * w, 1), "z1": np.sum(z, 1), "z3w": np.sum(z**3 * w, 1)}
    for key, v in vals.items():
        est, err = float(s.mean(v)), float(s.error(v))
        if method == "gauss_hermite":          # exact for polynomials of degree <= 2n - 1 per dimension
            assert est == pytest.approx(exact[key], rel=1e-11, abs=1e-11), key
        else:
            assert abs(est - exact[key]) <= 5 * err + 1e-12, (key, est, exact[key], err)
            # heavy-tailed integrands (4th moments) converge slowest through the inverse CDF
            assert err <= 1e-2 * max(1.0, abs(exact[key])), (key, err)


def test_views_have_the_right_covariances():
    """Reduced view: the u-free parts of (zeta, omega) with per-component covariance
    [[Q* + s, m], [m, q]] on the K - 1 complement directions; z_star_mean is E[z* | zeta, omega]."""
    s2 = 0.4
    ch = aa.SoftmaxChannel(1.0, noise=s2) if "noise" in aa.SoftmaxChannel.__dataclass_fields__ else None
    if ch is None:
        pytest.skip("this model has no noisy softmax channel")
    s = OutputSample(0.5, 3, Q, ch, n_mc=20_000)
    v = s.view(CrossEntropyLoss(1.0))
    m, q = 0.7, 0.9
    assert v.reduced and v.Qz == Q + s2
    zeta, om, zs = v.zeta, v.omega(m, q), v.z_star_mean(m, q)
    Km1 = s.K - 1
    for val, want in ((np.sum(zeta * zeta, 1), (Q + s2) * Km1), (np.sum(zeta * om, 1), m * Km1),
                      (np.sum(om * om, 1), q * Km1),
                      # E[z* . zeta] = Q*, E[z* . omega] = m: the conditional mean keeps both
                      (np.sum(zs * zeta, 1), Q * Km1), (np.sum(zs * om, 1), m * Km1)):
        assert abs(v.mean(val) - want) <= 5 * v.error(val) + 1e-12


# --------------------------------------------------------------------------------------------
# Softmax expectations against scipy.integrate (T = 2)
# --------------------------------------------------------------------------------------------


def _gauss2_expect(f, C, L=9.0):
    """E f(a, b) for (a, b) ~ N(0, C) by scipy.integrate.dblquad in whitened coordinates."""
    Lc = np.linalg.cholesky(C)

    def integrand(t, s):
        a, b = Lc @ np.array([s, t])
        return f(a, b) * math.exp(-0.5 * (s * s + t * t)) / (2 * math.pi)

    val, _ = integrate.dblquad(integrand, -L, L, -L, L, epsabs=1e-12, epsrel=1e-11)
    return val


@pytest.mark.parametrize("method,bound", [("qmc", 5e-4), ("gauss_hermite", 1e-2)])
def test_softmax_test_error_matches_scipy_reference_T2(method, bound):
    """T = 2 softmax: rows are (sigma(beta a), 1 - sigma(beta a)), a = h_00 - h_01 (and
    h_11 - h_01 for row 1), so the test error is 4 E[(sigma(beta a*) - sigma(beta a_hat))^2] with
    (a*, a_hat) ~ N(0, 3 [[Q*, m], [m, q]])."""
    beta, m, q = 1.3, 1.0, 1.2
    s = OutputSample(0.5, 2, Q, aa.SoftmaxChannel(beta), n_mc=50_000, method=method)
    ref = 4 * _gauss2_expect(lambda a, b: (expit(beta * a) - expit(beta * b)) ** 2,
                             3 * np.array([[Q, m], [m, q]]))
    est, err = s.test_error(m, q, return_error=True)
    assert abs(est - ref) <= max(5 * err, 1e-9), (est, ref, err)
    assert err <= bound * ref          # Gauss-Hermite converges slowly: softmax has complex poles


def test_softmax_square_moments_match_scipy_reference_T2():
    """c1 = E||z_y||^2/K and c2 = E[z_y . z*]/K for T = 2 softmax labels: with a = sqrt2 z0 - z1,
    b = sqrt2 z2 - z1 ((a, b) ~ N(0, Q* [[3, 1], [1, 3]])), z_y = (s_a/sqrt2, 1 - (s_a + s_b)/2,
    s_b/sqrt2) and E[z* | a, b] = C S^-1 (a, b) (exact for the part of z* along the flat direction,
    which is independent of (a, b))."""
    beta = 1.7
    S = Q * np.array([[3.0, 1.0], [1.0, 3.0]])
    C = Q * np.array([[math.sqrt(2), 0.0], [-1.0, -1.0], [0.0, math.sqrt(2)]])
    M = C @ np.linalg.inv(S)

    def zy(a, b):
        sa, sb = expit(beta * a), expit(beta * b)
        return np.array([sa / math.sqrt(2), 1 - 0.5 * (sa + sb), sb / math.sqrt(2)])

    c1 = _gauss2_expect(lambda a, b: float(zy(a, b) @ zy(a, b)), S) / 3
    c2 = _gauss2_expect(lambda a, b: float(zy(a, b) @ (M @ np.array([a, b]))), S) / 3
    s = OutputSample(0.5, 2, Q, aa.SoftmaxChannel(beta), n_mc=50_000)
    got = s.square_moments()
    assert got == pytest.approx((c1, c2), rel=1e-4)         # Monte Carlo at 5e4 draws: ~3e-3


# --------------------------------------------------------------------------------------------
# Closed forms against the generic weighted path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,channel", [(2, aa.SoftmaxChannel(1.0)), (3, aa.SoftmaxChannel(1.5)),
                                       (3, aa.LinearChannel(0.3)), (2, aa.HardmaxChannel())])
def test_square_loss_closed_form_equals_generic_weighted_path(T, channel):
    """The generic path (non-reduced nodes, z* replaced by E[z* | zeta, omega] for the noisy
    linear channel, Stein form of m_hat) against square_moments() (reduced nodes / exact)."""
    s = OutputSample(0.4, T, Q, channel, n_mc=20_000)
    loss = SquareLoss()
    for m, q, V in [(0.0, 0.0, 1.0), (0.4, 0.5, 0.3), (1.0, 1.2, 0.05), (1.2, 0.97, 0.2)]:
        closed = loss.se_conjugates(s, m, q, V)
        gen = OutputFactor.se_conjugates(loss, s, m, q, V)
        assert gen.A_hat == pytest.approx(closed.A_hat, rel=1e-12)
        for key in ("m_hat", "q_hat"):
            err = gen.stderr[key]
            assert abs(getattr(gen, key) - getattr(closed, key)) <= 5 * err + 1e-9 * abs(getattr(closed, key)), key
            assert err <= 1e-2 * abs(getattr(closed, key)) + 1e-12, key


def test_bayes_softmax_closed_form_equals_generic_reduced_path():
    """Nishimori line m = q, V = Q* - q: the generic average over the reduced nodes (2(K-1)
    dimensions) of the Bayes softmax g_out gives alpha (K - 1)/(Q* - q) for all three."""
    out = BayesSoftmaxOutput(1.0)
    for T in (2, 3):
        s = OutputSample(0.4, T, Q, out.channel(), n_mc=20_000)
        for q in (0.0, 0.6, 1.2):
            closed = out.se_conjugates(s, q, q, Q - q)
            gen = OutputFactor.se_conjugates(out, s, q, q, Q - q)
            assert gen.A_hat == pytest.approx(closed.A_hat, rel=1e-12)
            for key in ("m_hat", "q_hat"):
                assert abs(getattr(gen, key) - getattr(closed, key)) <= 5 * gen.stderr[key] + 1e-9 * closed.A_hat
                assert gen.stderr[key] <= 1e-3 * closed.A_hat


def test_noisy_test_error_of_the_linear_channel():
    """E||y - h_hat||^2 = 2K (Q* + s - 2m + q), E||h* - h_hat||^2 = 2K (Q* - 2m + q)."""
    s2, m, q = 0.3, 0.8, 1.1
    for method in ("qmc", "mc"):
        s = OutputSample(0.5, 3, Q, aa.LinearChannel(s2), n_mc=20_000, method=method)
        K = s.K
        for fn, want in ((s.test_error, 2 * K * (Q - 2 * m + q)), (s.test_error_noisy, 2 * K * (Q + s2 - 2 * m + q))):
            est, err = fn(m, q, return_error=True)
            assert abs(est - want) <= 5 * err, (method, fn.__name__, est, want, err)


# --------------------------------------------------------------------------------------------
# Cross-entropy: accuracy settings agree to the error estimate, far below Monte Carlo
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,state", [(2, (1.4464, 1.3956, 1.506)), (2, (0.4468, 0.4603, 21.9)),
                                     (3, (1.46254, 1.42612, 0.52809))])
def test_cross_entropy_accuracy_settings_agree_to_the_error_estimate(T, state):
    m, q, V = state
    ch, loss = aa.SoftmaxChannel(1.0), CrossEntropyLoss(1.0)
    lo = loss.se_conjugates(OutputSample(0.5, T, Q, ch, n_mc=25_000, qmc_seed=3), m, q, V)
    hi = loss.se_conjugates(OutputSample(0.5, T, Q, ch, n_mc=100_000), m, q, V)
    mc = loss.se_conjugates(OutputSample(0.5, T, Q, ch, n_mc=100_000, seed=0, method="mc"), m, q, V)
    for key in ("A_hat", "m_hat", "q_hat"):
        a, b = getattr(lo, key), getattr(hi, key)
        tol = 4 * math.hypot(lo.stderr[key], hi.stderr[key])
        assert abs(a - b) <= tol, (key, a, b, lo.stderr[key], hi.stderr[key])
        gain = 3 if key == "q_hat" else 10
        assert hi.stderr[key] <= mc.stderr[key] / gain, (key, hi.stderr[key], mc.stderr[key])
        assert abs(getattr(mc, key) - b) <= 5 * mc.stderr[key]        # MC is unbiased, just noisy


@pytest.mark.parametrize("T,state", [(2, (0.4433, 0.4559, 21.80)), (3, (0.9161, 0.7814, 16.49))])
def test_q_hat_stein_control_variate_keeps_the_mean_and_cuts_the_error(T, state):
    """``q_hat = alpha E||g||^2`` carries the Stein control variate ``h = g . xi_2 - r Tr(dg/domega)``
    (mean zero by Stein's lemma).  Against the plain mean of ``||g||^2`` on the same nodes,
    computed here from ``g_out``, over 10 scramblings at the alpha = 0.05 fixed points (where the
    error of ``q_hat`` reaches ``V ~ 20``): both agree with a plain 2^20-point reference, and the
    controlled one spreads less."""
    m, q, V = state
    alpha, ch, loss = 0.05, aa.SoftmaxChannel(1.0), CrossEntropyLoss(1.0)

    def plain_q_hat(sample):
        v = sample.view(loss)
        g = loss.g_out(v.y, v.omega(m, q), V, jacobian="trace")[0]
        return alpha * float(np.mean(np.sum(g * g, axis=1)))

    controlled, plain = [], []
    for seed in range(10):
        s = OutputSample(alpha, T, Q, ch, n_mc=65_536, qmc_seed=seed)
        controlled.append(loss.se_conjugates(s, m, q, V).q_hat)
        plain.append(plain_q_hat(s))
    ref = plain_q_hat(OutputSample(alpha, T, Q, ch, n_mc=2**20, qmc_seed=99))
    spread_c, spread_p = np.std(controlled, ddof=1), np.std(plain, ddof=1)
    assert abs(np.mean(plain) - ref) <= 3 * spread_p / math.sqrt(10) + 1e-5 * ref
    assert abs(np.mean(controlled) - ref) <= 3 * spread_c / math.sqrt(10) + 1e-5 * ref
    assert spread_c < spread_p / 1.2, (spread_c, spread_p)


def test_gauss_hermite_and_qmc_agree_on_cross_entropy_T2():
    m, q, V = 1.4464, 1.3956, 1.506
    ch, loss = aa.SoftmaxChannel(1.0), CrossEntropyLoss(1.0)
    gh = loss.se_conjugates(OutputSample(0.5, 2, Q, ch, n_mc=100_000, method="gauss_hermite"), m, q, V)
    qm = loss.se_conjugates(OutputSample(0.5, 2, Q, ch, n_mc=100_000), m, q, V)
    for key in ("A_hat", "m_hat", "q_hat"):
        assert abs(getattr(gh, key) - getattr(qm, key)) <= 4 * (gh.stderr[key] + qm.stderr[key]), key


def test_train_loss_uses_the_weights():
    """se_train_loss on Gauss-Hermite (non-uniform weights) agrees with QMC."""
    m, q, V = 1.0, 1.1, 0.5
    ch, loss = aa.SoftmaxChannel(1.0), CrossEntropyLoss(1.0)
    s = OutputSample(0.5, 2, Q, ch, n_mc=30_000, method="gauss_hermite")
    gh = loss.se_train_loss(s, m, q, V)
    qm = loss.se_train_loss(OutputSample(0.5, 2, Q, ch, n_mc=30_000), m, q, V)
    assert gh == pytest.approx(qm, rel=5e-3)
    v = s.view(loss)                    # an unweighted mean over the nodes would be far off
    p, _ = loss.prox(v.y, v.omega(m, q), V)
    assert abs(float(np.mean(loss.value_z(v.y, p))) - qm) > 0.1 * qm
