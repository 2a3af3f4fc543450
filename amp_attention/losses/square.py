"""The square loss: closed-form prox and ``g_out`` (docs/theory.md §4, §5).

:class:`SquareLoss` (docs/theory.md §4), per sample: ``1/2 ||y - h||_F^2`` over all ``T x T``
entries.  In whitened coordinates ``l_y(z) = ||z_y - z||^2 + 1/2 ||(y - y^T)/2||_F^2`` with
``z_y = whiten(y)`` (symmetric part).  The prox and ``g_out`` (contract in
:mod:`amp_attention.losses.base`) are closed form, vectorised NumPy:
``p = (I + 2V)^{-1} (2 V z_y + omega)``, ``g = 2 (z_y - p)``, ``dg = 2 (I + 2V)^{-1}``.
"""


from __future__ import annotations

import numpy as np

from ..factors import Conjugates
from ..variance import is_zero_variance, prepare_variance
from ..whitening import whiten
from .base import Loss, check_finite_result, check_H, check_jacobian, check_targets, check_z

__all__ = ["SquareLoss", "square_prox", "square_g_out"]


def _square_value(y, H):
    return 0.5 * np.sum((y - H) ** 2, axis=(1, 2))


def _square_value_z(y, z):
    zy = whiten(y)
    anti = 0.5 * (y - np.swapaxes(y, 1, 2))
    return np.sum((z - zy) ** 2, axis=1) + 0.5 * np.sum(anti**2, axis=(1, 2))


def _apply_shared_or_stacked(M, x):
    """``M (nV, K, K)`` times ``x (n, K)`` per sample (``nV == 1`` broadcasts)."""
    if M.shape[0] == 1:
        return x @ M[0].T
    return np.einsum("nij,nj->ni", M, x)


def _square_prox_core(y, omega, Vs):
    """Returns ``p, g, A`` with ``A = (I + 2V)^{-1}`` as ``(nV, K, K)``."""
    K = omega.shape[1]
    zy = whiten(y)
    A = np.linalg.inv(np.eye(K)[None] + 2.0 * Vs)
    A = 0.5 * (A + np.swapaxes(A, 1, 2))
    p = _apply_shared_or_stacked(A, 2.0 * _apply_shared_or_stacked(Vs, zy) + omega)
    g = 2.0 * (zy - p)
    return p, g, A


def _closed_form_info(n):
    return {"n_iter": 0, "n_failed": 0, "converged": np.ones(n, dtype=bool)}


def square_prox(y, omega, V):
    """Prox of the square loss ``1/2 ||y - h||_F^2`` (docs/theory.md §5, "Prox details").

    Parameters
    ----------
    y : (n, T, T) raw targets (not necessarily symmetric), 1 <= T <= 8.
    omega : (n, K) whitened centres, ``K = T(T+1)/2``.
    V : positive scalar (``v I_K``), ``(K, K)`` or ``(n, K, K)`` symmetric positive definite.

    Returns
    -------
    p : (n, K), ``p = (I + 2V)^{-1} (2 V z_y + omega)`` with ``z_y = whiten(y)``.
    info : dict ``{"n_iter": 0, "n_failed": 0, "converged": ones(n, bool)}`` (closed form).
    """
    y = check_targets(y)
    omega = check_z(omega, "omega", y)
    Vs, _ = prepare_variance(V, y.shape[0], omega.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):
        p, _, _ = _square_prox_core(y, omega, Vs)
    return check_finite_result("the square-loss prox", None, p), _closed_form_info(y.shape[0])


def square_g_out(y, omega, V, jacobian: str = "full"):
    """``g_out`` of the square loss (docs/theory.md §5, step 2).

    Returns ``(g, dg, info)``: ``g = 2 (z_y - p) = -grad l_y(p)`` of shape (n, K);
    ``dg = -dg/domega = 2 (I + 2V)^{-1}`` of shape (n, K, K) (``jacobian="full"``) or its trace,
    shape (n,) (``jacobian="trace"``); ``info`` as in :func:`square_prox` plus ``info["p"]``.
    """
    y = check_targets(y)
    omega = check_z(omega, "omega", y)
    jacobian = check_jacobian(jacobian)
    n, K = omega.shape
    Vs, _ = prepare_variance(V, n, K)
    with np.errstate(over="ignore", invalid="ignore"):
        p, g, A = _square_prox_core(y, omega, Vs)
    check_finite_result("the square-loss g_out", None, p, g, A)
    if jacobian == "full":
        dg = np.empty((n, K, K))
        dg[...] = 2.0 * A
    else:
        dg = np.empty(n)
        dg[...] = 2.0 * np.trace(A, axis1=1, axis2=2)
    info = _closed_form_info(n)
    info["p"] = p
    return g, dg, info


