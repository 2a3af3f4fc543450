"""Thresholds in alpha (docs/theory.md §7.4, §7.5): root finding on continuous SE criteria.

Analytic references: ridgeless square-loss regression on the noiseless (recovery) or noisy
(interpolation) linear channel has both thresholds at ``n K = d^2/2``, i.e. ``alpha = 1/(2K)``;
the Bayes-optimal SE on noiseless softmax with a Wishart(rho <= 1) teacher recovers perfectly
above the counting bound ``(rho - rho^2/2)/(K - 1)`` (``K`` for the noiseless linear channel).
"""

import functools
import math

import numpy as np
import pytest

import amp_attention as aa
from amp_attention import thresholds as thr
from amp_attention.spectral import SpectralLaw
from amp_attention.thresholds import (
    ThresholdResult,
    bayes_threshold,
    interpolation_threshold,
    perfect_recovery_threshold,
    recovery_threshold,
)
from amp_attention.whitening import n_pairs

LAW = SpectralLaw.wishart(0.5)
RIDGE = dict(loss="square", reg="frobenius", lam=1e-6)


def _check_consistent(res):
    """Invariants of every result: parallel records, a bracket around a found alpha."""
    assert isinstance(res, ThresholdResult)
    assert len(res.evaluations) == len(res.converged) == len(res.se_messages) >= 2
    assert all(len(e) == 2 for e in res.evaluations)
    assert res.message
    if res.found:
        lo, hi = res.bracket
        assert lo <= res.alpha <= hi and hi - lo <= res.xtol
        values = dict(res.evaluations)
        assert values[lo] >= 0 >= values[hi]  # the bracket is a sign change of the criterion
    else:
        assert res.alpha is None


# --------------------------------------------------------------------------------------------
# Analytic thresholds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2])
def test_ridgeless_recovery_threshold_is_one_over_2K(T):
    K = n_pairs(T)
    res = recovery_threshold(T, LAW, aa.LinearChannel(0.0), **RIDGE)
    _check_consistent(res)
    assert res.found and abs(res.alpha - 1 / (2 * K)) <= 3e-3
    assert res.xtol == 2e-3 and res.expansions == 0 and res.searched == (0.02, 1.0)


@pytest.mark.parametrize("T", [1, 2])
def test_ridgeless_interpolation_threshold_is_one_over_2K(T):
    K = n_pairs(T)
    res = interpolation_threshold(T, LAW, aa.LinearChannel(0.5), **RIDGE, n_mc=20_000)
    _check_consistent(res)
    assert res.found and abs(res.alpha - 1 / (2 * K)) <= 3e-3


def test_progress_is_called_once_per_se_evaluation():
    """``progress(alpha, value, converged)`` sees exactly the evaluations the result records, in
    order (the Bayes search's verification runs included)."""
    for search, kw in ((recovery_threshold, dict(RIDGE, channel=aa.LinearChannel(0.0))),
                       (bayes_threshold, dict(channel=aa.SoftmaxChannel(1.0), verify=True, verify_max_iter=3000))):
        seen = []
        res = search(2, LAW, progress=lambda a, v, c: seen.append((a, v, c)), **kw)
        assert res.found and len(seen) == len(res.evaluations) >= 3
        assert [(a, v) for a, v, _ in seen] == [tuple(e) for e in res.evaluations]
        assert tuple(c for *_, c in seen) == res.converged


def test_warm_and_cold_starts_give_the_same_threshold():
    warm = recovery_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE, xtol=1e-3)
    cold = recovery_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE, xtol=1e-3, warm_start=False)
    assert all("cold start" in m for m in cold.se_messages)
    assert any("warm start" in m for m in warm.se_messages)
    assert abs(warm.alpha - cold.alpha) <= 2e-3


