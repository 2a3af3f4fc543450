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

import numpy as np

from .._validation import check_real

__all__ = ["SoftThreshold", "LinearShrinkage", "check_denoiser", "check_kinks", "apply_denoiser",
           "denoiser_derivative"]


class SoftThreshold:
    """PSD soft threshold ``f(x) = max(x - tau, 0)`` (nuclear-norm prox, docs/theory.md §5 step 5).

    In the SE ``tau = lam / A_hat``.  ``derivative(x) = 1{x > tau}``; ``kinks = (tau,)`` tells the
    quadrature where ``f`` is not smooth.
    """

    def __init__(self, tau: float):
        self.tau = check_real(tau, "tau")
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
        self.c = check_real(c, "c")

    def __call__(self, x):
        return self.c * np.asarray(x, dtype=np.float64)

    def derivative(self, x):
        return np.full(np.shape(x), self.c, dtype=np.float64)

    def __repr__(self) -> str:
        return f"LinearShrinkage(c={self.c!r})"


def check_denoiser(f, name: str = "f"):
    """Validate the scalar map ``f`` (callable, optional finite real ``kinks``); return its kinks."""
    if not callable(f):
        raise ValueError(f"{name} must be a callable scalar denoiser, got {type(f).__name__}")
    return check_kinks(getattr(f, "kinks", ()), f"{name}.kinks")


def check_kinks(kinks, name: str = "kinks") -> tuple:
    """Quadrature breakpoints: a sequence of finite real numbers, as a tuple of floats."""
    try:
        arr = np.atleast_1d(np.asarray(kinks, dtype=np.float64)).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of finite real numbers, got {kinks!r}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {kinks!r}")
    return tuple(float(k) for k in arr)


def _values(out, x: np.ndarray, what: str) -> np.ndarray:
    """``out`` as a finite float64 array of the shape of ``x`` (broadcast), else ``ValueError``."""
    try:
        y = np.asarray(out, dtype=np.float64)
        if y.shape != x.shape:
            y = np.broadcast_to(y, x.shape).astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must return real numbers broadcastable to the input's shape "
                         f"{x.shape}, got {type(out).__name__}") from None
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{what} returned NaN or inf")
    return y


def apply_denoiser(f, x: np.ndarray, name: str = "f") -> np.ndarray:
    """``f(x)`` as a finite float64 array of the shape of ``x``, else ``ValueError`` naming ``name``
    (also when ``f`` itself raises a ``ValueError`` or ``TypeError`` on the array ``x``)."""
    try:
        out = f(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must map an array of eigenvalues to real values; it raised "
                         f"{type(exc).__name__}: {exc}") from None
    return _values(out, x, name)


def denoiser_derivative(f, x: np.ndarray, name: str = "f") -> np.ndarray:
    """``f'(x)``: ``f.derivative`` if provided, else central finite differences (finite values)."""
    der = getattr(f, "derivative", None)
    if der is not None:
        if not callable(der):
            raise ValueError(f"{name}.derivative must be callable, got {type(der).__name__}")
        try:
            out = der(x)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}.derivative must map an array of eigenvalues to real values; it "
                             f"raised {type(exc).__name__}: {exc}") from None
        return _values(out, x, f"{name}.derivative")
    h = 1e-6 * (1.0 + np.abs(x))
    with np.errstate(over="ignore"):
        out = (apply_denoiser(f, x + h, name) - apply_denoiser(f, x - h, name)) / (2 * h)
    return _values(out, x, f"the finite-difference derivative of {name}")
