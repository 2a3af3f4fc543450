"""The softmax-square loss: multi-start Newton prox and ``g_out`` (docs/theory.md §4, §5).

The loss
--------
:class:`SoftmaxSquareLoss` (the ERM loss of arXiv 2509.24914), per sample, over all ``T x T``
entries and with **no factor 1/2**::

    l(y, h) = sum_a || y_a - softmax(beta h_a) ||^2

with the softmax taken row-wise and computed as ``softmax(beta (h_a - max_b h_ab))``, stable for
every ``beta > 0``.  The paper's regularisation strength ``lambda`` is this package's ``lam`` with
``reg='nuclear'`` (docs/theory.md §4).  ``T = 1`` is rejected (a softmax of one entry is
identically 1, so the loss is constant).  The loss is bounded (``0 <= l <= 2T``), constant along
the global shift ``h -> h + c 11^T`` (the whitened flat direction ``u ~ (1/c_k)_k``,
:func:`amp_attention.whitening.flat_direction`) whatever ``y``, and **not convex** in ``h``: each
row saturates (flat plateaus far from the data) and the prox objective can have several local
minima.  In whitened coordinates ``z`` (docs/theory.md §2) ``l_y(z) = l(y, unwhiten(z))``; the
gradient and Hessian formulas are in :mod:`amp_attention.losses._softmax_square_kernels`.

The prox (docs/theory.md §5, "Output factor of a loss")
-------------------------------------------------------
The contract is that of :mod:`amp_attention.losses.base`::

    p  = argmin_z  l_y(z) + 1/2 (z - omega)^T V^{-1} (z - omega)       (the GLOBAL minimiser)
    g  = V^{-1} (p - omega) = -grad l_y(p)
    dg = -dg/domega = H (I + V H)^{-1},   H = hess l_y(p)

Because ``l_y`` is not convex, ``p`` is searched for globally: a safeguarded (modified) Newton
method is run from several starts and the result with the lowest prox objective is kept.

1. ``omega``;
2. ``z_y``, where the loss vanishes when ``y`` is the row softmax of a symmetric matrix:
   ``L_ab = log(y_ab) / beta``, ``h_ab = L_ab + c_a`` with the row offsets ``c`` chosen by least
   squares to make ``h`` symmetric (then symmetrised).  Entries ``y_ab <= 0`` (one-hot or
   underflowed targets, whose loss only vanishes at infinity) enter as ``1e-4``: the start then
   lies where the target's entries dominate their rows.  (Without it, one-hot targets lost the
   global minimiser on up to a third of the samples at ``beta = 20``, ``T = 2``.);
3. the warm start ``p0`` if given (GAMP passes the previous iteration's ``p``);
4. **row flips** of the best point so far: for each row ``a`` and each target (the centred rows
   ``h_a - mean(h_a)`` of ``omega`` and of ``z_y``), the point whose centred rows are those of the
   kept minimiser except row ``a``, which takes the target's (least squares); skipped when row
   ``a`` is already within ``0.1/beta`` of the target.  A flip that lowers the objective is kept
   and the sweep goes on from it; sweeps repeat while one improves (at most 4).

Why the flips: each row of ``y`` can be fitted (``s_a ~ y_a``) or left on a plateau near
``omega`` (saturated, where the quadratic term is cheaper), and the global minimiser often mixes
the two; Newton from ``omega`` (nothing fitted) and from ``z_y`` (everything fitted) misses such
mixtures (about 1% of samples at ``beta = 5``, ``T = 2``, in the tests' distribution).
Starts 2-4 are first moved along the flat direction ``u`` to the minimiser of the quadratic term
(exact, since ``l_y`` is constant along ``u``).  Ties (objectives within ``1e-12`` relative) keep
the earlier run, so a sample whose runs all reach one minimiser reports ``info["start"] == 0``.

Newton, per run: the step solves ``(V^{-1} + H) dz = -F`` (``F`` = gradient of the prox
objective) by Cholesky; if ``V^{-1} + H`` is not positive definite it is shifted by ``tau I``
(its most negative eigenvalue mirrored); Armijo backtracking on the prox objective, where a step
may raise the loss by at most 0.5 (without this cap a Newton step of the quadratic model jumps
over a rise of the loss, e.g. from a fitted row onto a plateau, and the search lost the global
minimiser); at a saddle point a step along the negative-curvature direction.  Stop when the
z-unit residual ``||V grad_l + z - omega||_inf <= tol (1 + ||omega||_inf + ||z||_inf) + floor``
(``tol = 1e-11``, ``floor = 64 eps beta ||V||_inf``) with ``V^{-1} + H`` positive semidefinite, or
after a final Newton step below ``tol (1 + ||z||_inf) + min(floor, 1e-3/beta)``.  Samples whose
kept run did not converge (``max_newton`` steps per run, line search, saddle) are counted in
``info["n_failed"]``; their outputs stay finite.

Cost (measured, n = 20000 noisy-softmax samples, mean Newton steps per sample summed over all
runs, V = 0.1 / 1 / 10): T = 2: 12 / 20 / 23 at ``beta = 1``, 20 / 26 / 33 at ``beta = 5``;
T = 3: 16 / 28 / 38 and 36 / 47 / 63; a single run takes 3-9 steps (``info["iterations"]``).
The flips are most of it: at ``beta = 1`` the run from omega is kept on virtually every sample.

How global: at ``T = 2`` the result matched a dense-grid and a 42-start BFGS reference on every
tested sample (noisy-softmax and one-hot targets, ``beta`` up to 20, ``V`` from 1e-3 to 1e3,
per-sample ``V``; see ``tests/test_softmax_square.py``).  For ``T >= 3`` the rows share their
off-diagonal entries and a few samples keep a slightly worse local minimum: against a 42-start
BFGS reference at ``T = 3``, 3 of 140 noisy-softmax samples at ``beta = 5`` (objective gaps
below 0.02), none of 140 at ``beta = 1``.  No certificate of global optimality is computed.

**Single-start option** (``start=`` of :func:`softmax_square_prox`, :func:`softmax_square_g_out`
and the class methods): the local minimiser reached by the same Newton method from ``start``
(n, K) only -- no other start, no flip, no flat projection, ``p0`` ignored.  This is the
convention of a published state evolution that starts the prox at the teacher ``z*``
(``start = z_star``).

**Jacobian.** ``dg`` is the derivative of ``g`` along the branch of local minimisers through
``p`` (implicit function theorem at ``p``): with ``N = V^{-1} + H`` (positive definite at a strict
local minimum), ``dg = H N^{-1} V^{-1}``, symmetric but, unlike for convex losses, not necessarily
positive semidefinite (``H`` can be indefinite).  Where two starts' minima exchange the lowest
objective, ``g`` jumps and ``dg`` describes neither side's jump.  ``u^T g = 0`` and ``dg u = 0``
hold for every ``y`` (the loss is flat along ``u`` for any targets).

``V`` is a positive scalar, a shared ``(K, K)`` or a per-sample ``(n, K, K)`` variance
(:mod:`amp_attention.variance`); the class's ``g_out`` also accepts ``V = 0`` (the ``V -> 0``
limit: ``p = omega``, ``g = -grad l_y(omega)``, ``dg = hess l_y(omega)``).  GAMP's
``gram_g_out`` takes the fused path :meth:`SoftmaxSquareLoss.g_out_gram`, which returns
``Tr(Gamma_mu dg_mu) = Tr(N^{-1} H) / v`` without forming the ``(n, K, K)`` Jacobians.
"""

