"""docs/theory.md §8.4 and the SE predictions: AMP iterates track the state evolution.

The SE never sees the sampled data: it integrates over Gaussians and random matrices. AMP runs
on sampled sequences. Agreement at large d is the check.
"""

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

import amp_attention as aa
from amp_attention.losses import SquareLoss
from amp_attention.erm import direct_erm
from amp_attention.factors import OutputFactor
from amp_attention.output_sample import OutputSample
from amp_attention.se import state_evolution
from amp_attention.spectral import SpectralLaw, shat_spectrum
from amp_attention.whitening import n_pairs

ITERS = 25
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]  # one AMP run at d = 200 is seconds

# Natural (loss, channel) pairs. The square loss on softmax targets tracks its SE only to
# ~0.015-0.02 at d = 200, decaying like 1/sqrt(d): the softmax sees the O(1/sqrt d) skewness of
# the finite-d diagonal preactivations h_aa (a quadratic form in x_a). See the closing note.
COMBOS = [
    ("cross_entropy", "nuclear", "softmax"),
    ("cross_entropy", "frobenius", "softmax"),
    ("square", "nuclear", "linear"),
    ("square", "frobenius", "linear"),
]


def _run_pair(d, T, alpha, rho, lam, beta, noise, loss, reg, channel_kind, seed, iters=ITERS):
    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, rho, rng)
    channel = {"softmax": aa.SoftmaxChannel(beta), "noisy_softmax": aa.SoftmaxChannel(beta, noise=noise),
               "linear": aa.LinearChannel(noise)}[channel_kind]
    data = aa.sample_data(int(round(alpha * d * d)), T, teacher, channel, rng)
    est = aa.ERMAttention(loss=loss, reg=reg, lam=lam, beta=beta, max_iter=iters, tol=0)
    est.fit(data.X, data.y, S_star=teacher.S)
    # the SE replays GAMP's damping schedule (adaptive by default): same initialisation, same steps
    se = state_evolution(alpha, T, teacher, channel, loss, reg, lam, beta, max_iter=iters, tol=0,
                         n_mc=60_000, seed=seed, predictions=False, damping=est.history_["damping"])
    return est, se


def _check_tracking(d, combo, T, alpha, rho, lam, beta, noise, seed):
    loss, reg, ch = combo
    est, se = _run_pair(d, T, alpha, rho, lam, beta, noise, loss, reg, ch, seed)
    assert est.n_iter_ == ITERS and se.n_iter == ITERS
    gap = np.abs(est.history_["mse"] - se.history["mse"])
    assert gap.max() <= 0.03, gap
    assert gap[-1] <= 0.01, gap


@pytest.mark.parametrize("combo", [("softmax_square", "nuclear", "noisy_softmax"),
                                   ("cross_entropy", "nuclear", "noisy_softmax")])
def test_paper_estimator_and_noisy_labels_track_se_at_d200(combo):
    """Issue 10: the paper's estimator (softmax-square loss on the attention map) and cross-entropy
    on noisy softmax labels (noise 0.25) track their SE with the §8.4 tolerances at d = 200."""
    _check_tracking(200, combo, 2, 0.4, 0.5, 0.05, 1.0, 0.25, 7)


# The fast profile stays in the regime where docs/theory.md's prototype verified the 0.01 tolerance at
# d = 200 (alpha 0.3-0.5, moderate beta and rho). Outside it, e.g. cross-entropy + frobenius at
# beta = 2, rho = 1, alpha = 0.58, single instances differ from the SE by ~0.012 at d = 200, with
# either sign across seeds (finite-d fluctuation; the seed-averaged gap is ~0.002); the slow
# profile covers wider ranges at d = 300.
@settings(max_examples=4, phases=NO_SHRINK)
@given(
    combo=st.sampled_from(COMBOS),
    T=st.sampled_from([2, 3]),
    alpha=st.floats(0.3, 0.5),
    rho=st.floats(0.3, 0.8),
    lam=st.floats(0.02, 0.2),
    beta=st.floats(0.5, 1.5),
    noise=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**20),
)
def test_amp_tracks_se_at_d200(combo, T, alpha, rho, lam, beta, noise, seed):
    _check_tracking(200, combo, T, alpha, rho, lam, beta, noise, seed)


