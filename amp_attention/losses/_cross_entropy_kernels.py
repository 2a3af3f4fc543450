"""Numba kernels of the cross-entropy loss, each beside its NumPy twin (docs/theory.md §5).

Private kernel module of :mod:`amp_attention.losses.cross_entropy`.  Naming: a Numba kernel is
``name``, its independently written, vectorised NumPy twin ``name_numpy`` (the twins check the
kernels in ``tests/test_losses.py``; the NumPy value/gradient/Hessian also serve the public
``CrossEntropyLoss.value``/``grad_z``/``hess_z``); ``run_name`` builds the index maps and output
arrays and calls the kernel ``name``.  Kernels and twins: ``ce_value`` / ``ce_value_numpy``;
``ce_derivs`` (value, gradient and Hessian) / ``ce_value_numpy``, ``ce_grad_numpy``,
``ce_hess_numpy``; ``ce_prox`` with ``ce_jacobian_full`` / ``ce_prox_numpy``; the inline
per-sample helpers (``ce_softmax_rows``, ``ce_sample``, ...) have no twin
(``ce_softmax_parts_numpy`` is the NumPy row softmax).  The Cholesky factorisation and triangular
solves are the inline kernels of :mod:`amp_attention.losses._linalg`.

:func:`ce_prox` (per-sample damped Newton, parallel over samples, with GAMP's Jacobian trace) is
compiled separately for each T (``kshape``/``tshape`` tuples, see its docstring), so that all
per-sample loops have fixed lengths.  The full Jacobian (``g_out(..., jacobian="full")`` and its
trace for a matrix V) is a second kernel, :func:`ce_jacobian_full`, run at the prox: a run that does
not need it (GAMP, the state evolution) does not compile it.  Compilation on a cold cache, T = 2:
~10 s for ``ce_prox``, ~5 s more for ``ce_jacobian_full`` (one ``prange`` kernel holding both
took ~25 s).

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

import numpy as np
from numba import njit, prange

from ..whitening import n_pairs, pair_indices, pair_maps, unwhiten
from ._linalg import backward, chol_solve, cholesky_inplace, cholesky_recip, forward, stack_empty, unmanaged


DEFAULT_TOL = 1e-11
DEFAULT_MAX_NEWTON = 100

# Rounding allowance of the stopping rules: ``V grad_l`` is computed with an absolute error of a
# few ``eps * beta * ||V||_inf`` (``grad_l = beta (s - y)`` with ``s, y`` in [0, 1]).
_ROUNDOFF = 64.0 * np.finfo(np.float64).eps

# Status codes of the cross-entropy Newton solver (per sample).
CONVERGED_RESIDUAL = 0  # ||V grad_l + z - omega||_inf <= tol (1 + |omega| + |z|) + floor
CONVERGED_STEP = 1  # ||dz||_inf <= tol (1 + ||z||_inf) + min(floor, 1e-3/beta) (step then taken)
MAX_ITER = 2  # max_newton iterations without convergence
LINE_SEARCH_FAILED = 3  # the line search found no step with decrease
NONFINITE = 4  # a non-finite value appeared (should not happen for valid inputs)


# --------------------------------------------------------------------------------------------
# Index maps of the whitened coordinates
# --------------------------------------------------------------------------------------------


def z_adjoint(G: np.ndarray) -> np.ndarray:
    """Chain rule through ``unwhiten``: ``G = dL/dH (n, T, T)`` -> ``dL/dz (n, K)``.

    ``dL/dz_k = c_k (G_ab + G_ba)`` off the diagonal and ``c_k G_aa`` on it.
    """
    ia, ib, c = pair_indices(G.shape[1])
    out = G[:, ia, ib] + G[:, ib, ia]
    out *= np.where(ia == ib, 0.5, 1.0) * c
    return out


# --------------------------------------------------------------------------------------------
# Row softmaxes
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def ce_softmax_rows(z, beta, kidx, cc, ebuf, S, want_lse):
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


def ce_softmax_parts_numpy(y, H, beta):
    """Row-wise stable pieces: returns ``value (n,)`` and the softmax ``s (n, T, T)`` of beta H.

    When ``beta H`` overflows, the row maximum of ``H`` is subtracted before multiplying by beta
    (``softmax(beta (H - max H))``, exponents ``<= 0``) and the value is formed as
    ``sum_a beta (max_b H_ab - sum_b y_ab H_ab) + log sum_b exp(...)``; it is inf only where the
    loss itself exceeds float64."""
    with np.errstate(over="ignore"):
        bh = beta * H
    if not np.all(np.isfinite(bh)):
        with np.errstate(over="ignore", invalid="ignore"):
            hm = np.max(H, axis=2, keepdims=True)
            e = np.exp(beta * (H - hm))
            ssum = np.sum(e, axis=2, keepdims=True)
            s = e / ssum
            gap = hm[..., 0] - np.sum(y * H, axis=2)  # (n, T)
            value = np.sum(beta * gap + np.log(ssum[..., 0]), axis=1)
        return value, s
    m = np.max(bh, axis=2, keepdims=True)
    e = np.exp(bh - m)
    ssum = np.sum(e, axis=2, keepdims=True)
    s = e / ssum
    lse = m[..., 0] + np.log(ssum[..., 0])  # (n, T)
    value = np.sum(lse, axis=1) - np.sum(y * bh, axis=(1, 2))
    return value, s


# --------------------------------------------------------------------------------------------
# Loss value
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def ce_value_one(yi, zi, beta, kidx, cc, brow, S):
    """Loss of one sample at ``zi``; leaves the row softmaxes in ``S`` (``brow``: (K,) workspace)."""
    T = yi.shape[0]
    lse = ce_softmax_rows(zi, beta, kidx, cc, brow, S, True)
    lin = 0.0
    for a in range(T):
        for b in range(T):
            lin += yi[a, b] * (beta * (cc[a, b] * zi[kidx[a, b]]))
    return lse - lin


@njit(cache=True, parallel=True)
def ce_value(y, z, beta, kidx, cc, value):
    """Loss ``l_y(z)`` per sample (Numba twin of the NumPy ``ce_value_numpy``); GAMP records the
    training objective with it every iteration."""
    n, K = z.shape
    T = y.shape[1]
    for i in prange(n):
        brow = np.empty(K)  # >= T; softmax workspace
        S = np.empty((T, T))
        value[i] = ce_value_one(y[i], z[i], beta, kidx, cc, brow, S)


def ce_value_numpy(y, z, beta):
    return ce_softmax_parts_numpy(y, unwhiten(z, y.shape[1]), beta)[0]


# --------------------------------------------------------------------------------------------
# Gradient and Hessian in whitened coordinates
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def ce_derivs_from_softmax(yi, beta, kidx, cc, S, grad, hess):
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


@njit(cache=True, parallel=True)
def ce_derivs(y, z, beta, kidx, cc, value, grad, hess):
    """Loss, gradient and Hessian in whitened coordinates per sample (Numba twin of the NumPy
    ``ce_value_numpy``/``ce_grad_numpy``/``ce_hess_numpy``; used by the tests)."""
    n, K = z.shape
    T = y.shape[1]
    for i in prange(n):
        brow = np.empty(K)  # >= T; softmax workspace
        S = np.empty((T, T))
        value[i] = ce_value_one(y[i], z[i], beta, kidx, cc, brow, S)
        ce_derivs_from_softmax(y[i], beta, kidx, cc, S, grad[i], hess[i])


def ce_grad_numpy(y, z, beta):
    _, s = ce_softmax_parts_numpy(y, unwhiten(z, y.shape[1]), beta)
    return z_adjoint(beta * (s - y))


def ce_hess_numpy(y, z, beta):
    T = y.shape[1]
    K = n_pairs(T)
    _, s = ce_softmax_parts_numpy(y, unwhiten(z, T), beta)
    kidx, cc = pair_maps(T)
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


# --------------------------------------------------------------------------------------------
# Python-side wrappers of the value / derivative kernels
# --------------------------------------------------------------------------------------------


def run_ce_value(y, z, beta):
    """Wrapper of :func:`ce_value`: returns ``value (n,)``."""
    kidx, cc = pair_maps(y.shape[1])
    value = np.empty(z.shape[0])
    ce_value(y, z, float(beta), kidx, cc, value)
    return value


def run_ce_derivs(y, z, beta):
    """Wrapper of :func:`ce_derivs`: returns ``value (n,), grad (n, K), hess (n, K, K)``."""
    n, K = z.shape
    kidx, cc = pair_maps(y.shape[1])
    value = np.empty(n)
    grad = np.empty((n, K))
    hess = np.empty((n, K, K))
    ce_derivs(
        np.ascontiguousarray(y), np.ascontiguousarray(z), float(beta), kidx, cc, value, grad, hess
    )
    return value, grad, hess


# --------------------------------------------------------------------------------------------
# Newton solver of the prox (one sample per call, inlined into ce_prox)
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def ce_line_derivs(yi, zt, dz, beta, kidx, cc, brow, S):
    """First and second derivative of the loss at ``zt`` along ``dz`` (one sample); leaves the
    row softmaxes at ``zt`` in ``S`` (reused by the next Newton iteration)."""
    T = S.shape[0]
    ce_softmax_rows(zt, beta, kidx, cc, brow, S, False)
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
def build_newton_matrix(Li, diag, hess, HL, B):
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
def factor_newton_matrix(B, M):
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
        if cholesky_inplace(M):
            return True
        shift = (_SHIFT_GROWTH**attempt) * _SHIFT_BASE * bmax
    return False


@njit(cache=True, inline="always")
def factor_prox_matrix(Wj, wscale, diag, hess, C, dinv):
    """Cholesky factor of the Newton matrix ``N = V^{-1} + H``, ``V^{-1} = wscale * Wj``, into
    ``C`` (lower; the strict upper triangle is not referenced) and ``dinv = 1/diag(C)``; only the
    diagonal of ``Wj`` is read if ``diag``.  Returns success.

    ``N >= V^{-1} > 0`` in exact arithmetic, but once ``beta^2 ||V||`` approaches 1/eps the
    rounding of ``H`` (entries ~ beta^2) swamps ``V^{-1}`` along the flat direction (``H u = 0``)
    and ``N`` can be numerically indefinite.  Then the diagonal is raised by a relative
    ``64 eps, 16 x 64 eps, ...`` (at most ~6e-11 of each diagonal entry; a scale-invariant shift,
    equivalent to the shift of ``I + L^T H L`` in :func:`factor_newton_matrix`) and the
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
        if cholesky_recip(C, dinv):
            return True
        fac = 1.0 + (_SHIFT_GROWTH**attempt) * _SHIFT_BASE
    return False


