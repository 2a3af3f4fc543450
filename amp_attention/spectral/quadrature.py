"""Quadrature against the density of ``R`` (docs/theory.md §7).

Holds the Gauss-Legendre pieces (:func:`piece_nodes`), the geometrically graded breakpoints
(:func:`graded_breakpoints`) and the :class:`QuadratureGrid` container.

``rho_R`` vanishes like a square root at every edge.  Each support interval is cut into pieces: at
its midpoint, at the kinks of the integrand (e.g. the soft threshold ``tau``), at the atoms and at
the density dips of nearly-closed gaps (discrete laws: the density can oscillate on the atom
spacing), and geometrically graded towards the complex singularities next to the support (other
roots of the cubic's discriminant: nearly-closed or just-opened gaps).  A piece with a square-root
edge at one end is integrated with the substitution ``t = edge + L s^2`` and Gauss-Legendre in
``s``, which makes the integrand analytic; other pieces use plain Gauss-Legendre.  ``integrate``
then converges spectrally: density mass and moments are exact to ~1e-12 (Wishart cubic, also next
to gap closings) and ~1e-9 or better (discrete laws, d = 300, Delta down to 1e-4) with the default
node counts.  Kinks must be declared (``f.kinks`` or ``kinks=``), otherwise the error is O(1/n^2).
The cutting itself is done by :meth:`amp_attention.spectral.RDensity.grid` with the breakpoints
supplied by the back-ends of :mod:`.backends`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = ["QuadratureGrid", "piece_nodes", "graded_breakpoints"]


@lru_cache(maxsize=64)
def _gl01(n: int):
    s, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (s + 1.0), 0.5 * w


def piece_nodes(t0: float, t1: float, edge0: bool, edge1: bool, n: int):
    """Nodes/weights for ``int_{t0}^{t1} g(t) dt`` when ``g`` has square-root zeros at flagged ends."""
    L = t1 - t0
    if L <= 0:
        return np.empty(0), np.empty(0)
    s, ws = _gl01(n)
    if edge0 and edge1:
        m = 0.5 * (t0 + t1)
        ta, wa = piece_nodes(t0, m, True, False, n)
        tb, wb = piece_nodes(m, t1, False, True, n)
        return np.concatenate([ta, tb]), np.concatenate([wa, wb])
    if edge0:
        return t0 + L * s * s, 2.0 * L * s * ws
    if edge1:
        return t1 - L * s * s, 2.0 * L * s * ws
    return t0 + L * s, L * ws


class QuadratureGrid(NamedTuple):
    """Quadrature against ``rho_R``: ``int f rho_R ~= sum(weights * f(x))``.

    ``x`` (N,) nodes (sorted), ``weights`` (N,) = ``rho_R(x) dx`` weights (sum ~ 1), ``re_g`` (N,)
    ``Re G_R(x)``, ``density`` (N,) ``rho_R(x)``.
    """

    x: np.ndarray
    weights: np.ndarray
    re_g: np.ndarray
    density: np.ndarray


def graded_breakpoints(lo: float, hi: float, sing) -> np.ndarray:
    """Breakpoints in ``(lo, hi)`` graded geometrically towards nearby singularities ``sing``.

    A singularity at complex ``r`` at distance ``h`` from the interval gets points ``c +- h 2^k``
    (``c``: its projection on ``[lo, hi]``); points closer to an edge than half their distance to
    ``c`` are dropped (a breakpoint next to a square-root edge would spoil the neighbouring piece).
    The interval's own edges are not singularities here (they are handled by the s^2 map).
    """
    L = hi - lo
    out = []
    k = np.concatenate([[0.0], 2.0 ** np.arange(0, 60)])
    for r in np.atleast_1d(sing):
        if abs(r - lo) <= 1e-10 * L or abs(r - hi) <= 1e-10 * L:
            continue
        c = min(max(r.real, lo), hi)
        h = max(abs(r - c), 1e-13 * L)
        if h >= 0.25 * L:
            continue
        off = h * k
        room = np.maximum(0.5 * off, 0.25 * h)
        up = c + off
        dn = c - off
        keep_up = (hi - up >= room) & (up - lo >= room)
        keep_dn = (dn - lo >= room) & (hi - dn >= room)
        cand = np.concatenate([up[keep_up], dn[keep_dn]])
        out.append(cand)
    if not out:
        return np.empty(0)
    return np.unique(np.concatenate(out))