@pytest.mark.slow
@settings(max_examples=10, phases=NO_SHRINK)
@given(
    combo=st.sampled_from(COMBOS),
    T=st.sampled_from([2, 3]),
    alpha=st.floats(0.3, 0.8),
    rho=st.floats(0.2, 1.0),
    lam=st.floats(0.01, 0.3),
    beta=st.floats(0.5, 3.0),
    noise=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**20),
)
def test_amp_tracks_se_at_d300_thorough(combo, T, alpha, rho, lam, beta, noise, seed):
    _check_tracking(300, combo, T, alpha, rho, lam, beta, noise, seed)


def test_gap_shrinks_with_d():
    """Averaged over seeds, the AMP-SE gap at d = 200 is smaller than at d = 100."""
    def mean_gap(d):
        gaps = []
        for seed in range(3):
            est, se = _run_pair(d, 2, 0.4, 0.5, 0.05, 1.0, 0.0, "cross_entropy", "nuclear", "softmax",
                                seed, iters=15)
            gaps.append(np.abs(est.history_["mse"] - se.history["mse"])[5:].mean())
        return np.mean(gaps)

    assert mean_gap(200) < mean_gap(100)


def test_se_fixed_point_matches_amp_and_direct_erm_at_d200():
    d, T, alpha, lam = 200, 2, 0.4, 0.1
    rng = np.random.default_rng(11)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    channel = aa.LinearChannel(0.2)
    data = aa.sample_data(int(alpha * d * d), T, teacher, channel, rng)
    est = aa.ERMAttention(loss="square", reg="frobenius", lam=lam, tol=1e-10, max_iter=500)
    est.fit(data.X, data.y, S_star=teacher.S)
    ref = direct_erm(data.X, data.y, loss="square", reg="frobenius", lam=lam)
    se = state_evolution(alpha, T, teacher, channel, "square", "frobenius", lam, tol=1e-12, max_iter=500)
    assert est.converged_ and se.converged
    mse_amp = np.sum((est.S_ - teacher.S) ** 2) / d
    mse_erm = np.sum((ref.S - teacher.S) ** 2) / d
    assert abs(mse_amp - mse_erm) <= 1e-6
    assert abs(mse_amp - se.mse) <= 0.01
    # the SE's train-loss prediction against the fitted model's mean training loss
    assert abs(est.history_["train_loss"][-1] - se.train_loss) <= 0.03 * se.train_loss


def test_square_loss_closed_form_equals_monte_carlo_output_side():
    """The closed-form square-loss output side against the generic Monte-Carlo path."""
    law_Q, alpha, T = 1.5, 0.4, 3
    for channel in (aa.LinearChannel(0.3), aa.SoftmaxChannel(1.5)):
        sample = OutputSample(alpha, T, law_Q, channel, n_mc=200_000, seed=1)
        loss = SquareLoss()

        def closed(m, q, V):
            return loss.se_conjugates(sample, m, q, V)

        def mc(m, q, V):  # the generic path of the output-factor contract
            return OutputFactor.se_conjugates(loss, sample, m, q, V)

        for m, q, V in [(0.0, 0.0, 1.0), (0.4, 0.5, 0.3), (1.0, 1.2, 0.05)]:
            a1, m1, q1, _ = closed(m, q, V)
            a2, m2, q2, err = mc(m, q, V)
            assert abs(a1 - a2) <= 1e-10 * a1
            assert abs(m1 - m2) <= 5 * err["m_hat"] + 1e-3 * abs(m1)
            assert abs(q1 - q2) <= 5 * err["q_hat"] + 1e-3 * q1
        K = n_pairs(T)
        if isinstance(channel, aa.LinearChannel):  # docs/theory.md §7's closed form
            m, q, V = 0.3, 0.4, 0.5
            a1, m1, q1, _ = closed(m, q, V)
            assert np.isclose(a1, 2 * alpha * K / (1 + 2 * V))
            assert np.isclose(m1, 2 * alpha * K / (1 + 2 * V))
            assert np.isclose(q1, 4 * alpha * K * (law_Q - 2 * m + q + 0.3) / (1 + 2 * V) ** 2)


