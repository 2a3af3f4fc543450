"""Back-ends of :class:`amp_attention.spectral.RDensity`: the Stieltjes transform of ``R``.

Holds :class:`SemicircleBackend`, :class:`CubicBackend` (Wishart teacher) and :class:`AtomsBackend`
(discrete teacher, subordination), docs/theory.md §7(b).  Each maps a parameter ``t`` on the
support to ``(x, Re G_R, rho_R, dx/dt)`` (``state``), exposes the support intervals in ``t`` and in
``x``, the quadrature breakpoints of each interval, and ``G_R(x + i0)`` at arbitrary real points
(``stieltjes``).

How ``G_R`` is computed
-----------------------
* ``SpectralLaw.wishart(rho)``: ``G = G_R(x)`` solves the cubic of docs/theory.md §7(b)::

      Delta a G^3 - (x a + Delta s) G^2 + (x s - a rho + a) G - s = 0,      s = sqrt(rho).

  It is solved in the variable ``H = 1/G`` (the reversed cubic
  ``-s H^3 + (x s + a (1 - rho)) H^2 - (x a + Delta s) H + Delta a = 0`` stays non-degenerate as
  ``a -> 0``; at ``a = 0`` it factors into ``H`` times the semicircle quadratic).  On the support the
  physical root is the one with ``Im H > 0`` (i.e. ``Im G < 0``); the support is where the cubic's
  discriminant (a quartic in ``x``) is negative.  The cubic was re-derived from the subordination
  relation below with the Marchenko-Pastur law ``z G^2 - (s z + 1 - rho) G + s = 0`` of ``S*`` and
  is correct as stated in docs/theory.md §7(b) (the tests check it against an independent
  subordination solve and against sampled matrices).
* ``SpectralLaw.atoms(eigenvalues, weights)``: subordination
  ``G_R(z) = G_mu(omega)``, ``omega = z - Delta G_R(z)``, ``mu`` the law of ``a S*``, solved with
  Biane's parametrisation of the free convolution with a semicircle: for real ``u`` let
  ``v(u) >= 0`` solve ``sum_k w_k / ((u - a lambda_k)^2 + v^2) = 1/Delta`` (``v = 0`` when the sum
  is already ``<= 1/Delta``).  Then ``omega = u + i v`` and ``u -> x(u) = u + Delta Re G_mu(omega)``
  is an increasing bijection of the real line onto itself, with
  ``Re G_R(x) = Re G_mu(omega)``, ``rho_R(x) = v / (pi Delta)``.  The support of ``rho_R`` is the
  image of ``{u : sum_k w_k/(u - a lambda_k)^2 > 1/Delta}``, a union of intervals found exactly
  (between two atoms the sum is convex, so each gap has at most two edges), and each support
  interval carries exactly the ``mu``-mass of the atoms inside its ``u``-preimage.  The per-node
  work is done by the Numba kernels of :mod:`._kernels` (NumPy twins with ``use_numba=False``).
* ``SpectralLaw.semicircle(variance, mean)`` (and any law at ``a = 0``): ``R`` is a semicircle of
  variance ``a^2 variance + Delta`` centred at ``a mean``; closed form.
"""

from __future__ import annotations

import math

import numpy as np

from ._kernels import biane_invert, biane_invert_numpy, biane_nodes, biane_nodes_numpy, support, support_numpy
from .quadrature import QuadratureGrid, graded_breakpoints

__all__ = ["SemicircleBackend", "CubicBackend", "AtomsBackend"]


class SemicircleBackend:
    """Semicircle of variance ``sigma2`` centred at ``c`` (law semicircle, or any law at a = 0)."""

    def __init__(self, sigma2: float, c: float):
        self.sigma2 = sigma2
        self.c = c
        r = 2.0 * math.sqrt(sigma2)
        self.t_intervals = np.array([[c - r, c + r]])
        self.x_intervals = self.t_intervals.copy()
        self.masses = np.array([1.0])

    def state(self, t):
        y = t - self.c
        rho = np.sqrt(np.maximum(4 * self.sigma2 - y * y, 0.0)) / (2 * np.pi * self.sigma2)
        return t, y / (2 * self.sigma2), rho, np.ones_like(t)

    def x_to_t(self, x):
        return np.asarray(x, float)

    def breakpoints(self, j):
        return np.empty(0)

    def stieltjes(self, x):
        y = np.asarray(x, float) - self.c
        s2 = self.sigma2
        disc = y * y - 4 * s2
        out = np.empty(y.shape, complex)
        ins = disc < 0
        out[ins] = (y[ins] - 1j * np.sqrt(-disc[ins])) / (2 * s2)
        yo = y[~ins]
        out[~ins] = (yo - np.sign(yo) * np.sqrt(disc[~ins])) / (2 * s2)
        return out



