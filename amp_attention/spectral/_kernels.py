"""Numba kernels of the discrete-law (atoms) back-end, each with its NumPy twin beside it.

Private module (docs/theory.md §7(b), Biane's parametrisation of the free convolution with a
semicircle; see :mod:`.backends`).  Naming scheme: a name without suffix is a Numba kernel
(``@njit(cache=True)``), ``name_numpy`` is its pure-NumPy twin (the tests pair them).  Kernels
without a twin are Numba-only helpers; ``bracket_root_numpy`` is a NumPy-only helper of
:func:`support_numpy`.

* :func:`biane_point` (helper): per-point Newton solve of ``v(u)`` and the sums it needs;
* :func:`biane_nodes` / :func:`biane_nodes_numpy`: per-node solve, columns ``(V, x, Re G, rho, dx/du)``;
* :func:`biane_invert` / :func:`biane_invert_numpy`: ``x -> u`` (for kinks and pointwise ``G_R``);
* :func:`fsum`, :func:`fval`, :func:`safe_newton` (helpers): ``F = sum w/(u - alpha)^2`` and the
  safeguarded Newton used for the edges;
* :func:`support` / :func:`support_numpy` (+ :func:`bracket_root_numpy`): support edges and gaps.

Typical cost: Wishart input side ~1 ms per call, discrete law with d = 300 atoms 15-60 ms.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "FLOOR",
    "biane_point",
    "biane_nodes",
    "biane_nodes_numpy",
    "biane_invert",
    "biane_invert_numpy",
    "fsum",
    "fval",
    "safe_newton",
    "support",
    "support_numpy",
    "bracket_root_numpy",
]


FLOOR = 1e-40  # relative floor on v^2 (in units of Delta) inside the Biane solve


@njit(cache=True)
def biane_point(u, V, alpha, w, Delta, inside):
    """Solve ``sum w/((u-alpha)^2 + V) = 1/Delta`` for V (concave monotone Newton), return sums."""
    K = alpha.shape[0]
    vfloor = FLOOR * Delta
    if inside:
        if V < vfloor:
            V = vfloor
        for _ in range(200):
            P1 = 0.0
            P2 = 0.0
            for k in range(K):
                dd = u - alpha[k]
                iD = 1.0 / (dd * dd + V)
                t = w[k] * iD
                P1 += t
                P2 += t * iD
            g = 1.0 / P1
            Vn = V + (Delta - g) * P1 * P1 / P2
            if Vn < vfloor:
                Vn = vfloor
            done = abs(Vn - V) <= 4e-16 * Vn or abs(Delta - g) <= 4e-16 * Delta
            V = Vn
            if done:
                break
    else:
        V = 0.0
    P1 = 0.0
    P2 = 0.0
    Q1 = 0.0
    Q2 = 0.0
    for k in range(K):
        dd = u - alpha[k]
        iD = 1.0 / (dd * dd + V)
        t = w[k] * iD
        P1 += t
        P2 += t * iD
        Q1 += t * dd
        Q2 += t * iD * dd
    return V, P1, P2, Q1, Q2


@njit(cache=True)
def biane_nodes(u, alpha, w, Delta):
    """Per node ``u``: columns ``(V, x, Re G, rho, dx/du)`` (u inside the u-support)."""
    n = u.shape[0]
    out = np.empty((n, 5))
    for i in range(n):
        V, P1, P2, Q1, Q2 = biane_point(u[i], 0.0, alpha, w, Delta, True)
        out[i, 0] = V
        out[i, 1] = u[i] + Delta * Q1
        out[i, 2] = Q1
        out[i, 3] = math.sqrt(V) / (math.pi * Delta)
        out[i, 4] = 2.0 * Delta * (V * P2 + Q2 * Q2 / P2)
    return out


def biane_nodes_numpy(u, alpha, w, Delta):
    """NumPy twin of :func:`biane_nodes` (vectorised over nodes)."""
    u = np.asarray(u, dtype=np.float64)
    du = u[:, None] - alpha[None, :]
    du2 = du * du
    vfloor = FLOOR * Delta
    V = np.full(u.shape, vfloor)
    active = np.ones(u.shape, bool)
    for _ in range(200):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        iD = 1.0 / (du2[idx] + V[idx, None])
        t = w * iD
        P1 = t.sum(1)
        P2 = (t * iD).sum(1)
        g = 1.0 / P1
        Vn = np.maximum(V[idx] + (Delta - g) * P1 * P1 / P2, vfloor)
        done = (np.abs(Vn - V[idx]) <= 4e-16 * Vn) | (np.abs(Delta - g) <= 4e-16 * Delta)
        V[idx] = Vn
        active[idx[done]] = False
    iD = 1.0 / (du2 + V[:, None])
    t = w * iD
    P1 = t.sum(1)
    P2 = (t * iD).sum(1)
    Q1 = (t * du).sum(1)
    Q2 = (t * iD * du).sum(1)
    out = np.empty((u.size, 5))
    out[:, 0] = V
    out[:, 1] = u + Delta * Q1
    out[:, 2] = Q1
    out[:, 3] = np.sqrt(V) / (np.pi * Delta)
    out[:, 4] = 2.0 * Delta * (V * P2 + Q2 * Q2 / P2)
    return out


@njit(cache=True)
def biane_invert(xt, lo, hi, inside, alpha, w, Delta):
    """Solve ``x(u) = xt`` for u in ``[lo, hi]`` (safeguarded Newton; ``x`` increasing there).

    ``inside[i]``: the bracket lies in the u-support (``v > 0``), else in a u-gap (``v = 0``,
    ``x(u) = u + Delta G_mu(u)``).  Returns columns ``(u, V, Re G)``.
    """
    n = xt.shape[0]
    out = np.empty((n, 3))
    for i in range(n):
        a = lo[i]
        b = hi[i]
        u = 0.5 * (a + b)
        V = 0.0
        Q1 = 0.0
        for _ in range(200):
            V, P1, P2, Q1, Q2 = biane_point(u, V, alpha, w, Delta, inside[i])
            xu = u + Delta * Q1
            if inside[i]:
                dx = 2.0 * Delta * (V * P2 + Q2 * Q2 / P2)
            else:
                dx = 1.0 - Delta * P1
            r = xu - xt[i]
            if r > 0:
                b = u
            else:
                a = u
            if r == 0.0 or b - a <= 1e-15 * (abs(a) + abs(b)) + 1e-300:
                break
            un = u - r / dx if dx > 0 else 0.5 * (a + b)
            if not (a < un < b):
                un = 0.5 * (a + b)
            if abs(un - u) <= 2e-16 * abs(u) + 1e-300:
                break
            u = un
        out[i, 0] = u
        out[i, 1] = V
        out[i, 2] = Q1
    return out


def biane_invert_numpy(xt, lo, hi, inside, alpha, w, Delta):
    """NumPy twin of :func:`biane_invert` (plain bisection on the same monotone map)."""
    xt = np.asarray(xt, float)
    a = np.array(lo, float)
    b = np.array(hi, float)
    inside = np.asarray(inside, bool)

    def xmap(u):
        du = u[:, None] - alpha[None, :]
        V = np.zeros(u.shape)
        if np.any(inside):
            V[inside] = biane_nodes_numpy(u[inside], alpha, w, Delta)[:, 0]
        t = w / (du * du + V[:, None])
        Q1 = (t * du).sum(1)
        return u + Delta * Q1, V, Q1

    for _ in range(200):
        m = 0.5 * (a + b)
        xm = xmap(m)[0]
        right = xm > xt
        b = np.where(right, m, b)
        a = np.where(right, a, m)
        if np.all(b - a <= 1e-15 * (np.abs(a) + np.abs(b)) + 1e-300):
            break
    u = 0.5 * (a + b)
    _, V, Q1 = xmap(u)
    return np.column_stack([u, V, Q1])


@njit(cache=True)
def fsum(u, alpha, w):
    """``F = sum w/(u-alpha)^2`` and its first two derivatives at a scalar ``u``."""
    F = 0.0
    F1 = 0.0
    F2 = 0.0
    for k in range(alpha.shape[0]):
        i = 1.0 / (u - alpha[k])
        i2 = i * i
        F += w[k] * i2
        F1 += w[k] * i2 * i
        F2 += w[k] * i2 * i2
    return F, -2.0 * F1, 6.0 * F2


@njit(cache=True)
def fval(mode, u, alpha, w, sD):
    """mode 0: F'(u) and F''(u); mode 1: r = 1/sqrt(F) - sqrt(Delta) and r'; mode 2: -r, -r'."""
    F, F1, F2 = fsum(u, alpha, w)
    if mode == 0:
        return F1, F2
    r = 1.0 / math.sqrt(F) - sD
    dr = -0.5 * F1 / (F * math.sqrt(F))
    if mode == 1:
        return r, dr
    return -r, -dr


