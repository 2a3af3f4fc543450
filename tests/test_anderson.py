"""Anderson mixing (``amp_attention.anderson``) (issue 11).

On a linear contraction Anderson reaches ``numpy.linalg.solve``'s answer in far fewer steps than
the plain iteration; on the logistic map, whose plain iteration is a 2-cycle, it converges with
damping; candidates outside the domain are rejected, accelerated steps that do not lower the
residual are undone, collinear differences are never used together.
"""

from __future__ import annotations

import numpy as np
import pytest

from amp_attention.anderson import Anderson


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


@pytest.mark.parametrize("kw, name", [(dict(memory=0), "memory"), (dict(memory=2.5), "memory"),
                                      (dict(rcond=0.0), "rcond"), (dict(rcond=1.0), "rcond"),
                                      (dict(growth=1.0), "growth"), (dict(growth=np.inf), "growth")])
def test_anderson_arguments_are_checked(kw, name):
    with pytest.raises(ValueError, match=name):
        Anderson(**kw)
