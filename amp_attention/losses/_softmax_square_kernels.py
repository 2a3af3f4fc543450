"""Numba kernels of the softmax-square loss, each beside its NumPy twin (docs/theory.md §4, §5).

Private kernel module of :mod:`amp_attention.losses.softmax_square` (the loss, its conventions and
the prox are described there).  Naming as in the cross-entropy kernels: a Numba kernel is
``name``, its independently written, vectorised NumPy twin ``name_numpy`` (the twins check the
kernels in ``tests/test_softmax_square.py``); ``run_name`` builds the index maps and output
arrays and calls the kernel ``name``.  Kernels and twins:

* ``ss_value`` / ``ss_value_numpy``: the loss ``l_y(z)`` per sample;
* ``ss_derivs`` / ``ss_derivs_numpy``: value, gradient and Hessian in whitened coordinates;
* ``ss_target_point`` / ``ss_target_point_numpy``: the start ``z_y`` (where ``l_y`` vanishes when
  ``y`` is the row softmax of a symmetric matrix; entries ``y_ab <= 0`` enter as ``Y_FLOOR``);
* ``ss_prox`` / ``ss_prox_numpy``: the global search (Newton from omega, ``z_y``, ``p0`` and row
  flips) or the single-start Newton prox, with ``g`` and the Jacobian ``dg`` (full, trace, or
  ``Tr(V dg)``).

The per-sample helpers (``ss_softmax_rows``, ``ss_derivs_from_softmax``, ``ss_newton``,
``ss_eigh``, ...) have no twin; the large ones are separate compiled functions rather than
``inline="always"`` (inlining them tripled the compile time of ``ss_prox``, to ~3 min).  The Cholesky factorisation and solves are the inline kernels of
:mod:`amp_attention.losses._linalg`; the rare indefinite Newton matrices are diagonalised by
:func:`ss_eigh` (cyclic Jacobi, no allocation).  Numba's cache is keyed by this file: after
editing ``_linalg``, touch this file so that the kernels are recompiled.

Loss per sample (no factor 1/2): ``l = sum_a ||y_a - s_a||^2``, ``s_a = softmax(beta h_a)``
computed as ``softmax(beta (h_a - max_b h_ab))``.  Per row, with ``r = s - y`` and
``d_c = r_c - sum_b s_b r_b`` (formed as ``sum_b s_b (r_c - r_b)``: no cancellation in saturated
rows), the derivatives in the row's entries are

    grad_c = 2 beta s_c d_c
    hess   = 2 beta^2 [ J J + diag(s d) - (s d) s^T - s (s d)^T ],   J = diag(s) - s s^T,

whose rows sum to zero (the loss is invariant under a shift of the row); the kernel builds the
off-diagonal entries and sets each diagonal entry to minus the sum of its row's off-diagonal
entries, which keeps that invariance to rounding.  Whitened coordinates: ``h_ab = c_k z_k``
(``k`` = pair of ``(a, b)``), so ``grad_z[k] = sum c_k grad_(a,b)`` over the entries of pair ``k``
and likewise for the Hessian.

Jacobian at the returned minimiser ``p``, with ``N = V^{-1} + H`` (positive definite at a strict
local minimum): ``dg = H (I + V H)^{-1} = V^{-1} X`` with ``X = N^{-1} H`` (Cholesky solves of
``N``; LU with partial pivoting if ``N`` is not numerically positive definite), returned
symmetrised; ``Tr(V dg) = Tr(X)`` (GAMP's ``Tr(Gamma dg) = Tr(X) / v`` for ``V = v Gamma``).
The twin uses ``dg^T = (I + H V)^{-1} H`` instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..whitening import n_pairs, pair_indices, pair_maps
from ._linalg import chol_solve, cholesky_recip
from .base import prox_buffers

DEFAULT_TOL = 1e-11
DEFAULT_MAX_NEWTON = 200

_EPS = float(np.finfo(np.float64).eps)
# Rounding allowance of the residual test: ``V grad_l`` has an absolute error of a few
# ``eps * beta * ||V||_inf`` (``grad_l`` entries are ``2 beta c s d`` with ``|s d| <= 1``).
_ROUNDOFF = 64.0 * _EPS
# A full Newton step (positive definite Newton matrix) whose predicted decrease of the prox
# objective ``-phi'(0)`` is below ``_ROUND_PHI (1 + l + quad)`` is taken without the Armijo test,
# which the rounding of ``phi`` (absolute ~ eps (1 + phi)) can no longer decide.
_ROUND_PHI = 1024.0 * _EPS
_ARMIJO = 1e-4  # sufficient-decrease constant c1
_MAX_BACKTRACK = 60
# A step may raise the loss l by at most _DL_MAX (l <= 2T; a saturated row costs up to 2): the
# Newton step of the quadratic model can otherwise jump over a rise of l into another basin
# (e.g. from a fitted row onto a plateau), which loses the global minimiser.
_DL_MAX = 0.5
# Indefinite Newton matrix N (eigenvalues lam, ascending): it is shifted to N + tau I with
# tau = -lam_min + max(|lam_min|, _SHIFT_REL * max |lam|): the most negative eigenvalue mirrored.
_SHIFT_REL = 1e-6
# At a stationary point, N counts as positive semidefinite when lam_min >= -_PSD_REL * max |lam|;
# otherwise the point is a saddle and a step along the eigenvector of lam_min is taken.
_PSD_REL = 1e-9
# Two starts whose prox objectives differ by at most _TIE (1 + |phi|) are tied: the earlier
# start (order: omega, z_y, extra) is kept unless only the later one converged.
_TIE = 1e-12
# Targets y_ab <= 0 enter the start z_y as this value (see ss_target_point_one).
Y_FLOOR = 1e-4

# Status codes of one Newton run (per sample and start).
CONVERGED_RESIDUAL = 0  # ||V grad_l + z - omega||_inf <= tol (1 + |omega| + |z|) + floor, N >= 0
CONVERGED_STEP = 1  # N > 0 and ||dz||_inf <= tol (1 + ||z||_inf) + min(floor, 1e-3/beta)
MAX_ITER = 2  # max_newton iterations without convergence
LINE_SEARCH_FAILED = 3  # no step with sufficient decrease along a descent direction
NONFINITE = 4  # a non-finite value appeared, or the Jacobian system was singular
SADDLE = 5  # stationary, N indefinite, and no decrease found along the negative curvature

# Which start a sample's prox came from (``info["start"]``).
START_OMEGA = 0
START_TARGET = 1  # z_y
START_EXTRA = 2  # p0, or the single start
START_FLIP = 3  # a row-flip candidate (see ss_prox)
# Row flips: at most _MAX_SWEEPS sweeps over (row, target); a flip is skipped when the row
# already lies within _FLIP_SKIP / beta (max-norm of the centred row) of its target.
_MAX_SWEEPS = 4
_FLIP_SKIP = 0.1


# --------------------------------------------------------------------------------------------
# Index maps of the whitened coordinates
# --------------------------------------------------------------------------------------------


def _arr(x):
    """float64, C-contiguous and writeable (a read-only view would compile a second kernel)."""
    return np.require(x, np.float64, ["C_CONTIGUOUS", "WRITEABLE"])


def _pair_matrix(T: int):
    """``P (T, T, K)``: ``h_ab = sum_k P[a, b, k] z_k`` (the linear map ``unwhiten``)."""
    ia, ib, c = pair_indices(T)
    P = np.zeros((T, T, ia.size))
    P[ia, ib, np.arange(ia.size)] = c
    P[ib, ia, np.arange(ia.size)] = c
    return P


def _unwhiten(z, T):
    return np.einsum("abk,nk->nab", _pair_matrix(T), z)


# --------------------------------------------------------------------------------------------
# Loss, gradient and Hessian
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def ss_softmax_rows(z, beta, kidx, cc, S):
    """Row softmaxes ``S[a, :] = softmax(beta (h_a - max_b h_ab))`` of one sample at ``z``."""
    T = S.shape[0]
    for a in range(T):
        mx = -np.inf
        for b in range(T):
            h = cc[a, b] * z[kidx[a, b]]
            S[a, b] = h
            if h > mx:
                mx = h
        ssum = 0.0
        for b in range(T):
            e = np.exp(beta * (S[a, b] - mx))
            S[a, b] = e
            ssum += e
        for b in range(T):
            S[a, b] = S[a, b] / ssum


@njit(cache=True, inline="always")
def ss_value_from_softmax(yi, S):
    """``sum_ab (S_ab - y_ab)^2`` (one sample)."""
    T = S.shape[0]
    v = 0.0
    for a in range(T):
        for b in range(T):
            d = S[a, b] - yi[a, b]
            v += d * d
    return v


@njit(cache=True)
def ss_derivs_from_softmax(yi, beta, kidx, cc, S, grad, hess, dv, J, Ha):
    """Gradient (K,) and Hessian (K, K) in z of one sample from its row softmaxes ``S``.

    Workspace: ``dv`` (T,), ``J`` and ``Ha`` (T, T).  See the module docstring for the formulas.
    """
    T = S.shape[0]
    K = grad.shape[0]
    for k in range(K):
        grad[k] = 0.0
        for m in range(K):
            hess[k, m] = 0.0
    g2 = 2.0 * beta
    h2 = 2.0 * beta * beta
    for a in range(T):
        # d_c = r_c - sum_b s_b r_b = sum_{b != c} s_b (r_c - r_b)
        for c in range(T):
            rc = S[a, c] - yi[a, c]
            acc = 0.0
            for b in range(T):
                if b != c:
                    acc += S[a, b] * (rc - (S[a, b] - yi[a, b]))
            dv[c] = acc
            grad[kidx[a, c]] += cc[a, c] * (g2 * (S[a, c] * acc))
        # J = diag(s) - s s^T, its diagonal s_c (1 - s_c) formed as s_c sum_{e != c} s_e
        for c in range(T):
            rest = 0.0
            for e in range(T):
                if e != c:
                    J[c, e] = -S[a, c] * S[a, e]
                    rest += S[a, e]
            J[c, c] = S[a, c] * rest
        for c in range(T):
            for e in range(c + 1, T):
                jj = 0.0
                for b in range(T):
                    jj += J[c, b] * J[b, e]
                val = h2 * (jj - (S[a, c] * S[a, e]) * (dv[c] + dv[e]))
                Ha[c, e] = val
                Ha[e, c] = val
        for c in range(T):
            acc = 0.0
            for e in range(T):
                if e != c:
                    acc += Ha[c, e]
            Ha[c, c] = -acc
        for c in range(T):
            kc = kidx[a, c]
            for e in range(T):
                hess[kc, kidx[a, e]] += (cc[a, c] * cc[a, e]) * Ha[c, e]


@njit(cache=True, parallel=True)
def ss_value(y, z, beta, kidx, cc, value):
    """Loss ``l_y(z)`` per sample into ``value (n,)`` (parallel over samples)."""
    n = z.shape[0]
    T = y.shape[1]
    for i in prange(n):
        S = np.empty((T, T))
        ss_softmax_rows(z[i], beta, kidx, cc, S)
        value[i] = ss_value_from_softmax(y[i], S)


def _softmax_numpy(H, beta):
    """Row softmax of ``beta H`` (n, T, T), shifted by the row max of H."""
    e = np.exp(beta * (H - np.max(H, axis=2, keepdims=True)))
    return e / np.sum(e, axis=2, keepdims=True)


def ss_value_numpy(y, z, beta):
    """NumPy twin of :func:`ss_value`: returns ``value (n,)``."""
    s = _softmax_numpy(_unwhiten(z, y.shape[1]), beta)
    return np.sum((s - y) ** 2, axis=(1, 2))


@njit(cache=True, parallel=True)
def ss_derivs(y, z, beta, kidx, cc, value, grad, hess):
    """Loss (n,), gradient (n, K) and Hessian (n, K, K) in whitened coordinates per sample."""
    n, K = z.shape
    T = y.shape[1]
    for i in prange(n):
        S = np.empty((T, T))
        dv = np.empty(T)
        J = np.empty((T, T))
        Ha = np.empty((T, T))
        ss_softmax_rows(z[i], beta, kidx, cc, S)
        value[i] = ss_value_from_softmax(y[i], S)
        ss_derivs_from_softmax(y[i], beta, kidx, cc, S, grad[i], hess[i], dv, J, Ha)


def ss_derivs_numpy(y, z, beta):
    """NumPy twin of :func:`ss_derivs`: returns ``value (n,), grad (n, K), hess (n, K, K)``.

    Written from the chain rule through the softmax Jacobian ``D[a, b, c] = ds_ab/dh_ac =
    beta s_ab (delta_bc - s_ac)`` and its second derivative (no row-sum trick):
    ``grad_h = 2 D^T r`` and ``hess_h(row a) = 2 D_a^T D_a + 2 sum_b r_ab d^2 s_ab``, mapped to z
    with the matrix ``P`` of ``unwhiten``.
    """
    T = y.shape[1]
    P = _pair_matrix(T)  # (T, T, K)
    s = _softmax_numpy(np.einsum("abk,nk->nab", P, z), beta)
    r = s - y
    value = np.sum(r * r, axis=(1, 2))
    eye = np.eye(T)
    # D[n, a, b, c] = beta s_ab (delta_bc - s_ac)
    D = beta * s[:, :, :, None] * (eye[None, None] - s[:, :, None, :])
    gh = 2.0 * np.einsum("nab,nabc->nac", r, D)  # dl/dh_ac
    # d^2 s_ab / dh_ac dh_ae = beta^2 [ s_ab (d_bc - s_ac)(d_be - s_ae) - s_ab s_ac (d_ce - s_ae) ]
    A = eye[None, None] - s[:, :, None, :]  # (n, a, b, c): delta_bc - s_ac
    D2 = beta**2 * (
        s[:, :, :, None, None] * A[:, :, :, :, None] * A[:, :, :, None, :]
        - s[:, :, :, None, None]
        * (s[:, :, None, :, None] * (eye[None, None, None] - s[:, :, None, None, :]))
    )
    Hh = 2.0 * np.einsum("nabc,nabe->nace", D, D) + 2.0 * np.einsum("nab,nabce->nace", r, D2)
    grad = np.einsum("abk,nab->nk", P, gh)
    hess = np.einsum("ack,nace,aem->nkm", P, Hh, P)
    return value, grad, hess


def run_ss_value(y, z, beta):
    kidx, cc = pair_maps(y.shape[1])
    value = np.empty(z.shape[0])
    ss_value(_arr(y), _arr(z), float(beta), kidx, cc, value)
    return value


def run_ss_derivs(y, z, beta):
    """Returns ``value (n,), grad (n, K), hess (n, K, K)`` from :func:`ss_derivs`."""
    n, K = z.shape
    kidx, cc = pair_maps(y.shape[1])
    value = np.empty(n)
    grad = np.empty((n, K))
    hess = np.empty((n, K, K))
    ss_derivs(_arr(y), _arr(z), float(beta), kidx, cc, value, grad, hess)
    return value, grad, hess


# --------------------------------------------------------------------------------------------
# The start z_y
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def ss_target_point_one(yi, beta, kidx, cc, Lw, cw, z):
    """``z_y`` of one sample into ``z``; returns whether all ``y_ab > 0`` (exact ``z_y``).

    ``L_ab = log(y_ab) / beta``, row offsets ``c_a = (1/T) sum_b (L_ba - L_ab)`` (the least-squares
    solution of ``L_ab + c_a = L_ba + c_b`` with ``sum_a c_a = 0``), ``h = L + c 1^T``
    symmetrised, ``z_k = (h_ab + h_ba) / (2 c_k)``.  Entries ``y_ab <= 0`` (one-hot or underflowed
    targets) are replaced by ``Y_FLOOR = 1e-4`` in the logarithm: the start then lies in the
    fitted basin (the target's entries dominate their rows) instead of at ``l = 0``, which such
    targets only reach at infinity.  Workspace ``Lw`` (T, T), ``cw`` (T,).
    """
    T = yi.shape[0]
    exact = True
    for a in range(T):
        for b in range(T):
            if yi[a, b] > 0.0:
                Lw[a, b] = np.log(yi[a, b]) / beta
            else:
                Lw[a, b] = np.log(Y_FLOOR) / beta
                exact = False
    for a in range(T):
        acc = 0.0
        for b in range(T):
            acc += Lw[b, a] - Lw[a, b]
        cw[a] = acc / T
    for a in range(T):
        for b in range(a, T):
            z[kidx[a, b]] = 0.5 * ((Lw[a, b] + cw[a]) + (Lw[b, a] + cw[b])) / cc[a, b]
    return exact


@njit(cache=True, parallel=True)
def ss_target_point(y, beta, kidx, cc, z, exact):
    """``z_y`` per sample into ``z (n, K)``; ``exact (n,)``: all ``y_ab > 0`` (else zero entries
    were floored at ``Y_FLOOR``)."""
    n = y.shape[0]
    T = y.shape[1]
    for i in prange(n):
        Lw = np.empty((T, T))
        cw = np.empty(T)
        exact[i] = ss_target_point_one(y[i], beta, kidx, cc, Lw, cw, z[i])


def ss_target_point_numpy(y, beta):
    """NumPy twin of :func:`ss_target_point`: returns ``z (n, K)`` and ``exact (n,)``.

    Solves the least-squares problem ``min_c sum_{a != b} (L_ab + c_a - L_ba - c_b)^2`` with
    ``lstsq`` (minimum-norm solution, i.e. ``sum_a c_a = 0``) instead of the closed form.
    """
    n, T, _ = y.shape
    exact = np.all(y > 0.0, axis=(1, 2))
    L = np.log(np.where(y > 0.0, y, Y_FLOOR)) / beta
    rows = []
    pairs = []
    for a in range(T):
        for b in range(T):
            if a != b:
                e = np.zeros(T)
                e[a] += 1.0
                e[b] -= 1.0
                rows.append(e)
                pairs.append((a, b))
    A = np.array(rows)
    rhs = np.stack([L[:, b, a] - L[:, a, b] for a, b in pairs], axis=0)  # (m, n)
    c = np.linalg.lstsq(A, rhs, rcond=None)[0].T  # (n, T)
    H = L + c[:, :, None]
    ia, ib, cst = pair_indices(T)
    return 0.5 * (H[:, ia, ib] + H[:, ib, ia]) / cst, exact


def run_ss_target_point(y, beta):
    n, T, _ = y.shape
    kidx, cc = pair_maps(T)
    z = np.empty((n, n_pairs(T)))
    exact = np.empty(n, dtype=np.bool_)
    ss_target_point(_arr(y), float(beta), kidx, cc, z, exact)
    return z, exact


# --------------------------------------------------------------------------------------------
# Prox: safeguarded (modified) Newton from several starts
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def ss_prox_objective(yi, om, z, Wj, beta, kidx, cc, S):
    """``(l_y(z), 1/2 (z - omega)^T V^{-1} (z - omega))`` of one sample (``S`` ends at z)."""
    K = z.shape[0]
    ss_softmax_rows(z, beta, kidx, cc, S)
    lv = ss_value_from_softmax(yi, S)
    quad = 0.0
    for a in range(K):
        s = 0.0
        for b in range(K):
            s += Wj[a, b] * (z[b] - om[b])
        quad += (z[a] - om[a]) * s
    return lv, 0.5 * quad


@njit(cache=True, inline="always")
def ss_project_flat(om, z, Wj, u):
    """Move ``z`` along the flat direction ``u`` (``u_k = 1/c_k``) to the minimiser of the
    quadratic term ``(z - omega)^T V^{-1} (z - omega)`` (the loss is constant along ``u``)."""
    K = z.shape[0]
    num = 0.0
    den = 0.0
    for a in range(K):
        wr = 0.0
        wu = 0.0
        for b in range(K):
            wr += Wj[a, b] * (z[b] - om[b])
            wu += Wj[a, b] * u[b]
        num += u[a] * wr
        den += u[a] * wu
    t = -num / den
    for a in range(K):
        z[a] += t * u[a]


@njit(cache=True)
def ss_eigh(A, lam, Q):
    """Eigen-decomposition of the symmetric ``A`` (K, K) by cyclic Jacobi rotations (in place:
    ``A`` is destroyed).  ``lam`` (K,) ascending, ``Q`` (K, K) orthonormal eigenvectors in its
    columns.  Used only for the rare indefinite Newton matrices (no allocation, no LAPACK call)."""
    K = A.shape[0]
    for a in range(K):
        for b in range(K):
            Q[a, b] = 1.0 if a == b else 0.0
    for sweep in range(100):
        off = 0.0
        dia = 0.0
        for a in range(K):
            dia += A[a, a] * A[a, a]
            for b in range(a + 1, K):
                off += A[a, b] * A[a, b]
        if not off > (1e-32 * dia):
            break
        for a in range(K - 1):
            for b in range(a + 1, K):
                apq = A[a, b]
                if apq == 0.0:
                    continue
                theta = (A[b, b] - A[a, a]) / (2.0 * apq)
                t = 1.0 / (abs(theta) + np.sqrt(theta * theta + 1.0))
                if theta < 0.0:
                    t = -t
                c = 1.0 / np.sqrt(t * t + 1.0)
                s = t * c
                for m in range(K):
                    amp = A[m, a]
                    amq = A[m, b]
                    A[m, a] = c * amp - s * amq
                    A[m, b] = s * amp + c * amq
                for m in range(K):
                    apm = A[a, m]
                    aqm = A[b, m]
                    A[a, m] = c * apm - s * aqm
                    A[b, m] = s * apm + c * aqm
                for m in range(K):
                    qmp = Q[m, a]
                    qmq = Q[m, b]
                    Q[m, a] = c * qmp - s * qmq
                    Q[m, b] = s * qmp + c * qmq
    for a in range(K):
        lam[a] = A[a, a]
    # insertion sort, ascending, with the columns of Q
    for a in range(1, K):
        b = a
        while b > 0 and lam[b - 1] > lam[b]:
            s = lam[b - 1]
            lam[b - 1] = lam[b]
            lam[b] = s
            for m in range(K):
                s = Q[m, b - 1]
                Q[m, b - 1] = Q[m, b]
                Q[m, b] = s
            b -= 1


@njit(cache=True)
def ss_newton(
    yi, om, z, Vj, Wj, vnorm, beta, kidx, cc, tol, max_newton,
    S, dv, J, Ha, grad, hess, N, E, lam, Q, dinv, q, F, dz, zt, tmp,
):
    """Safeguarded Newton on the prox objective of one sample, in place on ``z``.

    ``phi(z) = l_y(z) + 1/2 (z - omega)^T W (z - omega)``, ``W = V^{-1}``; ``Vj``/``Wj`` (K, K),
    ``vnorm = ||V||_inf``.  Each iteration: gradient ``F = grad_l + W (z - omega)`` and Newton
    matrix ``N = W + H``.  If the Cholesky factorisation of ``N`` succeeds, ``dz = -N^{-1} F``;
    otherwise ``N`` is diagonalised (Jacobi rotations, :func:`ss_eigh`) and shifted to
    ``N + tau I``, ``tau = -lam_min + max(|lam_min|, 1e-6 max|lam|)``.  Step length: Armijo backtracking on the
    values of ``phi`` (``phi(z + t dz) - phi(z) <= 1e-4 t F.dz``, the difference of the quadratic
    terms formed exactly as ``t (z - omega)^T W dz + t^2/2 dz^T W dz``), full step first, quadratic
    interpolation clamped to ``[0.1 t, 0.5 t]``; a step that decreases ``phi`` enough but raises the
    loss by more than ``_DL_MAX = 0.5`` is halved (it crossed a barrier of ``l``); a full Newton
    step whose predicted decrease is at the rounding level of ``phi`` is taken as is.  At a
    stationary point with ``N`` indefinite (a saddle) the step is along the eigenvector of
    ``lam_min`` (length ``1/beta``, backtracked until ``phi`` decreases by
    ``1e-4 t^2 |lam_min| / (2 beta^2)``).

    Stops when the z-unit residual ``||V grad_l + z - omega||_inf <= tol (1 + ||omega||_inf +
    ||z||_inf) + 64 eps beta ||V||_inf`` with ``N`` numerically positive semidefinite, or when a
    Newton step with ``N`` positive definite satisfies ``||dz||_inf <= tol (1 + ||z||_inf) +
    min(64 eps beta ||V||_inf, 1e-3/beta)`` (that step is taken).  Returns ``(status, steps)``.
    """
    K = z.shape[0]
    om_inf = 0.0
    for a in range(K):
        if abs(om[a]) > om_inf:
            om_inf = abs(om[a])
    floor = _ROUNDOFF * beta * vnorm
    step_floor = min(floor, 1e-3 / beta)
    nit = 0
    status = MAX_ITER
    for it in range(max_newton + 1):
        ss_softmax_rows(z, beta, kidx, cc, S)
        lval = ss_value_from_softmax(yi, S)
        ss_derivs_from_softmax(yi, beta, kidx, cc, S, grad, hess, dv, J, Ha)
        rinf = 0.0
        zinf = 0.0
        quad0 = 0.0
        finite = True
        for a in range(K):
            zt[a] = z[a] - om[a]
        for a in range(K):
            w = 0.0
            s = 0.0
            for b in range(K):
                w += Wj[a, b] * zt[b]
                s += Vj[a, b] * grad[b]
            q[a] = w
            F[a] = grad[a] + w
            quad0 += zt[a] * w
            s += zt[a]
            if not np.isfinite(s) or not np.isfinite(F[a]):
                finite = False
            elif abs(s) > rinf:
                rinf = abs(s)
            if abs(z[a]) > zinf:
                zinf = abs(z[a])
        quad0 *= 0.5
        if not finite or not np.isfinite(lval):
            status = NONFINITE
            break
        small = rinf <= tol * (1.0 + om_inf + zinf) + floor
        for a in range(K):
            for b in range(a + 1):
                N[a, b] = hess[a, b] + Wj[a, b]
        pd = cholesky_recip(N, dinv)
        escape = False
        lmin = 0.0
        if pd:
            if small:
                status = CONVERGED_RESIDUAL
                break
            if it == max_newton:
                break
            chol_solve(N, dinv, F, tmp, dz)
            for a in range(K):
                dz[a] = -dz[a]
        else:
            for a in range(K):
                for b in range(K):
                    E[a, b] = hess[a, b] + Wj[a, b]
            for a in range(K):
                for b in range(a + 1, K):
                    s = 0.5 * (E[a, b] + E[b, a])
                    E[a, b] = s
                    E[b, a] = s
            ss_eigh(E, lam, Q)
            lmin = lam[0]
            lmax = max(abs(lam[0]), abs(lam[K - 1]))
            psd = lmin >= -_PSD_REL * lmax
            if small and psd:
                status = CONVERGED_RESIDUAL
                break
            if it == max_newton:
                break
            if small:
                escape = True
                fv = 0.0
                for a in range(K):
                    fv += F[a] * Q[a, 0]
                sgn = -1.0 if fv > 0.0 else 1.0
                for a in range(K):
                    dz[a] = sgn * Q[a, 0] / beta
            else:
                tau = -lmin + max(abs(lmin), _SHIFT_REL * lmax)
                for a in range(K):
                    dz[a] = 0.0
                for i in range(K):
                    c = 0.0
                    for a in range(K):
                        c += Q[a, i] * F[a]
                    c = -c / (lam[i] + tau)
                    for a in range(K):
                        dz[a] += c * Q[a, i]
        d0 = 0.0
        dzinf = 0.0
        for a in range(K):
            d0 += F[a] * dz[a]
            if abs(dz[a]) > dzinf:
                dzinf = abs(dz[a])
        if pd and dzinf <= tol * (1.0 + zinf) + step_floor:
            for a in range(K):
                z[a] += dz[a]
            nit += 1
            status = CONVERGED_STEP
            break
        uw = 0.0
        ww = 0.0
        for a in range(K):
            uw += q[a] * dz[a]
            s = 0.0
            for b in range(K):
                s += Wj[a, b] * dz[b]
            ww += dz[a] * s
        dreq = 0.5 * lmin / (beta * beta)  # escape: required decrease per t^2 (< 0)
        t = 1.0
        accepted = False
        for ls in range(_MAX_BACKTRACK):
            for a in range(K):
                tmp[a] = z[a] + t * dz[a]
            ss_softmax_rows(tmp, beta, kidx, cc, S)
            lt = ss_value_from_softmax(yi, S)
            dphi = (lt - lval) + t * uw + 0.5 * t * t * ww
            if escape:
                if dphi <= _ARMIJO * t * t * dreq:
                    accepted = True
                    break
                t *= 0.5
                continue
            if pd and ls == 0 and -d0 <= _ROUND_PHI * (1.0 + lval + quad0):
                accepted = True
                break
            if dphi <= _ARMIJO * t * d0:
                if lt - lval <= _DL_MAX:
                    accepted = True
                    break
                t *= 0.5  # sufficient decrease, but the loss rose too much: a barrier was crossed
                continue
            den = 2.0 * (dphi - t * d0)
            tn = -d0 * t * t / den if den > 0.0 else 0.5 * t
            t = min(max(tn, 0.1 * t), 0.5 * t)
        if not accepted:
            status = SADDLE if escape else LINE_SEARCH_FAILED
            break
        for a in range(K):
            z[a] += t * dz[a]
        nit += 1
    return status, nit


@njit(cache=True)
def ss_lu_solve(A, B, piv):
    """Solve ``A X = B`` in place (``B`` becomes ``X``; ``A`` is overwritten) by Gaussian
    elimination with partial pivoting.  Returns False if a pivot is zero or non-finite."""
    K = A.shape[0]
    M = B.shape[1]
    for j in range(K):
        p = j
        amax = abs(A[j, j])
        for i in range(j + 1, K):
            if abs(A[i, j]) > amax:
                amax = abs(A[i, j])
                p = i
        if not amax > 0.0 or not np.isfinite(amax):
            return False
        piv[j] = p
        if p != j:
            for m in range(K):
                s = A[j, m]
                A[j, m] = A[p, m]
                A[p, m] = s
            for m in range(M):
                s = B[j, m]
                B[j, m] = B[p, m]
                B[p, m] = s
        for i in range(j + 1, K):
            f = A[i, j] / A[j, j]
            A[i, j] = 0.0
            for m in range(j + 1, K):
                A[i, m] -= f * A[j, m]
            for m in range(M):
                B[i, m] -= f * B[j, m]
    for j in range(K - 1, -1, -1):
        for m in range(M):
            s = B[j, m]
            for i in range(j + 1, K):
                s -= A[j, i] * B[i, m]
            B[j, m] = s / A[j, j]
    return True


@njit(cache=True)
def ss_jacobian(Wj, hess, N, E, dinv, X, col, tmp, out, piv):
    """``X = N^{-1} H`` with ``N = W + H`` (Cholesky, else LU with partial pivoting) into ``X``.
    Returns success (False if ``N`` is singular)."""
    K = hess.shape[0]
    for a in range(K):
        for b in range(a + 1):
            N[a, b] = hess[a, b] + Wj[a, b]
    if cholesky_recip(N, dinv):
        for j in range(K):
            for a in range(K):
                col[a] = hess[a, j]
            chol_solve(N, dinv, col, tmp, out)
            for a in range(K):
                X[a, j] = out[a]
        return True
    for a in range(K):
        for b in range(K):
            E[a, b] = 0.5 * ((hess[a, b] + Wj[a, b]) + (hess[b, a] + Wj[b, a]))
            X[a, b] = hess[a, b]
    return ss_lu_solve(E, X, piv)


def flip_maps(T: int):
    """``(A, M)`` of the row flips: ``A (T*T, K)`` maps ``z`` to the centred rows of ``h``
    (``h_ab - mean_b h_ab``, row-major), ``M = (A^T A + u u^T)^{-1} A^T`` (K, T*T) gives the ``z``
    whose centred rows are closest to given ones (least squares; ``u = (1/c_k)``: the flat
    direction, invisible to ``A``, gets the component of the minimum-norm solution)."""
    ia, ib, c = pair_indices(T)
    K = ia.size
    P = _pair_matrix(T)
    C = np.eye(T) - 1.0 / T
    A = np.einsum("bc,ack->abk", C, P).reshape(T * T, K)
    u = 1.0 / c
    M = np.linalg.solve(A.T @ A + np.outer(u, u), A.T)
    return np.ascontiguousarray(A), np.ascontiguousarray(M)


@njit(cache=True, inline="always")
def ss_matvec(A, x, out):
    for a in range(A.shape[0]):
        s = 0.0
        for b in range(A.shape[1]):
            s += A[a, b] * x[b]
        out[a] = s


@njit(cache=True, inline="always")
def ss_better(phi, conv, best_phi, best_conv, have_best):
    """The candidate replaces the kept run: lower objective beyond the tie tolerance, or tied and
    only the candidate converged."""
    if not have_best:
        return True
    tie = _TIE * (1.0 + abs(best_phi)) if np.isfinite(best_phi) else 0.0
    return phi < best_phi - tie or (phi <= best_phi + tie and conv and not best_conv)


@njit(cache=True, parallel=True)
def ss_prox(
    y, omega, zextra, multi, V, W, beta, kidx, cc, u, Arow, Mls, tol, max_newton,
    jac_mode, nchunk, p, g, dg, dgtr, iterations, status, start,
):
    """Per-sample softmax-square prox, ``g`` and Jacobian (Numba, parallel over samples).

    y (n, T, T), omega (n, K), zextra (m, n, K) with m in {0, 1}, V/W (nV, K, K) with nV in
    {1, n}, ``W = V^{-1}``; ``u (K,) = (1/c_k)`` (the flat direction); ``Arow``/``Mls`` from
    :func:`flip_maps`.

    ``multi`` (the global search): Newton (:func:`ss_newton`) from omega, from ``z_y`` (when all
    ``y_ab > 0``) and from ``zextra[0]`` (``p0``, if m = 1), the last two first moved along ``u``
    to the minimiser of the quadratic term; then **row flips**: for each row ``a`` and target
    (the centred rows of omega, and of ``z_y`` if any), a start whose centred rows are those of
    the kept minimiser except row ``a``, set to the target's (least squares ``Mls``, then moved
    along ``u``), unless row ``a`` is already within ``0.1/beta`` of it; a flip run that lowers
    the objective is kept and the sweep continues from it; sweeps repeat while one improved (at
    most 4).  A lower prox objective wins; ties (``1e-12 (1 + |phi|)``) keep the earlier run
    unless only the later one converged.  Not ``multi``: Newton from ``zextra[0]`` only, as is.

    jac_mode: 0 = none, 1 = full ``dg`` (n, K, K), 2 = ``Tr(dg)``, 3 = ``Tr(V dg)`` into dgtr (n,).
    Outputs p, g (n, K); iterations (n,) = Newton steps summed over all runs; status (n,) of the
    kept run (``NONFINITE`` if its Jacobian system is singular); start (n,) = ``START_*`` of it.
    """
    n, K = omega.shape
    T = y.shape[1]
    TT = T * T
    nV = V.shape[0]
    m_extra = zextra.shape[0]
    for ch in prange(nchunk):
        lo = (ch * n) // nchunk
        hi = ((ch + 1) * n) // nchunk
        z = np.empty(K)
        zbest = np.empty(K)
        zy = np.empty(K)
        S = np.empty((T, T))
        dv = np.empty(T)
        J = np.empty((T, T))
        Ha = np.empty((T, T))
        Lw = np.empty((T, T))
        cw = np.empty(T)
        grad = np.empty(K)
        hess = np.empty((K, K))
        N = np.empty((K, K))
        E = np.empty((K, K))
        X = np.empty((K, K))
        lam = np.empty(K)
        Q = np.empty((K, K))
        dinv = np.empty(K)
        q = np.empty(K)
        F = np.empty(K)
        dz = np.empty(K)
        zt = np.empty(K)
        tmp = np.empty(K)
        col = np.empty(K)
        out = np.empty(K)
        piv = np.empty(K, dtype=np.int64)
        rom = np.empty(TT)
        ry = np.empty(TT)
        crow = np.empty(TT)
        for i in range(lo, hi):
            j = i if nV > 1 else 0
            Vj = V[j]
            Wj = W[j]
            om = omega[i]
            yi = y[i]
            vnorm = 0.0
            for a in range(K):
                s = 0.0
                for b in range(K):
                    s += abs(Vj[a, b])
                if s > vnorm:
                    vnorm = s
            if multi:
                ss_target_point_one(yi, beta, kidx, cc, Lw, cw, zy)
            best_phi = np.inf
            best_st = -1
            best_start = -1
            total = 0
            n_runs = 3 if multi else 1
            for kind in range(n_runs):
                if multi and kind == START_OMEGA:
                    for a in range(K):
                        z[a] = om[a]
                elif multi and kind == START_TARGET:
                    for a in range(K):
                        z[a] = zy[a]
                    ss_project_flat(om, z, Wj, u)
                else:
                    if m_extra == 0:
                        continue
                    for a in range(K):
                        z[a] = zextra[0, i, a]
                    if multi:
                        ss_project_flat(om, z, Wj, u)
                label = kind if multi else START_EXTRA
                st, nit = ss_newton(
                    yi, om, z, Vj, Wj, vnorm, beta, kidx, cc, tol, max_newton,
                    S, dv, J, Ha, grad, hess, N, E, lam, Q, dinv, q, F, dz, zt, tmp,
                )
                total += nit
                lv, quad = ss_prox_objective(yi, om, z, Wj, beta, kidx, cc, S)
                phi = lv + quad
                if not np.isfinite(phi):
                    phi = np.inf
                conv = st <= CONVERGED_STEP
                if ss_better(phi, conv, best_phi, best_st >= 0 and best_st <= CONVERGED_STEP,
                             best_st >= 0):
                    best_phi = phi
                    best_st = st
                    best_start = label
                    for a in range(K):
                        zbest[a] = z[a]
            if multi:
                ss_matvec(Arow, om, rom)
                ss_matvec(Arow, zy, ry)
                for sweep in range(_MAX_SWEEPS):
                    improved = False
                    for a in range(T):
                        for itg in range(2):
                            ss_matvec(Arow, zbest, crow)
                            dmax = 0.0
                            for b in range(T):
                                tv = rom[a * T + b] if itg == 0 else ry[a * T + b]
                                if abs(crow[a * T + b] - tv) > dmax:
                                    dmax = abs(crow[a * T + b] - tv)
                                crow[a * T + b] = tv
                            if beta * dmax < _FLIP_SKIP:
                                continue
                            ss_matvec(Mls, crow, z)
                            ss_project_flat(om, z, Wj, u)
                            st, nit = ss_newton(
                                yi, om, z, Vj, Wj, vnorm, beta, kidx, cc, tol, max_newton,
                                S, dv, J, Ha, grad, hess, N, E, lam, Q, dinv, q, F, dz, zt, tmp,
                            )
                            total += nit
                            lv, quad = ss_prox_objective(yi, om, z, Wj, beta, kidx, cc, S)
                            phi = lv + quad
                            if not np.isfinite(phi):
                                phi = np.inf
                            conv = st <= CONVERGED_STEP
                            best_conv = best_st <= CONVERGED_STEP
                            tie = _TIE * (1.0 + abs(best_phi)) if np.isfinite(best_phi) else 0.0
                            if phi < best_phi - tie or (
                                phi <= best_phi + tie and conv and not best_conv
                            ):
                                if phi < best_phi - tie:
                                    improved = True
                                best_phi = phi
                                best_st = st
                                best_start = START_FLIP
                                for b in range(K):
                                    zbest[b] = z[b]
                    if not improved:
                        break
            ss_softmax_rows(zbest, beta, kidx, cc, S)
            ss_derivs_from_softmax(yi, beta, kidx, cc, S, grad, hess, dv, J, Ha)
            for a in range(K):
                p[i, a] = zbest[a]
                g[i, a] = -grad[a]
            if jac_mode != 0:
                ok = ss_jacobian(Wj, hess, N, E, dinv, X, col, tmp, out, piv)
                if not ok:
                    if best_st <= CONVERGED_STEP:
                        best_st = NONFINITE
                    for a in range(K):
                        for b in range(K):
                            X[a, b] = np.nan
                if jac_mode == 1:
                    for a in range(K):
                        for b in range(K):
                            s = 0.0
                            for c in range(K):
                                s += Wj[a, c] * X[c, b]
                            E[a, b] = s
                    for a in range(K):
                        for b in range(a, K):
                            s = 0.5 * (E[a, b] + E[b, a])
                            dg[i, a, b] = s
                            dg[i, b, a] = s
                elif jac_mode == 2:
                    s = 0.0
                    for a in range(K):
                        for c in range(K):
                            s += Wj[a, c] * X[c, a]
                    dgtr[i] = s
                else:
                    s = 0.0
                    for a in range(K):
                        s += X[a, a]
                    dgtr[i] = s
            iterations[i] = total
            status[i] = best_st
            start[i] = best_start


def ss_prox_numpy(
    y, omega, V, beta, p0=None, start=None, tol=DEFAULT_TOL, max_newton=DEFAULT_MAX_NEWTON
):
    """NumPy twin of :func:`ss_prox` (vectorised over samples; used by the tests).

    Same problem, starts, flips, rules and constants, written independently: the positive
    definite test and the shift use batched ``np.linalg.eigh`` of every Newton matrix, the Newton
    system is solved by ``np.linalg.solve`` (LU), the line search runs all samples in lock step,
    the flat projection and the flips use matrix products, and ``dg = H (I + V H)^{-1}`` comes
    from ``(I + H V) dg^T = H``.  ``V`` is anything broadcastable to ``(n, K, K)``; ``start``
    (n, K) selects the single-start mode (``p0`` is then ignored).

    Returns ``p (n, K), g (n, K), dg (n, K, K), iterations (n,), status (n,), start (n,)``.
    """
    n, K = omega.shape
    T = y.shape[1]
    V = np.broadcast_to(np.asarray(V, dtype=np.float64), (n, K, K))
    W = np.linalg.inv(V)
    W = 0.5 * (W + np.swapaxes(W, 1, 2))
    vnorm = np.max(np.sum(np.abs(V), axis=2), axis=1)
    om_inf = np.max(np.abs(omega), axis=1)
    floor = _ROUNDOFF * beta * vnorm
    step_floor = np.minimum(floor, 1e-3 / beta)
    u = 1.0 / pair_indices(T)[2]
    Arow, Mls = flip_maps(T)

    def mv(M, x):
        return np.einsum("nij,nj->ni", M, x)

    def objective(idx, zz):
        r = zz - omega[idx]
        return ss_value_numpy(y[idx], zz, beta) + 0.5 * np.sum(r * mv(W[idx], r), axis=1)

    def project_flat(idx, zz):
        Wu = W[idx] @ u
        t = -np.sum(Wu * (zz - omega[idx]), axis=1) / (Wu @ u)
        return zz + t[:, None] * u[None]

    def newton(idx, z0):
        """Newton from z0 for the samples idx; returns z, steps, status (len(idx),)."""
        m = idx.size
        z = np.array(z0, dtype=np.float64)
        steps = np.zeros(m, dtype=np.int64)
        status = np.full(m, MAX_ITER, dtype=np.int64)
        act = np.arange(m)
        for it in range(max_newton + 1):
            if act.size == 0:
                break
            ids = idx[act]
            za = z[act]
            lval, grad, hess = ss_derivs_numpy(y[ids], za, beta)
            Wa = W[ids]
            res = za - omega[ids]
            q = mv(Wa, res)
            F = grad + q
            quad0 = 0.5 * np.sum(res * q, axis=1)
            rinf = np.max(np.abs(res + mv(V[ids], grad)), axis=1)
            zinf = np.max(np.abs(za), axis=1)
            bad = ~(np.isfinite(rinf) & np.all(np.isfinite(F), axis=1) & np.isfinite(lval))
            Nm = hess + Wa
            Nm = 0.5 * (Nm + np.swapaxes(Nm, 1, 2))
            Nm[bad] = np.eye(K)
            lam, Q = np.linalg.eigh(Nm)  # (the kernel: Jacobi rotations)
            lmin = lam[:, 0]
            lmax = np.maximum(np.abs(lam[:, 0]), np.abs(lam[:, -1]))
            pd = lmin > 0.0
            small = rinf <= tol * (1.0 + om_inf[ids] + zinf) + floor[ids]
            done = ~bad & small & (lmin >= -_PSD_REL * lmax)
            status[act[bad]] = NONFINITE
            status[act[done]] = CONVERGED_RESIDUAL
            keep = ~bad & ~done
            if it == max_newton:
                break
            escape = keep & small & ~pd
            dz = np.zeros_like(za)
            sel = keep & pd
            if sel.any():
                dz[sel] = -np.linalg.solve(Nm[sel], F[sel][:, :, None])[:, :, 0]
            sel = keep & ~pd & ~small
            if sel.any():
                tau = -lmin[sel] + np.maximum(np.abs(lmin[sel]), _SHIFT_REL * lmax[sel])
                coef = -np.einsum("nki,nk->ni", Q[sel], F[sel]) / (lam[sel] + tau[:, None])
                dz[sel] = np.einsum("nki,ni->nk", Q[sel], coef)
            if escape.any():
                v = Q[escape][:, :, 0]
                sgn = np.where(np.sum(F[escape] * v, axis=1) > 0.0, -1.0, 1.0)
                dz[escape] = sgn[:, None] * v / beta
            d0 = np.sum(F * dz, axis=1)
            tiny = keep & pd & (np.max(np.abs(dz), axis=1) <= tol * (1.0 + zinf) + step_floor[ids])
            z[act[tiny]] += dz[tiny]
            steps[act[tiny]] += 1
            status[act[tiny]] = CONVERGED_STEP
            keep &= ~tiny
            uw = np.sum(q * dz, axis=1)
            ww = np.sum(dz * mv(Wa, dz), axis=1)
            dreq = 0.5 * lmin / beta**2
            t = np.ones(act.size)
            accepted = np.zeros(act.size, dtype=bool)
            searching = keep.copy()
            for ls in range(_MAX_BACKTRACK):
                if not searching.any():
                    break
                s_ = np.flatnonzero(searching)
                ti = t[s_]
                lt = ss_value_numpy(y[ids[s_]], za[s_] + ti[:, None] * dz[s_], beta)
                dphi = (lt - lval[s_]) + ti * uw[s_] + 0.5 * ti * ti * ww[s_]
                esc = escape[s_]
                armijo = dphi <= _ARMIJO * ti * d0[s_]
                rounding = (ls == 0) & pd[s_]
                rounding &= -d0[s_] <= _ROUND_PHI * (1.0 + lval[s_] + quad0[s_])
                ok = np.where(
                    esc, dphi <= _ARMIJO * ti * ti * dreq[s_],
                    rounding | (armijo & (lt - lval[s_] <= _DL_MAX)),
                )
                accepted[s_[ok]] = True
                searching[s_[ok]] = False
                den = 2.0 * (dphi - ti * d0[s_])
                with np.errstate(divide="ignore", invalid="ignore"):
                    tn = np.where(den > 0.0, -d0[s_] * ti * ti / den, 0.5 * ti)
                tn = np.minimum(np.maximum(tn, 0.1 * ti), 0.5 * ti)
                tn = np.where(esc | armijo, 0.5 * ti, tn)
                t[s_[~ok]] = tn[~ok]
            failed = keep & ~accepted
            status[act[failed & escape]] = SADDLE
            status[act[failed & ~escape]] = LINE_SEARCH_FAILED
            move = keep & accepted
            z[act[move]] += t[move, None] * dz[move]
            steps[act[move]] += 1
            act = act[move]
        return z, steps, status

    p = np.zeros((n, K))
    best_phi = np.full(n, np.inf)
    best_st = np.full(n, -1, dtype=np.int64)
    best_start = np.full(n, -1, dtype=np.int64)
    total = np.zeros(n, dtype=np.int64)

    def consider(idx, z0, label, strict=False):
        """Run Newton for the samples idx from z0 and keep the better results; returns the mask
        (over idx) of strict improvements."""
        z, steps, st = newton(idx, z0)
        total[idx] += steps
        phi = objective(idx, z)
        phi = np.where(np.isfinite(phi), phi, np.inf)
        conv = st <= CONVERGED_STEP
        bphi = best_phi[idx]
        have = best_st[idx] >= 0
        bconv = have & (best_st[idx] <= CONVERGED_STEP)
        tie = np.where(np.isfinite(bphi), _TIE * (1.0 + np.abs(bphi)), 0.0)
        lower = phi < bphi - tie
        take = ~have | lower | ((phi <= bphi + tie) & conv & ~bconv)
        sel = idx[take]
        p[sel] = z[take]
        best_phi[sel] = phi[take]
        best_st[sel] = st[take]
        best_start[sel] = label
        return lower & have

    all_idx = np.arange(n)
    if start is not None:
        consider(all_idx, np.asarray(start, dtype=np.float64), START_EXTRA)
    else:
        consider(all_idx, omega, START_OMEGA)
        zy, _ = ss_target_point_numpy(y, beta)
        consider(all_idx, project_flat(all_idx, zy), START_TARGET)
        if p0 is not None:
            consider(all_idx, project_flat(all_idx, np.asarray(p0, dtype=np.float64)), START_EXTRA)
        # row flips, sweep by sweep, every sample in the same (row, target) order
        targets = [omega @ Arow.T, zy @ Arow.T]
        sweeping = np.ones(n, dtype=bool)
        for sweep in range(_MAX_SWEEPS):
            improved = np.zeros(n, dtype=bool)
            for a in range(T):
                blk = slice(a * T, (a + 1) * T)
                for itg, tg in enumerate(targets):
                    rows = p @ Arow.T  # centred rows of the kept minimisers, (n, T*T)
                    dist = np.max(np.abs(rows[:, blk] - tg[:, blk]), axis=1)
                    cand = sweeping & ~(beta * dist < _FLIP_SKIP)
                    idx = np.flatnonzero(cand)
                    if idx.size == 0:
                        continue
                    rows = rows[idx]
                    rows[:, blk] = tg[idx, blk]
                    improved[idx] |= consider(idx, project_flat(idx, rows @ Mls.T), START_FLIP)
            sweeping &= improved
            if not sweeping.any():
                break
    _, grad, hess = ss_derivs_numpy(y, p, beta)
    eye = np.eye(K)
    dgT = np.linalg.solve(eye[None] + hess @ V, hess)
    dg = 0.5 * (dgT + np.swapaxes(dgT, 1, 2))
    return p, -grad, dg, total, best_st, best_start


def run_ss_prox(y, omega, V, W, beta, p0=None, start=None, tol=DEFAULT_TOL,
                max_newton=DEFAULT_MAX_NEWTON, jac_mode=0):
    """Call :func:`ss_prox` on validated inputs.

    ``V``, ``W = V^{-1}``: (nV, K, K) with nV in {1, n}.  ``start`` (n, K) selects the
    single-start mode (``p0`` ignored); otherwise the global search from omega, z_y, ``p0`` (if
    given) and the row flips.  Returns ``p, g, jac, iterations, status, start_used`` with ``jac``
    the full ``dg`` (n, K, K) for jac_mode 1, the traces (n,) for 2 and 3, None for 0.
    """
    n, K = omega.shape
    T = y.shape[1]
    kidx, cc = pair_maps(T)
    u = 1.0 / pair_indices(T)[2]
    Arow, Mls = flip_maps(T)
    if start is not None:
        zextra = _arr(np.asarray(start, dtype=np.float64)[None])
    elif p0 is None:
        zextra = np.empty((0, n, K))
    else:
        zextra = _arr(np.asarray(p0, dtype=np.float64)[None])
    b = prox_buffers(n, K, jac_mode)
    p, g, dg, dgtr, iterations, status = b["p"], b["g"], b["dg"], b["dgtr"], b["iterations"], b["status"]
    start_used = np.empty(n, dtype=np.int64)
    ss_prox(
        _arr(y), _arr(omega), zextra, start is None, _arr(V), _arr(W), float(beta), kidx, cc,
        u, Arow, Mls,
        float(tol), int(max_newton), int(jac_mode), b["nchunk"], p, g, dg, dgtr, iterations, status,
        start_used,
    )
    jac = dg if jac_mode == 1 else (dgtr if jac_mode in (2, 3) else None)
    return p, g, jac, iterations, status, start_used