@njit(cache=True)
def safe_newton(mode, lo, hi, u0, alpha, w, sD):
    """Root of an increasing function on ``(lo, hi)`` (negative at lo, positive at hi)."""
    a = lo
    b = hi
    u = u0
    if not (a < u < b):
        u = 0.5 * (a + b)
    for _ in range(200):
        f, df = fval(mode, u, alpha, w, sD)
        if f > 0:
            b = u
        elif f < 0:
            a = u
        else:
            return u
        if b - a <= 4e-16 * (abs(a) + abs(b)) + 1e-300:
            break
        un = u - f / df if df > 0 else 0.5 * (a + b)
        if not (a < un < b) or abs(un - u) > 0.5 * (b - a):
            un = 0.5 * (a + b)
        if un == u:
            break
        u = un
    return u


@njit(cache=True)
def support(alpha, w, Delta, cand):
    """Biane support of mu (+) semicircle(Delta) for atoms ``alpha`` (sorted) with weights ``w``.

    Returns ``(left, right, umin, is_open, ga, gb)``: exterior edges, and for each candidate gap
    ``(alpha[c], alpha[c+1])`` the minimiser of ``F``, whether the gap is open, and its edges.
    """
    sD = math.sqrt(Delta)
    K = alpha.shape[0]
    left = safe_newton(2, alpha[0] - sD, alpha[0] - 0.999 * sD * math.sqrt(w[0]),
                           alpha[0] - sD * math.sqrt(w[0]), alpha, w, sD)
    right = safe_newton(1, alpha[K - 1] + 0.999 * sD * math.sqrt(w[K - 1]), alpha[K - 1] + sD,
                            alpha[K - 1] + sD * math.sqrt(w[K - 1]), alpha, w, sD)
    n = cand.shape[0]
    umin = np.empty(n)
    is_open = np.zeros(n, np.bool_)
    ga = np.empty(n)
    gb = np.empty(n)
    for j in range(n):
        c = cand[j]
        lo = alpha[c]
        hi = alpha[c + 1]
        g = hi - lo
        eps = 1e-9 * g
        c1 = w[c] ** (1.0 / 3.0)
        c2 = w[c + 1] ** (1.0 / 3.0)
        um = safe_newton(0, lo + eps, hi - eps, lo + g * c1 / (c1 + c2), alpha, w, sD)
        umin[j] = um
        F, _, _ = fsum(um, alpha, w)
        if F * Delta < 1.0:
            is_open[j] = True
            ga[j] = safe_newton(1, lo + eps, um, lo + sD * math.sqrt(w[c]), alpha, w, sD)
            gb[j] = safe_newton(2, um, hi - eps, hi - sD * math.sqrt(w[c + 1]), alpha, w, sD)
        else:
            ga[j] = np.nan
            gb[j] = np.nan
    return left, right, umin, is_open, ga, gb


