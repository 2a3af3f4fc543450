"""Output side of ERM-GAMP: per-sample losses, their proximal maps and ``g_out`` (DESIGN.md 4, 5).

Conventions (DESIGN.md section 2)
---------------------------------
A sample's preactivations form a symmetric ``T x T`` matrix ``h``; its ``K = T(T+1)/2`` whitened
coordinates are ``z_k = h_ab / c_k`` for pairs ``k = (a, b)``, ``a <= b`` in row-major order,
``c_k = sqrt(2)`` on the diagonal and ``1`` off it (see :mod:`amp_attention.whitening`).  An
off-diagonal ``z_k`` therefore appears twice in ``h`` (entries ``(a, b)`` and ``(b, a)``).

Targets ``y`` are always the raw ``(n, T, T)`` arrays produced by the channel (softmax rows, one-hot
rows or noisy linear preactivations); they need not be symmetric.

Losses (DESIGN.md section 4), per sample
----------------------------------------
* :class:`SquareLoss`: ``1/2 ||y - h||_F^2`` over all ``T x T`` entries.  In whitened coordinates
  ``l_y(z) = ||z_y - z||^2 + 1/2 ||(y - y^T)/2||_F^2`` with ``z_y = whiten(y)`` (symmetric part).
* :class:`CrossEntropyLoss`: ``sum_a [ -beta sum_b y_ab h_ab + logsumexp_b(beta h_ab) ]``, convex,
  constant along the global shift ``h -> h + c 11^T`` when the rows of ``y`` sum to one, i.e. along
  the whitened direction ``u ~ (1/c_k)_k`` (:func:`amp_attention.whitening.flat_direction`).

Proximal map and ``g_out`` (DESIGN.md section 5, step 2 and "Prox details")
---------------------------------------------------------------------------
For each sample, with ``V`` a symmetric positive definite ``K x K`` variance,

    p      = argmin_z  l_y(z) + 1/2 (z - omega)^T V^{-1} (z - omega)
    g      = V^{-1} (p - omega) = -grad l_y(p)            (the latter form is used)
    dg     = -dg/domega = H (I + V H)^{-1},  H = hess l_y(p)   (symmetric PSD, returned symmetrised)

``V`` may be given as a positive scalar (``V = v I_K`` for every sample, the state-evolution case),
a ``(K, K)`` matrix shared by all samples, or a ``(n, K, K)`` stack (per-sample variances
``V^t Gamma_mu`` of GAMP).  Shared variances are never broadcast to ``(n, K, K)`` in memory.

The ``g_out`` methods of the loss classes also accept ``V = 0`` (scalar or all-zero array), the
``V -> 0`` limit reached by GAMP when the denoiser is locally constant: ``p = omega``,
``g = -grad l_y(omega)``, ``dg = hess l_y(omega)``.  The functions ``*_prox``/``*_g_out`` require
``V`` positive definite.

Facts worth knowing (tested in ``tests/test_channels.py``): ``g`` is orthogonal to the flat
direction ``u`` (``u^T V^{-1}(p - omega) = 0``) and ``dg u = 0``; the u-component of ``omega`` is
left unchanged by the prox (``u^T p = u^T omega``) only when ``u`` is an eigenvector of ``V``
(e.g. ``V = v I``), not for general per-sample ``V``.

Implementation: the square loss is closed form (vectorised NumPy).  The cross-entropy prox is a
damped Newton method, run per sample in the Numba kernel ``_ce_prox_kernel`` (parallel over
samples, compiled separately for each T so that all per-sample loops have fixed lengths);
``_ce_prox_numpy`` is an independently written, vectorised NumPy twin used by the tests.  Each
Newton step solves ``(V^{-1} + H) dz = -(grad_l + V^{-1}(z - omega))`` with one K x K Cholesky
factorisation and two triangular solves; ``V^{-1}`` is formed once per call (for GAMP once per
run: ``GramVariance.inv``, scaled by ``1/v``).  ``H u = 0`` along the flat direction is harmless
(``V^{-1} + H >= V^{-1}``); when ``beta^2 ||V||`` nears 1/eps and rounding of H makes the matrix
numerically indefinite, the factorisation is retried with a relative diagonal shift at the
rounding level.  The damping is a line search on the (convex) prox objective along the Newton
direction, driven by its directional derivatives rather than Armijo backtracking on values: at
large beta the values cancel catastrophically, and Armijo backtracking needed 2-10x more Newton
steps (up to 300 at beta = 1e4, T = 8, versus <= 45).  Typical counts: 3-6 steps at beta = 1, ~10
at beta = 10.  The Hessian is assembled so that saturated softmax rows stay PSD to relative
precision; the solver is reliable up to about ``beta^2 ||V|| ~ 1e12`` (tested at beta = 1e4); far
beyond (e.g. beta = 1e6, V = 1e4) rounding limits convergence and the affected samples are
reported as failed in ``info`` (their outputs stay finite).

Jacobians: GAMP (and the scalar-``V`` trace mode) needs only ``Tr(V dg) = Tr(N^{-1} H)`` with
``N = V^{-1} + H`` at the solution.  It is computed from the Cholesky factor ``N = C C^T`` as
``sum_k x_k^T H x_k`` over the rows ``x_k`` of ``C^{-1}``, each term evaluated as a curvature of
the loss (a sum of softmax variances, >= 0): no cancellation, relative accuracy per sample even
for traces that underflow, and ~1e-11 relative error at beta = 1e4, V = 1e2, T = 8 (1e-8 with
the earlier ``Tr((I + L^T H L)^{-1} L^T H L)``).  The full Jacobian ``dg = H (I + V H)^{-1}``
(and its trace for a matrix ``V``) uses the symmetric form ``dg = L^{-T} B (I + B)^{-1} L^{-1}``,
``B = L^T H L``, ``V = L L^T``.
"""

from __future__ import annotations

import numbers

import numba
import numpy as np
from numba import njit, prange

from ._validation import as_float_array, check_positive, check_T
from .whitening import n_pairs, pair_indices, unwhiten, whiten

__all__ = [
    "Loss",
    "SquareLoss",
    "CrossEntropyLoss",
    "make_loss",
    "square_prox",
    "square_g_out",
    "cross_entropy_prox",
    "cross_entropy_g_out",
    "GramVariance",
    "gram_g_out",
]

_DEFAULT_TOL = 1e-11
_DEFAULT_MAX_NEWTON = 100

# Rounding allowance of the stopping rules: ``V grad_l`` is computed with an absolute error of a
# few ``eps * beta * ||V||_inf`` (``grad_l = beta (s - y)`` with ``s, y`` in [0, 1]).
_ROUNDOFF = 64.0 * np.finfo(np.float64).eps

# Status codes of the cross-entropy Newton solver (per sample).
_CONVERGED_RESIDUAL = 0  # ||V grad_l + z - omega||_inf <= tol (1 + |omega| + |z|) + floor
_CONVERGED_STEP = 1  # ||dz||_inf <= tol (1 + ||z||_inf) + min(floor, 1e-3/beta) (step then taken)
_MAX_ITER = 2  # max_newton iterations without convergence
_LINE_SEARCH_FAILED = 3  # the line search found no step with decrease
_NONFINITE = 4  # a non-finite value appeared (should not happen for valid inputs)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_targets(y, min_T: int = 1) -> np.ndarray:
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


def _check_H(H, y: np.ndarray) -> np.ndarray:
    H = as_float_array(H, "H", ndim=3)
    if H.shape != y.shape:
        raise ValueError(f"H must have the shape of y {y.shape}, got {H.shape}")
    return H


def _check_z(z, name: str, y: np.ndarray) -> np.ndarray:
    n, T = y.shape[0], y.shape[1]
    K = n_pairs(T)
    z = as_float_array(z, name, ndim=2)
    if z.shape != (n, K):
        raise ValueError(f"{name} must have shape (n, K) = ({n}, {K}) to match y, got {z.shape}")
    return np.ascontiguousarray(z)


