"""The output-factor contract of a loss: :class:`Loss`, argument validation, :func:`gram_g_out`.

Proximal map and ``g_out`` (docs/theory.md §5, step 2 and "Prox details")
--------------------------------------------------------------------------
For each sample, with ``V`` a symmetric positive definite ``K x K`` variance,

    p      = argmin_z  l_y(z) + 1/2 (z - omega)^T V^{-1} (z - omega)
    g      = V^{-1} (p - omega) = -grad l_y(p)            (the latter form is used)
    dg     = -dg/domega = H (I + V H)^{-1},  H = hess l_y(p)   (symmetric PSD, returned symmetrised)

``V`` may be given as a positive scalar (``V = v I_K`` for every sample, the state-evolution case),
a ``(K, K)`` matrix shared by all samples, or a ``(n, K, K)`` stack (per-sample variances
``V^t Gamma_mu`` of GAMP); see :mod:`amp_attention.variance`.  Shared variances are never
broadcast to ``(n, K, K)`` in memory.

The ``g_out`` methods of the loss classes also accept ``V = 0`` (scalar or all-zero array), the
``V -> 0`` limit reached by GAMP when the denoiser is locally constant: ``p = omega``,
``g = -grad l_y(omega)``, ``dg = hess l_y(omega)``.  The functions ``*_prox``/``*_g_out`` require
``V`` positive definite.

Facts worth knowing (tested in ``tests/test_losses.py``): ``g`` is orthogonal to the flat
direction ``u`` (``u^T V^{-1}(p - omega) = 0``) and ``dg u = 0``; the u-component of ``omega`` is
left unchanged by the prox (``u^T p = u^T omega``) only when ``u`` is an eigenvector of ``V``
(e.g. ``V = v I``), not for general per-sample ``V``.

The validation helpers (:func:`check_targets`, :func:`check_H`, :func:`check_z`,
:func:`check_jacobian`) are shared by the losses and by the Bayes output functions
(:mod:`amp_attention.bayes_outputs`).
"""


from __future__ import annotations

import numbers

import numpy as np

from .._validation import as_float_array, check_nonnegative, check_positive, check_T
from ..factors import OutputFactor
from ..variance import GramVariance
from ..whitening import n_pairs

__all__ = ["Loss", "gram_g_out", "check_targets", "check_H", "check_z", "check_jacobian", "check_tol",
           "check_max_newton", "check_finite_result", "prox_buffers"]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def check_targets(y, min_T: int = 1) -> np.ndarray:
    """Targets ``y`` of shape ``(n, T, T)``, n >= 1, ``min_T <= T <= 8``, finite -> float64."""
    y = as_float_array(y, "y", ndim=3)
    if y.shape[1] != y.shape[2]:
        raise ValueError(f"y must have shape (n, T, T), got {y.shape}")
    T = check_T(y.shape[1])
    if T < min_T:
        raise ValueError(
            "the cross-entropy (softmax) loss needs T >= 2 tokens: with T = 1 the softmax of a "
            f"single logit is identically 1 and the loss is degenerate; got y of shape {y.shape}"
        )
    return np.ascontiguousarray(y)


def check_H(H, y: np.ndarray) -> np.ndarray:
    H = as_float_array(H, "H", ndim=3)
    if H.shape != y.shape:
        raise ValueError(f"H must have the shape of y {y.shape}, got {H.shape}")
    return H


def check_z(z, name: str, y: np.ndarray) -> np.ndarray:
    n, T = y.shape[0], y.shape[1]
    K = n_pairs(T)
    z = as_float_array(z, name, ndim=2)
    if z.shape != (n, K):
        raise ValueError(f"{name} must have shape (n, K) = ({n}, {K}) to match y, got {z.shape}")
    return np.ascontiguousarray(z)


def check_tol(tol) -> float:
    """Newton tolerance of a prox: a finite number > 0."""
    return check_positive(tol, "tol")


def check_max_newton(max_newton) -> int:
    """Newton step budget of a prox: an integer >= 1."""
    if isinstance(max_newton, bool) or not isinstance(max_newton, numbers.Integral) or max_newton < 1:
        raise ValueError(f"max_newton must be an integer >= 1, got {max_newton!r}")
    return int(max_newton)


def check_finite_result(what: str, beta, *arrays):
    """Return ``arrays`` (one array: itself) if every value is finite, else a ``ValueError``:
    the loss's ``what`` overflows float64 for these inputs (``beta`` None for the square loss)."""
    if all(a is None or np.all(np.isfinite(a)) for a in arrays):
        return arrays[0] if len(arrays) == 1 else arrays
    temp = "" if beta is None else f" at beta = {beta!r}"
    raise ValueError(f"{what} overflows float64{temp}: the inputs (y, H / z / omega, V){' times beta' if beta is not None else ''} "
                     "are too large to represent the result; rescale them")


def check_jacobian(jacobian) -> str:
    if not isinstance(jacobian, str) or jacobian not in ("full", "trace"):
        raise ValueError(f"jacobian must be 'full' or 'trace', got {jacobian!r}")
    return jacobian


# --------------------------------------------------------------------------------------------
# The output-factor contract of a loss, and g_out at GAMP's variances v Gamma_mu
# --------------------------------------------------------------------------------------------


