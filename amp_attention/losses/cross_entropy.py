"""The cross-entropy loss: Newton prox and ``g_out`` (docs/theory.md §4, §5).

:class:`CrossEntropyLoss` (docs/theory.md §4), per sample:
``sum_a [ -beta sum_b y_ab h_ab + logsumexp_b(beta h_ab) ]``, convex, constant along the global
shift ``h -> h + c 11^T`` when the rows of ``y`` sum to one, i.e. along the whitened direction
``u ~ (1/c_k)_k`` (:func:`amp_attention.whitening.flat_direction`).  The prox and ``g_out``
contract is in :mod:`amp_attention.losses.base`.

Implementation: the cross-entropy prox is a damped Newton method, run per sample in the Numba
kernel ``ce_prox`` of :mod:`amp_attention.losses._cross_entropy_kernels` (parallel over samples,
compiled separately for each T so that all per-sample loops have fixed lengths); ``ce_prox_numpy``
beside it is an independently written, vectorised NumPy twin used by the tests.  Each Newton step
solves ``(V^{-1} + H) dz = -(grad_l + V^{-1}(z - omega))`` with one K x K Cholesky factorisation
and two triangular solves; ``V^{-1}`` is formed once per call (for GAMP once per run:
``GramVariance.inv``, scaled by ``1/v``).  ``H u = 0`` along the flat direction is harmless
(``V^{-1} + H >= V^{-1}``); when ``beta^2 ||V||`` nears 1/eps and rounding of H makes the matrix
numerically indefinite, the factorisation is retried with a relative diagonal shift at the
rounding level.  The damping is a line search on the (convex) prox objective along the Newton
direction, driven by its directional derivatives rather than Armijo backtracking on values: at
large beta the values cancel catastrophically, and Armijo backtracking needed 2-10x more Newton
steps (up to 300 at beta = 1e4, T = 8, versus <= 45).  Typical counts: 3-6 steps at beta = 1, ~10
at beta = 10.  The Hessian is assembled so that saturated softmax rows stay PSD to relative
precision; the solver is reliable up to about ``beta^2 ||V|| ~ 1e12`` (tested at beta = 1e4); far
beyond (e.g. beta = 1e6, V = 1e4) rounding limits convergence and the affected samples are
reported as failed in ``info`` (their outputs stay finite).  The Jacobian (full, or only its
trace for GAMP) is described in the kernel module.
"""


from __future__ import annotations


import numpy as np

from .._validation import check_positive
from ..model import row_softmax
from ..variance import (
    GramVariance,
    inverse_from_cholesky,
    is_positive_scalar,
    is_zero_variance,
    prepare_variance,
)
from ._cross_entropy_kernels import (
    CONVERGED_STEP,
    DEFAULT_MAX_NEWTON,
    DEFAULT_TOL,
    ce_grad_numpy,
    ce_hess_numpy,
    ce_jacobian_full,
    ce_prox,
    ce_softmax_parts_numpy,
    run_ce_value,
)
from ..whitening import pair_maps
from .base import (Loss, check_finite_result, check_H, check_jacobian, check_max_newton, check_targets, check_tol,
                   check_z, prox_buffers)

__all__ = ["CrossEntropyLoss", "cross_entropy_prox", "cross_entropy_g_out"]


def _ce_run(y, omega, V, beta, p0, tol, max_newton, jac_mode, vscale=1.0):
    """Validated inputs -> kernel outputs ``(p, g, dg, info)``.

    ``V`` is anything :func:`~amp_attention.variance.prepare_variance` accepts, or a
    :class:`~amp_attention.variance.GramVariance` (already factored and inverted; the variance is
    then ``vscale * V.gamma``).  A scalar ``V = v`` runs as ``v * I_K``, so that its trace mode
    (``Tr dg = Tr(V dg) / v``) takes the fast jac_mode 3."""
    n, K = omega.shape
    if isinstance(V, GramVariance):
        Vs, W, L, diag = V.gamma, V.inv, V.chol, V.diag
    elif is_positive_scalar(V):
        vscale = float(V)
        Vs = W = L = np.eye(K)[None]
        diag = True
        if jac_mode == 2:
            jac_mode = 3
    else:
        Vs, L = prepare_variance(V, n, K)
        W = inverse_from_cholesky(L)
        diag = bool(np.all(Vs[:, ~np.eye(K, dtype=bool)] == 0.0))
    z0 = omega if p0 is None else check_z(p0, "p0", y)
    kidx, cc = pair_maps(y.shape[1])
    kshape, tshape = (0,) * K, (0,) * y.shape[1]
    b = prox_buffers(n, K, jac_mode)
    p, g, dg, dgtr, iterations, status = b["p"], b["g"], b["dg"], b["dgtr"], b["iterations"], b["status"]
    ce_prox(
        y, omega, z0, Vs, W, diag, float(vscale), float(beta), kidx, cc, float(tol), int(max_newton),
        jac_mode == 3, b["nchunk"], p, g, dgtr, iterations, status, kshape, tshape,
    )
    if jac_mode in (1, 2):
        ce_jacobian_full(y, p, L, diag, float(vscale), float(beta), kidx, cc, jac_mode == 1, b["nchunk"], dg, dgtr,
                         status, kshape, tshape)
    converged = status <= CONVERGED_STEP
    info = {
        "n_iter": int(iterations.max()),
        "n_failed": int(np.count_nonzero(~converged)),
        "converged": converged,
    }
    if jac_mode in (2, 3):
        dg = dgtr
    return p, g, dg, info