def test_free_and_finite_input_sides_agree_as_d_grows():
    def gap(d):
        teacher = aa.Teacher.wishart(d, 0.5, np.random.default_rng(d))
        kw = dict(loss="cross_entropy", reg="nuclear", lam=0.05, max_iter=12, tol=0, n_mc=20_000,
                  predictions=False, acceleration=None)  # compared step by step
        free = state_evolution(0.4, 2, teacher, aa.SoftmaxChannel(1.0), input_side="free", **kw)
        fin = state_evolution(0.4, 2, teacher, aa.SoftmaxChannel(1.0), input_side="finite", n_draws=4, **kw)
        return np.abs(free.history["mse"] - fin.history["mse"]).max()

    g100, g400 = gap(100), gap(400)
    assert g400 < g100 and g400 < 0.01


def test_predicted_spectrum_of_s_hat_matches_amp_and_direct_erm():
    """Zero atom and bulk of S_hat: SE pushforward vs eigenvalues of AMP's and direct_erm's S_hat."""
    d, T, alpha, lam = 200, 2, 0.5, 0.2
    rng = np.random.default_rng(3)
    teacher = aa.Teacher.wishart(d, 0.3, rng)
    channel = aa.LinearChannel(0.1)
    data = aa.sample_data(int(alpha * d * d), T, teacher, channel, rng)
    est = aa.ERMAttention(loss="square", reg="nuclear", lam=lam, tol=1e-9, max_iter=500).fit(data.X, data.y)
    se = state_evolution(alpha, T, teacher, channel, "square", "nuclear", lam, tol=1e-12, max_iter=500)
    law = SpectralLaw.atoms(teacher.eigenvalues)
    from amp_attention.spectral import SoftThreshold

    push = shat_spectrum(law, se.a, se.Delta, SoftThreshold(lam / se.A_hat))
    from scipy.integrate import cumulative_trapezoid

    mass = push.atom_mass + np.trapezoid(push.density, push.y)
    assert abs(mass - 1) < 1e-3
    # second moment of the predicted spectrum is the SE's q = Tr(S_hat^2)/d
    assert abs(np.trapezoid(push.density * push.y**2, push.y) - se.q) < 0.01 * se.q
    for S in (est.S_,):
        ev = np.linalg.eigvalsh(S)
        frac_zero = np.mean(ev < 1e-8)
        assert abs(frac_zero - push.atom_mass) < 0.05
        # CDF of the non-zero part vs the predicted bulk
        pos = np.sort(ev[ev >= 1e-8])
        cdf_pred = push.atom_mass + cumulative_trapezoid(push.density, push.y, initial=0.0)
        cdf_emp = np.searchsorted(pos, push.y, side="right") / d + frac_zero
        assert np.max(np.abs(cdf_pred - cdf_emp)) < 0.06


def test_se_validation_and_nonconvergence_flag():
    law = SpectralLaw.wishart(0.5)
    with pytest.raises(ValueError, match="alpha"):
        state_evolution(-1, 2, law, aa.SoftmaxChannel(1.0))
    with pytest.raises(ValueError, match="T >= 2"):
        state_evolution(0.3, 1, law, aa.SoftmaxChannel(1.0))
    with pytest.raises(ValueError, match="finite"):
        state_evolution(0.3, 2, law, aa.SoftmaxChannel(1.0), input_side="finite")
    with pytest.raises(ValueError, match="teacher"):
        state_evolution(0.3, 2, np.eye(3), aa.SoftmaxChannel(1.0))
    r = state_evolution(0.3, 2, law, aa.LinearChannel(0.1), "square", "nuclear", 0.05, max_iter=2, tol=1e-14)
    assert not r.converged and r.n_iter == 2 and "max_iter" in r.message


