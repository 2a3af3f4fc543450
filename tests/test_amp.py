"""The GAMP loop and the ERMAttention estimator: API, options, flags (docs/theory.md §5, §9)."""

import numpy as np
import pytest

import amp_attention as aa
from amp_attention.amp import gamp
from amp_attention.denoisers import make_denoiser
from amp_attention.losses import make_loss
from amp_attention.losses import SquareLoss
from amp_attention.erm import erm_objective
from naive import naive_gamp


@pytest.fixture(scope="module")
def instance():
    rng = np.random.default_rng(5)
    d, T = 30, 2
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    data = aa.sample_data(int(0.5 * d * d), T, teacher, aa.SoftmaxChannel(1.0), rng)
    return teacher, data


def test_tol_zero_runs_exactly_max_iter(instance):
    teacher, data = instance
    est = aa.ERMAttention(max_iter=7, tol=0).fit(data.X, data.y, S_star=teacher.S)
    assert est.n_iter_ == 7 and not est.converged_
    for key in ("m", "q", "mse", "V", "A_hat", "objective", "train_loss", "step", "time"):
        assert est.history_[key].shape == (7,), key
    # recorded order parameters are those of the iterate
    S = est.S_
    assert np.isclose(est.history_["q"][-1], np.sum(S * S) / 30)
    assert np.isclose(est.history_["m"][-1], np.sum(S * teacher.S) / 30)
    assert np.isclose(est.history_["mse"][-1], np.sum((S - teacher.S) ** 2) / 30)
    assert np.isclose(est.history_["objective"][-1],
                      erm_objective(data.X, data.y, S, "cross_entropy", "nuclear", 0.01, 1.0))


def test_scalar_variance_with_damping_reaches_the_same_fixed_point(instance):
    _, data = instance
    a = aa.ERMAttention(lam=0.1, tol=1e-11, max_iter=1000).fit(data.X, data.y)
    b = aa.ERMAttention(lam=0.1, tol=1e-11, max_iter=3000, variance="scalar", damping=0.5).fit(data.X, data.y)
    assert a.converged_ and b.converged_
    assert np.linalg.norm(a.S_ - b.S_) / np.linalg.norm(a.S_) < 1e-7