def _prepare_V(V, n: int, K: int):
    """Validate ``V`` and return ``(Vs, L)``, both ``(nV, K, K)`` with ``nV in {1, n}``.

    ``V`` is a positive scalar (``v I_K``), a ``(K, K)`` matrix or an ``(n, K, K)`` stack; it must
    be finite, symmetric (relative tolerance 1e-10) and positive definite.  ``L`` is the lower
    Cholesky factor.
    """
    if isinstance(V, bool):
        raise ValueError(f"V must be a positive number or a (K, K) / (n, K, K) array, got {V!r}")
    arr = as_float_array(V, "V")
    if arr.ndim == 0:
        v = float(arr)
        if v <= 0:
            raise ValueError(f"V must be > 0 when given as a scalar, got {v!r}")
        eye = np.eye(K)
        return (v * eye)[None], (np.sqrt(v) * eye)[None]
    if arr.ndim == 2:
        if arr.shape != (K, K):
            raise ValueError(f"V must have shape (K, K) = ({K}, {K}), got {arr.shape}")
        arr = arr[None]
    elif arr.ndim == 3:
        if arr.shape != (n, K, K):
            raise ValueError(f"V must have shape (n, K, K) = ({n}, {K}, {K}), got {arr.shape}")
    else:
        raise ValueError(f"V must be a scalar, (K, K) or (n, K, K), got shape {arr.shape}")
    scale = np.maximum(np.max(np.abs(arr), axis=(1, 2)), 1e-300)
    asym = np.max(np.abs(arr - np.swapaxes(arr, 1, 2)), axis=(1, 2))
    if np.any(asym > 1e-10 * scale):
        raise ValueError("V must be symmetric (per sample)")
    Vs = np.ascontiguousarray(0.5 * (arr + np.swapaxes(arr, 1, 2)))
    try:
        L = np.linalg.cholesky(Vs)
    except np.linalg.LinAlgError:
        raise ValueError("V must be positive definite (per sample)") from None
    if not np.all(np.isfinite(L)):
        raise ValueError("V must be positive definite (per sample)")
    return Vs, np.ascontiguousarray(L)


def _is_positive_scalar(V) -> bool:
    """True for a finite scalar ``V > 0`` (not bool), given as a number or a 0-d array."""
    if isinstance(V, (bool, np.bool_)):
        return False
    zero_dim = isinstance(V, np.ndarray) and V.ndim == 0 and V.dtype.kind in "iuf"
    if isinstance(V, numbers.Real) or zero_dim:
        v = float(V)
        return np.isfinite(v) and v > 0
    return False


def _inverse_from_cholesky(L: np.ndarray) -> np.ndarray:
    """``V^{-1} = L^{-T} L^{-1}`` for a stack ``L (nV, K, K)`` of lower Cholesky factors,
    symmetrised (contiguous ``(nV, K, K)``)."""
    K = L.shape[-1]
    Linv = np.linalg.solve(L, np.broadcast_to(np.eye(K), L.shape))
    W = np.swapaxes(Linv, 1, 2) @ Linv
    return np.ascontiguousarray(0.5 * (W + np.swapaxes(W, 1, 2)))


class GramVariance:
    """Per-sample variance shapes ``Gamma (n, K, K)`` (or one shared ``(K, K)``), validated,
    Cholesky-factored and inverted once, for GAMP's variances ``V_mu = v Gamma_mu`` (DESIGN.md
    section 5).

    Across GAMP iterations only the scalar ``v`` changes; :func:`gram_g_out` evaluates ``g_out`` at
    ``v * Gamma`` without re-validating or re-factoring ``n`` matrices per iteration (the
    cross-entropy Newton solver works with ``V_mu^{-1} = Gamma_mu^{-1} / v``).

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
        self.gamma, self.chol = _prepare_V(arr, n, K)
        self.inv = _inverse_from_cholesky(self.chol)
        self.diag = bool(np.all(self.gamma[:, ~np.eye(K, dtype=bool)] == 0.0))

    @property
    def shared(self) -> bool:
        return self.gamma.shape[0] == 1

    def scaled(self, v: float) -> np.ndarray:
        """``v Gamma`` as an ``(n, K, K)`` array, or ``(K, K)`` when shared."""
        return v * (self.gamma[0] if self.shared else self.gamma)

    def weighted_trace(self, dg: np.ndarray) -> np.ndarray:
        """``Tr(Gamma_mu dg_mu)`` per sample for ``dg (n, K, K)``."""
        return np.sum(self.gamma * dg, axis=(1, 2))


def gram_g_out(loss, y, omega, v: float, gram: GramVariance, p0=None):
    """``g_out`` of ``loss`` at ``V_mu = v Gamma_mu`` (DESIGN.md section 5, steps 2-3).

    Returns ``(g (n, K), a (n,), info)`` with ``a_mu = Tr(Gamma_mu dg_mu)``, ``dg = -dg/domega``:
    GAMP needs only ``A_hat = sum_mu a_mu / d^2``.  Losses with a fused kernel (cross-entropy)
    compute ``a`` without forming the ``(n, K, K)`` Jacobian; any other output object with a
    ``g_out(y, omega, V, p0=...)`` method (square loss, Bayes outputs) goes through it.
    ``v = 0`` gives the ``V -> 0`` limit.
    """
    fast = getattr(loss, "_gram_g_out", None)
    if fast is not None and v > 0:
        return fast(y, omega, v, gram, p0)
    g, dg, info = loss.g_out(y, omega, gram.scaled(v), p0=p0)
    return g, gram.weighted_trace(dg), info


def _is_zero_variance(V) -> bool:
    """True for ``V = 0`` given as a scalar or an all-zero array (``V -> 0`` limit of ``g_out``)."""
    if isinstance(V, (numbers.Real, np.floating)) and not isinstance(V, bool):
        return float(V) == 0.0
    arr = np.asarray(V)
    return arr.size > 0 and arr.dtype.kind == "f" and not np.any(arr)


def _check_jacobian(jacobian) -> str:
    if jacobian not in ("full", "trace"):
        raise ValueError(f"jacobian must be 'full' or 'trace', got {jacobian!r}")
    return jacobian


def _check_tol(tol) -> float:
    return check_positive(tol, "tol")


def _check_max_newton(max_newton) -> int:
    if (
        isinstance(max_newton, bool)
        or not isinstance(max_newton, numbers.Integral)
        or max_newton < 1
    ):
        raise ValueError(f"max_newton must be an integer >= 1, got {max_newton!r}")
    return int(max_newton)


def _pair_maps(T: int):
    """``kidx[a, b]`` = whitened index of entry (a, b); ``cc[a, b]`` = its constant ``c_k``."""
    ia, ib, c = pair_indices(T)
    kidx = np.empty((T, T), dtype=np.int64)
    cc = np.empty((T, T))
    kidx[ia, ib] = np.arange(ia.size)
    kidx[ib, ia] = np.arange(ia.size)
    cc[ia, ib] = c
    cc[ib, ia] = c
    return kidx, cc


def _z_adjoint(G: np.ndarray) -> np.ndarray:
    """Chain rule through ``unwhiten``: ``G = dL/dH (n, T, T)`` -> ``dL/dz (n, K)``.

    ``dL/dz_k = c_k (G_ab + G_ba)`` off the diagonal and ``c_k G_aa`` on it.
    """
    ia, ib, c = pair_indices(G.shape[1])
    out = G[:, ia, ib] + G[:, ib, ia]
    out *= np.where(ia == ib, 0.5, 1.0) * c
    return out


# --------------------------------------------------------------------------------------------
# Square loss (closed form, vectorised NumPy)
# --------------------------------------------------------------------------------------------


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
    """Prox of the square loss ``1/2 ||y - h||_F^2`` (DESIGN.md section 5, "Prox details").

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
    y = _check_targets(y)
    omega = _check_z(omega, "omega", y)
    Vs, _ = _prepare_V(V, y.shape[0], omega.shape[1])
    p, _, _ = _square_prox_core(y, omega, Vs)
    return p, _closed_form_info(y.shape[0])


