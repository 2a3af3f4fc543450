"""float32 tokens (issue 14, docs/theory.md §3, §10): the GEMMs run in float32 and every sum over
samples in float64; AMP still tracks its SE with the §8.4 tolerances at d = 200, and its fixed
point equals the float64 one to 1e-4 (relative Frobenius distance)."""

import warnings

import numpy as np
import pytest

import amp_attention as aa
from amp_attention.amp import FLOAT32_TOL, gamp
from amp_attention.denoisers import make_denoiser
from amp_attention.losses import make_loss
from amp_attention.se import state_evolution


@pytest.fixture(scope="module")
def instance():
    d, T, alpha = 200, 2, 0.4
    rng = np.random.default_rng(11)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    channel = aa.SoftmaxChannel(1.0)
    data = aa.sample_data(int(round(alpha * d * d)), T, teacher, channel, rng)
    return d, T, alpha, teacher, channel, data


def test_float32_amp_tracks_se_at_d200(instance):
    d, T, alpha, teacher, channel, data = instance
    loss, den = make_loss("cross_entropy", 1.0), make_denoiser("nuclear", 0.05)
    X32 = data.X.astype(np.float32)
    res = gamp(X32, data.y, loss, den, max_iter=25, tol=0, S_star=teacher.S)
    se = state_evolution(alpha, T, teacher, channel, "cross_entropy", "nuclear", 0.05, 1.0, max_iter=25, tol=0,
                         n_mc=60_000, seed=0, predictions=False, damping=res.history["damping"])
    gap = np.abs(res.history["mse"] - se.history["mse"])
    assert res.n_iter == 25 and not res.diverged
    assert gap.max() <= 0.03 and gap[-1] <= 0.01, gap


def test_float32_fixed_point_equals_float64(instance):
    d, T, alpha, teacher, channel, data = instance
    loss, den = make_loss("cross_entropy", 1.0), make_denoiser("nuclear", 0.05)
    r64 = gamp(data.X, data.y, loss, den, max_iter=300, tol=1e-9)
    r32 = gamp(data.X.astype(np.float32), data.y, loss, den, max_iter=300, tol=1e-9)  # raised to 1e-6
    assert r64.converged and r32.converged, (r64.message, r32.message)
    rel = np.linalg.norm(r32.S - r64.S) / np.linalg.norm(r64.S)
    assert rel <= 1e-4, rel
    assert rel > 0  # the float32 path really ran in float32
    assert r32.history["step"][-1] < FLOAT32_TOL


def test_float32_tolerance_floor_and_no_warning_at_default_tol(instance):
    """A tol below the float32 rounding floor is raised to FLOAT32_TOL: the run converges instead of
    running to max_iter and warning."""
    d, T, alpha, teacher, channel, data = instance
    X = data.X[:4000, :, :60].astype(np.float32)
    y = data.y[:4000]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = gamp(X, y, make_loss("cross_entropy", 1.0), make_denoiser("nuclear", 0.1), max_iter=400, tol=1e-12)
    assert res.converged and f"tol {FLOAT32_TOL:g}" in res.message


def test_estimator_dtype_parameter(instance):
    """``dtype=None`` follows X; 'float32' converts; the fit equals GAMP on float32 tokens."""
    d, T, alpha, teacher, channel, data = instance
    X, y = data.X[:3000, :, :40], data.y[:3000]
    ref = gamp(X.astype(np.float32), y, make_loss("cross_entropy", 1.0), make_denoiser("nuclear", 0.1),
               max_iter=5, tol=0)
    for est, Xin in ((aa.ERMAttention(lam=0.1, max_iter=5, tol=0, dtype="float32"), X),
                     (aa.ERMAttention(lam=0.1, max_iter=5, tol=0), X.astype(np.float32))):
        est.fit(Xin, y)
        np.testing.assert_array_equal(est.S_, ref.S)
    f64 = aa.ERMAttention(lam=0.1, max_iter=5, tol=0, dtype="float64").fit(X.astype(np.float32), y)
    assert not np.array_equal(f64.S_, ref.S)
    with pytest.raises(ValueError, match="dtype"):
        aa.ERMAttention(dtype="float16").fit(X, y)
    assert aa.BayesAttention(channel, teacher, dtype="float32").get_params()["dtype"] == "float32"