def test_objective_decreases_to_its_final_value(instance):
    _, data = instance
    est = aa.ERMAttention(loss="square", reg="frobenius", lam=0.1, tol=1e-10, max_iter=500).fit(data.X, data.y)
    obj = est.history_["objective"]
    assert obj[-1] <= obj[0]
    assert np.all(obj[len(obj) // 2:] >= obj[-1] - 1e-8 * abs(obj[-1]))


class _NaNAfter(SquareLoss):
    """A square loss whose g_out turns NaN at a given call: the loop must stop and flag it."""

    def __init__(self, at):
        super().__init__()
        self.calls, self.at = 0, at

    def g_out(self, y, omega, V, **kw):
        g, dg, info = super().g_out(y, omega, V, **kw)
        self.calls += 1
        if self.calls > self.at:
            g = g * np.nan
        return g, dg, info


def test_non_finite_iterate_stops_and_flags(instance):
    _, data = instance
    res = gamp(data.X, data.y, _NaNAfter(3), make_denoiser("frobenius", 0.1), max_iter=20, tol=0)
    assert res.diverged and not res.converged
    assert res.n_iter == 3
    assert np.all(np.isfinite(res.S))
    assert "non-finite" in res.message


def test_predict_score_and_decision_function(instance):
    teacher, data = instance
    est = aa.ERMAttention(lam=0.05, tol=1e-9).fit(data.X, data.y)
    X = data.X[:10]
    h = est.decision_function(X)
    np.testing.assert_allclose(h, aa.preactivations(X, est.S_), atol=1e-12)
    yhat = est.predict(X)
    np.testing.assert_allclose(yhat.sum(axis=-1), 1.0)
    assert np.isclose(est.score(X, data.y[:10]), -np.mean(np.sum((data.y[:10] - yhat) ** 2, axis=(1, 2))))
    sq = aa.ERMAttention(loss="square", lam=0.05, tol=1e-9).fit(data.X, data.y)
    np.testing.assert_allclose(sq.predict(X), aa.preactivations(X, sq.S_), atol=1e-12)


def test_validation_errors(instance):
    _, data = instance
    X, y = data.X, data.y
    with pytest.raises(ValueError, match="loss"):
        aa.ERMAttention(loss="hinge").fit(X, y)
    with pytest.raises(ValueError, match="reg"):
        aa.ERMAttention(reg="l1").fit(X, y)
    with pytest.raises(ValueError, match="lam"):
        aa.ERMAttention(lam=-1).fit(X, y)
    with pytest.raises(ValueError, match="beta"):
        aa.ERMAttention(beta=0).fit(X, y)
    with pytest.raises(ValueError, match="variance"):
        aa.ERMAttention(variance="diag").fit(X, y)
    with pytest.raises(ValueError, match="damping"):
        aa.ERMAttention(damping=1.0).fit(X, y)
    with pytest.raises(ValueError, match="max_iter"):
        aa.ERMAttention(max_iter=0).fit(X, y)
    with pytest.raises(ValueError, match="y must"):
        aa.ERMAttention().fit(X, y[:, :1])
    with pytest.raises(ValueError, match="y"):
        aa.ERMAttention().fit(X, np.full_like(y, np.nan))
    with pytest.raises(ValueError, match="T >= 2"):
        aa.ERMAttention().fit(X[:, :1], y[:, :1, :1])
    with pytest.raises(ValueError, match="S_star"):
        aa.ERMAttention().fit(X, y, S_star=np.eye(3))
    with pytest.raises(ValueError, match="not fitted"):
        aa.ERMAttention().predict(X)
    with pytest.raises(ValueError, match="width"):
        aa.ERMAttention(reg="frobenius", width=3).fit(X, y)
    est = aa.ERMAttention(max_iter=2, tol=0).fit(X, y)
    with pytest.raises(ValueError, match="token dimension"):
        est.predict(X[:, :, :5])


def test_get_set_params_roundtrip():
    est = aa.ERMAttention(lam=0.3)
    assert est.get_params()["lam"] == 0.3
    est.set_params(lam=0.1, reg="frobenius")
    assert est.lam == 0.1 and est.reg == "frobenius"
    with pytest.raises(ValueError, match="Invalid parameter 'alpha'"):  # scikit-learn's message
        est.set_params(alpha=1)


def test_fit_records_the_se_prediction_next_to_each_iterate(instance):
    teacher, data = instance
    est = aa.ERMAttention(lam=0.05, max_iter=8, tol=0)
    est.fit(data.X, data.y, S_star=teacher.S, channel=aa.SoftmaxChannel(1.0))
    for key in ("se_mse", "se_m", "se_q"):
        assert est.history_[key].shape == (8,)
    # the recorded SE is the state evolution run on its own at the same parameters, with GAMP's
    # damping schedule (adaptive by default) replayed step by step
    se = aa.state_evolution(data.n / 30**2, 2, aa.SpectralLaw.atoms(teacher.eigenvalues), aa.SoftmaxChannel(1.0),
                            "cross_entropy", "nuclear", 0.05, max_iter=8, tol=0, predictions=False,
                            damping=est.history_["damping"])
    np.testing.assert_allclose(est.history_["se_mse"], se.history["mse"])
    # and it is close to the iterates already at d = 30
    assert np.max(np.abs(est.history_["se_mse"] - est.history_["mse"])) < 0.15
    with pytest.raises(ValueError, match="S_star"):
        aa.ERMAttention(max_iter=2).fit(data.X, data.y, channel=aa.SoftmaxChannel(1.0))


@pytest.mark.parametrize("loss", ["square", "cross_entropy"])
def test_large_lam_gives_zero_estimate_without_nan(instance, loss):
    """All eigenvalues thresholded: S = 0 and V = 0; the next iteration uses the V -> 0 limit."""
    _, data = instance
    est = aa.ERMAttention(loss=loss, lam=50.0, max_iter=5, tol=0).fit(data.X, data.y)
    assert not est.diverged_ and est.n_iter_ == 5
    assert np.all(est.S_ == 0) and est.V_ == 0
    # KKT check independent of AMP: S = 0 is optimal iff lam d I + grad_S L(0) is PSD
    from amp_attention.erm import erm_gradient
    grad0 = erm_gradient(data.X, data.y, np.zeros((30, 30)), loss, "nuclear", 0.0, 1.0)
    assert np.linalg.eigvalsh(grad0 + 50.0 * 30 * np.eye(30)).min() >= 0


@pytest.mark.parametrize(
    "loss,reg,variance,damping",
    [("cross_entropy", "nuclear", "sample", 0.0), ("cross_entropy", "frobenius", "sample", 0.0),
     ("square", "nuclear", "sample", 0.0), ("cross_entropy", "nuclear", "scalar", 0.3)],
)
def test_iterates_equal_a_naive_transcription_of_section_5(loss, reg, variance, damping):
    """The fused loop (factored V, Jacobian traces, low-rank forward, SYRK adjoint) against a plain
    NumPy transcription of the six steps with materialised sensing matrices (tests/naive.py)."""
    rng = np.random.default_rng(21)
    d, T, lam, beta = 14, 3, 0.05, 1.3
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    channel = aa.SoftmaxChannel(beta) if loss == "cross_entropy" else aa.LinearChannel(0.1)
    data = aa.sample_data(int(0.6 * d * d), T, teacher, channel, rng)
    lossobj = make_loss(loss, beta)
    seen = []
    res = gamp(data.X, data.y, lossobj, make_denoiser(reg, lam), max_iter=5, tol=0, variance=variance,
               damping=damping, callback=lambda t, S, h: seen.append((S.copy(), h["V"][-1])) and False)
    assert res.n_iter == 5
    ranks = [np.sum(np.linalg.eigvalsh(S) > 1e-10) for S, _ in seen]
    if reg == "nuclear":
        assert min(ranks) < d  # the low-rank forward path is exercised
    ref = naive_gamp(data.X, data.y, loss, reg, lam, beta, 5, variance, damping)
    for (S, V), (S_ref, V_ref) in zip(seen, ref):
        assert np.linalg.norm(S - S_ref) <= 1e-8 * max(np.linalg.norm(S_ref), 1e-12)
        assert V == pytest.approx(V_ref, rel=1e-8)
