"""Anderson mixing (``amp_attention.anderson``) and the accelerated state evolution (issue 11).

* unit: on a linear contraction Anderson reaches ``numpy.linalg.solve``'s answer in far fewer steps
  than the plain iteration; on the logistic map, whose plain iteration is a 2-cycle, it converges
  with damping; candidates outside the domain are rejected, accelerated steps that make the
  residual grow are undone, collinear differences are never used together;
* SE: the accelerated fixed point equals the plain one (and independent references: the closed
  form of square + Frobenius, the scalar Bayes fixed-point equation solved by ``brentq``), it is
  reached in clearly fewer steps where the plain SE is slow (and not in more where the plain
  SE climbs over a hump of its residual), and the issue's hard cases still return without raising;
  a failed evaluation at an accelerated state falls back to the plain step;
* a damping schedule takes plain steps, bit for bit.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import brentq

import amp_attention as aa
from amp_attention.anderson import Anderson
from amp_attention.spectral import rie_mmse
from amp_attention.whitening import n_pairs

LAW = aa.SpectralLaw.wishart(0.5)


def _iterate(G, x0, acc=None, theta=1.0, tol=1e-12, max_iter=20_000, accept=None):
    """Plain (``acc=None``) or accelerated iteration of ``G`` from ``x0``; ``(x, steps, used)``
    with ``steps`` the number of evaluations of ``G`` until ``||G(x) - x|| < tol max(1, ||x||)``."""
    x, used = np.atleast_1d(np.asarray(x0, dtype=float)), []
    for k in range(max_iter):
        gx = G(x)
        if np.linalg.norm(gx - x) < tol * max(1.0, np.linalg.norm(x)):
            return x, k + 1, used
        candidate, n = (None, 0) if acc is None else acc.propose(x, gx, theta, accept)
        used.append(n)
        x = x + theta * (gx - x) if candidate is None else candidate
    return x, max_iter, used


# --------------------------------------------------------------------------------------------
# unit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, memory", [(3, 5), (8, 5)])
def test_linear_contraction_reaches_the_solution_in_few_steps(n, memory):
    rng = np.random.default_rng(n)
    P = np.eye(n) + 0.3 * rng.standard_normal((n, n))            # a non-orthogonal eigenbasis
    eig = np.concatenate([[0.995, -0.95], rng.uniform(-0.9, 0.9, n - 2)])  # a slow and an oscillating mode
    A = P @ np.diag(eig) @ np.linalg.inv(P)
    b = 10 * rng.standard_normal(n)
    ref = np.linalg.solve(np.eye(n) - A, b)
    G = lambda x: A @ x + b  # noqa: E731
    x_plain, k_plain, _ = _iterate(G, np.zeros(n))
    x_acc, k_acc, used = _iterate(G, np.zeros(n), Anderson(memory))
    assert 2000 < k_plain < 20_000  # the slow mode: 0.995^k
    assert k_acc <= 100 and k_acc * 50 < k_plain, (k_acc, k_plain)
    for x in (x_acc, x_plain):
        np.testing.assert_allclose(x, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    assert max(used) <= min(memory, n)


def test_logistic_two_cycle_converges_with_damping():
    """x -> 3.2 x (1 - x): the fixed point 1 - 1/3.2 has slope -1.2, the plain iteration settles on a
    2-cycle; damped Anderson converges to the fixed point (its first secant step overshoots out of
    [0, 1], where the map diverges, and is undone)."""
    r = 3.2
    G = lambda x: r * x * (1 - x)  # noqa: E731
    x, k, _ = _iterate(G, 0.3, max_iter=2000)
    assert k == 2000  # no convergence: a 2-cycle
    x1 = G(x)
    assert abs(x1 - x) > 0.1 and abs(G(x1) - x) < 1e-10
    x, k, used = _iterate(G, 0.3, Anderson(), theta=0.5)
    assert k < 20 and abs(x[0] - (1 - 1 / r)) < 1e-12, (k, x)
    assert max(used) >= 1


def test_out_of_domain_candidate_falls_back_and_growing_residual_is_undone():
    r, theta = 3.2, 0.5
    G = lambda x: r * x * (1 - x)  # noqa: E731
    x0 = np.array([0.3])
    x1 = x0 + theta * (G(x0) - x0)

    acc = Anderson()
    assert acc.propose(x0, G(x0), theta) == (None, 0)          # no memory yet: plain step
    candidate, used = acc.propose(x1, G(x1), theta)
    assert used == 1 and candidate[0] > 1                        # the secant overshoots out of [0, 1]
    # at the overshoot the residual grew: the step is undone, the plain step from x1 proposed
    back, used = acc.propose(candidate, G(candidate), theta)
    assert acc.retreated and used == 0
    np.testing.assert_allclose(back, x1 + theta * (G(x1) - x1), rtol=1e-15)
    assert acc.propose(back, G(back), theta) == (None, 0) and not acc.retreated  # one plain step after it

    acc = Anderson()
    in_unit = lambda c: bool(np.all((c >= 0) & (c <= 1)))  # noqa: E731
    acc.propose(x0, G(x0), theta, accept=in_unit)
    assert acc.propose(x1, G(x1), theta, accept=in_unit) == (None, 0)  # rejected: plain step
    assert not acc.retreated


def test_collinear_differences_are_used_one_at_a_time():
    """Iterates on a line (as the Bayes SE's (q, q, Q - q)): at most one difference is independent,
    the others are dropped as ill-conditioned; Anderson is then the secant method."""
    p, u = np.array([0.2, 0.2, 1.3]), np.array([1.0, 1.0, -1.0])

    def G(x):
        e = (x - p) @ u / 3 - 0.5  # the coordinate along the line, from its fixed point 0.5
        return p + (0.5 + 0.98 * e + 0.3 * e * e) * u

    x, k, used = _iterate(G, p, Anderson())
    _, k_plain, _ = _iterate(G, p)
    assert max(used) == 1 and 5 <= k <= 15 and k_plain > 500, (used, k, k_plain)
    np.testing.assert_allclose(x, p + 0.5 * u, rtol=1e-12)


def test_preconditioned_first_step_is_the_chord_step_and_exact_on_a_linear_map():
    """With ``M = (I - A)^{-1}`` the very first proposal on ``G(x) = A x + b`` (no memory) is the fixed
    point (``numpy.linalg.solve``); with a perturbed ``M`` (a nearby map's Jacobian) the
    preconditioned iteration converges to the same point in a handful of steps, far fewer than the
    plain one."""
    rng = np.random.default_rng(3)
    n = 3
    P = np.eye(n) + 0.3 * rng.standard_normal((n, n))
    A = P @ np.diag([0.99, -0.9, 0.5]) @ np.linalg.inv(P)
    b = rng.standard_normal(n)
    ref = np.linalg.solve(np.eye(n) - A, b)
    G = lambda x: A @ x + b  # noqa: E731
    x0 = np.zeros(n)
    exact = Anderson(preconditioner=np.linalg.inv(np.eye(n) - A))
    candidate, used = exact.propose(x0, G(x0))
    assert used == 0
    np.testing.assert_allclose(candidate, ref, rtol=1e-12, atol=1e-12)
    A_near = A + 1e-3 * rng.standard_normal((n, n))   # the Jacobian of a nearby (coarse) map
    x, k, _ = _iterate(G, x0, Anderson(preconditioner=np.linalg.inv(np.eye(n) - A_near)))
    _, k_plain, _ = _iterate(G, x0)
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    assert k <= 5 and k_plain > 1000, (k, k_plain)


def test_preconditioned_step_that_does_not_help_is_undone():
    """A wrong preconditioner (here: a chord step that overshoots) is caught by the residual test as
    any accelerated step: undone, and the plain step from the previous iterate proposed."""
    G = lambda x: 0.5 * x + 1.0  # noqa: E731  (fixed point 2)
    acc = Anderson(preconditioner=np.array([[10.0]]))
    x0 = np.array([0.0])
    candidate, _ = acc.propose(x0, G(x0), 1.0)
    assert candidate[0] == pytest.approx(10.0)                      # x0 + 10 (G(x0) - x0)
    back, used = acc.propose(candidate, G(candidate), 1.0)
    assert acc.retreated and used == 0 and back[0] == pytest.approx(1.0)  # the plain step from x0
    assert acc.preconditioner is None                                     # ... and M is dropped
    assert acc.propose(back, G(back), 1.0) == (None, 0)                   # (a plain step after a retreat)
    candidate, used = acc.propose(back + 0.5, G(back + 0.5), 1.0)        # then plain Anderson: a secant
    assert used == 1 and candidate[0] == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [np.ones((2, 3)), np.array([[np.nan]]), np.ones(3)])
def test_preconditioner_is_checked(bad):
    with pytest.raises(ValueError, match="preconditioner"):
        Anderson(preconditioner=bad)
    with pytest.raises(ValueError, match="preconditioner"):
        Anderson(preconditioner=np.eye(2)).propose(np.zeros(3), np.ones(3))


@pytest.mark.parametrize("kw, name", [(dict(memory=0), "memory"), (dict(memory=2.5), "memory"),
                                      (dict(rcond=0.0), "rcond"), (dict(rcond=1.0), "rcond"),
                                      (dict(growth=1.0), "growth"), (dict(growth=np.inf), "growth")])
def test_anderson_arguments_are_checked(kw, name):
    with pytest.raises(ValueError, match=name):
        Anderson(**kw)


def test_se_acceleration_argument_is_checked():
    for bad in ("Anderson", "None", True, 1):
        with pytest.raises(ValueError, match="acceleration"):
            aa.state_evolution(0.3, 2, LAW, aa.LinearChannel(0.1), "square", "frobenius", 0.1, acceleration=bad)
        with pytest.raises(ValueError, match="acceleration"):
            aa.bayes_state_evolution(0.3, 2, LAW, aa.SoftmaxChannel(1.0), acceleration=bad)
    # 'none' (the CLI's and the sweep's spelling) is None: the same plain steps
    args = (0.3, 2, LAW, aa.LinearChannel(0.1), "square", "frobenius", 0.1)
    spelled, plain = (aa.state_evolution(*args, acceleration=a) for a in ("none", None))
    assert spelled.params["acceleration"] is None and spelled.n_iter == plain.n_iter and spelled.m == plain.m


# --------------------------------------------------------------------------------------------
# the state evolution
# --------------------------------------------------------------------------------------------


def _both(run):
    return run(None), run("anderson")


@pytest.mark.parametrize("alpha, lam, ratio", [(0.5, 0.05, 0.6), (0.2, 0.01, 0.6), (0.5, 1e-4, 0.85)])
def test_se_fixed_point_unchanged_cross_entropy_nuclear(alpha, lam, ratio):
    """Same fixed point, fewer steps.  At lam = 1e-4 the adaptive damping must learn only from states
    linked by a plain step (else it damps the accelerated iteration: 61 of the plain 70 steps, with
    the step-by-step damping rule; with the windowed vote: 48 of 58)."""
    plain, acc = _both(lambda a: aa.state_evolution(
        alpha, 2, LAW, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", lam, n_mc=20_000, tol=1e-10,
        max_iter=2000, predictions=False, acceleration=a))
    assert plain.converged and acc.converged
    assert np.all(plain.history["anderson"] == 0) and np.max(acc.history["anderson"]) >= 1
    for k in "mqV":
        assert abs(getattr(acc, k) - getattr(plain, k)) <= 1e-7 * abs(getattr(plain, k)), k
    assert acc.n_iter <= ratio * plain.n_iter, (acc.n_iter, plain.n_iter)


@pytest.mark.parametrize("lam", [1e-4, 1e-5])
def test_se_small_alpha_small_lam_is_not_slower(lam):
    """alpha = 0.05: the plain SE's residual is not monotone on the way (V grows to ~20); accelerating
    only after a plain step that lowered the residual keeps Anderson from walking back (without
    that rule it took 1.6-2x the plain steps here)."""
    plain, acc = _both(lambda a: aa.state_evolution(
        0.05, 2, LAW, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", lam, n_mc=20_000, tol=1e-10,
        max_iter=1000, predictions=False, acceleration=a))
    assert plain.converged and acc.converged
    for k in "mqV":
        assert abs(getattr(acc, k) - getattr(plain, k)) <= 1e-7 * abs(getattr(plain, k)), k
    assert acc.n_iter < plain.n_iter, (acc.n_iter, plain.n_iter)


def _square_frobenius_fixed_point(alpha, T, lam, s2):
    """Linear channel (noise s2), square loss, Frobenius: a = 1, Delta = (mse + s2)/(2 alpha K),
    c = A_hat/(A_hat + lam), V = 1/(2 (A_hat + lam)) with A_hat = 2 alpha K/(1 + 2V) (a quadratic in V),
    m = c Q*, mse (1 - c^2/(2 alpha K)) = Q* (1 - c)^2 + c^2 s2/(2 alpha K)."""
    K, Q = n_pairs(T), LAW.Q
    b = 4 * alpha * K + 2 * lam - 2
    V = (-b + np.sqrt(b * b + 16 * lam)) / (8 * lam)
    A = 2 * alpha * K / (1 + 2 * V)
    c = A / (A + lam)
    mse = (Q * (1 - c) ** 2 + c * c * s2 / (2 * alpha * K)) / (1 - c * c / (2 * alpha * K))
    m = c * Q
    return {"m": m, "q": mse - Q + 2 * m, "V": V}


def test_se_fixed_point_unchanged_square_frobenius_closed_form():
    s2, alpha, lam, T = 0.1, 0.3, 0.1, 2
    ref = _square_frobenius_fixed_point(alpha, T, lam, s2)
    for res in _both(lambda a: aa.state_evolution(alpha, T, LAW, aa.LinearChannel(s2), "square", "frobenius",
                                                  lam, tol=1e-12, max_iter=5000, acceleration=a)):
        assert res.converged
        for k, v in ref.items():
            assert abs(getattr(res, k) - v) <= 1e-9 * abs(v), (k, getattr(res, k), v)


@pytest.mark.parametrize("alpha", [0.357, 0.45, 0.49])
def test_se_near_the_ridgeless_interpolation_peak(alpha):
    """T = 1, lam = 1e-6, below alpha = 1/(2K) = 0.5: the plain SE climbs slowly (V ~ 1e4-1e5) over a
    hump of its residual, where minimising the residual would walk back along the path (an early
    version of the safeguards cycled or drifted here); the accelerated SE reaches the closed form."""
    ref = _square_frobenius_fixed_point(alpha, 1, 1e-6, 0.5)
    plain, acc = _both(lambda a: aa.state_evolution(alpha, 1, LAW, aa.LinearChannel(0.5), "square", "frobenius",
                                                    1e-6, tol=1e-12, max_iter=3000, predictions=False, acceleration=a))
    assert plain.converged and acc.converged
    for k, v in ref.items():
        assert abs(getattr(acc, k) - v) <= 1e-9 * abs(v), (k, getattr(acc, k), v)
        assert abs(getattr(plain, k) - v) <= 1e-6 * abs(v), (k, getattr(plain, k), v)  # (stop rule relative to V)
    assert acc.n_iter <= 0.6 * plain.n_iter, (acc.n_iter, plain.n_iter)


@pytest.mark.parametrize("factor", [0.9, 0.97])
def test_bayes_se_fixed_point_unchanged_and_much_faster_near_the_threshold(factor):
    """Below the perfect-recovery threshold alpha_c the plain Bayes SE contracts ever more slowly;
    the fixed point solves mse = mmse_den(mse / (2 alpha (K - 1))) (found here by brentq)."""
    T = 2
    alpha = factor * aa.perfect_recovery_threshold(0.5, T)
    ref = brentq(lambda e: rie_mmse(LAW, e / (2 * alpha * (n_pairs(T) - 1))) - e, 1e-6, 0.99, xtol=1e-15)
    plain, acc = _both(lambda a: aa.bayes_state_evolution(alpha, T, LAW, aa.SoftmaxChannel(1.0), tol=1e-12,
                                                          max_iter=5000, acceleration=a))
    assert plain.converged and acc.converged and not acc.perfect_recovery
    for res in (plain, acc):
        assert abs(res.mse - ref) <= 1e-7 * ref, (res.mse, ref)
    assert abs(acc.mse - plain.mse) <= 1e-7 * plain.mse
    assert plain.n_iter > 200 and acc.n_iter <= 0.1 * plain.n_iter, (acc.n_iter, plain.n_iter)


def test_bayes_se_reaches_perfect_recovery_faster_above_the_threshold():
    alpha = 1.03 * aa.perfect_recovery_threshold(0.5, 2)
    plain, acc = _both(lambda a: aa.bayes_state_evolution(alpha, 2, LAW, aa.SoftmaxChannel(1.0), max_iter=5000,
                                                          acceleration=a))
    assert plain.perfect_recovery and acc.perfect_recovery
    assert acc.n_iter <= 0.1 * plain.n_iter, (acc.n_iter, plain.n_iter)


@pytest.mark.parametrize("alpha, lam", [(0.05, 1e-5), (1e4, 1e-5), (1e4, 0.01)])
def test_issue_hard_cases_still_return_without_raising(alpha, lam):
    """The issue's cold starts (cross-entropy + nuclear, Wishart rho = 0.5, n_mc = 5e4, seed 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = aa.state_evolution(alpha, 2, LAW, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", lam,
                                 n_mc=50_000, seed=1, max_iter=400)
    assert res.converged or (res.diverged and res.message), res.message
    assert res.converged, res.message  # and here it does converge
    assert all(np.isfinite(v) for v in (res.m, res.q, res.V, res.test_error, res.train_loss))
    assert res.m * res.m <= res.q * res.Q * (1 + 1e-9)


def test_failed_evaluation_at_an_accelerated_state_falls_back_to_the_plain_step():
    """A factor that fails beyond the fixed point V* = 0.5, reached from below by the plain iteration
    (V - V* -> 0.9 e - 0.5 e^2, monotone); the secant steps overshoot into the failing region.  Even
    with a fixed damping (no backtracking) the loop retries the plain step and converges."""
    from amp_attention.se_loop import erm_change, iterate_se

    class Edge:
        state = None

        def se_conjugates(self, sample, m, q, V):
            if V > 0.5:
                raise FloatingPointError("V beyond the factor's range")
            self.state = (m, q, V)
            return 1.0, 1.0, 1.0, {"A_hat": 0.0, "m_hat": 0.0, "q_hat": 0.0}

    for acceleration in (None, "anderson"):
        out = Edge()

        def overlaps(a, Delta, A_hat):
            e = out.state[2] - 0.5
            return 0.5, 1.0, 0.5 + 0.9 * e - 0.5 * e * e

        state, _, res = iterate_se(out, None, SimpleNamespace(Q=LAW.Q), overlaps, init=(0.5, 1.0, 0.4), max_iter=1000,
                                   tol=1e-12, damping=0.0, callback=None, change=erm_change,
                                   acceleration=acceleration)
        assert res["converged"] and not res["diverged"], res["message"]
        assert abs(state[2] - 0.5) < 1e-10 and state[:2] == (0.5, 1.0)
        assert np.any(res["history"]["V"] > 0.5) == (acceleration is not None)  # the overshoots were tried


def test_damping_schedule_takes_plain_steps():
    """A schedule replays another run step by step: the default acceleration does not apply."""
    schedule = (0.0, 0.5, 0.25, 0.0, 0.0, 0.1, 0.0, 0.0)
    kw = dict(max_iter=len(schedule), tol=0.0, damping=schedule)
    a, b = (aa.state_evolution(0.3, 2, LAW, aa.LinearChannel(0.1), "square", "frobenius", 0.1, acceleration=acc,
                               **kw) for acc in ("anderson", None))
    for k in ("m", "q", "V", "damping"):
        np.testing.assert_array_equal(a.history[k], b.history[k])
    assert np.all(a.history["anderson"] == 0) and a.params["acceleration"] is None
    c = aa.bayes_state_evolution(0.3, 2, LAW, aa.SoftmaxChannel(1.0), **kw)
    d = aa.bayes_state_evolution(0.3, 2, LAW, aa.SoftmaxChannel(1.0), acceleration=None, **kw)
    np.testing.assert_array_equal(c.history["mse"], d.history["mse"])
    assert np.all(c.history["anderson"] == 0)
