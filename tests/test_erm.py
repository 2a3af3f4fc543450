"""docs/theory.md §4 (and the reference side of check 8.3): the direct ERM minimiser.

The checks are independent of the AMP code: a closed-form ridge solution from materialised sensing
matrices, two unrelated nuclear solvers (L-BFGS on W with S = W W^T vs FISTA on S), finite
differences, and the KKT conditions of the nuclear problem.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amp_attention as aa
from amp_attention import erm
from amp_attention.erm import direct_erm, erm_gradient, erm_objective, kkt_residual
from naive import naive_cross_entropy, naive_whiten, sensing_tensor, sym_basis


def random_symmetric(d, rng):
    A = rng.standard_normal((d, d))
    return (A + A.T) / 2


def make_data(d, T, alpha, channel, seed, rho=0.5):
    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, rho, rng)
    n = max(1, int(round(alpha * d * d)))
    return aa.sample_data(n, T, teacher, channel, rng)


def rel(A, B):
    return np.linalg.norm(A - B) / np.linalg.norm(B)


# --------------------------------------------------------------------------------------------
# (1) square + frobenius == closed-form ridge on materialised sensing matrices
# --------------------------------------------------------------------------------------------




def ridge_closed_form(X, y, lam):
    """argmin_S 1/2 sum ||y - h||_F^2 + lam d/2 ||S||_F^2 via whitened normal equations."""
    d = X.shape[2]
    E = sym_basis(d)
    # rows (mu, k): the sensing matrices A_{mu,k} in orthonormal coordinates of Sym_d
    D = np.einsum("nkij,mij->nkm", sensing_tensor(X), E).reshape(-1, E.shape[0])
    z = naive_whiten(y).reshape(-1)
    # 1/2 ||y - h||_F^2 = ||z - D v||^2 (+ const for non-symmetric y), ||S||_F = ||v||
    v = np.linalg.solve(2.0 * D.T @ D + lam * d * np.eye(D.shape[1]), 2.0 * D.T @ z)
    return np.einsum("k,kij->ij", v, E)


@settings(max_examples=6)
@given(
    st.integers(8, 12),
    st.integers(1, 3),
    st.integers(3, 40),
    st.sampled_from([1e-3, 0.05, 1.0]),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_square_frobenius_equals_closed_form_ridge(d, T, n, lam, symmetric_y, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    y = rng.standard_normal((n, T, T))
    if symmetric_y:
        y = (y + np.swapaxes(y, 1, 2)) / 2
    S_ref = ridge_closed_form(X, y, lam)
    for method in ("lbfgs", "prox"):
        res = direct_erm(X, y, "square", "frobenius", lam, method=method)
        assert res.converged, (method, res.message)
        assert rel(res.S, S_ref) < 1e-6, method
        np.testing.assert_array_equal(res.S, res.S.T)
        obj_ref = erm_objective(X, y, S_ref, "square", "frobenius", lam)
        assert abs(res.objective - obj_ref) <= 1e-10 * abs(obj_ref)


# --------------------------------------------------------------------------------------------
# (2) two independent nuclear solvers agree
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize(
    "loss, channel", [("cross_entropy", aa.SoftmaxChannel(1.0)), ("square", aa.LinearChannel(0.1))]
)
def test_nuclear_lbfgs_on_W_equals_prox_on_S(loss, channel, T):
    data = make_data(24, T, 0.5, channel, seed=10 + T)
    lam = 0.05
    a = direct_erm(data.X, data.y, loss, "nuclear", lam, method="lbfgs", random_state=0)
    b = direct_erm(data.X, data.y, loss, "nuclear", lam, method="prox")
    assert a.converged and b.converged
    assert rel(a.S, b.S) < 1e-5
    assert abs(a.objective - b.objective) <= 1e-8 * abs(b.objective)
    # the nuclear penalty makes the estimate low rank (sparse spectrum), and both see the same rank
    ev_a, ev_b = np.linalg.eigvalsh(a.S), np.linalg.eigvalsh(b.S)
    assert ev_b.min() >= -1e-12 * ev_b.max()
    assert np.sum(ev_b > 1e-6 * ev_b.max()) < 24
    np.testing.assert_allclose(ev_a, ev_b, atol=1e-5 * ev_b.max())


def test_frobenius_lbfgs_equals_prox_cross_entropy():
    data = make_data(16, 3, 0.5, aa.SoftmaxChannel(2.0), seed=3)
    a = direct_erm(data.X, data.y, "cross_entropy", "frobenius", 0.02)
    b = direct_erm(data.X, data.y, "cross_entropy", "frobenius", 0.02, method="prox")
    assert a.converged and b.converged
    assert rel(a.S, b.S) < 1e-6
    assert abs(a.objective - b.objective) <= 1e-10 * abs(b.objective)


def test_hardmax_targets_large_beta():
    data = make_data(12, 2, 0.6, aa.HardmaxChannel(), seed=4)
    a = direct_erm(data.X, data.y, "cross_entropy", "nuclear", 0.1, beta=20.0, random_state=1)
    b = direct_erm(data.X, data.y, "cross_entropy", "nuclear", 0.1, beta=20.0, method="prox")
    assert a.converged and b.converged
    assert np.isfinite(a.objective)
    assert rel(a.S, b.S) < 1e-5


# --------------------------------------------------------------------------------------------
# (3) losses and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.3, 1.0, 7.0, 1e4])
def test_cross_entropy_value_matches_formula_and_is_shift_invariant(beta, rng):
    n, T = 20, 3
    H = rng.standard_normal((n, T, T))
    y = aa.model.row_softmax(rng.standard_normal((n, T, T)), 1.5)
    val, G = erm._loss_and_grad_h(y, H, "cross_entropy", beta)
    ref = naive_cross_entropy(y, H, beta)
    assert np.isfinite(val) and np.all(np.isfinite(G))
    assert abs(val - ref) <= 1e-12 * max(1.0, abs(ref))
    # flat along h -> h + c 11^T (per sample): gradient rows sum to zero, value unchanged
    np.testing.assert_allclose(G.sum(axis=-1), 0.0, atol=1e-12 * beta)
    shifted = erm._loss_and_grad_h(y, H + 3.7, "cross_entropy", beta)[0]
    assert abs(shifted - val) <= 1e-10 * max(1.0, abs(val))


@pytest.mark.parametrize("loss", ["square", "cross_entropy", "softmax_square"])
@pytest.mark.parametrize("reg", ["nuclear", "frobenius"])
def test_objective_gradient_matches_finite_differences(loss, reg, rng):
    d, T, n = 7, 3, 30
    X = rng.standard_normal((n, T, d))
    if loss == "square":
        y = rng.standard_normal((n, T, T))
    else:
        y = aa.model.row_softmax(rng.standard_normal((n, T, T)), 1.0)
    W = rng.standard_normal((d, d)) / d
    S = W @ W.T + 0.1 * np.eye(d)  # PSD interior, so the nuclear objective is smooth here
    lam, beta = 0.03, 1.3
    G = erm_gradient(X, y, S, loss, reg, lam, beta)
    np.testing.assert_array_equal(G, G.T)
    for _ in range(3):
        E = random_symmetric(d, rng)
        E *= 1e-2 / np.linalg.norm(E)
        eps = 1e-4
        fp = erm_objective(X, y, S + eps * E, loss, reg, lam, beta)
        fm = erm_objective(X, y, S - eps * E, loss, reg, lam, beta)
        fd = (fp - fm) / (2 * eps)
        assert abs(fd - np.sum(G * E)) <= 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("loss", ["square", "cross_entropy", "softmax_square"])
def test_optimised_variables_gradients_match_finite_differences(loss, rng):
    """The gradients L-BFGS sees: factor W (nuclear) and orthonormal Sym_d coordinates (frobenius)."""
    d, T, n, m = 6, 2, 25, 4
    X = rng.standard_normal((n, T, d))
    y = aa.model.row_softmax(rng.standard_normal((n, T, T)), 1.0)
    lam = 0.07
    for reg in ("nuclear", "frobenius"):
        problem = erm._Problem(X, y, loss, reg, lam, 1.0)
        if reg == "nuclear":
            fun = erm._factorised_fun(problem, m, {})
            x = rng.standard_normal(d * m) * 0.3
        else:
            coords = erm._sym_coords(d)
            fun = erm._frobenius_fun(problem, coords, {})
            x = rng.standard_normal(d * (d + 1) // 2) * 0.3
            # the coordinates are orthonormal: ||v|| = ||S||_F, and the value is the objective of S
            S = erm._vec_to_sym(x, d, coords)
            assert np.isclose(np.linalg.norm(S), np.linalg.norm(x))
            assert np.isclose(fun(x)[0], erm_objective(X, y, S, loss, reg, lam))
        f0, g = fun(x)
        fd = np.empty_like(x)
        for i in range(x.size):
            e = np.zeros_like(x)
            e[i] = 1e-6
            fd[i] = (fun(x + e)[0] - fun(x - e)[0]) / 2e-6
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(fd).max()))
    # factorised objective equals the nuclear objective at S = W W^T
    W = rng.standard_normal((d, m))
    problem = erm._Problem(X, y, loss, "nuclear", lam, 1.0)
    fW = erm._factorised_fun(problem, m, {})(W.ravel())[0]
    assert np.isclose(fW, erm_objective(X, y, W @ W.T, loss, "nuclear", lam), rtol=1e-13)


# --------------------------------------------------------------------------------------------
# (4) KKT conditions at the nuclear minimiser
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, channel, T",
    [("cross_entropy", aa.SoftmaxChannel(1.0), 2), ("square", aa.LinearChannel(0.0), 1)],
)
@pytest.mark.parametrize("method", ["lbfgs", "prox"])
def test_kkt_at_nuclear_minimiser(loss, channel, T, method):
    d, lam = 20, 0.1
    data = make_data(d, T, 0.5, channel, seed=7)
    res = direct_erm(data.X, data.y, loss, "nuclear", lam, method=method, random_state=2)
    S = res.S
    M = erm_gradient(data.X, data.y, S, loss, "nuclear", lam)  # grad_S L + lam d I
    scale = res.grad_scale
    ev_S, ev_M = np.linalg.eigvalsh(S), np.linalg.eigvalsh(M)
    assert ev_S.min() >= -1e-12 * ev_S.max()  # primal feasibility: S PSD
    assert ev_M.min() >= -1e-6 * scale  # dual feasibility: grad + lam d I PSD
    assert abs(np.trace(S @ M)) <= 1e-6 * scale * np.linalg.norm(S)  # complementary slackness
    assert np.linalg.norm(M @ S) <= 1e-6 * scale * np.linalg.norm(S)
    assert 0 < np.sum(ev_S > 1e-8 * ev_S.max()) < d  # some but not all directions survive
    assert kkt_residual(data.X, data.y, S, loss, "nuclear", lam) == pytest.approx(res.grad_norm, rel=1e-6, abs=1e-12 * scale)
    # nothing nearby (PSD) is better
    rng = np.random.default_rng(0)
    for _ in range(5):
        B = rng.standard_normal((d, 3)) * 1e-3
        S2 = S + B @ B.T
        assert erm_objective(data.X, data.y, S2, loss, "nuclear", lam) >= res.objective - 1e-12 * abs(res.objective)


# --------------------------------------------------------------------------------------------
# Result, options, determinism
# --------------------------------------------------------------------------------------------


def test_result_fields_determinism_and_warm_start():
    data = make_data(14, 2, 0.5, aa.SoftmaxChannel(1.0), seed=5)
    a = direct_erm(data.X, data.y, random_state=3)
    b = direct_erm(data.X, data.y, random_state=3)
    assert isinstance(a, erm.ERMResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.objective = 0.0
    np.testing.assert_array_equal(a.S, b.S)  # same seed -> same result
    assert a.n_iter == a.history.size and a.n_iter > 0
    assert a.times.shape == a.history.shape and np.all(np.diff(a.times) >= 0) and a.times[0] >= 0
    assert a.objective == pytest.approx(a.history[-1], rel=1e-12)
    assert np.all(np.diff(a.history) <= 1e-12 * abs(a.history[0]))  # L-BFGS-B is monotone
    assert a.objective == erm_objective(data.X, data.y, a.S, "cross_entropy", "nuclear", 0.01)
    assert a.grad_norm == pytest.approx(kkt_residual(data.X, data.y, a.S), rel=1e-6, abs=1e-12 * a.grad_scale)
    # warm start from the solution: few iterations, same answer
    c = direct_erm(data.X, data.y, S0=a.S, random_state=4)
    assert c.converged and c.n_iter < a.n_iter
    # convex loss: a single run (the random default start, or S0 alone)
    assert a.start_labels == ("random0",) and c.start_labels == ("S0",)
    assert a.best_start == 0 and a.start_objectives.tolist() == [a.objective]
    assert a.start_residuals.tolist() == [a.relative_residual]
    assert rel(c.S, a.S) < 1e-6
    p = direct_erm(data.X, data.y, S0=a.S, method="prox")
    assert p.times.shape == p.history.shape and np.all(np.diff(p.times) >= 0)
    assert p.converged and rel(p.S, a.S) < 1e-6


def test_width_caps_the_rank():
    data = make_data(12, 2, 0.5, aa.LinearChannel(0.0), seed=6)
    for method in ("lbfgs", "prox"):
        res = direct_erm(data.X, data.y, "square", "nuclear", 1e-3, width=3, method=method, random_state=0)
        ev = np.linalg.eigvalsh(res.S)
        assert np.sum(ev > 1e-10 * ev.max()) <= 3
    full = direct_erm(data.X, data.y, "square", "nuclear", 1e-3, random_state=0)
    assert full.objective < res.objective  # the rank budget binds here


def test_square_loss_sees_only_the_symmetric_part_of_y(rng):
    n, T, d = 30, 3, 8
    X = rng.standard_normal((n, T, d))
    y = rng.standard_normal((n, T, T))
    ys = (y + np.swapaxes(y, 1, 2)) / 2
    a = direct_erm(X, y, "square", "nuclear", 0.05, random_state=0)
    b = direct_erm(X, ys, "square", "nuclear", 0.05, random_state=0)
    assert rel(a.S, b.S) < 1e-6
    const = 0.5 * np.sum((y - ys) ** 2)
    assert a.objective == pytest.approx(b.objective + const, rel=1e-10)


def test_large_lambda_gives_zero():
    data = make_data(10, 2, 0.5, aa.SoftmaxChannel(1.0), seed=8)
    res = direct_erm(data.X, data.y, "cross_entropy", "nuclear", 100.0, method="prox")
    assert np.all(res.S == 0.0) and res.converged
    res = direct_erm(data.X, data.y, "cross_entropy", "nuclear", 100.0, random_state=0)
    assert np.linalg.norm(res.S) < 1e-6


def test_nonpsd_S_has_infinite_nuclear_objective(rng):
    X = rng.standard_normal((5, 2, 4))
    y = aa.model.row_softmax(rng.standard_normal((5, 2, 2)), 1.0)
    S = -np.eye(4)
    assert erm_objective(X, y, S, reg="nuclear") == np.inf
    assert np.isfinite(erm_objective(X, y, S, reg="frobenius"))


# --------------------------------------------------------------------------------------------
# (5) validation
# --------------------------------------------------------------------------------------------


def _good(rng, T=2):
    X = rng.standard_normal((6, T, 5))
    y = aa.model.row_softmax(rng.standard_normal((6, T, T)), 1.0)
    return X, y


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss": "hinge"}, "loss"),
        ({"reg": "l1"}, "reg"),
        ({"lam": -0.1}, "lam"),
        ({"lam": np.nan}, "lam"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"method": "newton"}, "method"),
        ({"tol": 0.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"width": 0}, "width"),
        ({"width": 6}, "width"),
        ({"width": 2, "reg": "frobenius"}, "width"),
        ({"S0": np.ones((4, 4))}, "S0"),
        ({"S0": np.arange(25.0).reshape(5, 5)}, "S0"),
        ({"random_state": "seed"}, "random_state"),
        ({"n_starts": -1}, "n_starts"),
        ({"n_starts": 1.5}, "n_starts"),
        ({"n_starts": 0}, "n_starts"),
        ({"n_starts": 0, "loss": "softmax_square"}, "n_starts"),
    ],
)
def test_validation_errors(kwargs, match, rng):
    X, y = _good(rng)
    with pytest.raises(ValueError, match=match):
        direct_erm(X, y, **kwargs)


def test_validation_errors_data(rng):
    X, y = _good(rng)
    with pytest.raises(ValueError, match="X"):
        direct_erm(X[0], y)
    Xbad = X.copy()
    Xbad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="X"):
        direct_erm(Xbad, y)
    with pytest.raises(ValueError, match="y"):
        direct_erm(X, y[:-1])
    with pytest.raises(ValueError, match="y"):
        direct_erm(X, y[:, :, :1])
    ybad = y.copy()
    ybad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="y"):
        direct_erm(X, ybad)
    with pytest.raises(ValueError, match="y"):
        direct_erm(X, 2.0 * y, loss="cross_entropy")  # rows must sum to 1
    with pytest.raises(ValueError, match="y"):
        direct_erm(X, y - 0.5 + np.array([1.0, 0.0]), loss="cross_entropy")  # negative entries
    X1, _ = _good(rng, T=1)
    with pytest.raises(ValueError, match="T >= 2"):
        direct_erm(X1, np.ones((6, 1, 1)), loss="cross_entropy")
    with pytest.raises(ValueError, match="T >= 2"):
        direct_erm(X1, np.ones((6, 1, 1)), loss="softmax_square")
    # T = 1 is fine for the square loss
    res = direct_erm(X1, rng.standard_normal((6, 1, 1)), loss="square", reg="frobenius", lam=0.1)
    assert res.converged
    for f in (erm_objective, erm_gradient, kkt_residual):
        with pytest.raises(ValueError, match="S"):
            f(X, y, np.ones((5, 4)))
        with pytest.raises(ValueError, match="S"):
            f(X, y, np.triu(np.ones((5, 5))))
        with pytest.raises(ValueError, match="loss"):
            f(X, y, np.eye(5), loss="mse")