def test_two_level_output_rule_reaches_the_full_rule_fixed_point():
    """output_rule='auto' iterates on n_mc/16 nodes first, then on the full rule: the fixed point is
    the full rule's ('qmc' at the same n_mc, one level), the coarse level only supplies the start
    (docs/theory.md §7.1)."""
    law = aa.SpectralLaw.wishart(0.5)
    kw = dict(n_mc=65_536, tol=1e-11, max_iter=500, predictions=False)
    two = state_evolution(0.5, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01,
                          output_rule="auto", **kw)
    one = state_evolution(0.5, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01,
                          output_rule="qmc", **kw)
    assert two.converged and one.converged
    assert two.params["coarse_n_mc"] == 4096 and 0 < two.params["coarse_steps"] < two.n_iter
    # the full level's steps, preconditioned by the coarse Jacobian, are few
    assert two.params["coarse_jacobian"] and two.n_iter - two.params["coarse_steps"] <= 4
    assert np.all(two.history["preconditioned"][two.params["coarse_steps"]:] <= 1)
    assert one.params["coarse_n_mc"] is None
    assert len(two.history["m"]) == two.n_iter
    for k in "mqV":
        assert abs(getattr(two, k) - getattr(one, k)) <= 1e-8 * max(1.0, abs(getattr(one, k))), k


@pytest.mark.parametrize("alpha, lam", [(0.5, 0.01), (0.05, 0.01)])
def test_coarse_preconditioner_is_the_inverse_of_one_minus_the_jacobian(alpha, lam):
    """The preconditioner of the full level, ``(I - J)^{-1}`` from one-sided differences along
    ``(m at fixed s, q, V)``, against ``I - J`` by central differences of the SE map composed here
    from the public factors (steps relative to each coordinate and, for q, to ``s = q - m^2/Q*``)."""
    import amp_attention.se_levels as se_levels
    from amp_attention.denoisers import make_denoiser
    from amp_attention.losses import make_loss
    from amp_attention.output_sample import OutputSample

    law, ch = aa.SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0)
    fp = state_evolution(alpha, 2, law, ch, "cross_entropy", "nuclear", lam, n_mc=16_384,
                         output_rule="qmc", tol=1e-10, max_iter=500, predictions=False)
    x = np.array([fp.m, fp.q, fp.V])
    loss, den = make_loss("cross_entropy", 1.0), make_denoiser("nuclear", lam)
    sample = OutputSample(alpha, 2, law.Q, ch, n_mc=16_384, method="qmc")

    def G(y):
        A_hat, m_hat, q_hat, _ = loss.se_conjugates(sample, *y)
        return np.array(den.se_overlaps(law, m_hat / A_hat, q_hat / (2 * A_hat**2), A_hat))

    s = x[1] - x[0] ** 2 / law.Q
    h = np.array([1e-6 * abs(x[0]), 1e-3 * s, 1e-6 * x[2]])
    h[0] = min(h[0], 1e-3 * s * law.Q / (2 * abs(x[0])))      # central steps in m stay in the domain
    J = np.column_stack([(G(x + hi * e) - G(x - hi * e)) / (2 * hi) for hi, e in zip(h, np.eye(3))])
    M = se_levels.coarse_preconditioner(loss, lambda a, D, A: den.se_overlaps(law, a, D, A), sample,
                                        tuple(x))
    assert M is not None
    ref = np.eye(3) - J
    got = np.linalg.inv(M)
    scale = np.abs(ref).max(axis=1, keepdims=True)   # row-wise: the V row is larger
    np.testing.assert_allclose(got / scale, ref / scale, rtol=0, atol=2e-3)


def test_two_level_near_perfect_recovery_uses_the_coarse_jacobian():
    """At alpha = 0.5, lam = 1e-4 the fixed point is ~1e-7 from the boundary ``m^2 = q Q*`` and the map
    depends on ``sqrt(q - m^2/Q*)``: the probes relative to that distance still give a
    preconditioner, the full level takes few steps and reaches the one-level fixed point."""
    law = aa.SpectralLaw.wishart(0.5)
    kw = dict(n_mc=65_536, tol=1e-8, max_iter=500, predictions=False)
    two = state_evolution(0.5, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 1e-4, **kw)
    one = state_evolution(0.5, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 1e-4,
                          output_rule="qmc", **kw)
    assert two.converged and one.converged and one.q - one.m**2 / law.Q < 1e-5
    assert two.params["coarse_jacobian"] and two.n_iter - two.params["coarse_steps"] <= 4
    for k in "mqV":
        assert abs(getattr(two, k) - getattr(one, k)) <= 1e-7 * max(1.0, abs(getattr(one, k))), k


