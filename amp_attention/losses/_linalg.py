"""Small inline linear-algebra kernels (Numba) of the per-sample Newton solvers of the losses.

Cholesky factorisation and triangular solves of one ``K x K`` system (``K <= 36``), written as
plain loops so that they inline into the per-sample kernels of the loss kernel modules (e.g.
:mod:`amp_attention.losses._cross_entropy_kernels`; ``inline="always"``: no call overhead, fixed
trip counts once K is a compile-time constant).  Only the lower triangle of a factor is read or
written.  Also two intrinsics for the per-sample kernels' arrays: :func:`stack_empty` (work arrays
on the stack) and :func:`unmanaged` (views without a reference count); see the section at the end.

Numba's on-disk cache of a kernel is keyed by the file that defines it, not by the files of the
functions it inlines: after editing this module, delete the cached kernels of the modules that
import it (``amp_attention/losses/__pycache__/_*_kernels.*.nbi``/``.nbc``) or touch those modules,
so that the kernels are recompiled with the new code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

__all__ = ["cholesky_recip", "cholesky_inplace", "chol_solve", "forward", "backward", "stack_empty", "unmanaged"]


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


# --------------------------------------------------------------------------------------------
# Work arrays without reference counting
# --------------------------------------------------------------------------------------------
#
# Every array variable that an inline helper receives is a new reference: one atomic increment and
# decrement of the array's reference count per call, which in a per-sample solver called ~10^5
# times per Newton loop is a ~20% slowdown (Numba's parallel pipeline removes most of them, at a
# large compilation cost).  Arrays whose "meminfo" is NULL have no reference count: these two
# intrinsics make such arrays.


@intrinsic
def stack_empty(typingctx, rows, cols):
    """Uninitialised float64 array of shape ``(len(rows), len(cols))`` (``(len(rows),)`` if ``cols``
    is ``()``) on the stack of the compiled function that calls it; ``rows``/``cols`` are tuples,
    whose lengths are compile-time constants.

    The array lives as long as that function's frame: call this only in the kernel that uses the
    array (or in an ``inline="always"`` helper of it), never in a function that returns it.
    """
    n0, n1 = len(rows), len(cols)
    shape = (n0,) if n1 == 0 else (n0, n1)
    aryty = types.Array(types.float64, len(shape), "C")

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        data = cgutils.alloca_once(builder, context.get_value_type(types.float64), size=n0 * max(n1, 1))
        ary = context.make_array(aryty)(context, builder)
        populate_array(ary, data=data, shape=[intp(m) for m in shape],
                       strides=[intp(8)] if n1 == 0 else [intp(8 * n1), intp(8)], itemsize=intp(8),
                       meminfo=None)
        return ary._getvalue()

    return aryty(rows, cols), codegen


@intrinsic
def unmanaged(typingctx, arr):
    """View of the array ``arr`` without a reference count (same type, data, shape and strides).

    Valid while ``arr`` is alive: use it on the arguments of a kernel (their owner, the caller,
    keeps them alive during the call), not on arrays the kernel allocates and then drops."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(arr)(context, builder, args[0])
        out = context.make_array(arr)(context, builder)
        populate_array(out, data=ary.data, shape=ary.shape, strides=ary.strides, itemsize=ary.itemsize,
                       meminfo=None)
        return out._getvalue()

    return arr(arr), codegen
