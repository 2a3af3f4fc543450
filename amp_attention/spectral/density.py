"""The density of ``R = a S* + sqrt(Delta) W``, the Bayes RIE and the spectrum of ``f(R)``.

Holds :class:`RDensity` / :func:`r_density` (support, quadrature grid, integrals and pointwise
Stieltjes transform of ``rho_R``, docs/theory.md §7(b)), the Bayes-optimal rotationally invariant
estimator :func:`rie_denoiser` and its MMSE :func:`rie_mmse` (docs/theory.md §6), and
:class:`Pushforward` / :func:`shat_spectrum`, the ``d -> infinity`` spectrum of
``S_hat = U f(L) U^T`` (docs/theory.md §7).  Conventions are in the :mod:`amp_attention.spectral`
docstring; the Stieltjes transforms come from :mod:`.backends`, the quadrature from
:mod:`.quadrature`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, NamedTuple, Sequence

import numpy as np

from .._validation import as_float_array, check_nonnegative, check_positive
from .backends import AtomsBackend, CubicBackend, SemicircleBackend
from .laws import SpectralLaw, check_law
from .quadrature import QuadratureGrid, piece_nodes
from .scalar_maps import apply_denoiser, check_denoiser, check_kinks, denoiser_derivative

__all__ = ["RDensity", "r_density", "rie_denoiser", "rie_mmse", "Pushforward", "shat_spectrum"]


#: Largest number of Gauss-Legendre nodes per quadrature piece accepted by :class:`RDensity`.
MAX_NODES = 1000


@contextlib.contextmanager
def _out_of_range(a, Delta, law):
    """Turn a numerical breakdown of the back-ends (overflow, underflow to 0, singular solves) at
    extreme ``a`` / ``Delta`` into a ``ValueError`` naming them: the density of
    ``R = a S* + sqrt(Delta) W`` depends on the ratio ``Delta / (a max|lambda|)^2``, and float64
    cannot resolve it far outside ~[1e-30, 1e300] (discrete laws) or where the numbers overflow."""
    try:
        with np.errstate(all="ignore"):
            yield
    except (ZeroDivisionError, OverflowError, FloatingPointError, np.linalg.LinAlgError,
            RuntimeError) as exc:
        with np.errstate(over="ignore"):
            r = a * law.radius  # (r * r, not r ** 2: no OverflowError)
            ratio = Delta / (r * r) if r > 0 else math.inf
        raise ValueError(
            f"Delta = {Delta!r} and a = {a!r} are out of the range where the density of "
            f"R = a S* + sqrt(Delta) W can be computed in float64 for {law!r} "
            f"(Delta / (a max|lambda|)^2 = {ratio:.3g}; {type(exc).__name__}: {exc})") from None


class _ScaledBackend:
    """The back-end of ``R`` from the back-end ``inner`` of ``R / c`` (``c`` a power of two, so
    that every rescaling below is exact): ``x = c x'``, ``t = c t'``, ``rho = rho' / c``,
    ``G = G' / c``; masses and ``dx/dt`` unchanged."""

    def __init__(self, inner, c: float):
        self.inner, self.c = inner, c
        self.t_intervals = inner.t_intervals * c
        self.x_intervals = inner.x_intervals * c
        self.masses = inner.masses

    def breakpoints(self, j):
        return np.asarray(self.inner.breakpoints(j)) * self.c

    def state(self, t):
        x, reg, rho, dxdt = self.inner.state(np.asarray(t, float) / self.c)
        return x * self.c, reg / self.c, rho / self.c, dxdt

    def x_to_t(self, x):
        return self.inner.x_to_t(np.asarray(x, float) / self.c) * self.c

    def stieltjes(self, x, grid: QuadratureGrid | None = None):
        x = np.asarray(x, float) / self.c
        if grid is None:
            return self.inner.stieltjes(x) / self.c
        g = QuadratureGrid(grid.x / self.c, grid.weights, grid.re_g * self.c, grid.density * self.c)
        return self.inner.stieltjes(x, g) / self.c


