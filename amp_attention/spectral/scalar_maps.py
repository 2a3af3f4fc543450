"""Scalar eigenvalue maps ``f`` applied to the spectrum of ``R`` (docs/theory.md §5 and §7).

Holds the two closed-form maps used by the state evolution, :class:`SoftThreshold` (nuclear-norm
prox) and :class:`LinearShrinkage` (Frobenius prox), and the helpers that implement the scalar-map
contract shared by :mod:`.density` and :mod:`.input_side`: a map is a vectorised callable, with an
optional ``kinks`` attribute (x-points where it is not smooth, used as quadrature breakpoints) and
an optional ``derivative`` method (central finite differences otherwise).

* :func:`check_denoiser` validates ``f`` and returns its kinks;
* :func:`apply_denoiser` evaluates ``f`` (broadcast to the input shape, finite values enforced);
* :func:`denoiser_derivative` evaluates ``f'``.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["SoftThreshold", "LinearShrinkage", "check_denoiser", "apply_denoiser", "denoiser_derivative"]


class SoftThreshold:
    """PSD soft threshold ``f(x) = max(x - tau, 0)`` (nuclear-norm prox, docs/theory.md §5 step 5).

    In the SE ``tau = lam / A_hat``.  ``derivative(x) = 1{x > tau}``; ``kinks = (tau,)`` tells the
    quadrature where ``f`` is not smooth.
    """

    def __init__(self, tau: float):
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not np.isfinite(tau):
            raise ValueError(f"tau must be a finite real number, got {tau!r}")
        self.tau = float(tau)
        self.kinks = (self.tau,)

    def __call__(self, x):
        return np.maximum(np.asarray(x, dtype=np.float64) - self.tau, 0.0)

    def derivative(self, x):
        return (np.asarray(x, dtype=np.float64) > self.tau).astype(np.float64)

    def __repr__(self) -> str:
        return f"SoftThreshold(tau={self.tau!r})"


class LinearShrinkage:
    """Linear shrinkage ``f(x) = c x`` (Frobenius prox: ``c = A_hat / (A_hat + lam)``, §5)."""

    kinks: tuple = ()

    def __init__(self, c: float):
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not np.isfinite(c):
            raise ValueError(f"c must be a finite real number, got {c!r}")
        self.c = float(c)

    def __call__(self, x):
        return self.c * np.asarray(x, dtype=np.float64)

    def derivative(self, x):
        return np.full(np.shape(x), self.c, dtype=np.float64)

    def __repr__(self) -> str:
        return f"LinearShrinkage(c={self.c!r})"


def check_denoiser(f, name: str = "f"):
    if not callable(f):
        raise ValueError(f"{name} must be a callable scalar denoiser, got {type(f).__name__}")
    kinks = getattr(f, "kinks", ())
    kinks = tuple(float(k) for k in np.atleast_1d(np.asarray(kinks, dtype=np.float64)))
    return kinks


def apply_denoiser(f, x: np.ndarray, name: str = "f") -> np.ndarray:
    y = np.asarray(f(x), dtype=np.float64)
    if y.shape != x.shape:
        y = np.broadcast_to(y, x.shape).astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} returned NaN or inf")
    return y


def denoiser_derivative(f, x: np.ndarray) -> np.ndarray:
    """``f'(x)``: ``f.derivative`` if provided, else central finite differences."""
    der = getattr(f, "derivative", None)
    if der is not None:
        return np.asarray(der(x), dtype=np.float64) * np.ones_like(x)
    h = 1e-6 * (1.0 + np.abs(x))
    return (apply_denoiser(f, x + h) - apply_denoiser(f, x - h)) / (2 * h)