@njit(cache=True, inline="always")
def line_search(yi, z, dz, uw, ww, d0, beta, kidx, cc, zt, brow, S):
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
        dl, cl = ce_line_derivs(yi, zt, dz, beta, kidx, cc, brow, S)
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
def ce_sample(
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
    status = MAX_ITER
    fresh = False
    stop = False  # set after the final tiny step / a failed line search: derivatives, then exit
    for it in range(max_newton + 1):
        if not fresh:
            ce_softmax_rows(z, beta, kidx, cc, brow, S, False)
        ce_derivs_from_softmax(yi, beta, kidx, cc, S, grad, hess)
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
            status = NONFINITE
            break
        if rinf <= tol * (1.0 + om_inf + zinf) + floor:
            status = CONVERGED_RESIDUAL
            break
        if it == max_newton:
            status = MAX_ITER
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
        if not factor_prox_matrix(Wj, wscale, diag, hess, C, dinv):
            status = NONFINITE
            break
        chol_solve(C, dinv, F, tmp, dz)
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
            status = CONVERGED_STEP
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
        t, fresh = line_search(yi, z, dz, uw, ww, d0, beta, kidx, cc, zt, brow, S)
        if not t > 0.0:
            status = LINE_SEARCH_FAILED
            fresh = False  # S holds a trial point: recompute it at the returned z
            stop = True
            continue
        for a in range(K):
            z[a] += t * dz[a]
        nit += 1
    return status, nit


@njit(cache=True, error_model="numpy")
def ce_jacobian(Li, diag, hess, HL, B, M, X, col, tmp, dg):
    """``dg = H (I + V H)^{-1} = L^{-T} B M^{-1} L^{-1}`` (B = L^T H L, M = I + B), symmetrised.

    ``B M^{-1}`` is obtained as ``(M^{-1} B)^T`` by Cholesky solves (no cancellation for small or
    large B).  Returns False if M is not numerically positive definite.
    """
    K = Li.shape[0]
    build_newton_matrix(Li, diag, hess, HL, B)
    ok = factor_newton_matrix(B, M)
    # X[i, :] = (M^{-1} B[:, i])^T, i.e. X = (M^{-1} B)^T = B M^{-1}
    for j in range(K):
        for i in range(K):
            col[i] = B[i, j]
        forward(M, False, col, tmp)
        backward(M, False, tmp, col)
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
            backward(Li, False, col, tmp)
            for i in range(K):
                B[i, j] = tmp[i]
        for i in range(K):
            for j in range(K):
                col[j] = B[i, j]
            backward(Li, False, col, tmp)
            for j in range(K):
                HL[i, j] = tmp[j]
    for i in range(K):
        for j in range(i, K):
            s = 0.5 * (HL[i, j] + HL[j, i])
            dg[i, j] = s
            dg[j, i] = s
    return ok


@njit(cache=True, inline="always")
def ce_jacobian_trace(Wj, wscale, diag, hess, beta, kidx, cc, S, C, dinv, X, brow):
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
    if not factor_prox_matrix(Wj, wscale, diag, hess, C, dinv):
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


# --------------------------------------------------------------------------------------------
# Prox, g_out and Jacobian: Numba kernel (parallel over samples) and NumPy twin
# --------------------------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def ce_prox_chunk(
    start, stop, y, omega, z0, V, W, diag, vscale, beta, kidx, cc, tol, max_newton, trace,
    p, g, dgtr, iterations, status, kshape, tshape,
):
    """Samples ``start:stop`` of :func:`ce_prox`, one after the other.

    The work arrays are on the stack (:func:`~amp_attention.losses._linalg.stack_empty`) and the
    arguments are used through views without a reference count
    (:func:`~amp_attention.losses._linalg.unmanaged`): the inline helpers then copy no reference
    counts per call (atomic operations that made this function ~1.2x slower than the same code in
    a ``prange`` body, whose compilation removes most of them but costs ~10 s more).
    """
    y, omega, z0, V, W = unmanaged(y), unmanaged(omega), unmanaged(z0), unmanaged(V), unmanaged(W)
    kidx, cc, p, g = unmanaged(kidx), unmanaged(cc), unmanaged(p), unmanaged(g)
    K = len(kshape)
    T = len(tshape)
    nV = V.shape[0]
    wscale = 1.0 / vscale
    z, grad, dinv = stack_empty(kshape, ()), stack_empty(kshape, ()), stack_empty(kshape, ())
    q, F, dz = stack_empty(kshape, ()), stack_empty(kshape, ()), stack_empty(kshape, ())
    zt, tmp, brow = stack_empty(kshape, ()), stack_empty(kshape, ()), stack_empty(kshape, ())  # brow: >= T
    hess, C, Ci = stack_empty(kshape, kshape), stack_empty(kshape, kshape), stack_empty(kshape, kshape)
    S = stack_empty(tshape, tshape)
    for a in range(K):
        for b in range(a + 1, K):
            Ci[a, b] = 0.0  # strict upper triangle stays zero (see ce_jacobian_trace)
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
        for a in range(K):
            z[a] = z0[i, a]
        st, nit = ce_sample(
            y[i], omega[i], z, Vj, vscale, Wj, wscale, vnorm, diag, beta, kidx, cc, tol,
            max_newton, grad, hess, C, dinv, q, F, dz, zt, tmp, brow, S,
        )
        for a in range(K):
            p[i, a] = z[a]
            g[i, a] = -grad[a]
        if trace:
            tr, ok = ce_jacobian_trace(Wj, wscale, diag, hess, beta, kidx, cc, S, C, dinv, Ci, brow)
            if not ok and st < MAX_ITER:
                st = NONFINITE
            dgtr[i] = tr * wscale
        iterations[i] = nit
        status[i] = st