def square_g_out(y, omega, V, jacobian: str = "full"):
    """``g_out`` of the square loss (DESIGN.md section 5, step 2).

    Returns ``(g, dg, info)``: ``g = 2 (z_y - p) = -grad l_y(p)`` of shape (n, K);
    ``dg = -dg/domega = 2 (I + 2V)^{-1}`` of shape (n, K, K) (``jacobian="full"``) or its trace,
    shape (n,) (``jacobian="trace"``); ``info`` as in :func:`square_prox` plus ``info["p"]``.
    """
    y = _check_targets(y)
    omega = _check_z(omega, "omega", y)
    jacobian = _check_jacobian(jacobian)
    n, K = omega.shape
    Vs, _ = _prepare_V(V, n, K)
    p, g, A = _square_prox_core(y, omega, Vs)
    if jacobian == "full":
        dg = np.empty((n, K, K))
        dg[...] = 2.0 * A
    else:
        dg = np.empty(n)
        dg[...] = 2.0 * np.trace(A, axis1=1, axis2=2)
    info = _closed_form_info(n)
    info["p"] = p
    return g, dg, info


# --------------------------------------------------------------------------------------------
# Cross-entropy loss: vectorised NumPy (public value/grad/hess, and the NumPy twin of the prox)
# --------------------------------------------------------------------------------------------


def _ce_softmax_parts(y, H, beta):
    """Row-wise stable pieces: returns ``value (n,)`` and the softmax ``s (n, T, T)`` of beta H."""
    bh = beta * H
    m = np.max(bh, axis=2, keepdims=True)
    e = np.exp(bh - m)
    ssum = np.sum(e, axis=2, keepdims=True)
    s = e / ssum
    lse = m[..., 0] + np.log(ssum[..., 0])  # (n, T)
    value = np.sum(lse, axis=1) - np.sum(y * bh, axis=(1, 2))
    return value, s


def _ce_value_z(y, z, beta):
    return _ce_softmax_parts(y, unwhiten(z, y.shape[1]), beta)[0]


def _ce_grad_z(y, z, beta):
    _, s = _ce_softmax_parts(y, unwhiten(z, y.shape[1]), beta)
    return _z_adjoint(beta * (s - y))


def _ce_hess_z(y, z, beta):
    T = y.shape[1]
    K = n_pairs(T)
    _, s = _ce_softmax_parts(y, unwhiten(z, T), beta)
    kidx, cc = _pair_maps(T)
    hess = np.zeros((z.shape[0], K, K))
    b2 = beta * beta
    off = 1.0 - np.eye(T)
    for a in range(T):
        sa = s[:, a, :]  # (n, T)
        B = -sa[:, :, None] * sa[:, None, :]
        # diagonal s_b (1 - s_b) as s_b * sum_{e != b} s_e: accurate for saturated rows
        B[:, np.arange(T), np.arange(T)] = sa * (sa @ off)
        ks = kidx[a]
        hess[:, ks[:, None], ks[None, :]] += (b2 * np.outer(cc[a], cc[a]))[None] * B
    return hess


def _ce_prox_numpy(y, omega, V, beta, p0=None, tol=_DEFAULT_TOL, max_newton=_DEFAULT_MAX_NEWTON):
    """NumPy twin of :func:`_ce_prox_kernel` (vectorised over samples; used by the tests).

    Same problem and stopping rules, written independently: the Newton system is solved in the
    form ``(I + V H) dz = -(V grad_l + z - omega)`` with batched LU (``np.linalg.solve``); the step
    length minimises the prox objective along ``dz`` by plain bisection on its directional
    derivative (bracket grown by doubling up to ``t = 64``); ``dg = H (I + V H)^{-1}`` comes from
    ``(I + H V) dg^T = H``.  ``V`` is ``(n, K, K)`` (or broadcastable to it).

    Returns ``p (n, K), g (n, K), dg (n, K, K), iterations (n,), status (n,)``.
    """
    n, K = omega.shape
    V = np.broadcast_to(np.asarray(V, dtype=np.float64), (n, K, K))
    Vinv = np.linalg.inv(V)
    eye = np.eye(K)
    z = (omega if p0 is None else p0).astype(np.float64, copy=True)
    iterations = np.zeros(n, dtype=np.int64)
    status = np.full(n, -1, dtype=np.int64)
    vnorm = np.max(np.sum(np.abs(V), axis=2), axis=1)
    om_inf = np.max(np.abs(omega), axis=1)
    active = np.arange(n)

    def dphi(idx, zz, dz):
        """Directional derivative of the prox objective at zz along dz."""
        F = _ce_grad_z(y[idx], zz, beta) + np.einsum("nij,nj->ni", Vinv[idx], zz - omega[idx])
        return np.sum(F * dz, axis=1)

    for it in range(max_newton + 1):
        if active.size == 0:
            break
        za, ya, Va = z[active], y[active], V[active]
        grad = _ce_grad_z(ya, za, beta)
        r = np.einsum("nij,nj->ni", Va, grad) + za - omega[active]
        zinf = np.max(np.abs(za), axis=1)
        floor = _ROUNDOFF * beta * vnorm[active]
        rinf = np.max(np.abs(r), axis=1)
        bad = ~np.isfinite(rinf)
        status[active[bad]] = _NONFINITE
        done = ~bad & (rinf <= tol * (1.0 + om_inf[active] + zinf) + floor)
        status[active[done]] = _CONVERGED_RESIDUAL
        keep = ~bad & ~done
        if it == max_newton:
            status[active[keep]] = _MAX_ITER
            break
        active, za, Va, r, zinf, floor = (
            active[keep], za[keep], Va[keep], r[keep], zinf[keep], floor[keep]
        )
        if active.size == 0:
            break
        Hs = _ce_hess_z(y[active], za, beta)
        dz = -np.linalg.solve(eye[None] + Va @ Hs, r[:, :, None])[:, :, 0]
        small = np.max(np.abs(dz), axis=1) <= tol * (1.0 + zinf) + np.minimum(floor, 1e-3 / beta)
        status[active[small]] = _CONVERGED_STEP  # take the tiny final step and stop
        z[active[small]] = za[small] + dz[small]
        iterations[active[small]] += 1
        active, za, dz = active[~small], za[~small], dz[~small]
        if active.size == 0:
            break
        # step length: bracket [lo, hi] with dphi(lo) <= 0 <= dphi(hi), then bisection
        lo = np.zeros(active.size)
        hi = np.ones(active.size)
        for _ in range(6):
            grow = dphi(active, za + hi[:, None] * dz, dz) < 0
            if not grow.any():
                break
            lo[grow] = hi[grow]
            hi[grow] *= 2.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            neg = dphi(active, za + mid[:, None] * dz, dz) <= 0
            lo = np.where(neg, mid, lo)
            hi = np.where(neg, hi, mid)
        t = np.where(dphi(active, za + hi[:, None] * dz, dz) <= 0, hi, lo)
        failed = ~(t > 0)
        status[active[failed]] = _LINE_SEARCH_FAILED
        good = ~failed
        active = active[good]
        z[active] = za[good] + t[good, None] * dz[good]
        iterations[active] += 1

    grad = _ce_grad_z(y, z, beta)
    Hs = _ce_hess_z(y, z, beta)
    dgT = np.linalg.solve(eye[None] + Hs @ V, Hs)
    dg = 0.5 * (dgT + np.swapaxes(dgT, 1, 2))
    return z, -grad, dg, iterations, status