def _runs_over_scramblings(monkeypatch, seeds, *args, **kw):
    """The SE once per internal QMC seed (every rule of the run scrambled with that seed)."""
    import amp_attention.se as se_module

    runs = []
    for seed in seeds:
        monkeypatch.setattr(se_module, "OutputSample",
                            lambda *a, _s=seed, **k: OutputSample(*a, **dict(k, qmc_seed=_s)))
        runs.append(state_evolution(*args, **kw))
    return runs


@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_fixed_point_stderr_matches_the_spread_over_scramblings(alpha, monkeypatch):
    """``SEResult.stderr`` (replicate spread of the last conjugates carried by ``(I - J)^{-1}``)
    against the empirical spread of the fixed point over 8 independent scramblings of the whole
    rule (the internal QMC seed): the same size, within the sampling error of 8 runs."""
    runs = _runs_over_scramblings(monkeypatch, range(8), alpha, 2, aa.SpectralLaw.wishart(0.5),
                                  aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01,
                                  n_mc=65_536, tol=1e-10, max_iter=500, predictions=False)
    assert all(r.converged and r.stderr is not None for r in runs)
    for k in ("m", "q", "V", "mse"):
        empirical = np.std([getattr(r, k) for r in runs], ddof=1)
        estimated = np.mean([r.stderr[k] for r in runs])
        assert 0.4 < empirical / estimated < 2.5, (k, empirical, estimated)


def test_fixed_point_stderr_is_none_without_replicates_or_preconditioner():
    law = aa.SpectralLaw.wishart(0.5)
    kw = dict(n_mc=65_536, predictions=False)
    args = (0.5, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01)
    assert state_evolution(*args, output_rule="qmc", **kw).stderr is None      # one level: no Jacobian
    assert state_evolution(*args, acceleration=None, **kw).stderr is None     # no preconditioning
    assert state_evolution(*args, output_rule="mc", **kw).stderr is None
    assert state_evolution(0.5, 2, law, aa.LinearChannel(0.1), "square", "nuclear", 0.01,
                           **kw).stderr is None                                 # closed form: no nodes
    with pytest.warns(ConvergenceWarning):
        assert state_evolution(*args, max_iter=3, **kw).stderr is None         # not converged


def test_precision_target_grows_the_rule_until_the_fixed_point_is_that_reproducible(monkeypatch):
    """``precision=``: at alpha = 0.05 (V ~ 22, the hardest point for the quadrature) the rule grows
    until ``stderr`` is below the target, and the fixed point's actual spread over independent
    scramblings of every rule is then of that size, and smaller than without the target."""
    args = (0.05, 2, aa.SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01)
    kw = dict(n_mc=65_536, tol=1e-10, max_iter=500, predictions=False)
    target = 2e-4
    plain = _runs_over_scramblings(monkeypatch, range(4), *args, **kw)
    held = _runs_over_scramblings(monkeypatch, range(4), *args, precision=target, **kw)
    assert all(r.stderr["V"] > target for r in plain)  # (the target needs a larger rule here)
    for r in held:
        assert r.converged and "precision 0.0002 reached" in r.message
        assert max(r.stderr.values()) <= target
        assert r.params["n_mc_used"][0] == 65_536 < r.params["n_mc_used"][-1] <= 16 * 65_536
    spread_held = np.std([r.V for r in held], ddof=1)
    assert spread_held <= 2.5 * target
    assert spread_held < np.std([r.V for r in plain], ddof=1)


def test_precision_not_reached_warns_and_keeps_the_last_converged_fixed_point(monkeypatch):
    import amp_attention.se_levels as se_levels

    monkeypatch.setattr(se_levels, "PRECISION_MAX_GROWTH", 2)
    args = (0.5, 2, aa.SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01)
    kw = dict(n_mc=65_536, predictions=False)
    with pytest.warns(ConvergenceWarning, match="precision target 1e-09 was not reached: the node budget limit"):
        r = state_evolution(*args, precision=1e-9, **kw)
    assert r.converged and "precision 1e-09 not reached" in r.message
    assert r.params["n_mc_used"] == [65_536, 131_072] and r.params["precision"] == 1e-9
    base = state_evolution(*args, **kw)
    assert abs(r.V - base.V) <= 5 * base.stderr["V"]   # the same fixed point, on a larger rule
    assert r.stderr["V"] < base.stderr["V"]
    # a round that cannot converge (one step left) is dropped: the first fixed point stays, one warning
    with pytest.warns(ConvergenceWarning) as caught:
        short = state_evolution(*args, precision=1e-9, max_iter=base.n_iter + 1, **kw)
    assert len(caught) == 1 and "stopped without converging" in str(caught[0].message)
    assert short.converged and (short.n_iter, short.V, short.params["n_mc_used"]) == (base.n_iter, base.V, [65_536])