@njit(cache=True, parallel=True)
def ce_prox(
    y, omega, z0, V, W, diag, vscale, beta, kidx, cc, tol, max_newton, trace, nchunk,
    p, g, dgtr, iterations, status, kshape, tshape,
):
    """Per-sample cross-entropy prox, ``g`` and (if ``trace``) the Jacobian trace ``Tr(Gamma dg)``
    (Numba, parallel over samples).

    y (n, T, T), omega/z0 (n, K), V/W (nV, K, K) with nV in {1, n}, ``W = V^{-1}``.  The variance
    used is ``vscale * V`` (inverse ``W / vscale``), so that GAMP's ``V^t Gamma_mu`` reuses one
    inversion of Gamma.  ``diag``: every V is diagonal (then only the diagonals of V and W are
    read).  ``trace``: write ``Tr(V_mu dg_mu) / vscale`` (i.e. ``Tr(Gamma_mu dg_mu)``) into dgtr
    (n,).  Outputs p, g (n, K), iterations, status (n,).  The full Jacobian is
    :func:`ce_jacobian_full`, a second pass at ``p``.  docs/theory.md §5.

    ``kshape``/``tshape`` are tuples of lengths K and T: ``len()`` of a tuple is a compile-time
    constant, so each T gets its own compiled (and cached) specialisation in which every
    per-sample loop over K or T has a fixed trip count (~1.7x faster at T = 3 than loops of
    unknown length).  The ``prange`` loop runs over ``nchunk`` blocks of samples, each a call of
    :func:`ce_prox_chunk`: the parallel compilation pipeline then handles a small loop body (the
    per-sample solver inlined into the ``prange`` body took ~2x longer to compile).
    """
    n = omega.shape[0]
    for ch in prange(nchunk):
        ce_prox_chunk(
            (ch * n) // nchunk, ((ch + 1) * n) // nchunk, y, omega, z0, V, W, diag, vscale, beta,
            kidx, cc, tol, max_newton, trace, p, g, dgtr, iterations, status, kshape, tshape,
        )