from __future__ import annotations


import numpy as np

from .._validation import check_positive
from ..model import row_softmax
from ..variance import GramVariance, inverse_from_cholesky, is_positive_scalar, is_zero_variance, prepare_variance
from ._softmax_square_kernels import (
    CONVERGED_STEP,
    DEFAULT_MAX_NEWTON,
    DEFAULT_TOL,
    run_ss_derivs,
    run_ss_prox,
    run_ss_target_point,
    run_ss_value,
)
from .base import (Loss, check_finite_result, check_H, check_jacobian, check_max_newton, check_targets, check_tol,
                   check_z)

__all__ = ["SoftmaxSquareLoss", "softmax_square_prox", "softmax_square_g_out"]


def _check_targets(y) -> np.ndarray:
    y = check_targets(y)
    if y.shape[1] < 2:
        raise ValueError(
            "the softmax-square loss needs T >= 2 tokens: with T = 1 the softmax of a single entry "
            f"is identically 1 and the loss is constant; got y of shape {y.shape}"
        )
    return y


def _variance(V, n: int, K: int):
    """``(V, V^{-1})`` as ``(nV, K, K)`` arrays (validated; a scalar ``v`` gives ``v I_K``)."""
    if is_positive_scalar(V):
        v = float(V)
        eye = np.eye(K)[None]
        return v * eye, eye / v
    Vs, L = prepare_variance(V, n, K)
    return Vs, inverse_from_cholesky(L)