class RDensity:
    """Spectral density of ``R = a S* + sqrt(Delta) W`` (conventions in the :mod:`amp_attention.spectral` docstring).

    Parameters: ``law`` (:class:`SpectralLaw`), ``a >= 0``, ``Delta > 0``; ``n_nodes``
    Gauss-Legendre nodes per quadrature piece (default 24 for Wishart/semicircle, 16 for discrete
    laws); ``use_numba=False`` switches the discrete-law kernels to their NumPy twins.

    Attributes
    ----------
    law, a, Delta : the inputs.
    a_negligible : True when ``a * max|lambda(S*)| <= 1e-9 sqrt(Delta)`` (including ``a = 0``):
        ``R`` is then treated as the semicircle of variance ``Delta`` and independent of ``S*``.
    intervals : (k, 2) array, the support intervals ``[lo, hi]`` of ``rho_R`` (sorted, disjoint).
    masses : (k,) array, ``int rho_R`` over each interval (sum 1).
    x, weights, re_g, density : the default quadrature grid (:class:`QuadratureGrid` fields).

    Methods
    -------
    grid(kinks=()) -> QuadratureGrid split at the given x-points (where the integrand has kinks).
    integrate(f, kinks=()) -> ``int f(x) rho_R(x) dx`` for a vectorised scalar ``f``.
    stieltjes(x) -> ``G_R(x + i0)`` (complex) at arbitrary real points (exact solve, also outside
    the support, where it is real).
    density_at(x), re_stieltjes(x).
    rie(x) -> ``(x - 2 Delta Re G_R(x)) / a`` (§6; the Bayes estimate of the eigenvalue of
    ``S*`` attached to an eigenvalue ``x`` of ``R``).
    """

    def __init__(self, law: SpectralLaw, a: float, Delta: float, n_nodes: int | None = None,
                 use_numba: bool = True):
        self.law = check_law(law)
        self.a = check_nonnegative(a, "a")
        self.Delta = check_positive(Delta, "Delta")
        if n_nodes is not None and (isinstance(n_nodes, bool) or not isinstance(n_nodes, numbers.Integral)
                                    or not 4 <= n_nodes <= MAX_NODES):
            raise ValueError(f"n_nodes must be None or an integer in 4..{MAX_NODES}, got {n_nodes!r}")
        if not isinstance(use_numba, (bool, np.bool_)):
            raise ValueError(f"use_numba must be True or False, got {use_numba!r}")
        # a ||S*|| below 1e-9 sqrt(Delta): R is a semicircle to that relative accuracy; use the
        # a = 0 formulas (avoids the degenerate cubic / 0/0 in the m formula).
        with np.errstate(over="ignore"):
            self.a_negligible = bool(self.a * law.radius <= 1e-9 * math.sqrt(self.Delta))
        with _out_of_range(self.a, self.Delta, law):
            # Far from unit scale (|R| beyond 2^+-30), work with R / c, c a power of two (exact):
            # the back-ends form powers of x up to the fourth, which would overflow or underflow.
            with np.errstate(over="ignore"):
                scale = max(self.a * law.radius, math.sqrt(self.Delta))
            c = 1.0
            if not 2.0**-30 <= scale <= 2.0**30:
                c = math.ldexp(1.0, math.frexp(scale)[1])
            a, D = self.a / c, self.Delta / (c * c)
            if not (D >= np.finfo(np.float64).tiny and math.isfinite(a)):
                raise FloatingPointError("Delta / (a max|lambda|)^2 is not representable in float64")
            if self.a_negligible:
                b = SemicircleBackend(D, 0.0)
            elif law.kind == "semicircle":
                b = SemicircleBackend(a * a * law.semicircle_variance + D, a * law.center)
            elif law.kind == "wishart":
                b = CubicBackend(law.rho, a, D)
            else:
                b = AtomsBackend(law.eigenvalues, law.weights, a, D, use_numba)
            self._kind = type(b)
            self._b = b if c == 1.0 else _ScaledBackend(b, c)
            if not np.all(np.isfinite(self._b.x_intervals)):
                raise FloatingPointError("support edges not finite")
        if n_nodes is None:
            n_nodes = 16 if self._kind is AtomsBackend else 24
        self.n_nodes = int(n_nodes)
        self._grid = None
        self.intervals = self._b.x_intervals

    # -- grids -------------------------------------------------------------------------------
    def _pieces(self, kinks):
        """Yield ``(j, t, dt, t0, t1, edge0, edge1)`` per quadrature piece: interval index, nodes and
        weights in the backend parameter ``t`` (x, or u for discrete laws), the piece ends and
        whether they are square-root edges."""
        kinks = np.sort(np.asarray(list(kinks), dtype=np.float64).ravel())
        tI, xI = self._b.t_intervals, self._b.x_intervals
        for j in range(len(tI)):
            kin = kinks[(kinks > xI[j, 0]) & (kinks < xI[j, 1])]
            cuts = self._b.x_to_t(kin) if kin.size else np.empty(0)
            cuts = np.concatenate([cuts, self._b.breakpoints(j)])
            cuts = np.unique(cuts[(cuts > tI[j, 0]) & (cuts < tI[j, 1])])
            pts = np.concatenate([[tI[j, 0]], cuts, [tI[j, 1]]])
            for p in range(len(pts) - 1):
                t, dt = piece_nodes(pts[p], pts[p + 1], p == 0, p == len(pts) - 2, self.n_nodes)
                yield j, t, dt, pts[p], pts[p + 1], p == 0, p == len(pts) - 2

    def grid(self, kinks: Sequence[float] = ()) -> QuadratureGrid:
        """Quadrature grid against ``rho_R``, with extra breakpoints at the x-points ``kinks``."""
        kinks = check_kinks(kinks)
        if len(kinks) == 0 and self._grid is not None:
            return self._grid
        with _out_of_range(self.a, self.Delta, self.law):
            pieces = list(self._pieces(kinks))
            t = np.concatenate([pc[1] for pc in pieces])
            dt = np.concatenate([pc[2] for pc in pieces])
            x, reg, rho, dxdt = self._b.state(t)
            order = np.argsort(x, kind="stable")
            g = QuadratureGrid(x[order], (dt * rho * dxdt)[order], reg[order], rho[order])
            if not all(np.all(np.isfinite(v)) for v in g):
                raise FloatingPointError("quadrature grid not finite")
        if len(kinks) == 0:
            self._grid = g
            if self._b.masses is None:
                xI = self._b.x_intervals
                idx = np.searchsorted(xI[:, 0], g.x, side="right") - 1
                self._b.masses = np.bincount(idx, weights=g.weights, minlength=len(xI))
        return g

    @property
    def masses(self) -> np.ndarray:
        if self._b.masses is None:
            self.grid()
        return self._b.masses

    @property
    def x(self):
        return self.grid().x

    @property
    def weights(self):
        return self.grid().weights

    @property
    def re_g(self):
        return self.grid().re_g

    @property
    def density(self):
        return self.grid().density

    def integrate(self, f: Callable, kinks: Sequence[float] | None = None) -> float:
        """``int f(x) rho_R(x) dx``; ``kinks`` defaults to ``f.kinks`` if present."""
        if kinks is None:
            kinks = check_denoiser(f)
        else:
            check_denoiser(f)
        g = self.grid(kinks)
        return float(np.dot(g.weights, apply_denoiser(f, g.x)))

    # -- pointwise -----------------------------------------------------------------------------
    def stieltjes(self, x) -> np.ndarray:
        """``G_R(x + i0)`` at real points ``x`` (any shape): ``Im <= 0``, real outside the support."""
        xa = as_float_array(x, "x", allow_empty=True)
        flat = xa.ravel()
        if flat.size == 0:
            return np.empty(xa.shape, complex)
        with _out_of_range(self.a, self.Delta, self.law):
            if self._kind is CubicBackend:
                G = self._b.stieltjes(flat, self.grid())
            else:
                G = self._b.stieltjes(flat)
            if not np.all(np.isfinite(G)):
                raise FloatingPointError("G_R not finite at some x")
        return G.reshape(xa.shape)

    def re_stieltjes(self, x) -> np.ndarray:
        return self.stieltjes(x).real

    def density_at(self, x) -> np.ndarray:
        return np.maximum(-self.stieltjes(x).imag, 0.0) / np.pi

    def rie(self, x) -> np.ndarray:
        """Bayes RIE (§6): ``(x - 2 Delta Re G_R(x)) / a`` at the points ``x`` (needs a > 0)."""
        if self.a == 0:
            raise ValueError("a must be > 0 for the RIE (R carries no information on S* at a = 0)")
        xa = as_float_array(x, "x", allow_empty=True)
        if self.a_negligible:  # a -> 0 limit of the Bayes estimate: the prior mean
            return np.full(xa.shape, self.law.mean)
        return (xa - 2.0 * self.Delta * self.re_stieltjes(xa)) / self.a

    def __repr__(self) -> str:
        return f"RDensity({self.law!r}, a={self.a!r}, Delta={self.Delta!r}, intervals={len(self.intervals)})"