def test_nuclear_recovery_threshold_between_bayes_and_ridge():
    """PSD nuclear ERM recovers a rank-deficient Wishart teacher below the ridge threshold 1/(2K),
    not below the Bayes counting bound (rho - rho^2/2)/K (linear channel: K components observed)."""
    rho, T = 0.5, 2
    K = n_pairs(T)
    res = recovery_threshold(T, SpectralLaw.wishart(rho), aa.LinearChannel(0.0), "square", "nuclear", 1e-5,
                             xtol=5e-3, tol=1e-8, max_iter=200)
    _check_consistent(res)
    bayes = bayes_threshold(T, SpectralLaw.wishart(rho), aa.LinearChannel(0.0))
    assert abs(bayes.alpha - (rho - rho**2 / 2) / K) <= bayes.xtol
    assert bayes.alpha - 5e-3 <= res.alpha <= 1 / (2 * K) - 0.01


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("rho", [0.3, 0.6, 1.0])
def test_bayes_threshold_is_the_counting_bound(rho, T):
    """The root of the Bayes-SE criterion equals the closed-form counting bound within xtol."""
    res = bayes_threshold(T, SpectralLaw.wishart(rho), aa.SoftmaxChannel(1.0))
    _check_consistent(res)
    assert res.found and res.all_converged and res.verified is None
    assert abs(res.alpha - perfect_recovery_threshold(rho, T)) <= res.xtol
    # the criterion is monotone through the root: its evaluations are ordered accordingly
    pts = sorted(res.evaluations)
    assert all(v1 >= v2 for (_, v1), (_, v2) in zip(pts, pts[1:]))


@pytest.mark.parametrize("rho,T", [(0.3, 3), pytest.param(0.5, 2, marks=pytest.mark.slow),
                                   pytest.param(1.0, 2, marks=pytest.mark.slow)])
def test_bayes_threshold_verified_by_full_runs_from_the_uninformative_start(rho, T):
    """Full BO-SE runs from q0 = 0: perfect recovery 5% above the threshold, not 5% below."""
    res = bayes_threshold(T, SpectralLaw.wishart(rho), aa.SoftmaxChannel(1.0), verify=True)
    assert res.found and res.verified is True, res.message
    assert abs(res.alpha - perfect_recovery_threshold(rho, T)) <= res.xtol
    above, below = res.evaluations[-2:]
    assert above[0] > res.alpha > below[0] and above[1] < 0 < below[1]


def test_bayes_threshold_linear_channel():
    """Noiseless linear channel: all K components observed; with noise the mse never reaches eps."""
    for rho, T in [(0.3, 2), (1.0, 3)]:
        res = bayes_threshold(T, SpectralLaw.wishart(rho), aa.LinearChannel(0.0))
        assert abs(res.alpha - (rho - rho**2 / 2) / n_pairs(T)) <= res.xtol
    noisy = bayes_threshold(2, SpectralLaw.wishart(0.5), aa.LinearChannel(0.1))
    _check_consistent(noisy)
    assert not noisy.found and noisy.message.startswith("none in [0.01, 8]")


# --------------------------------------------------------------------------------------------
# 'none in [lo, hi]' and bracket expansion
# --------------------------------------------------------------------------------------------


def test_square_loss_on_softmax_targets_has_no_recovery_threshold():
    """The issue's reproducer: square + nuclear on softmax targets never recovers S*; the result
    says so instead of raising after a long search."""
    teacher = aa.Teacher.wishart(60, 0.5, np.random.default_rng(0))
    res = recovery_threshold(2, teacher, aa.SoftmaxChannel(1.0), n_mc=20_000)
    _check_consistent(res)
    assert not res.found and res.alpha is None
    assert res.message.startswith("none in [0.02, 8]: ") and "positive at both ends" in res.message
    assert res.searched == res.bracket == (0.02, 8.0) and res.expansions == 3
    assert [a for a, _ in res.evaluations] == [0.02, 1.0, 2.0, 4.0, 8.0]
    assert all(v > 0 for _, v in res.evaluations)


def test_noiseless_data_is_always_interpolated():
    res = interpolation_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE, max_expand=1, n_mc=2_000)
    _check_consistent(res)
    assert not res.found and res.message.startswith("none in [0.02, 2]: ") and res.expansions == 1


def test_bracket_expands_downwards_when_the_condition_already_holds():
    K = n_pairs(2)
    res = recovery_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE, bracket=(0.5, 1.0), max_expand=0)
    assert not res.found and "negative at both ends" in res.message and res.searched == (0.5, 1.0)
    res = recovery_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE, bracket=(0.5, 1.0))
    _check_consistent(res)
    assert res.found and res.expansions == 2 and res.searched == (0.125, 1.0)
    assert abs(res.alpha - 1 / (2 * K)) <= 3e-3


# --------------------------------------------------------------------------------------------
# SE failures are reported, not raised
# --------------------------------------------------------------------------------------------