def _run(y, omega, Vs, W, beta, p0, start, tol, max_newton, jac_mode):
    with np.errstate(all="ignore"):
        p, g, jac, iterations, status, start_used = run_ss_prox(
            y, omega, Vs, W, beta, p0=p0, start=start, tol=tol, max_newton=max_newton,
            jac_mode=jac_mode,
        )
    if jac_mode != 3:  # (GAMP's fused path: non-finite values go to GAMP's divergence check)
        check_finite_result("the softmax-square prox", beta, p, g, jac)
    converged = status <= CONVERGED_STEP
    info = {
        "p": p,
        "n_iter": int(iterations.max()),
        "n_failed": int(np.count_nonzero(~converged)),
        "converged": converged,
        "iterations": iterations,
        "status": status,
        "start": start_used,
    }
    return g, jac, info


def _prepare(y, omega, beta, p0, start, tol, max_newton):
    beta = check_positive(beta, "beta")
    y = _check_targets(y)
    omega = check_z(omega, "omega", y)
    if start is not None:
        start = check_z(start, "start", y)
        p0 = None
    elif p0 is not None:
        p0 = check_z(p0, "p0", y)
    return y, omega, beta, p0, start, check_tol(tol), check_max_newton(max_newton)


def softmax_square_prox(
    y, omega, V, beta, p0=None, start=None, tol: float = DEFAULT_TOL,
    max_newton: int = DEFAULT_MAX_NEWTON,
):
    """Prox of the softmax-square loss (docs/theory.md §5; see the module docstring).

    Parameters
    ----------
    y : (n, T, T) raw targets, 2 <= T <= 8.
    omega : (n, K); V : positive scalar, (K, K) or (n, K, K) symmetric positive definite;
    beta : finite > 0.
    p0 : optional (n, K) warm start, an extra start of the multi-start search.
    start : optional (n, K): single-start mode (the local minimiser reached from ``start``
        only; ``p0`` is then ignored).
    tol, max_newton : stopping tolerance and Newton steps per start.

    Returns
    -------
    p : (n, K)
    info : dict with ``n_iter`` (most Newton steps of a sample, summed over its starts),
        ``n_failed`` (samples whose kept run did not converge), ``converged`` (bool (n,)),
        ``iterations`` (n,) (Newton steps summed over all runs), ``status`` (n,) (codes of the
        kernel module), ``start`` (n,): the run kept, 0 = omega, 1 = z_y, 2 = ``p0`` or the
        single start, 3 = a row flip; and ``p``.
    """
    y, omega, beta, p0, start, tol, max_newton = _prepare(
        y, omega, beta, p0, start, tol, max_newton
    )
    Vs, W = _variance(V, y.shape[0], omega.shape[1])
    _, _, info = _run(y, omega, Vs, W, beta, p0, start, tol, max_newton, 0)
    return info["p"], info