class CubicBackend:
    """Wishart(rho) teacher, ``a > 0``: the cubic of docs/theory.md §7(b), solved in ``H = 1/G``."""

    def __init__(self, rho: float, a: float, Delta: float):
        self.rho, self.a, self.Delta = rho, a, Delta
        self.s = math.sqrt(rho)
        self.t_intervals = self._edges()
        self.x_intervals = self.t_intervals
        self.masses = None  # filled by RDensity from the quadrature

    def _coeffs(self, x):
        s, a, D, rho = self.s, self.a, self.Delta, self.rho
        return -s, x * s + a * (1.0 - rho), -(x * a + D * s), D * a

    def _disc_poly(self):
        P = np.polynomial.Polynomial
        s, a, D, rho = self.s, self.a, self.Delta, self.rho
        A = P([-s])
        B = P([a * (1.0 - rho), s])
        C = P([-D * s, -a])
        Dd = P([D * a])
        return 18 * A * B * C * Dd - 4 * B**3 * Dd + B**2 * C**2 - 4 * A * C**3 - 27 * A**2 * Dd**2

    def _edges(self):
        p = self._disc_poly()
        dp = p.deriv()
        r = p.roots()
        r = np.sort(r[np.abs(r.imag) <= 1e-7 * (1.0 + np.abs(r))].real)
        # polish simple roots
        for k in range(r.size):
            for _ in range(3):
                d = dp(r[k])
                if d != 0:
                    step = p(r[k]) / d
                    if abs(step) < 1e-6 * (1 + abs(r[k])):
                        r[k] -= step
        # Weyl: supp rho_R lies in [a min(S*) - 2 sqrt(Delta), a max(S*) + 2 sqrt(Delta)], with
        # S* in [0, s (1 + 1/s)^2]; roots beyond are spurious (a far complex pair of the quartic,
        # x ~ 1/a, can come out real by rounding when a is tiny)
        sD2 = 2.0 * math.sqrt(self.Delta)
        xmin = -sD2 * (1 + 1e-9)
        xmax = (self.a * self.s * (1.0 + 1.0 / self.s) ** 2 + sD2) * (1 + 1e-9)
        r = np.unique(np.clip(r, xmin, xmax))
        intervals = []
        for lo, hi in zip(r[:-1], r[1:]):
            if hi - lo <= 1e-13 * (1 + abs(lo)):
                continue
            if p(0.5 * (lo + hi)) < 0:
                if intervals and abs(intervals[-1][1] - lo) <= 1e-12 * (1 + abs(lo)):
                    intervals[-1][1] = hi  # touching intervals (closing gap): merge
                else:
                    intervals.append([lo, hi])
        if not intervals:  # pragma: no cover - cannot happen for Delta > 0
            raise RuntimeError("no support found for the Wishart cubic")
        intervals = np.array(intervals)
        # Quadrature breakpoints: every other root of the discriminant (complex pair of a nearly
        # closed gap, the facing edge across a small gap, a touching point inside a merged
        # interval) is a singularity of the density's analytic continuation; grade the pieces
        # geometrically towards it.
        self._bps = [graded_breakpoints(lo, hi, p.roots()) for lo, hi in intervals]
        return intervals

    def breakpoints(self, j):
        return self._bps[j]

    def _roots(self, x):
        c3, c2, c1, c0 = self._coeffs(x)
        n = x.size
        M = np.zeros((n, 3, 3))
        M[:, 0, 0] = -c2 / c3
        M[:, 0, 1] = -c1 / c3
        M[:, 0, 2] = -c0 / c3
        M[:, 1, 0] = 1.0
        M[:, 2, 1] = 1.0
        H = np.linalg.eigvals(M)
        # Newton polish on the reversed cubic
        c2 = c2[:, None] if np.ndim(c2) else c2
        c1 = c1[:, None] if np.ndim(c1) else c1
        for _ in range(2):
            p = ((c3 * H + c2) * H + c1) * H + c0
            dp = (3 * c3 * H + 2 * c2) * H + c1
            ok = dp != 0
            H = np.where(ok, H - p / np.where(ok, dp, 1.0), H)
        return H

    def state(self, t):
        H = self._roots(t)
        h = H[np.arange(t.size), np.argmax(H.imag, axis=1)]
        G = 1.0 / h
        return t, G.real, np.maximum(-G.imag, 0.0) / np.pi, np.ones_like(t)

    def x_to_t(self, x):
        return np.asarray(x, float)

    def stieltjes(self, x, grid: QuadratureGrid):
        x = np.asarray(x, float)
        H = self._roots(x)
        out = np.empty(x.shape, complex)
        jmax = np.argmax(H.imag, axis=1)
        hmax = H[np.arange(x.size), jmax]
        edges = self.x_intervals
        inside = np.zeros(x.shape, bool)
        for lo, hi in edges:
            inside |= (x > lo) & (x < hi)
        clear = inside & (hmax.imag > 1e-9 * np.abs(hmax))
        out[clear] = 1.0 / hmax[clear]
        rest = np.flatnonzero(~clear)
        if rest.size:
            # real axis outside the support: G real, decreasing; pick the real root inside the
            # monotone range allowed by the edge values, closest to the quadrature estimate.
            g_edge = self._edge_values()
            flat = edges.ravel()
            xr = x[rest]
            est = np.empty(xr.shape)
            step = max(1, 2_000_000 // max(grid.x.size, 1))
            for i0 in range(0, xr.size, step):  # quadrature estimate of int rho/(x - y), chunked
                xc = xr[i0:i0 + step, None]
                est[i0:i0 + step] = np.sum(grid.weights[None, :] / (xc - grid.x[None, :]), axis=1)
            Hr = H[rest]
            nz = np.abs(Hr) > 0
            Gall = 1.0 / np.where(nz, Hr, 1.0)
            real = nz & (np.abs(Gall.imag) <= 1e-6 * np.abs(Gall))
            none = ~real.any(axis=1)
            real[none] = nz[none]
            Gi = Gall.real
            k = np.searchsorted(flat, xr)  # region: 0 left exterior, even = gap, flat.size right
            lo_g = np.full(xr.shape, -np.inf)
            hi_g = np.full(xr.shape, np.inf)
            left, right = k == 0, k == flat.size
            lo_g[left], hi_g[left] = g_edge[0], 0.0
            lo_g[right], hi_g[right] = 0.0, g_edge[-1]
            gap = (k % 2 == 0) & ~left & ~right
            lo_g[gap], hi_g[gap] = g_edge[k[gap]], g_edge[k[gap] - 1]
            fin = np.isfinite(lo_g)
            tol = np.where(fin, 1e-7 * (1 + np.abs(np.where(fin, lo_g, 0)) + np.abs(np.where(fin, hi_g, 0))), 0.0)
            ok = real & (Gi >= (lo_g - tol)[:, None]) & (Gi <= (hi_g + tol)[:, None])
            none = ~ok.any(axis=1)
            ok[none] = real[none]
            j = np.argmin(np.where(ok, np.abs(Gi - est[:, None]), np.inf), axis=1)
            out[rest] = Gi[np.arange(rest.size), j]
        return out

    def _edge_values(self):
        if getattr(self, "_gedge", None) is None:
            flat = self.x_intervals.ravel()
            w = self.x_intervals[:, 1] - self.x_intervals[:, 0]
            dx = 1e-10 * np.repeat(w, 2) * np.tile([1.0, -1.0], w.size)
            _, reg, _, _ = self.state(flat + dx)
            self._gedge = reg
        return self._gedge


class AtomsBackend:
    """Discrete teacher law, ``a > 0``: Biane's parametrisation of the subordination (module doc)."""

    def __init__(self, eigenvalues, weights, a: float, Delta: float, use_numba: bool = True):
        self.Delta = Delta
        self.use_numba = use_numba
        al = a * eigenvalues
        # merge (numerically) equal atoms
        scale = np.max(np.abs(al)) + math.sqrt(Delta)
        keep = np.concatenate([[True], np.diff(al) > 1e-12 * scale])
        grp = np.cumsum(keep) - 1
        self.alpha = np.ascontiguousarray(al[keep])
        self.w = np.ascontiguousarray(np.bincount(grp, weights=weights))
        self._find_support()

    def _find_support(self):
        al, w, D = self.alpha, self.w, self.Delta
        K = al.size
        if K > 1:
            g = np.diff(al)
            # two-atom lower bound: min_u F >= (w_k^(1/3) + w_{k+1}^(1/3))^3 / gap^2; gaps with a
            # bound below 4/Delta are open or nearly open (deep density dip: quadrature breakpoint)
            lb = (w[:-1] ** (1 / 3) + w[1:] ** (1 / 3)) ** 3 / g**2
            cand = np.flatnonzero(lb < 4.0 / D)
        else:
            cand = np.empty(0, np.int64)
        support_fn = support if self.use_numba else support_numpy
        left, right, umin, is_open, ga, gb = support_fn(al, w, D, cand)
        self._dips = umin[~is_open]
        gaps_lo, gaps_hi = list(ga[is_open]), list(gb[is_open])
        ulo = np.array([left] + gaps_hi)
        uhi = np.array(gaps_lo + [right])
        self.t_intervals = np.column_stack([ulo, uhi])
        # x-edges: v = 0 there, x = u + Delta G_mu(u)
        flat = self.t_intervals.ravel()
        Gmu = (1.0 / (flat[:, None] - al[None, :])) @ w
        self.x_intervals = (flat + D * Gmu).reshape(-1, 2)
        self.g_edges = Gmu
        # masses: atoms inside each u-interval
        idx = np.searchsorted(ulo, al, side="right") - 1
        self.masses = np.bincount(idx, weights=w, minlength=ulo.size)

    def breakpoints(self, j, max_pieces: int = 1024):
        """Atoms inside u-interval j (thinned to at most ``max_pieces`` pieces): the density can
        oscillate on the atom spacing, so pieces run from atom to atom."""
        lo, hi = self.t_intervals[j]
        al = self.alpha[(self.alpha > lo) & (self.alpha < hi)]
        hmin = (hi - lo) / max_pieces
        keep = [al[0]]
        for x in al[1:]:
            if x - keep[-1] >= hmin:
                keep.append(x)
        dips = self._dips[(self._dips > lo) & (self._dips < hi)]
        return np.concatenate([keep, dips])

    def state(self, t):
        t = np.ascontiguousarray(t, dtype=np.float64)
        if self.use_numba:
            out = biane_nodes(t, self.alpha, self.w, self.Delta)
        else:
            out = biane_nodes_numpy(t, self.alpha, self.w, self.Delta)
        return out[:, 1], out[:, 2], out[:, 3], out[:, 4]

    def _invert(self, x, lo, hi, inside):
        args = (np.ascontiguousarray(x, float), np.ascontiguousarray(lo, float),
                np.ascontiguousarray(hi, float), np.ascontiguousarray(inside, np.bool_),
                self.alpha, self.w, self.Delta)
        return biane_invert(*args) if self.use_numba else biane_invert_numpy(*args)

    def x_to_t(self, x):
        x = np.atleast_1d(np.asarray(x, float))
        j = np.searchsorted(self.x_intervals[:, 0], x, side="right") - 1
        j = np.clip(j, 0, len(self.x_intervals) - 1)
        lo, hi = self.t_intervals[j, 0], self.t_intervals[j, 1]
        return self._invert(x, lo, hi, np.ones(x.shape, bool))[:, 0]

    def stieltjes(self, x):
        x = np.asarray(x, float)
        flat_x = self.x_intervals.ravel()
        flat_u = self.t_intervals.ravel()
        k = np.searchsorted(flat_x, x, side="right")  # odd: inside interval (k-1)//2
        inside = (k % 2 == 1)
        lo = np.empty(x.shape)
        hi = np.empty(x.shape)
        ki = k[inside]
        lo[inside] = flat_u[ki - 1]
        hi[inside] = flat_u[ki]
        out_ = ~inside
        ko = k[out_]
        xo = x[out_]
        lo_o = np.where(ko == 0, np.minimum(xo, flat_u[0]), flat_u[np.maximum(ko - 1, 0)])
        hi_o = np.where(ko == flat_u.size, np.maximum(xo, flat_u[-1]), flat_u[np.minimum(ko, flat_u.size - 1)])
        lo[out_] = lo_o
        hi[out_] = hi_o
        res = self._invert(x, lo, hi, inside)
        G = res[:, 2] - 1j * np.sqrt(res[:, 1]) / self.Delta * inside
        # exterior/gap points exactly at an edge: use the edge value
        return G
