"""Tests of the softmax-square loss (amp_attention.losses.softmax_square; docs/theory.md §4, §5).

The loss is ``sum_a ||y_a - softmax(beta h_a)||^2`` (no 1/2), not convex; its prox is a global
search (Newton from omega, z_y, p0 and row flips).  Checked here: the definition, derivatives
against finite differences, Numba kernels against their NumPy twins, ``g``/``dg`` against finite
differences of the prox, global minimality at T = 2 against two independent references (a dense
grid and multi-start BFGS), optimality conditions, flat-direction facts, the single-start
option, the V -> 0 limit, the fused GAMP path, validation and the failure counter.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize
from scipy.special import softmax as sp_softmax

from amp_attention.losses.base import gram_g_out
from amp_attention.losses._softmax_square_kernels import (
    START_EXTRA,
    START_FLIP,
    START_OMEGA,
    START_TARGET,
    flip_maps,
    run_ss_derivs,
    run_ss_prox,
    run_ss_target_point,
    run_ss_value,
    ss_derivs_numpy,
    ss_prox_numpy,
    ss_target_point_numpy,
    ss_value_numpy,
)
from amp_attention.losses.softmax_square import (
    SoftmaxSquareLoss,
    softmax_square_g_out,
    softmax_square_prox,
)
from amp_attention.variance import GramVariance
from amp_attention.whitening import flat_direction, n_pairs, unwhiten, whiten
from inputs import full_V, onehot_targets, random_V


@pytest.fixture(scope="module", autouse=True)
def _compile_kernels_once():
    """JIT-compile the Numba kernels before the Hypothesis-driven tests (compiled code is cached
    on disk afterwards)."""
    y = np.full((2, 2, 2), 0.5)
    z = np.zeros((2, 3))
    softmax_square_g_out(y, z, 1.0, 1.0)
    run_ss_derivs(y, z, 1.0)
    run_ss_value(y, z, 1.0)
    run_ss_target_point(y, 1.0)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def row_softmax_ref(H, beta):
    return sp_softmax(beta * H, axis=2)


def noisy_softmax_targets(rng, n, T, beta, scale=1.0, noise=0.5):
    """y = softmax(beta (h* + noise xi)) row-wise: h* symmetric (whitened entries ~ N(0, scale^2)),
    xi a non-symmetric Gaussian matrix, so y is in general not the softmax of a symmetric h."""
    K = n_pairs(T)
    s = scale * rng.choice([0.5, 1.0, 2.0], size=(n, 1))
    h = unwhiten(s * rng.standard_normal((n, K)), T) + noise * rng.standard_normal((n, T, T))
    return row_softmax_ref(h, beta)


def prox_objective(y, omega, V, beta, z):
    n, K = omega.shape
    r = z - omega
    Vf = full_V(V, n, K)
    Wr = np.linalg.solve(Vf, r[:, :, None])[:, :, 0]
    return ss_value_numpy(y, z, beta) + 0.5 * np.sum(r * Wr, axis=1)


def problem(rng, n, T, beta, Vkind, v=1.0, targets="softmax", omega_scale=1.5):
    K = n_pairs(T)
    if targets == "softmax":
        y = noisy_softmax_targets(rng, n, T, beta)
    else:
        y = onehot_targets(rng, n, T)
    omega = omega_scale * rng.standard_normal((n, K))
    return y, omega, random_V(rng, n, K, Vkind, v)


# ---------------------------------------------------------------------------------------------
# the loss: definition, stability, derivatives
# ---------------------------------------------------------------------------------------------


def test_value_definition_has_no_half():
    loss = SoftmaxSquareLoss(beta=1.0)
    # h = 0: uniform rows (1/2, 1/2) against one-hot rows: each row costs 1/4 + 1/4, no 1/2 factor
    y = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert loss.value(y, np.zeros((1, 2, 2))) == pytest.approx(1.0, abs=1e-15)
    rng = np.random.default_rng(0)
    for T, beta in ((2, 0.7), (3, 2.0), (5, 1.3)):
        y = noisy_softmax_targets(rng, 6, T, beta)
        H = rng.standard_normal((6, T, T))  # any real H (not symmetric) for value()
        ref = np.sum((y - row_softmax_ref(H, beta)) ** 2, axis=(1, 2))
        np.testing.assert_allclose(SoftmaxSquareLoss(beta).value(y, H), ref, rtol=1e-13, atol=1e-15)
        z = rng.standard_normal((6, n_pairs(T)))
        np.testing.assert_allclose(
            SoftmaxSquareLoss(beta).value_z(y, z),
            SoftmaxSquareLoss(beta).value(y, unwhiten(z, T)), rtol=1e-13, atol=1e-15,
        )


def test_value_is_stable_for_large_beta_and_entries():
    loss = SoftmaxSquareLoss(beta=1e3)
    H = np.array([[[800.0, 0.0, -5.0], [0.0, 300.0, 300.5], [-5.0, 300.5, -1e4]]])
    y = np.full((1, 3, 3), 1.0 / 3.0)
    hard = np.zeros((1, 3, 3))
    hard[0, 0, 0] = hard[0, 1, 2] = hard[0, 2, 1] = 1.0  # softmax -> one-hot (e^{-500} ~ 0)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        v = loss.value(y, H)
        vz = loss.value_z(y, whiten(H))
        gz = loss.grad_z(y, whiten(H))
    assert np.all(np.isfinite(gz))
    np.testing.assert_allclose(v, np.sum((y - hard) ** 2), rtol=1e-12)
    np.testing.assert_allclose(vz, v, rtol=1e-12)


def central_difference(f, x, eps):
    """Jacobian of f (n, m) -> (n, ...) column by column by central differences."""
    cols = []
    for k in range(x.shape[1]):
        e = np.zeros_like(x)
        e[:, k] = eps
        cols.append((f(x + e) - f(x - e)) / (2 * eps))
    return np.stack(cols, axis=-1)


@given(T=st.integers(2, 5), beta=st.sampled_from([0.5, 1.0, 3.0]), seed=st.integers(0, 2**31 - 1))
def test_grad_h_matches_finite_differences(T, beta, seed):
    rng = np.random.default_rng(seed)
    loss = SoftmaxSquareLoss(beta)
    n = 4
    y = noisy_softmax_targets(rng, n, T, beta)
    H = rng.standard_normal((n, T, T))
    G = loss.grad_h(y, H)
    fd = central_difference(lambda x: loss.value(y, x.reshape(n, T, T)), H.reshape(n, -1), 1e-6)
    np.testing.assert_allclose(G.reshape(n, -1), fd, atol=2e-8 * (1 + beta**2))


@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("beta", [0.5, 2.0, 5.0])
def test_grad_z_and_hess_z_match_finite_differences(T, beta):
    rng = np.random.default_rng(T * 100 + int(10 * beta))
    loss = SoftmaxSquareLoss(beta)
    n = 8
    y = noisy_softmax_targets(rng, n, T, beta)
    z = rng.standard_normal((n, n_pairs(T)))
    g = loss.grad_z(y, z)
    Hs = loss.hess_z(y, z)
    fd_g = central_difference(lambda x: loss.value_z(y, x), z, 1e-6)
    fd_H = central_difference(lambda x: loss.grad_z(y, x), z, 1e-6)
    np.testing.assert_allclose(g, fd_g, atol=1e-8 * (1 + beta**2))
    np.testing.assert_allclose(Hs, fd_H, atol=1e-7 * (1 + beta**3))
    np.testing.assert_allclose(Hs, np.swapaxes(Hs, 1, 2), atol=1e-14 * (1 + beta**2))
    # chain rule through unwhiten: d/dz_k = sum over the entries of pair k of c_k dl/dh
    G = loss.grad_h(y, unwhiten(z, T))
    ia, ib = np.triu_indices(T)
    c = np.where(ia == ib, np.sqrt(2.0), 1.0)
    adj = np.where(ia == ib, G[:, ia, ib], G[:, ia, ib] + G[:, ib, ia]) * c
    np.testing.assert_allclose(g, adj, atol=1e-14 * (1 + beta))


@pytest.mark.parametrize("T", [2, 3, 4])
def test_loss_kernels_match_numpy_twins(T):
    rng = np.random.default_rng(T)
    for beta in (0.3, 1.0, 5.0, 40.0):
        y = noisy_softmax_targets(rng, 50, T, beta)
        z = 2.0 * rng.standard_normal((50, n_pairs(T)))
        v, g, H = run_ss_derivs(y, z, beta)
        v2, g2, H2 = ss_derivs_numpy(y, z, beta)
        np.testing.assert_allclose(v, v2, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(
            run_ss_value(y, z, beta), ss_value_numpy(y, z, beta), rtol=1e-12, atol=1e-14
        )
        np.testing.assert_allclose(g, g2, rtol=1e-10, atol=1e-13 * beta)
        np.testing.assert_allclose(H, H2, rtol=1e-10, atol=1e-12 * beta**2)


def test_target_point_kernel_matches_twin_and_zeroes_the_loss():
    rng = np.random.default_rng(3)
    for T in (2, 3, 4):
        K = n_pairs(T)
        # y the row softmax of a symmetric matrix: z_y gives l = 0 (up to the flat direction)
        zs = rng.standard_normal((20, K))
        beta = 2.5
        y = row_softmax_ref(unwhiten(zs, T), beta)
        z1, ok1 = run_ss_target_point(y, beta)
        z2, ok2 = ss_target_point_numpy(y, beta)
        assert ok1.all() and ok2.all()
        np.testing.assert_allclose(z1, z2, atol=1e-12)
        np.testing.assert_allclose(ss_value_numpy(y, z1, beta), 0.0, atol=1e-24)
        u = flat_direction(T)
        resid = (z1 - zs) - np.outer((z1 - zs) @ u, u)  # z_y = z* up to a shift along u
        np.testing.assert_allclose(resid, 0.0, atol=1e-12)
        # noisy targets: twin agreement; zero entries: floored at 1e-4 (not exact)
        y = noisy_softmax_targets(rng, 20, T, beta)
        y[0] = 0.0
        y[0, :, 0] = 1.0
        z1, ok1 = run_ss_target_point(y, beta)
        z2, ok2 = ss_target_point_numpy(y, beta)
        assert not ok1[0] and not ok2[0] and ok1[1:].all() and ok2[1:].all()
        np.testing.assert_allclose(z1, z2, atol=1e-12)
        s = row_softmax_ref(unwhiten(z1[:1], T), beta)[0]
        assert np.all(np.argmax(s, axis=1) == 0)  # the one-hot entries dominate their rows


# ---------------------------------------------------------------------------------------------
# prox kernel == NumPy twin
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("Vkind", ["scalar", "sample"])
@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_prox_kernel_matches_numpy_twin(T, Vkind, beta):
    rng = np.random.default_rng(1000 * T + int(beta))
    n, K = 60, n_pairs(T)
    for v in (0.05, 1.0, 30.0):
        y, omega, V = problem(rng, n, T, beta, Vkind, v)
        Vf = np.ascontiguousarray(full_V(V, n, K))
        W = np.linalg.inv(Vf)
        p0 = omega + 0.3 * rng.standard_normal((n, K))
        for kw in ({}, {"p0": p0}, {"start": p0}):
            p, g, dg, it, stt, sta = run_ss_prox(y, omega, Vf, W, beta, jac_mode=1, **kw)
            p2, g2, dg2, it2, stt2, sta2 = ss_prox_numpy(y, omega, Vf, beta, **kw)
            np.testing.assert_allclose(p, p2, atol=1e-9 * (1 + np.abs(p2).max()))
            np.testing.assert_allclose(g, g2, atol=1e-8 * (1 + beta**2))
            np.testing.assert_allclose(dg, dg2, atol=1e-7 * (1 + np.abs(dg2).max()))
            # same path: same runs kept and (but for rounding-level branch decisions) same steps
            assert np.mean(sta == sta2) >= 0.98 and np.mean(stt == stt2) >= 0.98
            assert np.mean(it == it2) >= 0.95
            if "start" in kw:
                assert np.all(sta == START_EXTRA)


def test_prox_modes_and_start_codes():
    rng = np.random.default_rng(11)
    y, omega, V = problem(rng, 400, 2, 5.0, "scalar", 1.0)
    _, info = softmax_square_prox(y, omega, V, 5.0)
    codes = set(np.unique(info["start"]))
    assert codes <= {START_OMEGA, START_TARGET, START_FLIP}
    assert {START_OMEGA, START_TARGET, START_FLIP} <= codes  # every kind of run wins sometimes
    _, info = softmax_square_prox(y, omega, V, 5.0, p0=omega + 0.5)
    assert set(np.unique(info["start"])) <= {START_OMEGA, START_TARGET, START_EXTRA, START_FLIP}


# ---------------------------------------------------------------------------------------------
# g and dg
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("Vkind", ["scalar", "sample"])
def test_g_and_dg_match_finite_differences_of_the_prox(T, Vkind):
    rng = np.random.default_rng(50 + T)
    n, K = 40, n_pairs(T)
    beta = 2.0
    y, omega, V = problem(rng, n, T, beta, Vkind, 0.7)
    Vf = full_V(V, n, K)
    g, dg, info = softmax_square_g_out(y, omega, V, beta)
    # g = V^{-1}(p - omega) = -grad l(p)
    np.testing.assert_allclose(
        g, np.linalg.solve(Vf, (info["p"] - omega)[:, :, None])[:, :, 0], atol=1e-9 * (1 + beta**2)
    )
    eps = 1e-5
    usable = np.ones(n, dtype=bool)
    fd = np.empty((n, K, K))
    for k in range(K):
        e = np.zeros(K)
        e[k] = eps
        gp, _, ip = softmax_square_g_out(y, omega + e, V, beta)
        gm, _, im = softmax_square_g_out(y, omega - e, V, beta)
        # away from branch jumps: the same run kept, and p moving by O(eps)
        usable &= (ip["start"] == info["start"]) & (im["start"] == info["start"])
        usable &= np.max(np.abs(ip["p"] - im["p"]), axis=1) < 1e3 * eps
        fd[:, :, k] = -(gp - gm) / (2 * eps)  # dg = -dg/domega
    assert usable.mean() >= 0.8
    scale = 1.0 + np.abs(dg[usable]).max()
    np.testing.assert_allclose(dg[usable], fd[usable], atol=2e-5 * scale)
    np.testing.assert_allclose(dg, np.swapaxes(dg, 1, 2), atol=1e-12 * scale)
    # dg = H (I + V H)^{-1}
    H = SoftmaxSquareLoss(beta).hess_z(y, info["p"])
    ref = np.swapaxes(np.linalg.solve(np.eye(K)[None] + H @ Vf, H), 1, 2)
    np.testing.assert_allclose(dg, ref, atol=1e-9 * scale)


def test_trace_modes_and_fused_gamp_path():
    rng = np.random.default_rng(7)
    T, n = 3, 50
    K = n_pairs(T)
    loss = SoftmaxSquareLoss(beta=3.0)
    y, omega, _ = problem(rng, n, T, 3.0, "scalar")
    for V in (0.4, random_V(rng, n, K, "shared"), random_V(rng, n, K, "sample")):
        g, dg, _ = loss.g_out(y, omega, V)
        g2, tr, _ = loss.g_out(y, omega, V, jacobian="trace")
        np.testing.assert_allclose(g2, g, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(tr, np.trace(dg, axis1=1, axis2=2), rtol=1e-10, atol=1e-12)
    for gamma in (random_V(rng, n, K, "shared"), random_V(rng, n, K, "sample")):
        gram = GramVariance(gamma)
        v = 0.6
        p0 = omega + 0.1
        g, a, info = gram_g_out(loss, y, omega, v, gram, p0=p0)
        g2, dg, info2 = loss.g_out(y, omega, gram.scaled(v), p0=p0)
        np.testing.assert_allclose(g, g2, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(info["p"], info2["p"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a, gram.weighted_trace(dg), rtol=1e-9, atol=1e-11)
        # v = 0: the V -> 0 limit through the generic path
        g0, a0, _ = gram_g_out(loss, y, omega, 0.0, gram)
        np.testing.assert_allclose(g0, -loss.grad_z(y, omega), rtol=1e-13, atol=1e-13)
        a_ref = gram.weighted_trace(loss.hess_z(y, omega))
        np.testing.assert_allclose(a0, a_ref, rtol=1e-12, atol=1e-12)


def test_zero_variance_limit():
    rng = np.random.default_rng(8)
    loss = SoftmaxSquareLoss(beta=2.0)
    y, omega, _ = problem(rng, 30, 3, 2.0, "scalar")
    K = omega.shape[1]
    for V0 in (0.0, np.zeros((K, K)), np.zeros((30, K, K))):
        g, dg, info = loss.g_out(y, omega, V0)
        np.testing.assert_array_equal(info["p"], omega)
        np.testing.assert_allclose(g, -loss.grad_z(y, omega), rtol=1e-14)
        np.testing.assert_allclose(dg, loss.hess_z(y, omega), rtol=1e-14)
    g, tr, _ = loss.g_out(y, omega, 0.0, jacobian="trace")
    np.testing.assert_allclose(tr, np.trace(loss.hess_z(y, omega), axis1=1, axis2=2), rtol=1e-13)
    # continuity: a tiny V gives (almost) the limit
    g_small, dg_small, _ = loss.g_out(y, omega, 1e-9)
    np.testing.assert_allclose(g_small, g, atol=1e-6)
    np.testing.assert_allclose(dg_small, loss.hess_z(y, omega), atol=1e-5)


def test_scalar_shared_and_stacked_V_agree():
    rng = np.random.default_rng(9)
    n, T = 30, 3
    K = n_pairs(T)
    y, omega, _ = problem(rng, n, T, 2.0, "scalar")
    out = [
        softmax_square_g_out(y, omega, V, 2.0)
        for V in (0.8, 0.8 * np.eye(K), np.broadcast_to(0.8 * np.eye(K), (n, K, K)).copy())
    ]
    for g, dg, info in out[1:]:
        np.testing.assert_allclose(g, out[0][0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(dg, out[0][1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(info["p"], out[0][2]["p"], rtol=1e-12, atol=1e-13)


@given(
    T=st.integers(2, 5),
    beta=st.sampled_from([0.5, 2.0, 6.0]),
    Vkind=st.sampled_from(["scalar", "shared", "sample", "diag"]),
    v=st.sampled_from([0.01, 1.0, 50.0]),
    rowsum=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_flat_direction_facts(T, beta, Vkind, v, rowsum, seed):
    """u^T g = 0 and dg u = 0 for any targets (the loss is invariant under h -> h + c 11^T)."""
    rng = np.random.default_rng(seed)
    n = 20
    y, omega, V = problem(rng, n, T, beta, Vkind, v)
    if not rowsum:
        y = y * rng.uniform(0.5, 1.5, size=(n, T, 1))  # rows need not sum to one
    g, dg, info = softmax_square_g_out(y, omega, V, beta)
    u = flat_direction(T)
    gscale = 1.0 + np.abs(g).max()
    np.testing.assert_allclose(g @ u, 0.0, atol=1e-12 * gscale * (1 + beta))
    np.testing.assert_allclose(dg @ u, 0.0, atol=1e-10 * (1 + np.abs(dg).max()) * (1 + beta**2))
    if Vkind == "scalar":  # u an eigenvector of V: the u-component of omega is kept
        np.testing.assert_allclose(info["p"] @ u, omega @ u, atol=1e-10 * (1 + np.abs(omega).max()))


# ---------------------------------------------------------------------------------------------
# optimality and global minimality
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_optimality_conditions_at_the_prox(T, beta):
    rng = np.random.default_rng(20 * T + int(beta))
    n, K = 60, n_pairs(T)
    loss = SoftmaxSquareLoss(beta)
    for Vkind, v in (("scalar", 1e-3), ("scalar", 1.0), ("scalar", 1e3), ("sample", 3.0)):
        y, omega, V = problem(rng, n, T, beta, Vkind, v)
        p, info = loss.prox(y, omega, V)
        assert info["n_failed"] == 0
        Vf = full_V(V, n, K)
        W = np.linalg.inv(Vf)
        # stationarity of the prox objective, in z units: V grad l(p) + p - omega = 0
        r = np.einsum("nij,nj->ni", Vf, loss.grad_z(y, p)) + p - omega
        scale = 1 + np.abs(omega).max(axis=1) + np.abs(p).max(axis=1)
        floor = 1e-12 * beta * np.abs(Vf).sum(axis=2).max(axis=1)
        assert np.all(np.abs(r).max(axis=1) <= 1e-9 * scale + floor)
        # second order: V^{-1} + H positive semidefinite
        lam = np.linalg.eigvalsh(W + loss.hess_z(y, p))
        assert np.all(lam[:, 0] >= -1e-8 * np.abs(lam).max(axis=1))


def grid_reference_T2(y, omega, V, beta, phi_bound, m=1601, refine=6):
    """Global minimum of the T = 2 prox objective, independently of the prox code.

    For T = 2 the loss depends on ``x1 = h00 - h01`` and ``x2 = h11 - h01`` only, row by row:
    ``l = f(x1; y_0) + f(-x2; y_1)``-like terms computed here directly from the softmax of
    ``(x, 0)``.  Writing ``z = (x1 + s, s, x2 + s) / c`` and minimising the quadratic term over the
    shift ``s`` in closed form leaves a 2-D problem, evaluated on an ``m x m`` grid of the box
    that must contain any point with objective ``<= phi_bound`` (``l >= 0`` gives
    ``|z - omega|_W^2 <= 2 phi_bound``); the best grid points are refined by BFGS in z.
    """
    W = np.linalg.inv(V)
    c = np.array([np.sqrt(2.0), 1.0, np.sqrt(2.0)])
    e = 1.0 / c  # z(x, s) = z(x, 0) + s e
    x_om = np.array([c[0] * omega[0] - omega[1], c[2] * omega[2] - omega[1]])
    R = np.sqrt(3.0 * 2.0 * phi_bound * np.linalg.eigvalsh(V)[-1]) + 1e-9
    g1 = np.linspace(x_om[0] - R, x_om[0] + R, m)
    g2 = np.linspace(x_om[1] - R, x_om[1] + R, m)

    def row_loss(x, yrow):  # row (x, 0) of h: softmax (sigma(beta x), 1 - sigma(beta x))
        s0 = 0.5 * (1.0 + np.tanh(0.5 * beta * x))
        return (s0 - yrow[0]) ** 2 + (1.0 - s0 - yrow[1]) ** 2

    # row 0 of h is (h00, h01): x1 = h00 - h01; row 1 is (h01, h11): s_11 = sigma(beta x2)
    L0 = row_loss(g1, y[0])
    L1 = row_loss(g2, y[1, ::-1])
    # quadratic term minimised over s: 1/2 [Z^T W Z - (e^T W Z)^2 / (e^T W e)],
    # Z = x1 a + x2 b - omega
    a = np.array([1.0 / c[0], 0.0, 0.0])
    b = np.array([0.0, 0.0, 1.0 / c[2]])
    We = W @ e
    X1, X2 = g1[:, None], g2[None, :]
    ZWZ = (X1**2 * (a @ W @ a) + X2**2 * (b @ W @ b) + 2 * X1 * X2 * (a @ W @ b)
           - 2 * X1 * (a @ W @ omega) - 2 * X2 * (b @ W @ omega) + omega @ W @ omega)
    eWZ = X1 * (We @ a) + X2 * (We @ b) - We @ omega
    quad = 0.5 * (ZWZ - eWZ**2 / (e @ We))
    phi = L0[:, None] + L1[None, :] + quad
    # local minima of the grid (3 x 3 neighbourhoods), best first
    P = np.pad(phi, 1, constant_values=np.inf)
    shifts = [(da, db) for da in (-1, 0, 1) for db in (-1, 0, 1)]
    nb = np.min([P[1 + da:m + 1 + da, 1 + db:m + 1 + db] for da, db in shifts], axis=0)
    idx = np.argwhere(phi <= nb)
    idx = idx[np.argsort(phi[idx[:, 0], idx[:, 1]])][:refine]

    def f(z):
        v, gr, _ = ss_derivs_numpy(y[None], z[None], beta)
        r = z - omega
        return v[0] + 0.5 * r @ W @ r, gr[0] + W @ r

    best = np.inf
    for i, j in idx:
        z0 = g1[i] * a + g2[j] * b
        z0 = z0 - ((z0 - omega) @ We) / (e @ We) * e
        res = minimize(f, z0, jac=True, method="BFGS", options={"gtol": 1e-11})
        best = min(best, phi[i, j], res.fun)
    return best


def t2_cases(rng, beta, n):
    """(y, omega, V) at T = 2 with small, moderate and large scalar V and per-sample V."""
    K = 3
    out = []
    for v in (1e-3, 0.1, 1.0, 10.0, 1e3, "sample"):
        y = noisy_softmax_targets(rng, n, 2, beta)
        omega = rng.standard_normal((n, K)) * rng.choice([0.3, 1.0, 3.0], size=(n, 1))
        if v == "sample":
            V = random_V(rng, n, K, "sample") * np.exp(rng.uniform(-3, 3, size=(n, 1, 1)))
        else:
            V = np.broadcast_to(v * np.eye(K), (n, K, K)).copy()
        out.append((y, omega, V))
    return out


@pytest.mark.parametrize("beta", [5.0, pytest.param(1.0, marks=pytest.mark.slow),
                                  pytest.param(20.0, marks=pytest.mark.slow)])
def test_prox_is_the_global_minimiser_T2_grid(beta):
    rng = np.random.default_rng(int(100 * beta))
    for y, omega, V in t2_cases(rng, beta, 8):
        p, info = softmax_square_prox(y, omega, V, beta)
        assert info["n_failed"] == 0
        ours = prox_objective(y, omega, V, beta, p)
        for i in range(y.shape[0]):
            ref = grid_reference_T2(y[i], omega[i], V[i], beta, ours[i])
            assert ours[i] <= ref + 1e-9 * (1 + abs(ref)), (beta, i, ours[i], ref)


@pytest.mark.parametrize("beta", [2.0, 5.0])
def test_prox_is_the_global_minimiser_T2_multistart(beta):
    """Against scipy BFGS from omega, z_y and 40 random starts (scales 0.1-10 x sqrt(V))."""
    rng = np.random.default_rng(int(7 * beta))
    for y, omega, V in t2_cases(rng, beta, 5):
        p, info = softmax_square_prox(y, omega, V, beta)
        ours = prox_objective(y, omega, V, beta, p)
        zy, ok = ss_target_point_numpy(y, beta)
        for i in range(y.shape[0]):
            W = np.linalg.inv(V[i])

            def f(z):
                v, gr, _ = ss_derivs_numpy(y[i][None], z[None], beta)
                r = z - omega[i]
                return v[0] + 0.5 * r @ W @ r, gr[0] + W @ r

            scale = max(np.sqrt(np.trace(V[i]) / 3), 1.0 / beta)
            starts = [omega[i]] + ([zy[i]] if ok[i] else [])
            scales = np.geomspace(0.1, 10, 40) * scale
            starts += [omega[i] + s * rng.standard_normal(3) for s in scales]
            opts = {"gtol": 1e-10}
            ref = min(minimize(f, s0, jac=True, method="BFGS", options=opts).fun for s0 in starts)
            assert ours[i] <= ref + 1e-9 * (1 + abs(ref)), (beta, i, ours[i], ref)


def test_global_search_beats_the_single_starts():
    """The kept objective is never above any single start's (omega, z_y), and the single start at
    the teacher z* is a stationary local minimiser that is sometimes not the global one."""
    rng = np.random.default_rng(5)
    n, T, beta = 300, 2, 5.0
    K = n_pairs(T)
    zs = rng.standard_normal((n, K))
    y = row_softmax_ref(unwhiten(zs, T), beta)  # noiseless: l(z*) = 0
    omega = 0.5 * zs + rng.standard_normal((n, K))
    V = 1.0
    loss = SoftmaxSquareLoss(beta)
    p, info = loss.prox(y, omega, V)
    phi = prox_objective(y, omega, V, beta, p)
    zy, ok = ss_target_point_numpy(y, beta)
    for start in (omega, zs, np.where(ok[:, None], zy, omega)):
        ps, infos = loss.prox(y, omega, V, start=start, p0=omega + 100.0)  # p0 ignored
        assert infos["n_failed"] == 0 and np.all(infos["start"] == START_EXTRA)
        phis = prox_objective(y, omega, V, beta, ps)
        assert np.all(phi <= phis + 1e-12 * (1 + phis))
        r = V * loss.grad_z(y, ps) + ps - omega
        assert np.abs(r).max() < 1e-9
    ps, _ = loss.prox(y, omega, V, start=zs)
    phis = prox_objective(y, omega, V, beta, ps)
    assert np.any(phis > phi + 1e-3)  # the teacher start is not always the global minimiser
    # g_out with start= returns the single-start result
    g, dg, info_s = loss.g_out(y, omega, V, start=zs)
    np.testing.assert_allclose(info_s["p"], ps, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(g, (ps - omega) / V, atol=1e-9)


def test_one_hot_targets():
    """Targets with zeros (hardmax channel): z_y is built with the zeros floored; the prox is
    stationary and second-order optimal, and at T = 2 global (grid reference)."""
    rng = np.random.default_rng(6)
    for T in (2, 3):
        for beta in (1.0, 5.0, 20.0):
            y, omega, V = problem(rng, 100, T, beta, "scalar", 1.0, targets="onehot")
            loss = SoftmaxSquareLoss(beta)
            p, info = loss.prox(y, omega, V)
            assert info["n_failed"] == 0
            r = V * loss.grad_z(y, p) + p - omega
            assert np.abs(r).max() < 1e-9
            lam = np.linalg.eigvalsh(np.eye(omega.shape[1]) / V + loss.hess_z(y, p))
            assert np.all(lam[:, 0] >= -1e-8 * np.abs(lam).max(axis=1))
    for beta in (5.0, 20.0):
        n = 16
        for v in (0.1, 10.0, 1e3):
            y, omega, _ = problem(rng, n, 2, beta, "scalar", targets="onehot", omega_scale=2.0)
            V = np.broadcast_to(v * np.eye(3), (n, 3, 3)).copy()
            p, _ = softmax_square_prox(y, omega, V, beta)
            ours = prox_objective(y, omega, V, beta, p)
            for i in range(n):
                ref = grid_reference_T2(y[i], omega[i], V[i], beta, ours[i])
                assert ours[i] <= ref + 1e-9 * (1 + abs(ref)), (beta, v, i, ours[i], ref)


@pytest.mark.parametrize("T", [2, 3, 4])
def test_failure_counter_is_zero_on_ordinary_inputs(T):
    rng = np.random.default_rng(30 + T)
    K = n_pairs(T)
    for beta in (0.5, 1.0, 5.0):
        for Vkind, v in (("scalar", 0.1), ("scalar", 1.0), ("scalar", 10.0), ("sample", 1.0)):
            y, omega, V = problem(rng, 500, T, beta, Vkind, v)
            g, tr, info = softmax_square_g_out(y, omega, V, beta, jacobian="trace")
            assert info["n_failed"] == 0
            assert info["converged"].all() and np.all(np.isfinite(g)) and np.all(np.isfinite(tr))
            assert info["iterations"].shape == (500,) and info["n_iter"] == info["iterations"].max()
    # a warm start at the previous solution: converged at once for every sample
    y, omega, V = problem(rng, 500, T, 1.0, "scalar", 1.0)
    p, _ = softmax_square_prox(y, omega, V, 1.0)
    _, info = softmax_square_prox(y, omega, V, 1.0, start=p)
    assert info["n_failed"] == 0 and info["n_iter"] <= 1
    np.testing.assert_allclose(info["p"], p, atol=1e-10)
    assert K == omega.shape[1]


# ---------------------------------------------------------------------------------------------
# validation, repr
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -1.0, np.inf, np.nan, True, "1"])
def test_beta_is_validated(beta):
    with pytest.raises(ValueError, match="beta"):
        SoftmaxSquareLoss(beta)
    with pytest.raises(ValueError, match="beta"):
        softmax_square_prox(np.full((1, 2, 2), 0.5), np.zeros((1, 3)), 1.0, beta)


def test_T1_is_rejected():
    loss = SoftmaxSquareLoss()
    y1 = np.ones((3, 1, 1))
    for call in (
        lambda: loss.value(y1, np.zeros((3, 1, 1))),
        lambda: loss.value_z(y1, np.zeros((3, 1))),
        lambda: loss.prox(y1, np.zeros((3, 1)), 1.0),
        lambda: loss.g_out(y1, np.zeros((3, 1)), 1.0),
        lambda: loss.g_out(y1, np.zeros((3, 1)), 0.0),
        lambda: loss.check_T(1),
    ):
        with pytest.raises(ValueError, match="T >= 2"):
            call()
    loss.check_T(2)


def test_arguments_are_validated_by_name():
    loss = SoftmaxSquareLoss(2.0)
    y = np.full((4, 3, 3), 1.0 / 3.0)
    om = np.zeros((4, 6))
    cases = [
        (lambda: loss.prox(y, np.zeros((4, 5)), 1.0), "omega"),
        (lambda: loss.prox(y, om, 1.0, p0=np.zeros((3, 6))), "p0"),
        (lambda: loss.prox(y, om, 1.0, start=np.zeros((4, 3))), "start"),
        (lambda: loss.prox(y, om, -1.0), "V"),
        (lambda: loss.prox(y, om, np.ones((6, 6))), "V"),
        (lambda: loss.prox(y, om, np.eye(5)), "V"),
        (lambda: loss.g_out(y, om, 1.0, jacobian="diag"), "jacobian"),
        (lambda: loss.value(y, np.zeros((4, 3, 2))), "H"),
        (lambda: loss.grad_z(y, np.zeros((4, 7))), "z"),
        (lambda: loss.value(np.full((4, 3, 2), 0.5), np.zeros((4, 3, 2))), "y"),
        (lambda: loss.prox(y, np.full((4, 6), np.nan), 1.0), "omega"),
        (lambda: SoftmaxSquareLoss(1.0, tol=0.0), "tol"),
        (lambda: SoftmaxSquareLoss(1.0, max_newton=0), "max_newton"),
        (lambda: softmax_square_g_out(y, om, 1.0, 1.0, max_newton=2.5), "max_newton"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_min_value():
    rng = np.random.default_rng(12)
    for T in (2, 3):
        loss = SoftmaxSquareLoss(2.0)
        y = row_softmax_ref(unwhiten(rng.standard_normal((20, n_pairs(T))), T), 2.0)
        np.testing.assert_allclose(loss.min_value(y), 0.0, atol=1e-20)
        y = noisy_softmax_targets(rng, 20, T, 2.0)
        m = loss.min_value(y)
        zy, _ = ss_target_point_numpy(y, 2.0)
        assert np.all(m >= 0.0) and np.all(m <= ss_value_numpy(y, zy, 2.0) + 1e-15)
        if T == 2:  # every positive y with unit row sums is a symmetric softmax at T = 2
            np.testing.assert_allclose(m, 0.0, atol=1e-20)
        else:  # stationary: a (local) minimum of l
            p, _ = loss.prox(y, zy, 1e6)
            assert np.abs(loss.grad_z(y, p)).max() < 1e-4
        y = onehot_targets(rng, 20, T)
        m = loss.min_value(y)
        zy, _ = ss_target_point_numpy(y, 2.0)
        assert np.all(m >= 0.0) and np.all(m <= ss_value_numpy(y, zy, 2.0) + 1e-15)
        if T == 2:  # every one-hot y is a limit of symmetric softmaxes at T = 2: infimum 0
            assert np.all(m < 1e-5)


def test_repr_name_and_link():
    loss = SoftmaxSquareLoss(beta=2.5)
    assert repr(loss) == "SoftmaxSquareLoss(beta=2.5)"
    assert loss.name == "softmax_square"
    h = np.random.default_rng(0).standard_normal((3, 4, 4))
    np.testing.assert_allclose(loss.link(h), row_softmax_ref(h, 2.5), rtol=1e-14)
    A, M = flip_maps(4)
    np.testing.assert_allclose(A @ M @ A, A, atol=1e-12)  # M is a least-squares inverse of A