class Loss(OutputFactor):
    """Common interface of the per-sample losses, an :class:`~amp_attention.factors.OutputFactor`
    (docs/theory.md §4, §5).

    All methods take the raw targets ``y`` of shape ``(n, T, T)`` (n >= 1) and work in float64:

    * ``value(y, H) -> (n,)``, ``grad_h(y, H) -> (n, T, T)``: loss and its derivative w.r.t. the
      entries of ``H (n, T, T)`` treated as independent (what a direct ERM solver backprojects);
    * ``value_z(y, z) -> (n,)``, ``grad_z(y, z) -> (n, K)``, ``hess_z(y, z) -> (n, K, K)``: the
      loss ``l_y(z) = loss(y, unwhiten(z))`` in whitened coordinates;
    * ``prox(y, omega, V, p0=None) -> (p, info)`` and
      ``g_out(y, omega, V, p0=None, jacobian="full") -> (g, dg, info)``, see the module docstring;
    * ``g_out_gram(y, omega, v, gram, p0=None) -> (g, a, info)``: ``g_out`` at GAMP's variances
      ``v Gamma_mu`` with ``a_mu = Tr(Gamma_mu dg_mu)`` (a loss with a fused kernel overrides it);
    * ``link(h)``: the model output from preactivations (``predict``);
    * ``min_value(y) -> (n,)``: ``min_z l_y(z)`` (the interpolation threshold's floor).
    """

    name = "loss"

    def _targets(self, y):
        return check_targets(y)

    def value(self, y, H):  # pragma: no cover - abstract
        raise NotImplementedError

    def grad_h(self, y, H):  # pragma: no cover - abstract
        raise NotImplementedError

    def value_z(self, y, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def grad_z(self, y, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def hess_z(self, y, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def prox(self, y, omega, V, p0=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def g_out(self, y, omega, V, p0=None, jacobian="full"):  # pragma: no cover - abstract
        raise NotImplementedError

    def _g_out_zero_variance(self, y, omega, jacobian="full"):
        """The ``V -> 0`` limit of ``g_out``: ``p = omega``, ``g = -grad l_y(omega)``,
        ``dg = hess l_y(omega)``.

        GAMP reaches ``V = 0`` when the denoiser maps a neighbourhood of ``R`` to a constant (e.g.
        every eigenvalue below the nuclear threshold: ``S = 0``, divergence 0).
        """
        jacobian = check_jacobian(jacobian)
        omega = check_z(omega, "omega", self._targets(y))
        g = -self.grad_z(y, omega)
        H = self.hess_z(y, omega)
        dg = np.trace(H, axis1=1, axis2=2) if jacobian == "trace" else H
        n = omega.shape[0]
        info = {"n_iter": 0, "n_failed": 0, "converged": np.ones(n, dtype=bool), "p": omega.copy()}
        return g, dg, info


def gram_g_out(loss, y, omega, v: float, gram: GramVariance, p0=None):
    """``g_out`` of ``loss`` at ``V_mu = v Gamma_mu`` (docs/theory.md §5, steps 2-3).

    Returns ``(g (n, K), a (n,), info)`` with ``a_mu = Tr(Gamma_mu dg_mu)``, ``dg = -dg/domega``:
    GAMP needs only ``A_hat = sum_mu a_mu / d^2``.  Losses with a fused kernel (cross-entropy)
    compute ``a`` without forming the ``(n, K, K)`` Jacobian; any other output object with a
    ``g_out(y, omega, V, p0=...)`` method (square loss, Bayes outputs) goes through it.
    ``v = 0`` gives the ``V -> 0`` limit.
    """
    if not isinstance(gram, GramVariance):
        raise ValueError(f"gram must be a GramVariance, got {type(gram).__name__}")
    if not callable(getattr(loss, "g_out", None)):
        raise ValueError(f"loss must be an output factor with a g_out method, got {type(loss).__name__}")
    v = check_nonnegative(v, "v")
    if v > 0:
        return loss.g_out_gram(y, omega, v, gram, p0)
    g, dg, info = loss.g_out(y, omega, gram.scaled(v), p0=p0)
    return g, gram.weighted_trace(dg), info


def prox_buffers(n: int, K: int, jac_mode: int) -> dict:
    """Output arrays of the compiled prox kernels (``ce_prox``, ``ss_prox``) for ``n`` samples of
    ``K`` components: ``p, g (n, K)``, ``dg (n, K, K)`` (jac_mode 1, else a dummy ``(1, 1, 1)``),
    ``dgtr (n,)`` (jac_mode 2 or 3, else a dummy ``(1,)``), ``iterations, status (n,)`` int64, and
    ``nchunk`` the number of work chunks (8 per Numba thread, at most n)."""
    import numba

    return {
        "p": np.empty((n, K)),
        "g": np.empty((n, K)),
        "dg": np.empty((n, K, K)) if jac_mode == 1 else np.empty((1, 1, 1)),
        "dgtr": np.empty(n) if jac_mode in (2, 3) else np.empty(1),
        "iterations": np.empty(n, dtype=np.int64),
        "status": np.empty(n, dtype=np.int64),
        "nchunk": int(min(n, 8 * numba.get_num_threads())),
    }
