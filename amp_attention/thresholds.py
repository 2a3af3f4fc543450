"""Thresholds in alpha predicted by the state evolution (docs/theory.md §7, "Predictions").

* :func:`recovery_threshold` -- the smallest alpha whose ERM-SE fixed point recovers ``S*``
  (``mse / Q* < eps``) at small ``lam``;
* :func:`interpolation_threshold` -- the largest alpha whose ERM-SE fixed point still fits the
  training data (excess train loss ``< eps``) at small ``lam``;
* :func:`perfect_recovery_threshold` -- the Bayes-optimal counting bound (noiseless softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validation import check_positive, check_T
from .losses import make_loss
from .model import as_spectral_law
from .output_sample import OutputSample
from .se import state_evolution
from .whitening import n_pairs

__all__ = ["ThresholdResult", "recovery_threshold", "interpolation_threshold", "perfect_recovery_threshold"]


@dataclass(frozen=True)
class ThresholdResult:
    """A threshold in alpha located by bisection: ``alpha`` lies in ``bracket`` (width <= xtol)."""

    alpha: float
    bracket: tuple
    evaluations: tuple  # (alpha, value) pairs, in evaluation order


def _bisect(pred, lo, hi, xtol, max_expand=6):
    """Smallest alpha in [lo, hi] with pred(alpha) True, assuming pred is monotone False -> True."""
    evals = []

    def p(a):
        v, flag = pred(a)
        evals.append((a, v))
        return flag

    if p(lo):
        raise ValueError(f"the threshold is below the bracket: the condition already holds at alpha={lo}")
    k = 0
    while not p(hi):
        k += 1
        if k > max_expand:
            raise ValueError(f"no threshold found up to alpha={hi}")
        lo, hi = hi, 2 * hi
    while hi - lo > xtol:
        mid = 0.5 * (lo + hi)
        if p(mid):
            hi = mid
        else:
            lo = mid
    return ThresholdResult(alpha=0.5 * (lo + hi), bracket=(lo, hi), evaluations=tuple(evals))


def recovery_threshold(T, teacher, channel, loss="square", reg="nuclear", lam=1e-5, *,
                       bracket=(0.02, 1.0), eps=1e-3, xtol=2e-3, **se_kwargs) -> ThresholdResult:
    """Smallest alpha whose SE fixed point has ``mse / Q* < eps`` at small ``lam`` (noiseless data).

    Bisection assumes the SE mse decreases through ``eps`` once (lam -> 0+ is approximated by the
    given small ``lam``).  ``se_kwargs`` go to :func:`~amp_attention.se.state_evolution`.
    """
    se_kwargs.setdefault("max_iter", 2000)
    se_kwargs.setdefault("tol", 1e-10)
    se_kwargs.setdefault("predictions", False)

    def pred(alpha):
        r = state_evolution(alpha, T, teacher, channel, loss, reg, lam, **se_kwargs)
        v = r.mse / r.Q
        return v, v < eps

    return _bisect(pred, bracket[0], bracket[1], xtol)


def interpolation_threshold(T, teacher, channel, loss="square", reg="frobenius", lam=1e-5, *,
                            bracket=(0.02, 1.0), eps=1e-3, xtol=2e-3, **se_kwargs) -> ThresholdResult:
    """Largest alpha whose SE fixed point still fits the training data: excess train loss
    ``E[l_y(p) - min_z l_y(z)] < eps`` at small ``lam`` (above it the excess is > 0)."""
    se_kwargs.setdefault("max_iter", 2000)
    se_kwargs.setdefault("tol", 1e-10)
    law = as_spectral_law(teacher, se_kwargs.get("spectrum", "exact"))
    beta = se_kwargs.get("beta")
    output = make_loss(loss, getattr(channel, "beta", 1.0) if beta is None else beta)
    floor = {}

    def pred(alpha):
        r = state_evolution(alpha, T, teacher, channel, loss, reg, lam, **se_kwargs)
        if "v" not in floor:
            sample = OutputSample(alpha, T, law.Q, channel, n_mc=se_kwargs.get("n_mc", 100_000),
                                  seed=se_kwargs.get("seed", 0))
            floor["v"] = float(np.mean(output.min_value(sample.y)))
        v = r.train_loss - floor["v"]
        return v, v >= eps

    return _bisect(pred, bracket[0], bracket[1], xtol)


def perfect_recovery_threshold(rho: float, T: int) -> float:
    """``alpha = (rho - rho^2/2)/(K - 1)`` (noiseless softmax, Wishart(rho <= 1); docs/theory.md §7, §8.5).

    Counting bound: ``rho d^2 - rho^2 d^2/2`` degrees of freedom of a rank-``rho d`` symmetric
    matrix against ``K - 1`` equations per sample.  Equivalently ``mmse_den(Delta) ~ (2 rho - rho^2)
    Delta`` as ``Delta -> 0``, and ``mse = 0`` is a stable fixed point of the BO-SE iff
    ``(2 rho - rho^2) / (2 alpha (K - 1)) < 1``.  For ``rho > 1`` (full rank) use ``rho = 1``.
    """
    rho = min(check_positive(rho, "rho"), 1.0)
    T = check_T(T)
    if T == 1:
        raise ValueError("the softmax channel needs T >= 2")
    return (rho - rho * rho / 2.0) / (n_pairs(T) - 1)