def _failing_se(monkeypatch, fails):
    """Replace the SE used by the thresholds by one that raises when ``fails(call, alpha, kw)``."""
    real = thr.state_evolution
    calls = []

    def fake(alpha, *args, **kw):
        calls.append(alpha)
        probe = kw.get("callback") is not None  # the argument probe, stopped by its callback
        if not probe and fails(len(calls), alpha, kw):
            raise ValueError("a must be >= 0, got -0.66")
        return real(alpha, *args, **kw)

    monkeypatch.setattr(thr, "state_evolution", fake)
    return calls


def test_se_failure_at_a_bracket_end_is_reported(monkeypatch):
    _failing_se(monkeypatch, lambda n, alpha, kw: alpha == 1.0)
    res = recovery_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE)
    _check_consistent(res)
    assert not res.found and "SE failed at alpha=1 " in res.message and "a must be >= 0" in res.message
    assert math.isnan(dict(res.evaluations)[1.0]) and res.converged[-1] is False


def test_se_failure_inside_the_root_search_is_reported(monkeypatch):
    _failing_se(monkeypatch, lambda n, alpha, kw: 0.02 < alpha < 1.0 and n > 6)
    res = recovery_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE)
    _check_consistent(res)
    assert not res.found and res.message.startswith("root search interrupted: the SE failed at alpha=")
    lo, hi = res.bracket
    assert lo < 1 / 6 < hi and dict(res.evaluations)[lo] > 0 > dict(res.evaluations)[hi]


def test_failed_warm_start_is_retried_cold(monkeypatch):
    _failing_se(monkeypatch, lambda n, alpha, kw: kw.get("init") is not None)
    res = recovery_threshold(2, LAW, aa.LinearChannel(0.0), **RIDGE)
    assert res.found and abs(res.alpha - 1 / 6) <= 3e-3
    assert all("cold start" in m for m in res.se_messages)


def test_cross_entropy_nuclear_recovery_returns():
    """Cross-entropy + nuclear on softmax data (the issue's crash), default bracket: returns."""
    res = recovery_threshold(2, LAW, aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear",
                             n_mc=500, max_iter=20, tol=1e-6, xtol=5e-2)
    _check_consistent(res)


@pytest.mark.slow
def test_cross_entropy_recovery_thresholds():
    """CE on noiseless softmax, small lam: K - 1 informative components per sample, so Frobenius
    recovers at about 1/(2(K-1)); PSD nuclear in between that and the Bayes counting bound."""
    rho, T = 0.5, 2
    K = n_pairs(T)
    kw = dict(n_mc=5_000, max_iter=500, xtol=5e-3)
    nuc = recovery_threshold(T, SpectralLaw.wishart(rho), aa.SoftmaxChannel(1.0), "cross_entropy", "nuclear", **kw)
    _check_consistent(nuc)
    assert nuc.found and perfect_recovery_threshold(rho, T) - 5e-3 <= nuc.alpha <= 1 / (2 * (K - 1))
    frob = recovery_threshold(T, SpectralLaw.wishart(rho), aa.SoftmaxChannel(1.0), "cross_entropy", "frobenius",
                              **kw)
    _check_consistent(frob)
    assert frob.found and abs(frob.alpha - 1 / (2 * (K - 1))) <= 1e-2


# --------------------------------------------------------------------------------------------
# Argument checks: immediate ValueErrors naming the argument
# --------------------------------------------------------------------------------------------

BAD = [
    ("xtol", dict(xtol=0)), ("xtol", dict(xtol=float("nan"))), ("xtol", dict(xtol=-1e-3)),
    ("xtol", dict(xtol=float("inf"))), ("xtol", dict(xtol="1e-3")),
    ("bracket", dict(bracket=(0.5,))), ("bracket", dict(bracket=(1, 0.5))), ("bracket", dict(bracket=(0, 1))),
    ("bracket", dict(bracket=(-1, 1))), ("bracket", dict(bracket=(0.1, float("inf")))),
    ("bracket", dict(bracket=(float("nan"), 1))), ("bracket", dict(bracket=0.5)), ("bracket", dict(bracket="ab")),
    ("bracket", dict(bracket=(0.5, 0.5))), ("bracket", dict(bracket=(0.1, 0.5, 1))),
    ("eps", dict(eps=0)), ("eps", dict(eps=-1)), ("eps", dict(eps=float("nan"))),
    ("max_expand", dict(max_expand=-1)), ("max_expand", dict(max_expand=1.5)),
    ("progress", dict(progress=3)),
]


