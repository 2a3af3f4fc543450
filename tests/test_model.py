"""docs/theory.md §1: teachers, tokens, channels and sampling."""

import numpy as np
import pytest

import amp_attention as aa
from amp_attention.whitening import whiten


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: aa.Teacher.wishart(60, 0.3, rng),
        lambda rng: aa.Teacher.powerlaw(60, 1.2, rng),
        lambda rng: aa.Teacher.powerlaw(60, 0.5, rng, cutoff=10),
        lambda rng: aa.Teacher.lowrank(60, 3, rng, strength=2.0),
        lambda rng: aa.Teacher.custom(np.linspace(-1, 2, 60), rng),
    ],
)
def test_teacher_spectrum_is_the_matrix_spectrum(make, rng):
    t = make(rng)
    np.testing.assert_array_equal(t.S, t.S.T)
    np.testing.assert_allclose(np.linalg.eigvalsh(t.S), t.eigenvalues, atol=1e-10)
    assert np.isclose(t.Q, np.trace(t.S @ t.S) / t.d)
    assert np.isclose(t.trace_mean, np.trace(t.S) / t.d)


def test_wishart_limits():
    # Tr S/d -> sqrt(rho), Q* -> 1 + rho (fluctuations O(1/d))
    for rho in (0.25, 1.0, 2.0):
        t = aa.Teacher.wishart(600, rho, 1)
        assert abs(t.trace_mean - np.sqrt(rho)) < 0.02
        assert abs(t.Q - (1 + rho)) < 0.05 * (1 + rho)
        assert t.params["rank"] == round(rho * 600)


def test_powerlaw_and_lowrank_normalisation():
    t = aa.Teacher.powerlaw(50, 1.0, 0, cutoff=20)
    assert np.isclose(t.Q, 1.0)
    assert np.sum(t.eigenvalues > 1e-12) == 20
    lam = np.sort(t.eigenvalues)[::-1][:20]
    np.testing.assert_allclose(lam / lam[0], np.arange(1, 21) ** -1.0)
    s = aa.Teacher.lowrank(50, 5, 0, strength=1.5)
    assert np.isclose(s.Q, 1.5**2)
    assert np.linalg.matrix_rank(s.S) == 5


def test_haar_basis_is_orthogonal_and_seeded():
    O = aa.model.haar_orthogonal(30, 3)
    np.testing.assert_allclose(O @ O.T, np.eye(30), atol=1e-12)
    np.testing.assert_array_equal(O, aa.model.haar_orthogonal(30, 3))


def test_same_seed_bit_identical_data():
    def make(seed):
        rng = np.random.default_rng(seed)
        t = aa.Teacher.wishart(20, 0.5, rng)
        return t, aa.sample_data(100, 3, t, aa.LinearChannel(0.3), rng)

    (t1, d1), (t2, d2) = make(7), make(7)
    np.testing.assert_array_equal(t1.S, t2.S)
    for a, b in [(d1.X, d2.X), (d1.y, d2.y), (d1.h, d2.h)]:
        np.testing.assert_array_equal(a, b)
    _, d3 = make(8)
    assert not np.array_equal(d1.X, d3.X)


def test_dataset_shapes_and_h_is_teacher_preactivation(rng):
    t = aa.Teacher.wishart(15, 0.5, rng)
    data = aa.sample_data(30, 4, t, aa.SoftmaxChannel(2.0), rng)
    assert data.X.shape == (30, 4, 15) and data.y.shape == (30, 4, 4) and data.h.shape == (30, 4, 4)
    assert (data.n, data.T, data.d) == (30, 4, 15)
    Z = np.einsum("nai,ij,nbj->nab", data.X, t.S, data.X) - np.eye(4) * np.trace(t.S)
    np.testing.assert_allclose(data.h, Z / np.sqrt(15), atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0, 30.0, 1e4])
def test_softmax_rows_sum_to_one_and_stable(beta, rng):
    h = rng.standard_normal((200, 5, 5)) * 3
    h = h + np.swapaxes(h, 1, 2)
    y = aa.SoftmaxChannel(beta)(h)
    assert np.all(np.isfinite(y)) and np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-12)
    # independent reference: exp/normalise in extended precision where it does not overflow
    if beta <= 30:
        e = np.exp(np.longdouble(beta) * h.astype(np.longdouble))
        ref = (e / e.sum(axis=-1, keepdims=True)).astype(float)
        np.testing.assert_allclose(y, ref, atol=1e-12)
    else:  # beta huge: the softmax is the one-hot argmax (no ties in continuous data)
        np.testing.assert_allclose(y, aa.HardmaxChannel()(h), atol=1e-12)


