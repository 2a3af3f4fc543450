"""The loop scaffold shared by GAMP and the state evolutions (amp_attention.loop)."""

from __future__ import annotations

import numpy as np
import pytest

from amp_attention.loop import Loop


def _run(loop, f, x0):
    x = x0
    for t in loop:
        new = loop.mix(f(x), x)
        if not np.isfinite(new):
            loop.diverge(f"iteration {t}: non-finite")
            break
        change = abs(new - x)
        x = new
        loop.record(x=x)
        if loop.finished(change, callback_args=(t, loop.history)):
            break
    return x, loop.outcome()


def test_contraction_converges_to_the_fixed_point_with_and_without_damping():
    for damping in (0.0, 0.5, 0.9):
        x, out = _run(Loop(["x"], max_iter=10_000, tol=1e-13, damping=damping), lambda x: 0.5 * x + 1, 0.0)
        assert out["converged"] and not out["diverged"]
        assert x == pytest.approx(2.0, abs=1e-11)  # damping never moves the fixed point
        assert out["n_iter"] == len(out["history"]["x"])


def test_damping_is_the_convex_mixture():
    loop = Loop(["x"], max_iter=1, tol=0, damping=0.25)
    assert loop.mix(1.0, 0.0) == 0.75
    np.testing.assert_array_equal(loop.mix(np.ones(3), np.zeros(3)), np.full(3, 0.75))


def test_tol_zero_runs_max_iter_and_callback_stops():
    x, out = _run(Loop(["x"], max_iter=7, tol=0.0), lambda x: x, 1.0)
    assert out["n_iter"] == 7 and not out["converged"] and "max_iter" in out["message"]
    loop = Loop(["x"], max_iter=50, tol=0.0, callback=lambda t, h: t == 3)
    _, out = _run(loop, lambda x: x + 1, 0.0)
    assert out["n_iter"] == 4 and "callback" in out["message"]


def test_divergence_is_flagged_and_the_last_finite_state_kept():
    x, out = _run(Loop(["x"], max_iter=5000, tol=1e-10), lambda x: x * 1e30, 1.0)
    assert out["diverged"] and not out["converged"]
    assert np.isfinite(x) and np.all(np.isfinite(out["history"]["x"]))


@pytest.mark.parametrize("kw, name", [
    ({"max_iter": 0}, "max_iter"), ({"max_iter": 2.5}, "max_iter"), ({"max_iter": True}, "max_iter"),
    ({"tol": -1.0}, "tol"), ({"tol": float("nan")}, "tol"), ({"damping": 1.0}, "damping"),
    ({"damping": -0.1}, "damping"), ({"callback": 3}, "callback"),
])
def test_arguments_are_validated_by_name(kw, name):
    args = {"max_iter": 5, "tol": 1e-8} | kw
    with pytest.raises(ValueError, match=name):
        Loop(["x"], **args)


def _feed(updates, scale=1.0):
    """Drive an 'auto' loop with prescribed raw updates of a 1-component state; return the
    step sizes theta after each update."""
    loop = Loop(["x"], max_iter=len(updates) + 1, tol=0, damping="auto")
    thetas = []
    for t, u in zip(loop, updates):
        loop.update((np.array([scale + u]),), (np.array([scale]),))
        thetas.append(loop.theta)
    return thetas


def test_adaptive_rule_ignores_an_isolated_jump_and_halves_on_a_persistent_cycle():
    # a contracting sequence with one isolated reversal (a rank change of a nuclear prox, say):
    # the window vote keeps theta at 1 (the step-by-step rule halved it at once)
    updates = [0.5 ** k for k in range(5)] + [-0.07] + [0.02 * 0.5 ** k for k in range(8)]
    assert min(_feed(updates)) == 1.0
    # a period-2 cycle: every step is bad; theta halves after a full window of 6 votes, and again
    # after the next full window
    thetas = _feed([(-1.0) ** k for k in range(14)], scale=100.0)
    assert thetas[5] == 1.0 and thetas[6] == 0.5  # votes start at the 2nd update; 6 bad -> halve
    assert thetas[12] == 0.25


def test_adaptive_rule_scales_each_component_separately():
    # the raw update of a large scalar component (GAMP's V ~ 1e3) must not drown the other one:
    # a cycle in the first component is detected although V moves more in absolute terms
    loop = Loop(["x"], max_iter=20, tol=0, damping="auto")
    thetas = []
    for t in loop:
        x_old, x_new = np.full(4, 1.0), np.full(4, 1.0 + 0.1 * (-1.0) ** t)   # a 2-cycle, 10%
        v_old, v_new = 1000.0, 1000.0 + 1.0 + 0.01 * t                        # steady drift, 0.1%
        loop.update((x_new, v_new), (x_old, v_old))
        thetas.append(loop.theta)
    assert thetas[-1] < 1.0


def test_damp_harder_lowers_the_ceiling_of_the_step_size_for_the_rest_of_the_run():
    """After ``damp_harder`` the step size is halved and never grows back above the new ceiling,
    however well the iteration contracts; each call halves the ceiling again, down to the floor;
    with a fixed damping it does nothing."""
    from amp_attention.loop import THETA_MIN

    loop = Loop(["x"], max_iter=200, tol=0, damping="auto")
    thetas = []
    for t in loop:
        if t in (5, 60):
            assert loop.damp_harder()
        loop.update((1.0 + 0.5 ** t,), (1.0 + 0.5 ** (t - 1),))   # a contracting sequence: good steps
        thetas.append(loop.theta)
    assert thetas[4] == 1.0 and thetas[5] == 0.5 and max(thetas[5:60]) == 0.5
    assert thetas[60] == 0.25 and max(thetas[60:]) == 0.25
    while loop.damp_harder():
        pass
    assert loop.theta_max == THETA_MIN and loop.theta == THETA_MIN
    fixed = Loop(["x"], max_iter=2, tol=0, damping=0.3)
    assert not fixed.damp_harder() and fixed.current_damping() == 0.3