def support_numpy(alpha, w, Delta, cand):
    """NumPy twin of :func:`support` (vectorised secant/bisection brackets)."""
    sD = math.sqrt(Delta)

    def F(u, order=0):
        du = u[:, None] - alpha[None, :]
        inv = 1.0 / du
        i2 = inv * inv
        if order == 0:
            return i2 @ w
        return (i2 * inv) @ w * -2.0

    def r(u):  # > 0 outside the u-support, < 0 inside; ~linear near atoms
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / np.sqrt(F(u)) - sD

    left = bracket_root_numpy(lambda u: -r(u), np.array([alpha[0] - sD]),
                         np.array([alpha[0] - 0.999 * sD * math.sqrt(w[0])]))[0]
    right = bracket_root_numpy(r, np.array([alpha[-1] + 0.999 * sD * math.sqrt(w[-1])]), np.array([alpha[-1] + sD]))[0]
    n = cand.size
    umin = np.empty(n)
    is_open = np.zeros(n, bool)
    ga = np.full(n, np.nan)
    gb = np.full(n, np.nan)
    if n:
        lo = alpha[cand]
        hi = alpha[cand + 1]
        eps = 1e-9 * (hi - lo)
        umin = bracket_root_numpy(lambda u: F(u, 1) * ((u - lo) * (hi - u)) ** 3, lo + eps, hi - eps)
        is_open = r(umin) > 0
        if np.any(is_open):
            o = is_open
            ga[o] = bracket_root_numpy(r, lo[o] + eps[o], umin[o])
            gb[o] = bracket_root_numpy(lambda u: -r(u), umin[o], hi[o] - eps[o])
    return left, right, umin, is_open, ga, gb


def bracket_root_numpy(fun, lo, hi, maxit=200):
    """Vectorised root of increasing-through-zero ``fun`` on ``[lo, hi]`` (fun(lo) <= 0 <= fun(hi)).

    Secant/bisection hybrid (Illinois-free: bisection whenever the secant step leaves the bracket
    or does not shrink it fast enough).
    """
    a = np.array(lo, float)
    b = np.array(hi, float)
    fa = fun(a)
    fb = fun(b)
    for it in range(maxit):
        if it % 3 == 2:
            m = 0.5 * (a + b)
        else:
            with np.errstate(all="ignore"):
                m = b - fb * (b - a) / (fb - fa)
            bad = ~np.isfinite(m) | (m <= a) | (m >= b)
            m = np.where(bad, 0.5 * (a + b), m)
        fm = fun(m)
        pos = fm > 0
        b = np.where(pos, m, b)
        fb = np.where(pos, fm, fb)
        a = np.where(pos, a, m)
        fa = np.where(pos, fa, fm)
        if np.all((b - a) <= 4e-16 * (np.abs(a) + np.abs(b)) + 1e-300):
            break
    return np.where(np.abs(fa) < np.abs(fb), a, b)