def r_density(law: SpectralLaw, a: float, Delta: float, n_nodes: int | None = None) -> RDensity:
    """Density of ``R = a S* + sqrt(Delta) W`` (see :class:`RDensity`; docs/theory.md §7(b)).

    ``n_nodes``: Gauss-Legendre nodes per quadrature piece (default 24 for the Wishart cubic and
    the semicircle, 16 for discrete laws, whose pieces run from atom to atom).  Pieces: each support
    interval is cut at its midpoint, at kinks of the integrand, at the atoms (discrete laws), and
    around nearly-closed gaps (geometrically graded); square-root edges get ``t = edge + L s^2``.
    """
    return RDensity(law, a, Delta, n_nodes=n_nodes)


# ---------------------------------------------------------------------------------------------
# Bayes RIE
# ---------------------------------------------------------------------------------------------


def check_density(density, law: SpectralLaw, a: float, Delta: float) -> RDensity:
    """``density`` (an :class:`RDensity` built for these ``(law, a, Delta)``), or a new one if None."""
    if density is None:
        return RDensity(law, a, Delta)
    if not isinstance(density, RDensity) or density.law is not law or density.a != a or density.Delta != Delta:
        raise ValueError("density must be None or an RDensity built for the same (law, a, Delta), "
                         f"got {type(density).__name__}")
    return density


