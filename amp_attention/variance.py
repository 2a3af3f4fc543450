"""Variance shapes of the output side, e.g. GAMP's ``V Gamma_mu`` (docs/theory.md §5).

The proximal map and ``g_out`` of a loss (:mod:`amp_attention.losses`) take, for each sample, a
symmetric positive definite ``K x K`` variance ``V`` (``K = T(T+1)/2`` whitened coordinates).
``V`` may be given as a positive scalar (``V = v I_K`` for every sample, the state-evolution case),
a ``(K, K)`` matrix shared by all samples, or a ``(n, K, K)`` stack (per-sample variances
``V^t Gamma_mu`` of GAMP).  Shared variances are never broadcast to ``(n, K, K)`` in memory.

The ``g_out`` methods of the loss classes also accept ``V = 0`` (scalar or all-zero array), the
``V -> 0`` limit reached by GAMP when the denoiser is locally constant (:func:`is_zero_variance`).

* :func:`prepare_variance` validates any of these shapes and returns it with its Cholesky factor;
* :class:`GramVariance` holds the shapes ``Gamma`` (validated, Cholesky-factored and inverted once
  per GAMP run), so that only the scalar ``v`` of ``V_mu = v Gamma_mu`` changes across iterations;
* :func:`sample_variance` builds GAMP's ``variance='sample'`` shapes from the sample Gram matrices,
  falling back to the scalar shapes ``Gamma_mu = I_K`` (with a warning) when they are unusable.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

from ._validation import as_float_array, check_nonnegative

__all__ = [
    "GramVariance",
    "sample_variance",
    "prepare_variance",
    "inverse_from_cholesky",
    "is_positive_scalar",
    "is_zero_variance",
]


def prepare_variance(V, n: int, K: int, name: str = "V"):
    """Validate ``V`` and return ``(Vs, L)``, both ``(nV, K, K)`` with ``nV in {1, n}``.

    ``V`` is a positive scalar (``v I_K``), a ``(K, K)`` matrix or an ``(n, K, K)`` stack; it must
    be finite, symmetric (relative tolerance 1e-10) and positive definite.  ``L`` is the lower
    Cholesky factor.  ``name``: the argument named in error messages.
    """
    for arg, val in (("n", n), ("K", K)):
        if isinstance(val, (bool, np.bool_)) or not isinstance(val, numbers.Integral) or val < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {val!r}")
    if isinstance(V, bool):
        raise ValueError(f"{name} must be a positive number or a (K, K) / (n, K, K) array, got {V!r}")
    arr = as_float_array(V, name)
    if arr.ndim == 0:
        v = float(arr)
        if v <= 0:
            raise ValueError(f"{name} must be > 0 when given as a scalar, got {v!r}")
        eye = np.eye(K)
        return (v * eye)[None], (np.sqrt(v) * eye)[None]
    if arr.ndim == 2:
        if arr.shape != (K, K):
            raise ValueError(f"{name} must have shape (K, K) = ({K}, {K}), got {arr.shape}")
        arr = arr[None]
    elif arr.ndim == 3:
        if arr.shape != (n, K, K):
            raise ValueError(f"{name} must have shape (n, K, K) = ({n}, {K}, {K}), got {arr.shape}")
    else:
        raise ValueError(f"{name} must be a scalar, (K, K) or (n, K, K), got shape {arr.shape}")
    scale = np.maximum(np.max(np.abs(arr), axis=(1, 2)), 1e-300)
    asym = np.max(np.abs(arr - np.swapaxes(arr, 1, 2)), axis=(1, 2))
    if np.any(asym > 1e-10 * scale):
        raise ValueError(f"{name} must be symmetric (per sample)")
    Vs = np.ascontiguousarray(0.5 * (arr + np.swapaxes(arr, 1, 2)))
    try:
        L = np.linalg.cholesky(Vs)
    except np.linalg.LinAlgError:
        raise ValueError(f"{name} must be positive definite (per sample)") from None
    if not np.all(np.isfinite(L)):
        raise ValueError(f"{name} must be positive definite (per sample)")
    return Vs, np.ascontiguousarray(L)


def is_positive_scalar(V) -> bool:
    """True for a finite scalar ``V > 0`` (not bool), given as a number or a 0-d array."""
    if isinstance(V, (bool, np.bool_)):
        return False
    zero_dim = isinstance(V, np.ndarray) and V.ndim == 0 and V.dtype.kind in "iuf"
    if isinstance(V, numbers.Real) or zero_dim:
        try:
            v = float(V)
        except (OverflowError, TypeError, ValueError):
            return False
        return bool(np.isfinite(v) and v > 0)
    return False


def inverse_from_cholesky(L: np.ndarray) -> np.ndarray:
    """``V^{-1} = L^{-T} L^{-1}`` for a stack ``L (nV, K, K)`` of lower Cholesky factors,
    symmetrised (contiguous ``(nV, K, K)``)."""
    L = as_float_array(L, "L", ndim=3)
    if L.shape[1] != L.shape[2]:
        raise ValueError(f"L must have shape (nV, K, K), got {L.shape}")
    if np.any(np.diagonal(L, axis1=1, axis2=2) <= 0):
        raise ValueError("L must be lower Cholesky factors with a positive diagonal")
    K = L.shape[-1]
    Linv = np.linalg.solve(L, np.broadcast_to(np.eye(K), L.shape))
    W = np.swapaxes(Linv, 1, 2) @ Linv
    return np.ascontiguousarray(0.5 * (W + np.swapaxes(W, 1, 2)))


class GramVariance:
    """Per-sample variance shapes ``Gamma (n, K, K)`` (or one shared ``(K, K)``), validated,
    Cholesky-factored and inverted once, for GAMP's variances ``V_mu = v Gamma_mu``
    (docs/theory.md §5).

    Across GAMP iterations only the scalar ``v`` changes; :func:`amp_attention.losses.gram_g_out`
    evaluates ``g_out`` at ``v * Gamma`` without re-validating or re-factoring ``n`` matrices per
    iteration (the cross-entropy Newton solver works with ``V_mu^{-1} = Gamma_mu^{-1} / v``).

    Attributes: ``gamma``, ``chol`` and ``inv`` (nV, K, K) with nV in {1, n} (``chol`` lower
    Cholesky factor, ``inv = Gamma^{-1}`` symmetrised), ``diag`` (every Gamma diagonal).  Raises
    ValueError if Gamma is not symmetric positive definite.
    """

    def __init__(self, gamma):
        arr = as_float_array(gamma, "gamma")
        if arr.ndim not in (2, 3) or arr.shape[-1] != arr.shape[-2]:
            raise ValueError(f"gamma must have shape (K, K) or (n, K, K), got {arr.shape}")
        n = arr.shape[0] if arr.ndim == 3 else 1
        K = arr.shape[-1]
        self.gamma, self.chol = prepare_variance(arr, n, K, name="gamma")
        self.inv = inverse_from_cholesky(self.chol)
        self.diag = bool(np.all(self.gamma[:, ~np.eye(K, dtype=bool)] == 0.0))

    @property
    def shared(self) -> bool:
        return self.gamma.shape[0] == 1

    def scaled(self, v: float) -> np.ndarray:
        """``v Gamma`` as an ``(n, K, K)`` array, or ``(K, K)`` when shared (``v >= 0`` finite)."""
        v = check_nonnegative(v, "v")
        return v * (self.gamma[0] if self.shared else self.gamma)

    def weighted_trace(self, dg: np.ndarray) -> np.ndarray:
        """``Tr(Gamma_mu dg_mu)`` per sample for ``dg (n, K, K)``."""
        dg = np.asarray(dg, dtype=np.float64)
        K = self.gamma.shape[-1]
        if dg.ndim != 3 or dg.shape[1:] != (K, K) or (not self.shared and dg.shape[0] != self.gamma.shape[0]):
            raise ValueError(f"dg must have shape (n, {K}, {K}) matching gamma {self.gamma.shape}, got {dg.shape}")
        return np.sum(self.gamma * dg, axis=(1, 2))


def sample_variance(gamma) -> GramVariance:
    """GAMP's ``variance='sample'`` shapes: :class:`GramVariance` of the sample Gram matrices
    ``Gamma_mu (n, K, K)``, or, when some ``Gamma_mu`` is not finite and positive definite, the scalar
    shapes ``Gamma_mu = I_K`` (``variance='scalar'``) with a ``UserWarning``.

    The fallback is the ``d -> infinity`` form of the same variances (``E Gamma_mu = I_K``): GAMP then
    runs exactly as with ``variance='scalar'``.  It happens when ``K = T(T+1)/2 > d(d+1)/2`` (every
    ``Gamma_mu``, of rank at most ``d(d+1)/2``, is singular: a tiny token dimension ``d``), for
    degenerate tokens (e.g. a sequence of zero or repeated tokens), or when the tokens' scale
    over- or underflows the Gram matrices.
    """
    K = gamma.shape[-1]
    with np.errstate(all="ignore"):
        finite = bool(np.all(np.isfinite(gamma)))
    if finite:
        try:
            return GramVariance(gamma)
        except ValueError:
            pass
    n = gamma.shape[0] if gamma.ndim == 3 else 1
    N = None if gamma.ndim != 3 else "d(d+1)/2"
    reason = ("not finite (the tokens' scale overflows them)" if not finite else
              f"not all positive definite (K = {K} coordinates per sample need {N} >= K: is the token "
              "dimension d too small, or are some tokens zero, repeated or tiny?)")
    warnings.warn(f"variance='sample': the sample Gram matrices Gamma_mu of the {n} samples are {reason}; "
                  "falling back to variance='scalar' (V_mu = V I_K)", UserWarning, stacklevel=3)
    return GramVariance(np.eye(K))


def is_zero_variance(V) -> bool:
    """True for ``V = 0`` given as a scalar or an all-zero array (``V -> 0`` limit of ``g_out``)."""
    if isinstance(V, (numbers.Real, np.floating)) and not isinstance(V, bool):
        try:
            return float(V) == 0.0
        except (OverflowError, TypeError, ValueError):
            return False
    try:
        arr = np.asarray(V)
    except (TypeError, ValueError):  # ragged: not zero; prepare_variance names it
        return False
    return arr.size > 0 and arr.dtype.kind == "f" and not np.any(arr)