class SquareLoss(Loss):
    """``1/2 ||y - h||_F^2`` over all T x T entries (docs/theory.md §4); 1 <= T <= 8.

    In whitened coordinates ``l_y(z) = ||z_y - z||^2 + 1/2 ||(y - y^T)/2||_F^2``,
    ``z_y = whiten(y)``; ``grad_z = 2 (z - z_y)``, ``hess_z = 2 I``.
    """

    name = "square"
    smooth_g_out = True  # g is affine in omega

    def __repr__(self):
        return "SquareLoss()"

    def value(self, y, H):
        """Per-sample loss ``1/2 ||y - H||_F^2``, shape (n,)."""
        y = self._targets(y)
        H = check_H(H, y)
        with np.errstate(over="ignore", invalid="ignore"):
            return check_finite_result("the square loss", None, _square_value(y, H))

    def grad_h(self, y, H):
        """``H - y``, shape (n, T, T)."""
        y = self._targets(y)
        H = check_H(H, y)
        with np.errstate(over="ignore", invalid="ignore"):
            return check_finite_result("the square-loss gradient", None, H - y)

    def value_z(self, y, z):
        """``l_y(z)`` (n,) for z (n, K); equals ``value(y, unwhiten(z))``."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(over="ignore", invalid="ignore"):
            return check_finite_result("the square loss", None, _square_value_z(y, z))

    def grad_z(self, y, z):
        """``2 (z - z_y)``, shape (n, K)."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(over="ignore", invalid="ignore"):
            return check_finite_result("the square-loss gradient", None, 2.0 * (z - whiten(y)))

    def hess_z(self, y, z):
        """``2 I_K`` per sample, shape (n, K, K)."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        out = np.zeros((z.shape[0], z.shape[1], z.shape[1]))
        out[:, np.arange(z.shape[1]), np.arange(z.shape[1])] = 2.0
        return out

    def prox(self, y, omega, V, p0=None):
        """Closed form, see :func:`square_prox` (``p0`` is accepted and ignored)."""
        return square_prox(y, omega, V)

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """See :func:`square_g_out` (``p0`` is accepted and ignored)."""
        if is_zero_variance(V):
            return self._g_out_zero_variance(y, omega, jacobian)
        return square_g_out(y, omega, V, jacobian=jacobian)

    def link(self, h):
        """The model output is the preactivation itself."""
        return h

    def min_value(self, y) -> np.ndarray:
        """``min_z l_y(z) = 1/2 ||(y - y^T)/2||_F^2`` (reached at ``z = whiten(y)``), shape (n,)."""
        y = self._targets(y)
        return self.value_z(y, whiten(y))

    def se_conjugates(self, sample, m, q, V) -> Conjugates:
        """Closed form (docs/theory.md §7): ``g = 2 (z_y - omega)/(1 + 2V)`` is affine in omega, so
        only ``c1 = E||z_y||^2/K`` and ``c2 = E[z_y . z*]/K`` enter (``sample.square_moments()``)::

            A_hat = 2 alpha K / (1 + 2V),  m_hat = 2 alpha K c2 / (Q* (1 + 2V)),
            q_hat = 4 alpha K (c1 - 2 (m/Q*) c2 + q) / (1 + 2V)^2
        """
        alpha, K, Q = sample.alpha, sample.K, sample.Q
        c1, c2 = sample.square_moments()
        A_hat = 2 * alpha * K / (1 + 2 * V)
        m_hat = 2 * alpha * K * c2 / (Q * (1 + 2 * V))
        q_hat = 4 * alpha * K * (c1 - 2 * (m / Q) * c2 + q) / (1 + 2 * V) ** 2
        return Conjugates(A_hat, m_hat, q_hat, {"A_hat": 0.0, "m_hat": 0.0, "q_hat": 0.0})