def softmax_square_g_out(
    y, omega, V, beta, p0=None, start=None, tol: float = DEFAULT_TOL,
    max_newton: int = DEFAULT_MAX_NEWTON, jacobian: str = "full",
):
    """``g_out`` of the softmax-square loss (docs/theory.md §5, step 2).

    Returns ``(g, dg, info)``: ``g = -grad l_y(p)`` (n, K) (``= V^{-1}(p - omega)`` at the prox);
    ``dg = -dg/domega = H (I + V H)^{-1}``, ``H = hess l_y(p)``, symmetrised, (n, K, K) for
    ``jacobian="full"`` or its trace (n,) for ``jacobian="trace"``; ``info`` as in
    :func:`softmax_square_prox` (with ``info["p"]``).  Arguments as there.
    """
    y, omega, beta, p0, start, tol, max_newton = _prepare(
        y, omega, beta, p0, start, tol, max_newton
    )
    jac_mode = 1 if check_jacobian(jacobian) == "full" else 2
    Vs, W = _variance(V, y.shape[0], omega.shape[1])
    return _run(y, omega, Vs, W, beta, p0, start, tol, max_newton, jac_mode)


class SoftmaxSquareLoss(Loss):
    """``sum_a ||y_a - softmax(beta h_a)||^2`` per sample, no factor 1/2 (docs/theory.md §4).

    ``beta`` finite > 0; 2 <= T <= 8 (T = 1 is rejected by every method).  ``tol`` and
    ``max_newton`` configure the Newton prox (see :func:`softmax_square_prox`).  Not convex: the
    prox is the global minimiser over several starts, or with ``start=`` the local minimiser
    reached from a given start (module docstring).
    """

    name = "softmax_square"
    flat_invariant = True  # row softmaxes: invariant to h -> h + c 11^T
    smooth_g_out = False  # the global minimiser can jump between branches: the SE uses Stein on g

    def __init__(
        self, beta: float = 1.0, tol: float = DEFAULT_TOL, max_newton: int = DEFAULT_MAX_NEWTON,
        prox_start: str = "global",
    ):
        self.beta = check_positive(beta, "beta")
        self.tol = check_tol(tol)
        self.max_newton = check_max_newton(max_newton)
        if not isinstance(prox_start, str) or prox_start not in ("global", "teacher"):
            raise ValueError(f"prox_start must be 'global' or 'teacher', got {prox_start!r}")
        self.prox_start = prox_start

    def __repr__(self):
        extra = "" if self.prox_start == "global" else f", prox_start={self.prox_start!r}"
        return f"SoftmaxSquareLoss(beta={self.beta!r}{extra})"

    def se_start(self, z_star):
        """The SE's prox convention (docs/theory.md §7.1): ``None`` for the global minimiser
        (``prox_start='global'``, the default), the teacher's ``z*`` for ``prox_start='teacher'`` (the
        local minimiser reached from ``z*``, the convention of a published SE; GAMP has no ``z*``
        and always uses the global minimiser)."""
        return z_star if self.prox_start == "teacher" else None

    def _targets(self, y):
        return _check_targets(y)

    def check_T(self, T: int) -> None:
        """Raise ``ValueError`` for ``T = 1`` (the softmax of one entry is constant)."""
        if T < 2:
            raise ValueError(
                "the softmax-square loss needs T >= 2 tokens: with T = 1 the softmax of a single "
                "entry is identically 1 and the loss is constant"
            )

    def link(self, h):
        """Model output ``softmax(beta h)`` row-wise."""
        return row_softmax(h, self.beta)

    def value(self, y, H):
        """Per-sample loss ``sum_ab (y_ab - softmax(beta H_a)_b)^2``, shape (n,) (any real H)."""
        y = self._targets(y)
        H = check_H(H, y)
        s = row_softmax(H, self.beta)
        with np.errstate(over="ignore"):
            return check_finite_result("the softmax-square loss", self.beta, np.sum((s - y) ** 2, axis=(1, 2)))

    def grad_h(self, y, H):
        """Derivative w.r.t. the entries of ``H`` (independent), shape (n, T, T):
        ``2 beta s_ac (r_ac - sum_b s_ab r_ab)`` with ``s = softmax(beta H_a)``, ``r = s - y``."""
        y = self._targets(y)
        H = check_H(H, y)
        s = row_softmax(H, self.beta)
        r = s - y
        d = r - np.sum(s * r, axis=2, keepdims=True)
        with np.errstate(over="ignore", invalid="ignore"):
            return check_finite_result("the softmax-square gradient", self.beta, 2.0 * self.beta * s * d)

    def value_z(self, y, z):
        """``l_y(z) = value(y, unwhiten(z))``, shape (n,)."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(all="ignore"):
            return check_finite_result("the softmax-square loss", self.beta, run_ss_value(y, z, self.beta))

    def grad_z(self, y, z):
        """Gradient of ``l_y`` in whitened coordinates, shape (n, K); orthogonal to ``u``."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(all="ignore"):
            return check_finite_result("the softmax-square gradient", self.beta, run_ss_derivs(y, z, self.beta)[1])

    def hess_z(self, y, z):
        """Hessian of ``l_y`` in whitened coordinates, shape (n, K, K) (indefinite in general),
        ``hess u = 0``."""
        y = self._targets(y)
        z = check_z(z, "z", y)
        with np.errstate(all="ignore"):
            return check_finite_result("the softmax-square Hessian", self.beta, run_ss_derivs(y, z, self.beta)[2])

    def prox(self, y, omega, V, p0=None, start=None):
        """See :func:`softmax_square_prox`."""
        return softmax_square_prox(
            y, omega, V, self.beta, p0=p0, start=start, tol=self.tol, max_newton=self.max_newton
        )

    def g_out(self, y, omega, V, p0=None, jacobian="full", start=None):
        """See :func:`softmax_square_g_out`; ``V = 0`` gives the ``V -> 0`` limit."""
        if is_zero_variance(V):
            return self._g_out_zero_variance(y, omega, jacobian)
        return softmax_square_g_out(
            y, omega, V, self.beta, p0=p0, start=start, tol=self.tol,
            max_newton=self.max_newton, jacobian=jacobian,
        )

    def min_value(self, y) -> np.ndarray:
        """``min_z l_y(z)`` per sample, shape (n,), approximated from above by the loss at the
        global prox search with ``omega = z_y`` and ``V = 1e6 I`` (the quadratic term moves the
        minimiser by ~1e-6 of the loss's gradient scale).  0 (to rounding) when ``y`` is the row
        softmax of a symmetric matrix, e.g. every ``y > 0`` with rows summing to one at T = 2;
        for targets with zeros (one-hot) an infimum 0 is only approached at infinity (the value
        returned is then small but positive), and it is positive when the rows' wishes conflict
        (e.g. cyclic one-hot rows at T = 3).  Not certified global for T >= 3."""
        y = self._targets(y)
        zy, _ = run_ss_target_point(y, self.beta)
        p, _ = self.prox(y, zy, 1e6)
        return self.value_z(y, p)

    def g_out_gram(self, y, omega, v, gram, p0=None):
        """Fused path of :func:`~amp_attention.losses.base.gram_g_out` at ``V_mu = v Gamma_mu``:
        returns ``(g, a, info)`` with ``a_mu = Tr(Gamma_mu dg_mu) = Tr(N_mu^{-1} H_mu) / v``
        (no ``(n, K, K)`` Jacobian); ``Gamma^{-1}`` is taken from ``gram`` (scaled by ``1/v``)."""
        y, omega, beta, p0, _, tol, max_newton = _prepare(
            y, omega, self.beta, p0, None, self.tol, self.max_newton
        )
        if not isinstance(gram, GramVariance):
            raise ValueError(f"gram must be a GramVariance, got {type(gram).__name__}")
        if gram.gamma.shape[0] not in (1, y.shape[0]) or gram.gamma.shape[1] != omega.shape[1]:
            raise ValueError(
                f"gram has shape {gram.gamma.shape}, incompatible with omega {omega.shape}"
            )
        v = check_positive(v, "v")
        g, a, info = _run(
            y, omega, v * gram.gamma, gram.inv / v, beta, p0, None, tol, max_newton, 3
        )
        return g, a / v, info
