"""Kernel of the spectral divergence, with its NumPy twin (docs/theory.md §5, step 6).

For a spectral map ``F(R) = U f(L) U^T`` of a symmetric ``d x d`` matrix, the divergence in
orthonormal coordinates of Sym_d (``N = d(d+1)/2`` of them) is::

    div F = sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j)) / (l_i - l_j)

with the divided difference replaced by the mean of ``f'`` for eigenvalue pairs equal to 1e-12
relative.  ``spectral_divergence`` is the Numba kernel (serial on purpose: ``d^2/2`` cheap pairs,
~1e-4 s at d = 1000, cost less than waking a thread pool right after a multithreaded BLAS call);
``spectral_divergence_numpy`` is its vectorised twin (tests pair them).  Both take contiguous
float64 arrays ``l, f, fp`` of equal length ``d``; callers validate.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["spectral_divergence", "spectral_divergence_numpy"]


@njit(cache=True)
def _divergence_rows(l, f, fp):
    d = l.shape[0]
    rows = np.zeros(d)
    for i in range(d):
        s = fp[i]
        for j in range(i + 1, d):
            dl = l[i] - l[j]
            df = f[i] - f[j]
            if dl != 0.0 and abs(dl) > 1e-12 * (abs(l[i]) + abs(l[j])):
                s += df / dl
            else:
                s += 0.5 * (fp[i] + fp[j])
        rows[i] = s
    return rows.sum()


def spectral_divergence(l, f, fp) -> float:
    """Numba kernel: ``sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j)) / (l_i - l_j)``."""
    return float(_divergence_rows(np.ascontiguousarray(l, dtype=np.float64),
                                  np.ascontiguousarray(f, dtype=np.float64),
                                  np.ascontiguousarray(fp, dtype=np.float64)))


def spectral_divergence_numpy(l, f, fp) -> float:
    """NumPy twin of :func:`spectral_divergence`."""
    l, f, fp = (np.asarray(v, dtype=np.float64) for v in (l, f, fp))
    dl = l[:, None] - l[None, :]
    df = f[:, None] - f[None, :]
    close = np.abs(dl) <= 1e-12 * (np.abs(l)[:, None] + np.abs(l)[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(close, 0.5 * (fp[:, None] + fp[None, :]), df / np.where(close, 1.0, dl))
    iu = np.triu_indices(l.size, 1)
    return float(fp.sum() + q[iu].sum())
