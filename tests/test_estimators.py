"""The estimators are scikit-learn estimators (docs/theory.md §9): clone, params, GridSearchCV."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import GridSearchCV, KFold

import amp_attention as aa


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    d, T = 20, 2
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    return aa.sample_data(int(0.6 * d * d), T, teacher, aa.LinearChannel(0.5), rng), teacher


def test_params_come_from_the_signature_and_clone_works():
    est = aa.ERMAttention(loss="square", reg="frobenius", lam=0.3, max_iter=17)
    assert isinstance(est, BaseEstimator)
    p = est.get_params()
    assert p == {"loss": "square", "reg": "frobenius", "lam": 0.3, "beta": 1.0, "width": None,
                 "variance": "sample", "max_iter": 17, "tol": 1e-8, "damping": "auto", "dtype": None}
    c = clone(est)
    assert c is not est and c.get_params() == p
    c.set_params(lam=1.5)
    assert c.lam == 1.5 and est.lam == 0.3
    with pytest.raises(ValueError):
        est.set_params(bogus=1)
    b = aa.BayesAttention(aa.LinearChannel(0.1), aa.SpectralLaw.wishart(0.5), max_iter=9)
    assert clone(b).get_params()["max_iter"] == 9
    assert "random_state" not in p  # GAMP is deterministic: no random state to pretend to use


def test_grid_search_over_lam_selects_by_score(data):
    ds, _ = data
    grid = GridSearchCV(aa.ERMAttention(loss="square", reg="nuclear", max_iter=60, damping=0.3),
                        {"lam": [1e-3, 0.1, 30.0]}, cv=KFold(3))
    grid.fit(ds.X, ds.y)
    scores = grid.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    # lam = 30 shrinks S to 0: clearly the worst; the score is minus the test error
    assert np.argmin(scores) == 2
    best = grid.best_estimator_
    assert best.lam == grid.best_params_["lam"] and hasattr(best, "S_")
    # score is minus the mean per-sample ||y - predict||^2 (independent formula)
    pred = best.predict(ds.X)
    assert best.score(ds.X, ds.y) == pytest.approx(-np.mean(np.sum((ds.y - pred) ** 2, axis=(1, 2))))


def test_unfitted_estimator_raises():
    with pytest.raises(ValueError, match="not fitted"):
        aa.ERMAttention().predict(np.zeros((2, 2, 3)))