@pytest.mark.parametrize("beta", [1e306, 1.7e308])
def test_softmax_stable_at_the_largest_beta(beta):
    """The row max of h is subtracted before multiplying by beta (beta * h alone overflows)."""
    y = aa.SoftmaxChannel(beta)(np.array([[[0.0, 200.0], [200.0, 0.0]]]))
    np.testing.assert_array_equal(y, [[[0.0, 1.0], [1.0, 0.0]]])


def test_hardmax_one_hot_with_deterministic_ties():
    h = np.zeros((2, 3, 3))
    h[1] = [[0, 2, 2], [2, 1, 0], [2, 0, 5]]
    y = aa.HardmaxChannel()(h)
    np.testing.assert_array_equal(y.sum(axis=-1), 1.0)
    np.testing.assert_array_equal(y[0], [[1, 0, 0]] * 3)  # all tied: lowest index
    np.testing.assert_array_equal(y[1], [[0, 1, 0], [1, 0, 0], [0, 0, 1]])


def test_linear_channel_noise_structure(rng):
    n, T = 40000, 3
    h = np.zeros((n, T, T))
    y = aa.LinearChannel(0.5)(h, rng)
    np.testing.assert_array_equal(y, np.swapaxes(y, 1, 2))
    var = y.var(axis=0)
    off = ~np.eye(T, dtype=bool)
    tol = 6 * np.sqrt(2 / n)
    assert np.all(np.abs(var[off] - 0.5) <= 0.5 * tol)
    assert np.all(np.abs(np.diag(var) - 1.0) <= 1.0 * tol)
    z = whiten(y)
    assert np.all(np.abs(z.var(axis=0) - 0.5) <= 0.5 * tol)
    np.testing.assert_array_equal(aa.LinearChannel(0.0)(h), h)


def test_model_validation_errors(rng):
    with pytest.raises(ValueError, match="rho"):
        aa.Teacher.wishart(10, -0.5, rng)
    with pytest.raises(ValueError, match="d must"):
        aa.Teacher.wishart(0, 0.5, rng)
    with pytest.raises(ValueError, match="cutoff"):
        aa.Teacher.powerlaw(10, 1.0, rng, cutoff=11)
    with pytest.raises(ValueError, match="rank"):
        aa.Teacher.lowrank(10, 0, rng)
    with pytest.raises(ValueError, match="eigenvalues"):
        aa.Teacher.custom([1.0, np.nan], rng)
    with pytest.raises(ValueError, match="beta"):
        aa.SoftmaxChannel(0.0)
    with pytest.raises(ValueError, match="beta"):
        aa.SoftmaxChannel(-1.0)
    with pytest.raises(ValueError, match="noise"):
        aa.LinearChannel(-0.1)
    with pytest.raises(ValueError, match="noise"):
        aa.SoftmaxChannel(1.0, noise=-0.1)
    with pytest.raises(ValueError, match="noise"):
        aa.HardmaxChannel(noise=np.inf)
    t = aa.Teacher.wishart(10, 0.5, rng)
    with pytest.raises(ValueError, match="T must"):
        aa.sample_data(5, 9, t, aa.LinearChannel(0.0), rng)
    with pytest.raises(ValueError, match="T must"):
        aa.sample_data(5, 0, t, aa.LinearChannel(0.0), rng)
    with pytest.raises(ValueError, match="T >= 2"):
        aa.sample_data(5, 1, t, aa.SoftmaxChannel(1.0), rng)
    with pytest.raises(ValueError, match="n must"):
        aa.sample_data(0, 2, t, aa.LinearChannel(0.0), rng)
    with pytest.raises(ValueError, match="teacher"):
        aa.sample_data(5, 2, t.S, aa.LinearChannel(0.0), rng)
    with pytest.raises(ValueError, match="channel"):
        aa.sample_data(5, 2, t, lambda h: h, rng)
    with pytest.raises(ValueError, match="rng"):
        aa.sample_data(5, 2, t, aa.LinearChannel(0.0), "seed")
    with pytest.raises(ValueError, match="h must"):
        aa.SoftmaxChannel(1.0)(np.zeros((3, 2, 3)))
