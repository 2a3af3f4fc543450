"""Whitened pair coordinates of the T x T preactivation matrices (docs/theory.md §2).

A sample's preactivations form a symmetric ``T x T`` matrix ``h``.  Its ``K = T(T+1)/2``
independent entries are indexed by pairs ``k = (a, b)`` with ``a <= b`` in row-major order::

    T = 3:  k = 0:(0,0) 1:(0,1) 2:(0,2) 3:(1,1) 4:(1,2) 5:(2,2)

The whitening constants are ``c_k = sqrt(2)`` on the diagonal (``a == b``) and ``1`` off it, and
``z_k = h_ab / c_k``.  For Gaussian tokens every ``z_k`` then has variance ``Tr(S^2)/d``, and
``1/2 ||Y - H||_F^2 = ||z_Y - z_H||^2`` for symmetric ``Y``.

For a non-symmetric ``Y`` (softmax targets), ``whiten`` uses the symmetric part
``(Y + Y^T)/2``, which is the only part a symmetric ``H`` can see in ``1/2 ||Y - H||_F^2``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["pair_indices", "n_pairs", "whiten", "unwhiten", "flat_direction"]

T_MAX = 8


def _as_float(x, name: str) -> np.ndarray:
    """``x`` as a float64 array (no finiteness check: iterates of a diverging run pass through),
    else ``ValueError`` naming ``name``."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real numeric array, got {type(x).__name__}") from None


def n_pairs(T: int) -> int:
    """Number ``K = T(T+1)/2`` of whitened coordinates per sample."""
    return T * (T + 1) // 2


@lru_cache(maxsize=None)
def _pairs(T: int):
    ia, ib = np.triu_indices(T)
    c = np.where(ia == ib, np.sqrt(2.0), 1.0)
    for arr in (ia, ib, c):
        arr.setflags(write=False)
    return ia.astype(np.int64), ib.astype(np.int64), c


def pair_indices(T: int):
    """Return ``(ia, ib, c)``: row index, column index and whitening constant of each pair.

    Arrays of length ``K = T(T+1)/2`` (read-only), pairs ``a <= b`` in row-major order.
    """
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)) or not 1 <= T <= T_MAX:
        raise ValueError(f"T must be an integer in 1..{T_MAX}, got {T!r}")
    return _pairs(int(T))


def whiten(H: np.ndarray) -> np.ndarray:
    """Map preactivation matrices ``H`` of shape ``(n, T, T)`` to ``z`` of shape ``(n, K)``.

    ``z_k = (H_ab + H_ba) / (2 c_k)`` (the symmetric part; equal to ``H_ab / c_k`` for symmetric H).
    """
    H = _as_float(H, "H")
    if H.ndim != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H must have shape (n, T, T), got {H.shape}")
    ia, ib, c = pair_indices(H.shape[1])
    return 0.5 * (H[:, ia, ib] + H[:, ib, ia]) / c


def unwhiten(z: np.ndarray, T: int) -> np.ndarray:
    """Inverse of :func:`whiten` on symmetric matrices: ``z (n, K) -> H (n, T, T)``, ``H_ab = c_k z_k``."""
    z = _as_float(z, "z")
    ia, ib, c = pair_indices(T)
    if z.ndim != 2 or z.shape[1] != ia.size:
        raise ValueError(f"z must have shape (n, {ia.size}) for T={T}, got {z.shape}")
    kidx, _ = pair_maps(T)
    return np.take(z * c, kidx, axis=1)


def flat_direction(T: int) -> np.ndarray:
    """Unit vector ``u ~ (1/c_k)_k``: the whitened image of the global shift ``h -> h + 11^T``.

    The cross-entropy loss is constant along it (docs/theory.md §4).
    """
    _, _, c = pair_indices(T)
    u = 1.0 / c
    return u / np.linalg.norm(u)


def pair_maps(T: int):
    """``kidx[a, b]`` = whitened index of entry (a, b) (either order); ``cc[a, b]`` = its ``c_k``,
    both ``(T, T)`` (for kernels that walk the ``T x T`` entries of a sample)."""
    ia, ib, c = pair_indices(T)
    kidx = np.empty((T, T), dtype=np.int64)
    cc = np.empty((T, T))
    kidx[ia, ib] = np.arange(ia.size)
    kidx[ib, ia] = np.arange(ia.size)
    cc[ia, ib] = c
    cc[ib, ia] = c
    return kidx, cc