# --------------------------------------------------------------------------------------------
# Cross-entropy loss: Numba kernel (per-sample damped Newton, parallel over samples)
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _ce_softmax_rows(z, beta, kidx, cc, ebuf, S, want_lse):
    """Row softmaxes ``S[a, :] = softmax_b(beta h_ab)`` of one sample at ``z`` (stable).

    Returns ``sum_a logsumexp_b(beta h_ab)`` if ``want_lse`` (else 0.0: the Newton solver needs
    only ``S``).  ``ebuf``: (K,) workspace (K >= T), ``S``: (T, T).

    When ``beta max_k |z_k| <= 200`` (so ``|beta h| <= 200 sqrt(2)``), ``exp(beta h)`` can neither
    overflow nor underflow: one exponential per distinct entry (K instead of T^2), no max shift.
    Otherwise each row is shifted by its maximum.  Both give the same relative accuracy (the
    rounding of the argument ``beta h`` dominates either way), and in both a saturated row gives
    exactly 1.0 for its dominant entry (exact row sums keep the softmax variances, hence the
    curvatures and the Jacobian trace, accurate relative to tiny probabilities).
    """
    T = S.shape[0]
    K = z.shape[0]
    zmax = 0.0
    for k in range(K):
        if abs(z[k]) > zmax:
            zmax = abs(z[k])
    lse = 0.0
    if beta * zmax <= 200.0:
        for a in range(T):
            ebuf[kidx[a, a]] = np.exp(beta * (cc[a, a] * z[kidx[a, a]]))
            for b in range(a + 1, T):
                ebuf[kidx[a, b]] = np.exp(beta * (cc[a, b] * z[kidx[a, b]]))
        for a in range(T):
            ssum = 0.0
            for b in range(T):
                e = ebuf[kidx[a, b]]
                S[a, b] = e
                ssum += e
            for b in range(T):
                S[a, b] = S[a, b] / ssum  # (not * (1/ssum): a dominant entry must give 1.0)
            if want_lse:
                lse += np.log(ssum)
        return lse
    for a in range(T):
        mx = -np.inf
        for b in range(T):
            bh = beta * (cc[a, b] * z[kidx[a, b]])
            ebuf[b] = bh
            if bh > mx:
                mx = bh
        ssum = 0.0
        for b in range(T):
            e = np.exp(ebuf[b] - mx)
            S[a, b] = e
            ssum += e
        for b in range(T):
            S[a, b] = S[a, b] / ssum
        if want_lse:
            lse += mx + np.log(ssum)
    return lse


@njit(cache=True, inline="always")
def _ce_derivs_from_softmax(yi, beta, kidx, cc, S, grad, hess):
    """Gradient (K,) and Hessian (K, K) of the loss in z from the row softmaxes ``S``."""
    T = S.shape[0]
    K = grad.shape[0]
    for k in range(K):
        grad[k] = 0.0
        for m in range(K):
            hess[k, m] = 0.0
    b2 = beta * beta
    for a in range(T):
        for b in range(T):
            kb = kidx[a, b]
            cb = cc[a, b]
            sb = S[a, b]
            grad[kb] += cb * beta * (sb - yi[a, b])
            # Hessian block beta^2 (diag(s) - s s^T); its diagonal s_b (1 - s_b) is formed as
            # s_b * sum_{e != b} s_e (no cancellation when s_b ~ 1), which keeps the block PSD
            # with zero row sums to relative precision even for saturated rows.
            rest = 0.0
            for e2 in range(T):
                if e2 != b:
                    rest += S[a, e2]
                    hess[kb, kidx[a, e2]] -= b2 * (cb * cc[a, e2]) * (sb * S[a, e2])
            hess[kb, kb] += b2 * (cb * cb) * (sb * rest)


@njit(cache=True, inline="always")
def _ce_line_derivs(yi, zt, dz, beta, kidx, cc, brow, S):
    """First and second derivative of the loss at ``zt`` along ``dz`` (one sample); leaves the
    row softmaxes at ``zt`` in ``S`` (reused by the next Newton iteration)."""
    T = S.shape[0]
    _ce_softmax_rows(zt, beta, kidx, cc, brow, S, False)
    d1 = 0.0
    d2 = 0.0
    for a in range(T):
        m1 = 0.0
        lin = 0.0
        for b in range(T):
            dh = cc[a, b] * dz[kidx[a, b]]
            m1 += S[a, b] * dh
            lin += yi[a, b] * dh
        m2 = 0.0  # variance of dh under s, two-pass (no cancellation)
        for b in range(T):
            dev = cc[a, b] * dz[kidx[a, b]] - m1
            m2 += S[a, b] * dev * dev
        d1 += beta * (m1 - lin)
        d2 += beta * beta * m2
    return d1, d2


@njit(cache=True, inline="always")
def _cholesky_recip(A, dinv):
    """Lower Cholesky factor of SPD ``A`` in place; only the lower triangle of ``A`` is read and
    written (the strict upper triangle is left as is and never referenced).  Also stores
    ``dinv = 1 / diag(factor)`` and divides by multiplying with it (shorter dependency chains).
    Returns success."""
    K = A.shape[0]
    for j in range(K):
        s = A[j, j]
        for m in range(j):
            s -= A[j, m] * A[j, m]
        if not s > 0.0:
            return False
        d = np.sqrt(s)
        A[j, j] = d
        r = 1.0 / d
        dinv[j] = r
        for i in range(j + 1, K):
            s = A[i, j]
            for m in range(j):
                s -= A[i, m] * A[j, m]
            A[i, j] = s * r
    return True


@njit(cache=True, inline="always")
def _cholesky_inplace(A):
    """:func:`_cholesky_recip` without keeping the reciprocal pivots.  Returns success."""
    return _cholesky_recip(A, np.empty(A.shape[0]))


@njit(cache=True, inline="always")
def _chol_solve(C, dinv, b, tmp, out):
    """Solve ``C C^T out = b`` with the factor of :func:`_cholesky_recip` (``tmp``: workspace)."""
    K = C.shape[0]
    for i in range(K):
        s = b[i]
        for m in range(i):
            s -= C[i, m] * tmp[m]
        tmp[i] = s * dinv[i]
    for i in range(K - 1, -1, -1):
        s = tmp[i]
        for m in range(i + 1, K):
            s -= C[m, i] * out[m]
        out[i] = s * dinv[i]


@njit(cache=True, inline="always")
def _forward(L, diag, b, out):
    """Solve ``L out = b`` (L lower triangular; only its diagonal is used if ``diag``)."""
    K = L.shape[0]
    for i in range(K):
        s = b[i]
        if not diag:
            for m in range(i):
                s -= L[i, m] * out[m]
        out[i] = s / L[i, i]


@njit(cache=True, inline="always")
def _backward(L, diag, b, out):
    """Solve ``L^T out = b`` (L lower triangular; only its diagonal is used if ``diag``)."""
    K = L.shape[0]
    for i in range(K - 1, -1, -1):
        s = b[i]
        if not diag:
            for m in range(i + 1, K):
                s -= L[m, i] * out[m]
        out[i] = s / L[i, i]


@njit(cache=True, inline="always")
def _build_newton_matrix(Li, diag, hess, HL, B):
    """``B = L^T H L`` (symmetric PSD); ``HL`` is workspace."""
    K = Li.shape[0]
    if diag:
        for i in range(K):
            for j in range(i, K):
                s = (Li[i, i] * Li[j, j]) * hess[i, j]
                B[i, j] = s
                B[j, i] = s
    else:
        for i in range(K):
            for j in range(K):
                s = 0.0
                for m in range(j, K):  # L[m, j] = 0 for m < j
                    s += hess[i, m] * Li[m, j]
                HL[i, j] = s
        for i in range(K):
            for j in range(i, K):
                s = 0.0
                for m in range(i, K):
                    s += Li[m, i] * HL[m, j]
                B[i, j] = s
                B[j, i] = s


# Diagonal shifts of the Newton-matrix safeguard: a factorisation that fails is retried with the
# diagonal raised by 64, 1024, 16384, 262144 eps (at most ~6e-11), relative to the largest diagonal
# entry of B for ``I + B`` and to each diagonal entry of ``V^{-1} + H``.
_SHIFT_BASE = 64.0 * 2.220446049250313e-16
_SHIFT_GROWTH = 16.0
_SHIFT_ATTEMPTS = 5