def cross_entropy_prox(
    y, omega, V, beta, p0=None, tol: float = DEFAULT_TOL, max_newton: int = DEFAULT_MAX_NEWTON
):
    """Prox of the cross-entropy loss (docs/theory.md §5, "Prox details").

    ``p = argmin_z l_y(z) + 1/2 (z - omega)^T V^{-1} (z - omega)`` per sample, by damped Newton
    started at ``p0`` (default ``omega``).  The Newton system is
    ``(V^{-1} + H) dz = -F``, ``F = grad_l + V^{-1}(z - omega)`` (the gradient of the prox
    objective, ``H = hess l_y(z)``), solved by one Cholesky factorisation of the symmetric positive
    definite ``V^{-1} + H`` (``H u = 0`` along the flat direction is harmless: the matrix is
    ``>= V^{-1}``; if rounding of a huge H makes it numerically indefinite, the factorisation is
    retried with a relative diagonal shift of 64 eps, then 16x larger, at most 4 times).
    ``V^{-1}`` is computed once per call from the Cholesky factor of V.  Step length: a
    safeguarded line minimisation of the objective ``phi`` along ``dz`` (full step first;
    accepted when ``|phi'(t)| <= 0.1 |phi'(0)|`` and a decrease of ``phi`` is certain), see
    ``line_search`` in :mod:`amp_attention.losses._cross_entropy_kernels`.

    Stopping rule (per sample): the z-unit residual ``r = V grad_l(z) + z - omega`` satisfies
    ``||r||_inf <= tol (1 + ||omega||_inf + ||z||_inf) + floor``, or the Newton step satisfies
    ``||dz||_inf <= tol (1 + ||z||_inf) + min(floor, 1e-3 / beta)`` (that last step, well inside
    the region where the Newton model is accurate, is taken), where
    ``floor = 64 eps beta ||V||_inf`` is the rounding level of ``V grad_l`` (negligible unless
    beta ||V|| is large; the step test covers the stiff directions, where rounding of the
    softmax arguments dominates ``r``); at most ``max_newton`` Newton steps.

    Parameters
    ----------
    y : (n, T, T) raw targets, 2 <= T <= 8 (T = 1 is rejected: the softmax is degenerate).
    omega : (n, K); V : positive scalar, (K, K) or (n, K, K) SPD; beta : > 0.
    p0 : optional (n, K) warm start.

    Returns
    -------
    p : (n, K)
    info : dict with ``n_iter`` (max Newton steps used over samples), ``n_failed`` (samples that
        did not converge: max iterations or line-search failure; their ``p`` is the last iterate,
        finite) and ``converged`` (bool mask (n,)).
    """
    beta = check_positive(beta, "beta")
    y = check_targets(y, min_T=2)
    omega = check_z(omega, "omega", y)
    tol = check_tol(tol)
    max_newton = check_max_newton(max_newton)
    p, _, _, info = _ce_run(y, omega, V, beta, p0, tol, max_newton, 0)
    return check_finite_result("the cross-entropy prox", beta, p), info


def cross_entropy_g_out(
    y,
    omega,
    V,
    beta,
    p0=None,
    tol: float = DEFAULT_TOL,
    max_newton: int = DEFAULT_MAX_NEWTON,
    jacobian: str = "full",
):
    """``g_out`` of the cross-entropy loss (docs/theory.md §5, step 2).

    Returns ``(g, dg, info)``: ``g = -grad l_y(p)`` (n, K) (equal to ``V^{-1}(p - omega)`` at the
    prox); ``dg = -dg/domega = H (I + V H)^{-1}`` with ``H = hess l_y(p)``, symmetrised, shape
    (n, K, K) for ``jacobian="full"`` or its trace (n,) for ``jacobian="trace"`` (saves memory for
    large Monte Carlo batches).  ``info`` as in :func:`cross_entropy_prox` plus ``info["p"]``.
    """
    beta = check_positive(beta, "beta")
    y = check_targets(y, min_T=2)
    omega = check_z(omega, "omega", y)
    tol = check_tol(tol)
    max_newton = check_max_newton(max_newton)
    jac_mode = 1 if check_jacobian(jacobian) == "full" else 2
    p, g, dg, info = _ce_run(y, omega, V, beta, p0, tol, max_newton, jac_mode)
    check_finite_result("the cross-entropy g_out", beta, p, g, dg)
    info["p"] = p
    return g, dg, info