@pytest.fixture
def se_calls(monkeypatch):
    """Counts the SE runs the threshold functions start (both SE functions wrapped)."""
    calls = []
    for name in ("state_evolution", "bayes_state_evolution"):
        original = getattr(thr, name)

        @functools.wraps(original)  # (the search checks keywords against the SE's signature)
        def counted(*args, _original=original, **kw):
            calls.append(_original.__name__)
            return _original(*args, **kw)
        monkeypatch.setattr(thr, name, counted)
    return calls


@pytest.mark.parametrize("func", [recovery_threshold, interpolation_threshold])
@pytest.mark.parametrize("name,kw", BAD)
def test_threshold_arguments_are_checked_immediately(func, name, kw, se_calls):
    with pytest.raises(ValueError, match=name):
        func(2, LAW, aa.LinearChannel(0.0), **kw)
    assert se_calls == []  # before any SE run


@pytest.mark.parametrize("name,kw", BAD + [("eps", dict(eps=1.0)), ("verify_margin", dict(verify_margin=1.5)),
                                            ("verify_max_iter", dict(verify_max_iter=0)),
                                            ("verify", dict(verify="yes"))])
def test_bayes_threshold_arguments_are_checked_immediately(name, kw, se_calls):
    with pytest.raises(ValueError, match=name):
        bayes_threshold(2, LAW, aa.SoftmaxChannel(1.0), **kw)
    assert se_calls == []  # before any SE run


@pytest.mark.parametrize("args,kw,name", [
    ((0, LAW, aa.LinearChannel(0.0)), {}, "T"),
    ((9, LAW, aa.LinearChannel(0.0)), {}, "T"),
    ((2.0, LAW, aa.LinearChannel(0.0)), {}, "T"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(lam=-1.0), "lam"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(lam=float("nan")), "lam"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(reg="l1"), "reg"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(loss="hinge"), "loss"),
    ((2, LAW, "softmax"), {}, "channel"),
    ((2, np.eye(3), aa.LinearChannel(0.0)), {}, "teacher"),
    ((1, LAW, aa.SoftmaxChannel(1.0)), dict(loss="cross_entropy"), "T >= 2"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(n_mc=10), "n_mc"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(input_side="middle"), "input_side"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(max_iter=0), "max_iter"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(tol=-1.0), "tol"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(init=(0.0, 0.0, 1.0)), "init"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(warm_start="no"), "warm_start"),
    ((2, LAW, aa.LinearChannel(0.0)), dict(callback=3), "callback"),
])
def test_model_arguments_are_checked_by_the_se_before_the_search(args, kw, name, se_calls):
    for func in (recovery_threshold, interpolation_threshold):
        se_calls.clear()
        with pytest.raises(ValueError, match=name):
            func(*args, **kw)
        assert len(se_calls) <= 1  # at most the probe (stopped after one step), no search


def test_unknown_se_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="n_montecarlo"):
        recovery_threshold(2, LAW, aa.LinearChannel(0.0), n_montecarlo=10)
    with pytest.raises(TypeError, match="channel"):
        recovery_threshold(2, LAW, aa.LinearChannel(0.0), channel=aa.LinearChannel(0.0))


def test_bayes_threshold_model_arguments():
    with pytest.raises(NotImplementedError):
        bayes_threshold(2, LAW, aa.HardmaxChannel())
    with pytest.raises(ValueError, match="T >= 2"):
        bayes_threshold(1, LAW, aa.SoftmaxChannel(1.0))
    with pytest.raises(ValueError, match="teacher"):
        bayes_threshold(2, np.eye(3), aa.SoftmaxChannel(1.0))


def test_perfect_recovery_threshold_closed_form():
    for rho, T in [(0.5, 2), (0.3, 3), (2.0, 2)]:
        r = min(rho, 1.0)
        assert perfect_recovery_threshold(rho, T) == pytest.approx((r - r * r / 2) / (n_pairs(T) - 1))
    with pytest.raises(ValueError, match="rho"):
        perfect_recovery_threshold(0.0, 2)
    with pytest.raises(ValueError, match="T >= 2"):
        perfect_recovery_threshold(0.5, 1)