@njit(cache=True, inline="always")
def _factor_newton_matrix(B, M):
    """Cholesky factor of ``M = I + B`` into ``M`` (lower).  Returns success.

    ``M >= I`` in exact arithmetic, but when ``||B||`` reaches ~1/eps (beta^2 ||V|| ~ 1e16) the
    rounding of ``B`` along the flat direction can make it numerically indefinite; then a shift of
    the diagonal at the rounding level of ``B`` is added (at most ~6e-11 ||B||) and the
    factorisation retried.
    """
    K = B.shape[0]
    bmax = 0.0
    for i in range(K):
        if abs(B[i, i]) > bmax:
            bmax = abs(B[i, i])
    shift = 0.0
    for attempt in range(_SHIFT_ATTEMPTS):
        for i in range(K):
            for j in range(i + 1):
                M[i, j] = B[i, j]
            M[i, i] += 1.0 + shift
        if _cholesky_inplace(M):
            return True
        shift = (_SHIFT_GROWTH**attempt) * _SHIFT_BASE * bmax
    return False


@njit(cache=True, inline="always")
def _factor_prox_matrix(Wj, wscale, diag, hess, C, dinv):
    """Cholesky factor of the Newton matrix ``N = V^{-1} + H``, ``V^{-1} = wscale * Wj``, into
    ``C`` (lower; the strict upper triangle is not referenced) and ``dinv = 1/diag(C)``; only the
    diagonal of ``Wj`` is read if ``diag``.  Returns success.

    ``N >= V^{-1} > 0`` in exact arithmetic, but once ``beta^2 ||V||`` approaches 1/eps the
    rounding of ``H`` (entries ~ beta^2) swamps ``V^{-1}`` along the flat direction (``H u = 0``)
    and ``N`` can be numerically indefinite.  Then the diagonal is raised by a relative
    ``64 eps, 16 x 64 eps, ...`` (at most ~6e-11 of each diagonal entry; a scale-invariant shift,
    equivalent to the shift of ``I + L^T H L`` in :func:`_factor_newton_matrix`) and the
    factorisation retried.  The shift only shortens the Newton step; the fixed point is unchanged.
    """
    K = hess.shape[0]
    fac = 1.0
    for attempt in range(_SHIFT_ATTEMPTS):
        for i in range(K):
            if not diag:
                for j in range(i):
                    C[i, j] = hess[i, j] + wscale * Wj[i, j]
            else:
                for j in range(i):
                    C[i, j] = hess[i, j]
            C[i, i] = (hess[i, i] + wscale * Wj[i, i]) * fac
        if _cholesky_recip(C, dinv):
            return True
        fac = 1.0 + (_SHIFT_GROWTH**attempt) * _SHIFT_BASE
    return False


@njit(cache=True, inline="always")
def _line_search(yi, z, dz, uw, ww, d0, beta, kidx, cc, zt, brow, S):
    """Step length along the Newton direction ``dz`` (one sample).

    ``phi(t) = l(z + t dz) + 1/2 (z - omega + t dz)^T V^{-1} (z - omega + t dz)``, with
    ``uw = (z - omega)^T V^{-1} dz``, ``ww = dz^T V^{-1} dz`` and ``d0 = phi'(0) < 0``.  ``phi``
    is convex, so the minimiser is bracketed and approached by safeguarded Newton on ``phi'``
    (second derivatives are cheap along a line).  A step is accepted when
    ``|phi'(t)| <= eta |phi'(0)|`` (``eta = 0.1``) and ``phi(t) < phi(0)`` is guaranteed:
    ``phi'(t) <= 0`` (left of the minimiser), or ``phi'(t) < t ww / 2`` (``phi'' >= ww`` along
    the line).  The full Newton step ``t = 1`` is tried first.
    Uses only derivatives, which stay accurate at large beta where values of ``phi`` cancel.
    Returns ``(t, fresh)``: ``t > 0`` (0.0 on failure) and whether ``S`` holds the row softmaxes
    at ``z + t dz``.
    """
    K = z.shape[0]
    eta = 0.1
    tmax = 64.0
    lo = 0.0
    hi = np.inf
    dprev = np.inf
    t = 1.0
    for _ls in range(100):
        for a in range(K):
            zt[a] = z[a] + t * dz[a]
        dl, cl = _ce_line_derivs(yi, zt, dz, beta, kidx, cc, brow, S)
        d = dl + uw + t * ww
        c = cl + ww
        if not np.isfinite(d):
            hi = t
            t = 0.5 * (lo + hi)
            continue
        if d <= 0.0:
            if d >= eta * d0:
                return t, True
            lo = t
        else:
            # phi'' >= ww on the line, so phi(t) - phi(0) <= t d - ww t^2 / 2 < 0 here
            if d <= eta * -d0 and d < 0.5 * t * ww:
                return t, True
            hi = t
        tn = t - d / c  # Newton on phi'
        if hi == np.inf:
            if t >= tmax:
                return t, True
            tn = min(tn, 4.0 * t, tmax)
        elif not (lo < tn < hi) or abs(d) > 0.5 * dprev:
            # Newton left the bracket or stalled: bisect, geometrically while the bracket spans
            # orders of magnitude (saturated rows make the Newton step overshoot by up to
            # ~beta ||V|| / (scale of a kink), so the minimiser can sit at t ~ 1e-10)
            if lo == 0.0:
                tn = hi / 16.0
            elif hi > 16.0 * lo:
                tn = np.sqrt(lo * hi)
            else:
                tn = 0.5 * (lo + hi)
        dprev = abs(d)
        t = tn
    return lo, False


@njit(cache=True, inline="always")
def _ce_sample(
    yi, om, z, Vj, vscale, Wj, wscale, vnorm, diag, beta, kidx, cc, tol, max_newton,
    grad, hess, C, dinv, q, F, dz, zt, tmp, brow, S,
):
    """Damped Newton for one sample, in place on ``z``. Returns ``(status, iterations)``.

    The variance is ``V = vscale * Vj`` with inverse ``V^{-1} = wscale * Wj`` (only diagonals are
    read if ``diag``) and ``vnorm = ||V||_inf``.  Newton system:
    ``(V^{-1} + H) dz = -(grad_l + V^{-1}(z - omega))``: one Cholesky factorisation (into ``C``,
    ``dinv``) and two triangular solves per step.  On return ``grad``/``hess`` hold the loss
    derivatives at the final ``z`` and ``S`` (T, T) its row softmaxes.
    """
    K = z.shape[0]
    om_inf = 0.0
    for a in range(K):
        if abs(om[a]) > om_inf:
            om_inf = abs(om[a])
    floor = _ROUNDOFF * beta * vnorm  # rounding level of V grad_l (grad_l ~ beta (s - y))
    # a final step is only taken well inside the quadratic region (|beta dh| <~ 1e-3)
    step_floor = min(floor, 1e-3 / beta)
    nit = 0
    status = _MAX_ITER
    fresh = False
    stop = False  # set after the final tiny step / a failed line search: derivatives, then exit
    for it in range(max_newton + 1):
        if not fresh:
            _ce_softmax_rows(z, beta, kidx, cc, brow, S, False)
        _ce_derivs_from_softmax(yi, beta, kidx, cc, S, grad, hess)
        if stop:
            break
        # z-unit residual r = V grad + z - omega (V times the prox-objective gradient F)
        rinf = 0.0
        zinf = 0.0
        finite = True
        for a in range(K):
            zt[a] = z[a] - om[a]
            if diag:
                s = Vj[a, a] * grad[a]
            else:
                s = 0.0
                for b in range(K):
                    s += Vj[a, b] * grad[b]
            s = zt[a] + vscale * s
            if not np.isfinite(s):
                finite = False
            elif abs(s) > rinf:
                rinf = abs(s)
            if abs(z[a]) > zinf:
                zinf = abs(z[a])
        if not finite:
            status = _NONFINITE
            break
        if rinf <= tol * (1.0 + om_inf + zinf) + floor:
            status = _CONVERGED_RESIDUAL
            break
        if it == max_newton:
            status = _MAX_ITER
            break
        # Newton step (V^{-1} + H) dz = -F, F = grad + q, q = V^{-1}(z - omega)
        for a in range(K):
            if diag:
                w = Wj[a, a] * zt[a]
            else:
                w = 0.0
                for b in range(K):
                    w += Wj[a, b] * zt[b]
            q[a] = wscale * w
            F[a] = grad[a] + q[a]
        if not _factor_prox_matrix(Wj, wscale, diag, hess, C, dinv):
            status = _NONFINITE
            break
        _chol_solve(C, dinv, F, tmp, dz)
        d0 = 0.0  # phi'(0) = F.dz = -dz^T N dz < 0
        uw = 0.0  # (z - omega)^T V^{-1} dz
        dzinf = 0.0
        for a in range(K):
            dz[a] = -dz[a]
            d0 += F[a] * dz[a]
            uw += q[a] * dz[a]
            if abs(dz[a]) > dzinf:
                dzinf = abs(dz[a])
        if dzinf <= tol * (1.0 + zinf) + step_floor:
            # take the (tiny) final step and stop, with derivatives at the returned point
            for a in range(K):
                z[a] += dz[a]
            nit += 1
            status = _CONVERGED_STEP
            fresh = False
            stop = True
            continue
        ww = 0.0  # dz^T V^{-1} dz
        for a in range(K):
            if diag:
                ww += Wj[a, a] * (dz[a] * dz[a])
            else:
                s = 0.0
                for b in range(K):
                    s += Wj[a, b] * dz[b]
                ww += dz[a] * s
        ww *= wscale
        t, fresh = _line_search(yi, z, dz, uw, ww, d0, beta, kidx, cc, zt, brow, S)
        if not t > 0.0:
            status = _LINE_SEARCH_FAILED
            fresh = False  # S holds a trial point: recompute it at the returned z
            stop = True
            continue
        for a in range(K):
            z[a] += t * dz[a]
        nit += 1
    return status, nit