def test_precision_is_checked_and_ignored_by_closed_form_output_sides():
    import warnings

    args = (0.5, 2, aa.SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01)
    for bad in (0.0, -1e-4, float("nan"), float("inf"), "1e-4", True):
        with pytest.raises(ValueError, match="precision"):
            state_evolution(*args, precision=bad, n_mc=65_536)
    for other in (dict(output_rule="qmc"), dict(acceleration=None), dict(damping=(0.5, 0.5)),
                  dict(callback=lambda t, h: False), dict(n_mc=65_535)):
        with pytest.raises(ValueError, match="precision needs"):
            state_evolution(*args, precision=1e-4, **dict(dict(n_mc=65_536), **other))
    teacher = aa.Teacher.wishart(30, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="precision needs input_side='free'"):
        state_evolution(0.5, 2, teacher, *args[3:], precision=1e-4, input_side="finite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = state_evolution(0.5, 2, aa.SpectralLaw.wishart(0.5), aa.LinearChannel(0.1), "square", "nuclear",
                            0.01, precision=1e-12)
    assert r.converged and r.params["n_mc_used"] == [r.params["n_mc"]] and "precision" not in r.message


def test_small_alpha_fixed_point_does_not_depend_on_the_node_budget():
    """Issue 11's reproducibility target at its hardest point, alpha = 0.05 (V ~ 22): the default
    rule at n_mc = 4e5 and 8e5 (different Sobol sets) agree to 1e-4 in m, q and the test error;
    V, which carries q_hat's relative error one for one, to 2e-4 (1e-5 relative)."""
    law = aa.SpectralLaw.wishart(0.5)
    runs = [state_evolution(0.05, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01,
                            n_mc=n, tol=1e-10, max_iter=500) for n in (400_000, 800_000)]
    assert all(r.converged for r in runs)
    a, b = runs
    for k, bound in (("m", 1e-4), ("q", 1e-4), ("test_error", 1e-4), ("V", 2e-4)):
        assert abs(getattr(a, k) - getattr(b, k)) <= bound, (k, getattr(a, k), getattr(b, k))


def test_two_level_rule_falls_back_to_one_level_when_the_coarse_level_fails(monkeypatch):
    """A coarse level that fails (here: its output side raises) must not decide the result: the SE
    reruns on the full rule from the start, as one-level 'qmc' would."""
    import amp_attention.se as se_module

    real = se_module.make_loss

    def failing_on_coarse(name, *args, **kw):
        loss = real(name, *args, **kw)
        base = type(loss)

        class CoarseFails(base):  # the generic se_conjugates stays (the coarse level applies)
            def _se_g_out(self, y, *args):
                if len(y) < 10_000:
                    raise FloatingPointError("coarse rule failure (test)")
                return base._se_g_out(self, y, *args)

        loss.__class__ = CoarseFails
        return loss

    law = aa.SpectralLaw.wishart(0.5)
    kw = dict(n_mc=65_536, tol=1e-10, max_iter=300, predictions=False)
    ref = state_evolution(0.5, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01,
                          output_rule="qmc", **kw)
    monkeypatch.setattr(se_module, "make_loss", failing_on_coarse)
    got = state_evolution(0.5, 2, law, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", 0.01, **kw)
    assert got.params["coarse_n_mc"] == 4096  # the coarse level was tried ...
    assert got.converged and not got.diverged and got.params["coarse_steps"] == 0  # ... and dropped
    for k in "mqV":
        assert abs(getattr(got, k) - getattr(ref, k)) <= 1e-8 * max(1.0, abs(getattr(ref, k))), k