class CrossEntropyLoss(Loss):
    """``sum_a [ -beta sum_b y_ab h_ab + logsumexp_b(beta h_ab) ]`` per sample
    (docs/theory.md §4).

    ``beta > 0``; 2 <= T <= 8 (T = 1 is rejected by every method).  ``tol`` and ``max_newton``
    configure the Newton prox (see :func:`cross_entropy_prox`).
    """

    name = "cross_entropy"
    flat_invariant = True  # softmax of rows: invariant to h -> h + c 11^T
    smooth_g_out = True  # convex: the prox is Lipschitz in omega

    def __init__(
        self, beta: float = 1.0, tol: float = DEFAULT_TOL, max_newton: int = DEFAULT_MAX_NEWTON
    ):
        self.beta = check_positive(beta, "beta")
        self.tol = check_tol(tol)
        self.max_newton = check_max_newton(max_newton)

    def __repr__(self):
        return f"CrossEntropyLoss(beta={self.beta!r})"

    def _targets(self, y):
        return check_targets(y, min_T=2)

    def value(self, y, H):
        """Per-sample loss, shape (n,) (any real H; symmetric H in GAMP/ERM)."""
        y = self._targets(y)
        H = check_H(H, y)
        return check_finite_result("the cross-entropy loss", self.beta, ce_softmax_parts_numpy(y, H, self.beta)[0])

    def grad_h(self, y, H):
        """``beta (softmax(beta H_a) - y_a)`` row-wise, shape (n, T, T)."""
        y = self._targets(y)
        H = check_H(H, y)
        _, s = ce_softmax_parts_numpy(y, H, self.beta)
        with np.errstate(over="ignore"):
            return check_finite_result("the cross-entropy gradient", self.beta, self.beta * (s - y))

    def value_z(self, y, z):
        """``l_y(z) = value(y, unwhiten(z))``, shape (n,)."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(all="ignore"):
            return check_finite_result("the cross-entropy loss", self.beta, run_ce_value(y, z, self.beta))

    def grad_z(self, y, z):
        """Gradient of ``l_y`` in whitened coordinates, shape (n, K); orthogonal to ``u`` when the
        rows of ``y`` sum to one."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(all="ignore"):
            return check_finite_result("the cross-entropy gradient", self.beta, ce_grad_numpy(y, z, self.beta))

    def hess_z(self, y, z):
        """Hessian of ``l_y`` in whitened coordinates, shape (n, K, K), PSD, ``hess u = 0``."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(all="ignore"):
            return check_finite_result("the cross-entropy Hessian", self.beta, ce_hess_numpy(y, z, self.beta))

    def prox(self, y, omega, V, p0=None):
        """See :func:`cross_entropy_prox`."""
        return cross_entropy_prox(
            y, omega, V, self.beta, p0=p0, tol=self.tol, max_newton=self.max_newton
        )

    def check_T(self, T: int) -> None:
        if T == 1:
            raise ValueError("loss='cross_entropy' needs T >= 2: with T = 1 the softmax target is y = 1")

    def link(self, h):
        """Row-wise ``softmax(beta h)``."""
        return row_softmax(h, self.beta)

    def min_value(self, y) -> np.ndarray:
        """``min_z l_y(z)`` = the row entropies ``-sum_ab y_ab log y_ab`` (rows of y summing to one)."""
        y = self._targets(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0).sum(axis=(1, 2))

    def g_out_gram(self, y, omega, v, gram, p0=None):
        """Fused path of :func:`~amp_attention.losses.base.gram_g_out`: the kernel returns
        ``Tr(Gamma_mu dg_mu)`` directly."""
        y = self._targets(y)
        omega = check_z(omega, "omega", y)
        if not isinstance(gram, GramVariance):
            raise ValueError(f"gram must be a GramVariance, got {type(gram).__name__}")
        if gram.gamma.shape[0] not in (1, y.shape[0]) or gram.gamma.shape[1] != omega.shape[1]:
            raise ValueError(f"gram has shape {gram.gamma.shape}, incompatible with omega {omega.shape}")
        v = check_positive(v, "v")
        p, g, a, info = _ce_run(y, omega, gram, self.beta, p0, self.tol, self.max_newton, 3, vscale=v)
        info["p"] = p
        return g, a, info

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """See :func:`cross_entropy_g_out`."""
        if is_zero_variance(V):
            return self._g_out_zero_variance(y, omega, jacobian)
        return cross_entropy_g_out(
            y, omega, V, self.beta, p0=p0, tol=self.tol, max_newton=self.max_newton,
            jacobian=jacobian,
        )