@njit(cache=True)
def _ce_jacobian(Li, diag, hess, HL, B, M, X, col, tmp, dg):
    """``dg = H (I + V H)^{-1} = L^{-T} B M^{-1} L^{-1}`` (B = L^T H L, M = I + B), symmetrised.

    ``B M^{-1}`` is obtained as ``(M^{-1} B)^T`` by Cholesky solves (no cancellation for small or
    large B).  Returns False if M is not numerically positive definite.
    """
    K = Li.shape[0]
    _build_newton_matrix(Li, diag, hess, HL, B)
    ok = _factor_newton_matrix(B, M)
    # X[i, :] = (M^{-1} B[:, i])^T, i.e. X = (M^{-1} B)^T = B M^{-1}
    for j in range(K):
        for i in range(K):
            col[i] = B[i, j]
        _forward(M, False, col, tmp)
        _backward(M, False, tmp, col)
        for i in range(K):
            X[j, i] = col[i]
    if diag:
        for i in range(K):
            for j in range(K):
                HL[i, j] = X[i, j] / (Li[i, i] * Li[j, j])
    else:
        # Z = L^{-T} X (columns), then dg = Z L^{-1}: row i of dg = L^{-T} (row i of Z)
        for j in range(K):
            for i in range(K):
                col[i] = X[i, j]
            _backward(Li, False, col, tmp)
            for i in range(K):
                B[i, j] = tmp[i]
        for i in range(K):
            for j in range(K):
                col[j] = B[i, j]
            _backward(Li, False, col, tmp)
            for j in range(K):
                HL[i, j] = tmp[j]
    for i in range(K):
        for j in range(i, K):
            s = 0.5 * (HL[i, j] + HL[j, i])
            dg[i, j] = s
            dg[j, i] = s
    return ok


@njit(cache=True, inline="always")
def _ce_jacobian_trace(Wj, wscale, diag, hess, beta, kidx, cc, S, C, dinv, X, brow):
    """``Tr(V dg) = Tr(N^{-1} H)`` with ``N = V^{-1} + H`` (``dg = H N^{-1} V^{-1}``), one sample;
    ``V^{-1} = wscale * Wj``.

    With ``N = C C^T`` and ``x_k`` the rows of ``C^{-1}``, ``N^{-1} = sum_k x_k x_k^T``, so the
    trace is ``sum_k x_k^T H x_k`` and each term is evaluated as the second derivative of the
    loss along ``x_k``: ``beta^2 sum_a Var_{s_a}(h_a(x_k))`` with the row softmaxes ``S`` (two-pass
    variances).  Every term is >= 0 and the flat direction (``H u = 0``), along which ``N^{-1}``
    is ~ ``||V||`` while ``H`` has entries ~ beta^2, cancels inside each variance instead of
    through a sum of large terms of both signs.  ``X`` (K, K) must have a zero strict upper
    triangle on entry (it stays so); ``brow`` (>= T,) is workspace.  Returns ``(trace, ok)``; if N
    is not numerically positive definite (not expected for finite H), ``(nan, False)``.
    """
    K = hess.shape[0]
    T = S.shape[0]
    if not _factor_prox_matrix(Wj, wscale, diag, hess, C, dinv):
        return np.nan, False
    # X = C^{-1} (lower triangular), column by column
    for j in range(K):
        X[j, j] = dinv[j]
        for i in range(j + 1, K):
            s = 0.0
            for m in range(j, i):
                s -= C[i, m] * X[m, j]
            X[i, j] = s * dinv[i]
    tr = 0.0
    for k in range(K):
        for a in range(T):
            m1 = 0.0
            for b in range(T):
                h = cc[a, b] * X[k, kidx[a, b]]
                brow[b] = h
                m1 += S[a, b] * h
            m2 = 0.0
            for b in range(T):
                dev = brow[b] - m1
                m2 += S[a, b] * (dev * dev)
            tr += m2
    return (beta * beta) * tr, True


@njit(cache=True, parallel=True)
def _ce_prox_kernel(
    y, omega, z0, V, W, L, diag, vscale, beta, kidx, cc, tol, max_newton, jac_mode, nchunk,
    p, g, dg, dgtr, iterations, status, kshape, tshape,
):
    """Per-sample cross-entropy prox, ``g`` and Jacobian (Numba, parallel over samples).

    y (n, T, T), omega/z0 (n, K), V/W/L (nV, K, K) with nV in {1, n}: ``W = V^{-1}`` and ``L``
    the Cholesky factor of V (read only for jac_mode 1, 2).  The variance used is
    ``vscale * V`` (inverse ``W / vscale``, factor ``sqrt(vscale) L``), so that GAMP's
    ``V^t Gamma_mu`` reuses one inversion of Gamma.  ``diag``: every V is diagonal (then only the
    diagonals of V, W, L are read).  jac_mode: 0 = no Jacobian, 1 = full into dg (n, K, K),
    2 = trace into dgtr (n,), 3 = ``Tr(V_mu dg_mu) / vscale`` (i.e. ``Tr(Gamma_mu dg_mu)``)
    into dgtr.  Outputs p, g (n, K), iterations, status (n,).  DESIGN.md section 5.

    ``kshape``/``tshape`` are tuples of lengths K and T: ``len()`` of a tuple is a compile-time
    constant, so each T gets its own compiled (and cached) specialisation in which every
    per-sample loop over K or T has a fixed trip count (~1.7x faster at T = 3 than loops of
    unknown length).  The per-sample work stays inside the ``prange`` body: moved into a
    separate serial function it ran ~1.5x slower (apparently reference-count traffic on the
    work arrays, which the parallel pipeline prunes).
    """
    n = omega.shape[0]
    K = len(kshape)
    T = len(tshape)
    nV = V.shape[0]
    lscale = np.sqrt(vscale)
    wscale = 1.0 / vscale
    need_L = jac_mode == 1 or jac_mode == 2
    for ch in prange(nchunk):
        start = (ch * n) // nchunk
        stop = ((ch + 1) * n) // nchunk
        z = np.empty(K)
        grad = np.empty(K)
        hess = np.empty((K, K))
        C = np.empty((K, K))
        dinv = np.empty(K)
        Ci = np.empty((K, K))
        for a in range(K):
            for b in range(a + 1, K):
                Ci[a, b] = 0.0  # strict upper triangle stays zero (see _ce_jacobian_trace)
        HL = np.empty((K, K))
        B = np.empty((K, K))
        M = np.empty((K, K))
        X = np.empty((K, K))
        D = np.empty((K, K))
        q = np.empty(K)
        F = np.empty(K)
        dz = np.empty(K)
        zt = np.empty(K)
        tmp = np.empty(K)
        brow = np.empty(K)  # >= T; softmax workspace
        S = np.empty((T, T))
        Li = np.empty((K, K))
        vnorm = 0.0
        for i in range(start, stop):
            j = i if nV > 1 else 0
            Vj = V[j]
            Wj = W[j]
            if i == start or nV > 1:
                vnorm = 0.0  # ||V||_inf
                for a in range(K):
                    if diag:
                        s = abs(Vj[a, a])
                    else:
                        s = 0.0
                        for b in range(K):
                            s += abs(Vj[a, b])
                    if s > vnorm:
                        vnorm = s
                vnorm *= vscale
                if need_L:
                    for a in range(K):
                        for b in range(K):
                            Li[a, b] = lscale * L[j, a, b]
            for a in range(K):
                z[a] = z0[i, a]
            st, nit = _ce_sample(
                y[i], omega[i], z, Vj, vscale, Wj, wscale, vnorm, diag, beta, kidx, cc, tol,
                max_newton, grad, hess, C, dinv, q, F, dz, zt, tmp, brow, S,
            )
            for a in range(K):
                p[i, a] = z[a]
                g[i, a] = -grad[a]
            if jac_mode == 3:
                tr, ok = _ce_jacobian_trace(
                    Wj, wscale, diag, hess, beta, kidx, cc, S, C, dinv, Ci, brow
                )
                if not ok and st < _MAX_ITER:
                    st = _NONFINITE
                dgtr[i] = tr * wscale
            elif jac_mode != 0:
                ok = _ce_jacobian(Li, diag, hess, HL, B, M, X, q, tmp, D)
                if not ok and st < _MAX_ITER:
                    st = _NONFINITE
                if jac_mode == 1:
                    for a in range(K):
                        for b in range(K):
                            dg[i, a, b] = D[a, b]
                else:
                    s = 0.0
                    for a in range(K):
                        s += D[a, a]
                    dgtr[i] = s
            iterations[i] = nit
            status[i] = st