def rie_denoiser(x, law: SpectralLaw, Delta: float, a: float = 1.0, density: RDensity | None = None) -> np.ndarray:
    """Bayes-optimal RIE (docs/theory.md §6): ``f(x) = (x - 2 Delta Re G_R(x)) / a``.

    ``R = a S* + sqrt(Delta) W`` (the BO input side has ``a = 1``).  ``x``: eigenvalues of ``R``
    (any shape); points outside the support use the real-axis Stieltjes transform (exact).
    """
    law = check_law(law)
    a = check_positive(a, "a")
    Delta = check_positive(Delta, "Delta")
    density = check_density(density, law, a, Delta)
    return density.rie(x)


def rie_mmse(law: SpectralLaw, Delta: float, density: RDensity | None = None) -> float:
    """MMSE per ``Tr/d`` of the RIE for ``R = S* + sqrt(Delta) W`` (§6):
    ``Delta - (4 pi^2 / 3) Delta^2 int rho_R^3``, clipped at 0 (rounding).

    Extreme ``Delta`` (the formula cancels catastrophically, or the density cannot be resolved in
    float64), with ``v`` the variance of the law:

    * ``Delta > 1e7 v``: ``v Delta / (v + Delta)`` (the low-SNR expansion
      ``mmse = v - v^2/Delta + O(Delta^-2)``; the formula would lose ``eps Delta / v`` relative);
    * discrete laws with ``Delta < 1e-20 gap^2`` (``gap``: smallest spacing of the atoms):
      ``Delta (1 - sum_k w_k^2)`` (the high-SNR limit: each atom of weight ``w`` becomes a
      semicircle of variance ``w Delta``; relative error ``O(Delta / gap^2)``).
    """
    law = check_law(law)
    Delta = check_positive(Delta, "Delta")
    if density is not None:
        density = check_density(density, law, 1.0, Delta)
    v = law.variance
    if Delta > 1e7 * v:
        return float(v / (1.0 + v / Delta))
    if law.kind == "atoms" and law.eigenvalues.size > 1:
        lam, w = law.eigenvalues, law.weights
        keep = np.concatenate([[True], np.diff(lam) > 1e-12 * np.max(np.abs(lam))])
        gaps = np.diff(lam[keep])
        if gaps.size and Delta < 1e-20 * float(np.min(gaps)) ** 2:
            wm = np.bincount(np.cumsum(keep) - 1, weights=w)
            return float(Delta * (1.0 - np.dot(wm, wm)))
    density = check_density(density, law, 1.0, Delta)
    g = density.grid()
    I = np.dot(g.weights, g.density**2)
    c = 4 * np.pi**2 / 3
    if 1e-300 < Delta * Delta < 1e300:
        mmse = Delta - c * Delta**2 * I
    else:  # Delta^2 would overflow or lose digits (subnormal): Delta (1 - c Delta int rho^3), Delta int rho^3 = O(1)
        mmse = Delta * (1.0 - c * (Delta * I))
    return max(float(mmse), 0.0)



