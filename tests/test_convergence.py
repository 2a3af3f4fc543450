"""Convergence at the paper's operating points (issue 11; docs/theory.md §5 damping, §7.3).

The reproducers of the convergence issue, as a fast subset of the convergence grid
(``benchmarks/convergence_grid.py``; the full grid is behind ``-m slow``):

* undamped ERM-GAMP cycles at d = 60, T = 2, alpha = 0.1 (cross-entropy + nuclear, lam = 0.01):
  the default adaptive damping converges, to the minimiser found independently by ``direct_erm``;
* the SE never raises for valid inputs (extreme alpha, tiny lam) and returns a converged state or a
  flagged one with a message;
* a loop stopped by ``max_iter`` warns with scikit-learn's ``ConvergenceWarning``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import amp_attention as aa


@pytest.fixture(scope="module")
def cycling_instance():
    d = 60
    teacher = aa.Teacher.wishart(d, 0.5, np.random.default_rng(0))
    data = aa.sample_data(int(0.1 * d * d), 2, teacher, aa.SoftmaxChannel(1.0), np.random.default_rng(0))
    return teacher, data


def test_undamped_gamp_cycles_here_and_adaptive_damping_reaches_the_minimiser(cycling_instance):
    teacher, data = cycling_instance
    with pytest.warns(ConvergenceWarning):
        plain = aa.ERMAttention(lam=0.01, max_iter=150, damping=0.0).fit(data.X, data.y)
    assert not plain.converged_  # the reproducer: a period-2 cycle, no convergence
    auto = aa.ERMAttention(lam=0.01, max_iter=1000, tol=1e-8).fit(data.X, data.y)
    assert auto.converged_ and not auto.diverged_
    assert np.max(auto.history_["damping"]) > 0  # the adaptive rule engaged
    assert auto.history_["damping"][0] == 0.0  # and started undamped
    ref = aa.direct_erm(data.X, data.y, "cross_entropy", "nuclear", 0.01, random_state=0)
    assert np.linalg.norm(auto.S_ - ref.S) <= 1e-5 * np.linalg.norm(ref.S)


def test_adaptive_damping_leaves_a_contracting_iteration_undamped():
    d = 40
    rng = np.random.default_rng(3)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    data = aa.sample_data(int(0.5 * d * d), 2, teacher, aa.LinearChannel(0.1), rng)
    a = aa.ERMAttention(loss="square", reg="frobenius", lam=0.1, max_iter=300).fit(data.X, data.y)
    b = aa.ERMAttention(loss="square", reg="frobenius", lam=0.1, max_iter=300, damping=0.0).fit(data.X, data.y)
    assert a.converged_ and b.converged_
    if np.all(a.history_["damping"] == 0):
        np.testing.assert_array_equal(a.S_, b.S_)  # bit-identical when the rule never engaged
    np.testing.assert_allclose(a.S_, b.S_, atol=1e-7 * np.abs(b.S_).max())


@pytest.mark.parametrize("alpha, lam", [(0.05, 1e-5), (1e4, 0.01)])
def test_state_evolution_converges_at_extreme_operating_points(alpha, lam):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        r = aa.state_evolution(alpha, 2, aa.SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0), "cross_entropy",
                               "nuclear", lam, n_mc=20_000, seed=1, max_iter=400)
    assert r.converged and not r.diverged, r.message
    assert all(np.isfinite(v) for v in (r.m, r.q, r.V, r.test_error, r.train_loss))
    assert r.m * r.m <= r.q * r.Q * (1 + 1e-9)  # Cauchy-Schwarz of the overlaps


def test_state_evolution_at_vanishing_alpha_predicts_without_raising():
    r = aa.state_evolution(1e-12, 2, aa.SpectralLaw.wishart(0.5), aa.SoftmaxChannel(1.0), "cross_entropy",
                           "nuclear", 0.01, n_mc=5_000, max_iter=50)
    assert r.V == 0.0 and r.q == 0.0  # nothing learnt: S = 0, a locally constant denoiser
    assert np.isfinite(r.train_loss) and np.isfinite(r.test_error)


def test_state_evolution_stopped_by_max_iter_warns_and_flags():
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        r = aa.state_evolution(0.3, 2, aa.SpectralLaw.wishart(0.5), aa.LinearChannel(0.1), "square", "nuclear",
                               0.05, max_iter=2, tol=1e-12)
    assert not r.converged and "max_iter" in r.message
    with warnings.catch_warnings():  # tol = 0 asks for exactly max_iter steps: no warning
        warnings.simplefilter("error", ConvergenceWarning)
        aa.state_evolution(0.3, 2, aa.SpectralLaw.wishart(0.5), aa.LinearChannel(0.1), "square", "nuclear",
                           0.05, max_iter=2, tol=0)


def test_se_failure_inside_the_loop_is_reported_not_raised():
    """A factor that raises inside the loop: fixed damping flags it, 'auto' backtracks first."""
    from amp_attention.losses import SquareLoss

    class Fragile(SquareLoss):
        def se_conjugates(self, sample, m, q, V):
            if q > 0.5:
                raise FloatingPointError("overflow in a factor")
            return super().se_conjugates(sample, m, q, V)

    from amp_attention.denoisers import make_denoiser
    from amp_attention.output_sample import OutputSample
    from amp_attention.se_loop import erm_change, iterate_se

    law = aa.SpectralLaw.wishart(0.5)
    den = make_denoiser("frobenius", 0.01)
    sample = OutputSample(1.0, 2, law.Q, aa.LinearChannel(0.0), n_mc=1000)
    for damping in (0.0, "auto"):
        state, _, out = iterate_se(Fragile(), den, sample,
                                   lambda a, D, A: den.se_overlaps(law, a, D, A), init=(0.0, 0.0, 1.0),
                                   max_iter=50, tol=1e-10, damping=damping, callback=None, change=erm_change)
        assert out["diverged"] and "FloatingPointError" in out["message"]
        # the returned state is the last recorded one, finite
        assert all(np.isfinite(state)) and state[1] == out["history"]["q"][-1]


def test_gamp_is_not_converged_while_its_variance_drifts():
    """The stop rule watches V as well as S (docs/theory.md §5): an input factor whose divergence
    keeps growing moves V by 5% per iteration while S settles at the minimiser (square loss +
    Frobenius: the fixed point in S does not depend on V).  With S's step alone the loop declared
    convergence; it must not, and the unperturbed factor must still converge."""
    from amp_attention.denoisers import make_denoiser

    base = make_denoiser("frobenius", 0.1)

    class DriftingDivergence(type(base)):
        calls = 0

        def factored(self, R, A_hat):
            S, div, F = super().factored(R, A_hat)
            DriftingDivergence.calls += 1
            return S, div * 1.05 ** DriftingDivergence.calls, F

    d = 30
    rng = np.random.default_rng(5)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    data = aa.sample_data(int(0.5 * d * d), 2, teacher, aa.LinearChannel(0.1), rng)
    loss = aa.make_loss("square")
    ok = aa.gamp(data.X, data.y, loss, base, damping=0.0, max_iter=300, tol=1e-8)
    assert ok.converged
    drifting = DriftingDivergence(0.1)
    with pytest.warns(ConvergenceWarning):
        res = aa.gamp(data.X, data.y, loss, drifting, damping=0.0, max_iter=300, tol=1e-8)
    assert not res.converged
    S_step = res.history["step"]
    assert S_step[-1] < 1e-8  # S did settle: the old rule would have stopped here
    V = res.history["V"]
    assert abs(V[-1] / V[-2] - 1.05) < 1e-3


class _JumpySquare:
    """A generic (node-averaged) square-loss output factor whose ``g`` is multiplied by
    ``1 + eps sign(V - V0)``: the SE map jumps across ``V = V0`` and, with ``V0`` the fixed point
    of the smooth map (``eps = 0``), has no fixed point -- the situation of a non-convex loss whose
    prox switches branch on single nodes (docs/theory.md §7.3, resolution stop).  Per node
    ``g = s 2 (z_y - omega) / (1 + 2V)`` (``z_y = whiten(y)``, linear channel) and
    ``Tr(-dg/domega) = s 2K / (1 + 2V)``."""

    def __new__(cls, V0, eps, smooth=False):
        from amp_attention.factors import OutputFactor
        from amp_attention.whitening import whiten

        class Jumpy(OutputFactor):
            smooth_g_out = smooth

            def g_out(self, y, omega, V, p0=None, jacobian="full"):
                V = float(V)
                s = 1.0 + (eps if V > V0 else -eps)
                g = s * 2.0 * (whiten(np.asarray(y)) - omega) / (1.0 + 2.0 * V)
                tr = np.full(omega.shape[0], s * 2.0 * omega.shape[1] / (1.0 + 2.0 * V))
                return g, tr, {"p": omega + V * g}

        return Jumpy()


def _run_jumpy(V0, eps, smooth=False, max_iter=200, **kw):
    from amp_attention.denoisers import make_denoiser
    from amp_attention.output_sample import OutputSample
    from amp_attention.se_loop import erm_change, iterate_se

    law = aa.SpectralLaw.wishart(0.5)
    den = make_denoiser("frobenius", 0.1)
    sample = OutputSample(0.5, 2, law.Q, aa.LinearChannel(0.0), n_mc=8192, method="qmc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        state, _, out = iterate_se(_JumpySquare(V0, eps, smooth), den, sample,
                                   lambda a, D, A: den.se_overlaps(law, a, D, A), init=None, max_iter=max_iter,
                                   callback=None, change=erm_change, **{"damping": "auto", "tol": 1e-10, **kw})
    return state, out, sample


def test_se_map_with_a_small_jump_stops_at_the_resolution_of_its_rule():
    """A jump of relative size 1e-6 at the smooth map's fixed point: tol = 1e-10 cannot be reached
    (the map has no fixed point), and the loop stops, converged, by the resolution rule -- within
    the jump of that fixed point; the stopping criterion recomputed here from the rule's replicates.
    A jump larger than the rule's error (eps = 1e-2) is not taken for a resolution limit, nor is any
    jump of a factor that declares ``g`` Lipschitz (``smooth_g_out``): both run to max_iter."""
    from amp_attention.se_loop import RESOLUTION_FRACTION, RESOLUTION_WINDOW

    smooth_state, smooth_out, _ = _run_jumpy(V0=np.inf, eps=0.0)
    assert smooth_out["converged"] and "resolution" not in smooth_out["message"]
    m0, q0, V0 = smooth_state
    eps = 1e-6
    (m, q, V), out, sample = _run_jumpy(V0, eps)
    assert out["converged"] and not out["diverged"], out["message"]
    assert "resolution of the integration rule" in out["message"]
    assert out["n_iter"] < 200
    # it circles the jump: within a few jump sizes of the smooth fixed point
    assert abs(V - V0) <= 10 * eps * V0 and abs(m - m0) <= 1e-5 and abs(q - q0) <= 1e-5
    # the tol criterion was never met: the last changes are of the jump's size, not below 1e-10
    changes = np.abs(np.diff(out["history"]["V"][-RESOLUTION_WINDOW - 1:])) / max(1.0, V)
    assert changes.max() > 1e-10
    # the criterion, from the replicate conjugates of the last evaluation (through the public input side)
    law = aa.SpectralLaw.wishart(0.5)
    den = aa.make_denoiser("frobenius", 0.1)
    view = sample.view(_JumpySquare(V0, eps))
    reps = sample.alpha * view.rule.replicate_means(view.last_values)
    outs = np.array([den.se_overlaps(law, c[1] / c[0], c[2] / (2 * c[0] ** 2), c[0]) for c in reps])
    step_error = np.max(outs.std(axis=0, ddof=1) / np.sqrt(len(reps))) / max(1.0, abs(m), abs(q), abs(V))
    assert changes.max() <= RESOLUTION_FRACTION * step_error * 1.01
    # a jump above the rule's resolution, or a factor that says g is Lipschitz: no such stop
    # tol = 0 asks for every step (GAMP's replay): no early stop
    _, out, _ = _run_jumpy(V0, eps, max_iter=40, tol=0.0)
    assert not out["converged"] and out["n_iter"] == 40
    # a slow but steady approach (heavy fixed damping, plain steps) is no stall: it reaches tol
    _, out, _ = _run_jumpy(V0=np.inf, eps=0.0, max_iter=400, damping=0.9, acceleration=None)
    assert out["converged"] and "resolution" not in out["message"] and out["n_iter"] > 2 * RESOLUTION_WINDOW
    # (its V0: that factor's own smooth fixed point, its estimators being those of a Lipschitz g)
    V0_smooth = _run_jumpy(V0=np.inf, eps=0.0, smooth=True)[0][2]
    for V_jump, kw in ((V0, {"eps": 1e-2}), (V0_smooth, {"eps": eps, "smooth": True})):
        _, out, _ = _run_jumpy(V_jump, max_iter=60, **kw)
        assert not out["converged"] and out["n_iter"] == 60, (kw, out["message"])


def test_long_se_cycle_of_runaway_and_collapse_is_damped_to_the_fixed_point(monkeypatch):
    """Softmax-square + nuclear at alpha = 0.02, lam = 1e-5 (noisy softmax, T = 2; the lower end of
    the thresholds' bracket): undamped, q and V run away 10x per step, S then collapses to 0, and the
    12-step cycle repeats exactly -- the adaptive vote, which compares consecutive updates, halves
    the step size and lets it grow back every round.  The SE sees the repeated state and lowers the
    step size's ceiling (docs/theory.md §7.3); it then converges to the fixed point that an
    independent path, fixed damping 0.5, reaches.  With that rule disabled it does not converge."""
    from amp_attention.loop import Loop

    kw = dict(alpha=0.02, T=2, teacher=aa.SpectralLaw.wishart(0.5), channel=aa.SoftmaxChannel(1.0, 0.25),
              loss="softmax_square", reg="nuclear", lam=1e-5, n_mc=65536, tol=1e-10, predictions=False)
    auto = aa.state_evolution(**kw, max_iter=300)
    fixed = aa.state_evolution(**kw, max_iter=300, damping=0.5)
    assert auto.converged and fixed.converged, (auto.message, fixed.message)
    assert max(auto.history["damping"]) > 0 and auto.n_iter < 150
    for k in ("m", "q", "V"):
        assert getattr(auto, k) == pytest.approx(getattr(fixed, k), rel=1e-6), k
    monkeypatch.setattr(Loop, "damp_harder", lambda self: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cycling = aa.state_evolution(**kw, max_iter=150)
    assert not cycling.converged