@njit(cache=True, inline="always")
def _ce_value_one(yi, zi, beta, kidx, cc, brow, S):
    """Loss of one sample at ``zi``; leaves the row softmaxes in ``S`` (``brow``: (K,) workspace)."""
    T = yi.shape[0]
    lse = _ce_softmax_rows(zi, beta, kidx, cc, brow, S, True)
    lin = 0.0
    for a in range(T):
        for b in range(T):
            lin += yi[a, b] * (beta * (cc[a, b] * zi[kidx[a, b]]))
    return lse - lin


@njit(cache=True, parallel=True)
def _ce_derivs_kernel(y, z, beta, kidx, cc, value, grad, hess):
    """Loss, gradient and Hessian in whitened coordinates per sample (Numba twin of the NumPy
    ``_ce_value_z``/``_ce_grad_z``/``_ce_hess_z``; used by the tests)."""
    n, K = z.shape
    T = y.shape[1]
    for i in prange(n):
        brow = np.empty(K)  # >= T; softmax workspace
        S = np.empty((T, T))
        value[i] = _ce_value_one(y[i], z[i], beta, kidx, cc, brow, S)
        _ce_derivs_from_softmax(y[i], beta, kidx, cc, S, grad[i], hess[i])


@njit(cache=True, parallel=True)
def _ce_value_kernel(y, z, beta, kidx, cc, value):
    """Loss ``l_y(z)`` per sample (Numba twin of the NumPy ``_ce_value_z``); GAMP records the
    training objective with it every iteration."""
    n, K = z.shape
    T = y.shape[1]
    for i in prange(n):
        brow = np.empty(K)  # >= T; softmax workspace
        S = np.empty((T, T))
        value[i] = _ce_value_one(y[i], z[i], beta, kidx, cc, brow, S)


def _ce_value_numba(y, z, beta):
    kidx, cc = _pair_maps(y.shape[1])
    value = np.empty(z.shape[0])
    _ce_value_kernel(y, z, float(beta), kidx, cc, value)
    return value


def _ce_derivs_numba(y, z, beta):
    """Wrapper of :func:`_ce_derivs_kernel`: returns ``value (n,), grad (n, K), hess (n, K, K)``."""
    n, K = z.shape
    kidx, cc = _pair_maps(y.shape[1])
    value = np.empty(n)
    grad = np.empty((n, K))
    hess = np.empty((n, K, K))
    _ce_derivs_kernel(
        np.ascontiguousarray(y), np.ascontiguousarray(z), float(beta), kidx, cc, value, grad, hess
    )
    return value, grad, hess


def _ce_run(y, omega, V, beta, p0, tol, max_newton, jac_mode, vscale=1.0):
    """Validated inputs -> kernel outputs ``(p, g, dg, info)``.

    ``V`` is anything :func:`_prepare_V` accepts, or a :class:`GramVariance` (already factored and
    inverted; the variance is then ``vscale * V.gamma``).  A scalar ``V = v`` runs as
    ``v * I_K``, so that its trace mode (``Tr dg = Tr(V dg) / v``) takes the fast jac_mode 3."""
    n, K = omega.shape
    if isinstance(V, GramVariance):
        Vs, W, L, diag = V.gamma, V.inv, V.chol, V.diag
    elif _is_positive_scalar(V):
        vscale = float(V)
        Vs = W = L = np.eye(K)[None]
        diag = True
        if jac_mode == 2:
            jac_mode = 3
    else:
        Vs, L = _prepare_V(V, n, K)
        W = _inverse_from_cholesky(L)
        diag = bool(np.all(Vs[:, ~np.eye(K, dtype=bool)] == 0.0))
    z0 = omega if p0 is None else _check_z(p0, "p0", y)
    kidx, cc = _pair_maps(y.shape[1])
    p = np.empty((n, K))
    g = np.empty((n, K))
    dg = np.empty((n, K, K)) if jac_mode == 1 else np.empty((1, 1, 1))
    dgtr = np.empty(n) if jac_mode in (2, 3) else np.empty(1)
    iterations = np.empty(n, dtype=np.int64)
    status = np.empty(n, dtype=np.int64)
    nchunk = int(min(n, 8 * numba.get_num_threads()))
    _ce_prox_kernel(
        y, omega, z0, Vs, W, L, diag, float(vscale), float(beta), kidx, cc, float(tol),
        int(max_newton), int(jac_mode), nchunk, p, g, dg, dgtr, iterations, status,
        (0,) * K, (0,) * y.shape[1],
    )
    converged = status <= _CONVERGED_STEP
    info = {
        "n_iter": int(iterations.max()),
        "n_failed": int(np.count_nonzero(~converged)),
        "converged": converged,
    }
    if jac_mode in (2, 3):
        dg = dgtr
    return p, g, dg, info