@njit(cache=True, parallel=True)
def ce_jacobian_full(y, p, L, diag, vscale, beta, kidx, cc, full, nchunk, dg, dgtr, status, kshape, tshape):
    """Jacobian ``dg = H (I + V H)^{-1}`` at the prox ``p`` of :func:`ce_prox` (Numba, parallel
    over samples), into dg (n, K, K) if ``full``, else its trace into dgtr (n,).

    ``L`` (nV, K, K): the Cholesky factor of V (the variance is ``vscale * V``; only its diagonal is
    read if ``diag``).  ``H`` is recomputed at ``p`` (bit for bit the Hessian at the end of the
    Newton solve).  A sample whose ``I + B`` is not numerically positive definite gets status
    ``NONFINITE`` unless it already failed.
    """
    n = p.shape[0]
    K = len(kshape)
    T = len(tshape)
    nV = L.shape[0]
    lscale = np.sqrt(vscale)
    for ch in prange(nchunk):
        grad = np.empty(K)
        hess = np.empty((K, K))
        Li = np.empty((K, K))
        HL = np.empty((K, K))
        B = np.empty((K, K))
        M = np.empty((K, K))
        X = np.empty((K, K))
        D = np.empty((K, K))
        col = np.empty(K)
        tmp = np.empty(K)
        S = np.empty((T, T))
        for i in range((ch * n) // nchunk, ((ch + 1) * n) // nchunk):
            j = i if nV > 1 else 0
            for a in range(K):
                for b in range(K):
                    Li[a, b] = lscale * L[j, a, b]
            ce_softmax_rows(p[i], beta, kidx, cc, tmp, S, False)
            ce_derivs_from_softmax(y[i], beta, kidx, cc, S, grad, hess)
            ok = ce_jacobian(Li, diag, hess, HL, B, M, X, col, tmp, D)
            if not ok and status[i] < MAX_ITER:
                status[i] = NONFINITE
            if full:
                for a in range(K):
                    for b in range(K):
                        dg[i, a, b] = D[a, b]
            else:
                s = 0.0
                for a in range(K):
                    s += D[a, a]
                dgtr[i] = s


def ce_prox_numpy(y, omega, V, beta, p0=None, tol=DEFAULT_TOL, max_newton=DEFAULT_MAX_NEWTON):
    """NumPy twin of :func:`ce_prox` (vectorised over samples; used by the tests).

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
        F = ce_grad_numpy(y[idx], zz, beta) + np.einsum("nij,nj->ni", Vinv[idx], zz - omega[idx])
        return np.sum(F * dz, axis=1)

    for it in range(max_newton + 1):
        if active.size == 0:
            break
        za, ya, Va = z[active], y[active], V[active]
        grad = ce_grad_numpy(ya, za, beta)
        r = np.einsum("nij,nj->ni", Va, grad) + za - omega[active]
        zinf = np.max(np.abs(za), axis=1)
        floor = _ROUNDOFF * beta * vnorm[active]
        rinf = np.max(np.abs(r), axis=1)
        bad = ~np.isfinite(rinf)
        status[active[bad]] = NONFINITE
        done = ~bad & (rinf <= tol * (1.0 + om_inf[active] + zinf) + floor)
        status[active[done]] = CONVERGED_RESIDUAL
        keep = ~bad & ~done
        if it == max_newton:
            status[active[keep]] = MAX_ITER
            break
        active, za, Va, r, zinf, floor = (
            active[keep], za[keep], Va[keep], r[keep], zinf[keep], floor[keep]
        )
        if active.size == 0:
            break
        Hs = ce_hess_numpy(y[active], za, beta)
        dz = -np.linalg.solve(eye[None] + Va @ Hs, r[:, :, None])[:, :, 0]
        small = np.max(np.abs(dz), axis=1) <= tol * (1.0 + zinf) + np.minimum(floor, 1e-3 / beta)
        status[active[small]] = CONVERGED_STEP  # take the tiny final step and stop
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
        status[active[failed]] = LINE_SEARCH_FAILED
        good = ~failed
        active = active[good]
        z[active] = za[good] + t[good, None] * dz[good]
        iterations[active] += 1

    grad = ce_grad_numpy(y, z, beta)
    Hs = ce_hess_numpy(y, z, beta)
    dgT = np.linalg.solve(eye[None] + Hs @ V, Hs)
    dg = 0.5 * (dgT + np.swapaxes(dgT, 1, 2))
    return z, -grad, dg, iterations, status
