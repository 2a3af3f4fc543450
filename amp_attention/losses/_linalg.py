"""Small inline linear-algebra kernels (Numba) of the per-sample Newton solvers of the losses.

Cholesky factorisation and triangular solves of one ``K x K`` system (``K <= 36``), written as
plain loops so that they inline into the per-sample kernels of the loss kernel modules (e.g.
:mod:`amp_attention.losses._cross_entropy_kernels`; ``inline="always"``: no call overhead, fixed
trip counts once K is a compile-time constant).  Only the lower triangle of a factor is read or
written.

Numba's on-disk cache of a kernel is keyed by the file that defines it, not by the files of the
functions it inlines: after editing this module, delete the cached kernels of the modules that
import it (``amp_attention/losses/__pycache__/_*_kernels.*.nbi``/``.nbc``) or touch those modules,
so that the kernels are recompiled with the new code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["cholesky_recip", "cholesky_inplace", "chol_solve", "forward", "backward"]


@njit(cache=True, inline="always")
def cholesky_recip(A, dinv):
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
def cholesky_inplace(A):
    """:func:`cholesky_recip` without keeping the reciprocal pivots.  Returns success."""
    return cholesky_recip(A, np.empty(A.shape[0]))


@njit(cache=True, inline="always")
def chol_solve(C, dinv, b, tmp, out):
    """Solve ``C C^T out = b`` with the factor of :func:`cholesky_recip` (``tmp``: workspace)."""
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
def forward(L, diag, b, out):
    """Solve ``L out = b`` (L lower triangular; only its diagonal is used if ``diag``)."""
    K = L.shape[0]
    for i in range(K):
        s = b[i]
        if not diag:
            for m in range(i):
                s -= L[i, m] * out[m]
        out[i] = s / L[i, i]


@njit(cache=True, inline="always")
def backward(L, diag, b, out):
    """Solve ``L^T out = b`` (L lower triangular; only its diagonal is used if ``diag``)."""
    K = L.shape[0]
    for i in range(K - 1, -1, -1):
        s = b[i]
        if not diag:
            for m in range(i + 1, K):
                s -= L[m, i] * out[m]
        out[i] = s / L[i, i]