def cross_entropy_prox(
    y, omega, V, beta, p0=None, tol: float = _DEFAULT_TOL, max_newton: int = _DEFAULT_MAX_NEWTON
):
    """Prox of the cross-entropy loss (DESIGN.md section 5, "Prox details").

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
    ``_line_search``.

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
    y = _check_targets(y, min_T=2)
    omega = _check_z(omega, "omega", y)
    tol = _check_tol(tol)
    max_newton = _check_max_newton(max_newton)
    p, _, _, info = _ce_run(y, omega, V, beta, p0, tol, max_newton, 0)
    return p, info


def cross_entropy_g_out(
    y,
    omega,
    V,
    beta,
    p0=None,
    tol: float = _DEFAULT_TOL,
    max_newton: int = _DEFAULT_MAX_NEWTON,
    jacobian: str = "full",
):
    """``g_out`` of the cross-entropy loss (DESIGN.md section 5, step 2).

    Returns ``(g, dg, info)``: ``g = -grad l_y(p)`` (n, K) (equal to ``V^{-1}(p - omega)`` at the
    prox); ``dg = -dg/domega = H (I + V H)^{-1}`` with ``H = hess l_y(p)``, symmetrised, shape
    (n, K, K) for ``jacobian="full"`` or its trace (n,) for ``jacobian="trace"`` (saves memory for
    large Monte Carlo batches).  ``info`` as in :func:`cross_entropy_prox` plus ``info["p"]``.
    """
    beta = check_positive(beta, "beta")
    y = _check_targets(y, min_T=2)
    omega = _check_z(omega, "omega", y)
    tol = _check_tol(tol)
    max_newton = _check_max_newton(max_newton)
    jac_mode = 1 if _check_jacobian(jacobian) == "full" else 2
    p, g, dg, info = _ce_run(y, omega, V, beta, p0, tol, max_newton, jac_mode)
    info["p"] = p
    return g, dg, info


# --------------------------------------------------------------------------------------------
# Loss classes (common interface)
# --------------------------------------------------------------------------------------------


class Loss:
    """Common interface of the per-sample losses (DESIGN.md sections 4-5).

    All methods take the raw targets ``y`` of shape ``(n, T, T)`` (n >= 1) and work in float64:

    * ``value(y, H) -> (n,)``, ``grad_h(y, H) -> (n, T, T)``: loss and its derivative w.r.t. the
      entries of ``H (n, T, T)`` treated as independent (what a direct ERM solver backprojects);
    * ``value_z(y, z) -> (n,)``, ``grad_z(y, z) -> (n, K)``, ``hess_z(y, z) -> (n, K, K)``: the
      loss ``l_y(z) = loss(y, unwhiten(z))`` in whitened coordinates;
    * ``prox(y, omega, V, p0=None) -> (p, info)`` and
      ``g_out(y, omega, V, p0=None, jacobian="full") -> (g, dg, info)``, see the module docstring.
    """

    name = "loss"

    def _targets(self, y):
        return _check_targets(y)

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
        jacobian = _check_jacobian(jacobian)
        omega = np.asarray(omega, dtype=np.float64)
        g = -self.grad_z(y, omega)
        H = self.hess_z(y, omega)
        dg = np.trace(H, axis1=1, axis2=2) if jacobian == "trace" else H
        n = omega.shape[0]
        info = {"n_iter": 0, "n_failed": 0, "converged": np.ones(n, dtype=bool), "p": omega.copy()}
        return g, dg, info


class SquareLoss(Loss):
    """``1/2 ||y - h||_F^2`` over all T x T entries (DESIGN.md section 4); 1 <= T <= 8.

    In whitened coordinates ``l_y(z) = ||z_y - z||^2 + 1/2 ||(y - y^T)/2||_F^2``,
    ``z_y = whiten(y)``; ``grad_z = 2 (z - z_y)``, ``hess_z = 2 I``.
    """

    name = "square"

    def __repr__(self):
        return "SquareLoss()"

    def value(self, y, H):
        """Per-sample loss ``1/2 ||y - H||_F^2``, shape (n,)."""
        y = self._targets(y)
        return _square_value(y, _check_H(H, y))

    def grad_h(self, y, H):
        """``H - y``, shape (n, T, T)."""
        y = self._targets(y)
        return _check_H(H, y) - y

    def value_z(self, y, z):
        """``l_y(z)`` (n,) for z (n, K); equals ``value(y, unwhiten(z))``."""
        y = self._targets(y)
        return _square_value_z(y, _check_z(z, "z", y))

    def grad_z(self, y, z):
        """``2 (z - z_y)``, shape (n, K)."""
        y = self._targets(y)
        return 2.0 * (_check_z(z, "z", y) - whiten(y))

    def hess_z(self, y, z):
        """``2 I_K`` per sample, shape (n, K, K)."""
        y = self._targets(y)
        z = _check_z(z, "z", y)
        out = np.zeros((z.shape[0], z.shape[1], z.shape[1]))
        out[:, np.arange(z.shape[1]), np.arange(z.shape[1])] = 2.0
        return out

    def prox(self, y, omega, V, p0=None):
        """Closed form, see :func:`square_prox` (``p0`` is accepted and ignored)."""
        return square_prox(y, omega, V)

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """See :func:`square_g_out` (``p0`` is accepted and ignored)."""
        if _is_zero_variance(V):
            return self._g_out_zero_variance(y, omega, jacobian)
        return square_g_out(y, omega, V, jacobian=jacobian)


class CrossEntropyLoss(Loss):
    """``sum_a [ -beta sum_b y_ab h_ab + logsumexp_b(beta h_ab) ]`` per sample (DESIGN.md 4).

    ``beta > 0``; 2 <= T <= 8 (T = 1 is rejected by every method).  ``tol`` and ``max_newton``
    configure the Newton prox (see :func:`cross_entropy_prox`).
    """

    name = "cross_entropy"

    def __init__(
        self, beta: float = 1.0, tol: float = _DEFAULT_TOL, max_newton: int = _DEFAULT_MAX_NEWTON
    ):
        self.beta = check_positive(beta, "beta")
        self.tol = _check_tol(tol)
        self.max_newton = _check_max_newton(max_newton)

    def __repr__(self):
        return f"CrossEntropyLoss(beta={self.beta!r})"

    def _targets(self, y):
        return _check_targets(y, min_T=2)

    def value(self, y, H):
        """Per-sample loss, shape (n,) (any real H; symmetric H in GAMP/ERM)."""
        y = self._targets(y)
        H = _check_H(H, y)
        return _ce_softmax_parts(y, H, self.beta)[0]

    def grad_h(self, y, H):
        """``beta (softmax(beta H_a) - y_a)`` row-wise, shape (n, T, T)."""
        y = self._targets(y)
        H = _check_H(H, y)
        _, s = _ce_softmax_parts(y, H, self.beta)
        return self.beta * (s - y)

    def value_z(self, y, z):
        """``l_y(z) = value(y, unwhiten(z))``, shape (n,)."""
        y = self._targets(y)
        return _ce_value_numba(y, _check_z(z, "z", y), self.beta)

    def grad_z(self, y, z):
        """Gradient of ``l_y`` in whitened coordinates, shape (n, K); orthogonal to ``u`` when the
        rows of ``y`` sum to one."""
        y = self._targets(y)
        return _ce_grad_z(y, _check_z(z, "z", y), self.beta)

    def hess_z(self, y, z):
        """Hessian of ``l_y`` in whitened coordinates, shape (n, K, K), PSD, ``hess u = 0``."""
        y = self._targets(y)
        return _ce_hess_z(y, _check_z(z, "z", y), self.beta)

    def prox(self, y, omega, V, p0=None):
        """See :func:`cross_entropy_prox`."""
        return cross_entropy_prox(
            y, omega, V, self.beta, p0=p0, tol=self.tol, max_newton=self.max_newton
        )

    def _gram_g_out(self, y, omega, v, gram, p0=None):
        """Fused path of :func:`gram_g_out`: the kernel returns ``Tr(Gamma_mu dg_mu)`` directly."""
        y = self._targets(y)
        omega = _check_z(omega, "omega", y)
        if gram.gamma.shape[0] not in (1, y.shape[0]) or gram.gamma.shape[1] != omega.shape[1]:
            raise ValueError(f"gram has shape {gram.gamma.shape}, incompatible with omega {omega.shape}")
        v = check_positive(v, "v")
        p, g, a, info = _ce_run(y, omega, gram, self.beta, p0, self.tol, self.max_newton, 3, vscale=v)
        info["p"] = p
        return g, a, info

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """See :func:`cross_entropy_g_out`."""
        if _is_zero_variance(V):
            return self._g_out_zero_variance(y, omega, jacobian)
        return cross_entropy_g_out(
            y, omega, V, self.beta, p0=p0, tol=self.tol, max_newton=self.max_newton,
            jacobian=jacobian,
        )


def make_loss(name: str, beta: float = 1.0) -> Loss:
    """``'square'`` -> :class:`SquareLoss`; ``'cross_entropy'`` -> ``CrossEntropyLoss(beta)``."""
    if name == "square":
        return SquareLoss()
    if name == "cross_entropy":
        return CrossEntropyLoss(beta)
    raise ValueError(f"loss must be 'square' or 'cross_entropy', got {name!r}")