# ---------------------------------------------------------------------------------------------
# Spectrum of S_hat = f(R)
# ---------------------------------------------------------------------------------------------


class Pushforward(NamedTuple):
    """Spectrum of ``S_hat = U f(L) U^T`` in the ``d -> infinity`` limit (docs/theory.md §7).

    ``atom_mass``: mass of the atom at ``f`` of the flat region (``0`` for the soft threshold: the
    ``rho_R`` mass below ``tau``).  ``y`` (N,) sorted points of the continuous part, ``density`` (N,)
    its density ``rho_R(x)/f'(x)`` at ``y = f(x)`` (integrates to ``1 - atom_mass``; the grid
    includes the images of the support edges and kinks, so ``np.trapezoid(density, y)`` is accurate).
    """

    atom_mass: float
    y: np.ndarray
    density: np.ndarray


#: slopes of f below this (in absolute value) count as flat: rounding of f' (finite differences, or
#: a RIE map at tiny Delta, whose flat piece has |f'| ~ 1e-11) must not read as a decreasing f
_FLAT_SLOPE = 1e-8


def shat_spectrum(law: SpectralLaw, a: float, Delta: float, f: Callable,
                  density: RDensity | None = None) -> Pushforward:
    """Pushforward of ``rho_R`` through a non-decreasing scalar denoiser ``f``.

    ``f'(x) = 0`` regions (e.g. ``x < tau`` for :class:`SoftThreshold`) become the atom; elsewhere the
    density is ``rho_R(x) / f'(x)`` at ``y = f(x)``.  Uses ``f.derivative`` (finite differences if
    absent) and ``f.kinks``.
    """
    law = check_law(law)
    a = check_nonnegative(a, "a")
    Delta = check_positive(Delta, "Delta")
    kinks = check_denoiser(f)
    density = check_density(density, law, a, Delta)
    b = density._b
    atom = 0.0
    ys, ds = [], []
    for j, t, dt, t0, t1, e0, e1 in density._pieces(kinks):
        x, _, rho, dxdt = b.state(t)
        w = dt * rho * dxdt
        der = denoiser_derivative(f, x)
        if np.all(der <= _FLAT_SLOPE):  # f' is dimensionless: flat to rounding (e.g. a RIE at tiny Delta)
            atom += float(np.sum(w))
            continue
        if np.any(der < -_FLAT_SLOPE):
            raise ValueError(f"f must be non-decreasing for shat_spectrum (f' = {der.min():.3g} "
                             f"near x = {x[np.argmin(der)]:.6g})")
        der = np.maximum(der, _FLAT_SLOPE)
        xe, _, rhoe, _ = b.state(np.array([t0, t1]))
        rhoe = np.where([e0, e1], 0.0, rhoe)
        # one-sided derivative at the piece ends: from the nearest node
        dere = np.array([der[np.argmin(x)], der[np.argmax(x)]])
        xx = np.concatenate([xe[:1], x, xe[1:]])
        rr = np.concatenate([rhoe[:1], rho, rhoe[1:]])
        dd = np.concatenate([dere[:1], der, dere[1:]])
        ys.append(apply_denoiser(f, xx))
        ds.append(rr / dd)
    if ys:
        y = np.concatenate(ys)
        dens = np.concatenate(ds)
        order = np.argsort(y, kind="stable")
        y, dens = y[order], dens[order]
    else:
        y, dens = np.empty(0), np.empty(0)
    return Pushforward(atom, y, dens)
