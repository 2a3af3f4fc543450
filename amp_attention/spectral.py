"""Free probability for the input side of the state evolution and for the Bayes RIE denoiser.

Setting (DESIGN.md sections 6 and 7): ``R = a S* + sqrt(Delta) W`` with ``S*`` a symmetric ``d x d``
teacher whose spectral law is a :class:`SpectralLaw`, ``W`` a GOE matrix (off-diagonal variance
``1/d``, diagonal ``2/d``, semicircle on ``[-2, 2]``), ``a >= 0`` and ``Delta > 0``.

Conventions
-----------
* Stieltjes transform ``G_R(z) = int rho_R(y) / (z - y) dy`` (so ``G ~ 1/z`` at infinity).
* On the real axis it is taken from above, ``G_R(x) = G_R(x + i0)``: ``Im G <= 0``, the density is
  ``rho_R(x) = -Im G_R(x) / pi`` and ``Re G_R(x)`` is the principal-value Hilbert transform
  ``PV int rho_R(y) / (x - y) dy`` (no ``1/pi``).  Outside the support ``G_R`` is real.
* Traces are normalised by ``d``: ``mean(S*) = Tr S*/d``, ``Q* = Tr S*^2/d``.

How ``G_R`` is computed
-----------------------
* ``SpectralLaw.wishart(rho)``: ``G = G_R(x)`` solves the cubic of DESIGN.md section 7(b)::

      Delta a G^3 - (x a + Delta s) G^2 + (x s - a rho + a) G - s = 0,      s = sqrt(rho).

  It is solved in the variable ``H = 1/G`` (the reversed cubic
  ``-s H^3 + (x s + a (1 - rho)) H^2 - (x a + Delta s) H + Delta a = 0`` stays non-degenerate as
  ``a -> 0``; at ``a = 0`` it factors into ``H`` times the semicircle quadratic).  On the support the
  physical root is the one with ``Im H > 0`` (i.e. ``Im G < 0``); the support is where the cubic's
  discriminant (a quartic in ``x``) is negative.  The cubic was re-derived from the subordination
  relation below with the Marchenko-Pastur law ``z G^2 - (s z + 1 - rho) G + s = 0`` of ``S*`` and
  is correct as stated in DESIGN.md (the tests check it against an independent subordination solve
  and against sampled matrices).
* ``SpectralLaw.atoms(eigenvalues, weights)``: subordination
  ``G_R(z) = G_mu(omega)``, ``omega = z - Delta G_R(z)``, ``mu`` the law of ``a S*``, solved with
  Biane's parametrisation of the free convolution with a semicircle: for real ``u`` let
  ``v(u) >= 0`` solve ``sum_k w_k / ((u - a lambda_k)^2 + v^2) = 1/Delta`` (``v = 0`` when the sum
  is already ``<= 1/Delta``).  Then ``omega = u + i v`` and ``u -> x(u) = u + Delta Re G_mu(omega)``
  is an increasing bijection of the real line onto itself, with
  ``Re G_R(x) = Re G_mu(omega)``, ``rho_R(x) = v / (pi Delta)``.  The support of ``rho_R`` is the
  image of ``{u : sum_k w_k/(u - a lambda_k)^2 > 1/Delta}``, a union of intervals found exactly
  (between two atoms the sum is convex, so each gap has at most two edges), and each support
  interval carries exactly the ``mu``-mass of the atoms inside its ``u``-preimage.
* ``SpectralLaw.semicircle(variance, mean)`` (and any law at ``a = 0``): ``R`` is a semicircle of
  variance ``a^2 variance + Delta`` centred at ``a mean``; closed form.

Quadrature
----------
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

Numerics
--------
Discrete laws use Numba kernels with NumPy twins (the tests pair them): ``_biane_nodes_nb`` /
``_biane_nodes_np`` (per-node solve of ``v(u)``), ``_biane_invert_nb`` / ``_biane_invert_np``
(``x -> u``, for kinks and pointwise ``G_R``), ``_support_nb`` / ``_support_np`` (edges).
Typical cost: Wishart input side ~1 ms per call, discrete law with d = 300 atoms 15-60 ms.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import Callable, NamedTuple, Sequence

import numpy as np
from numba import njit

from ._validation import as_float_array, check_nonnegative, check_positive, check_rng

__all__ = [
    "SoftThreshold",
    "LinearShrinkage",
    "SpectralLaw",
    "QuadratureGrid",
    "RDensity",
    "r_density",
    "InputSide",
    "free_input_side",
    "finite_input_side",
    "sample_goe",
    "rie_denoiser",
    "rie_mmse",
    "Pushforward",
    "shat_spectrum",
]

_FLOOR = 1e-40  # relative floor on v^2 (in units of Delta) inside the Biane solve


# ---------------------------------------------------------------------------------------------
# Scalar denoisers
# ---------------------------------------------------------------------------------------------


class SoftThreshold:
    """PSD soft threshold ``f(x) = max(x - tau, 0)`` (nuclear-norm prox, DESIGN.md section 5 step 5).

    In the SE ``tau = lam / A_hat``.  ``derivative(x) = 1{x > tau}``; ``kinks = (tau,)`` tells the
    quadrature where ``f`` is not smooth.
    """

    def __init__(self, tau: float):
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not np.isfinite(tau):
            raise ValueError(f"tau must be a finite real number, got {tau!r}")
        self.tau = float(tau)
        self.kinks = (self.tau,)

    def __call__(self, x):
        return np.maximum(np.asarray(x, dtype=np.float64) - self.tau, 0.0)

    def derivative(self, x):
        return (np.asarray(x, dtype=np.float64) > self.tau).astype(np.float64)

    def __repr__(self) -> str:
        return f"SoftThreshold(tau={self.tau!r})"


class LinearShrinkage:
    """Linear shrinkage ``f(x) = c x`` (Frobenius prox: ``c = A_hat / (A_hat + lam)``, section 5)."""

    kinks: tuple = ()

    def __init__(self, c: float):
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not np.isfinite(c):
            raise ValueError(f"c must be a finite real number, got {c!r}")
        self.c = float(c)

    def __call__(self, x):
        return self.c * np.asarray(x, dtype=np.float64)

    def derivative(self, x):
        return np.full(np.shape(x), self.c, dtype=np.float64)

    def __repr__(self) -> str:
        return f"LinearShrinkage(c={self.c!r})"


def _check_denoiser(f, name: str = "f"):
    if not callable(f):
        raise ValueError(f"{name} must be a callable scalar denoiser, got {type(f).__name__}")
    kinks = getattr(f, "kinks", ())
    kinks = tuple(float(k) for k in np.atleast_1d(np.asarray(kinks, dtype=np.float64)))
    return kinks


def _apply(f, x: np.ndarray, name: str = "f") -> np.ndarray:
    y = np.asarray(f(x), dtype=np.float64)
    if y.shape != x.shape:
        y = np.broadcast_to(y, x.shape).astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} returned NaN or inf")
    return y


def _derivative(f, x: np.ndarray) -> np.ndarray:
    """``f'(x)``: ``f.derivative`` if provided, else central finite differences."""
    der = getattr(f, "derivative", None)
    if der is not None:
        return np.asarray(der(x), dtype=np.float64) * np.ones_like(x)
    h = 1e-6 * (1.0 + np.abs(x))
    return (_apply(f, x + h) - _apply(f, x - h)) / (2 * h)


# ---------------------------------------------------------------------------------------------
# Teacher spectral laws
# ---------------------------------------------------------------------------------------------


class SpectralLaw:
    """Limiting (or exact finite-d) spectral law of the teacher ``S*``.

    Build with the constructors:

    * ``SpectralLaw.wishart(rho)``: the ``d -> infinity`` law of ``S* = W W^T / sqrt(r d)``,
      ``r = rho d`` (DESIGN.md section 1): ``sqrt(rho)`` times a Marchenko-Pastur law of ratio
      ``1/rho``; ``mean = sqrt(rho)``, ``Q = 1 + rho``; for ``rho < 1`` an atom of mass ``1 - rho``
      at zero.
    * ``SpectralLaw.atoms(eigenvalues, weights=None)``: a discrete law (finite-d exact spectrum:
      power law, spikes, custom); weights default to ``1/len(eigenvalues)``, must be >= 0 and are
      normalised to sum 1.
    * ``SpectralLaw.semicircle(variance, mean=0.0)``: semicircle (GOE-like teacher).

    Attributes ``kind`` (``'wishart' | 'atoms' | 'semicircle'``), ``mean`` (``Tr S*/d``),
    ``Q`` (``Tr S*^2/d``), ``variance`` (``Q - mean^2``).
    """

    def __init__(self, kind, *, rho=None, eigenvalues=None, weights=None, variance=None, center=None):
        self.kind = kind
        self.rho = rho
        self.eigenvalues = eigenvalues
        self.weights = weights
        self._variance = variance
        self.center = center
        if kind == "wishart":
            self.mean = math.sqrt(rho)
            self.Q = 1.0 + rho
        elif kind == "atoms":
            self.mean = float(np.dot(weights, eigenvalues))
            self.Q = float(np.dot(weights, eigenvalues**2))
        elif kind == "semicircle":
            self.mean = center
            self.Q = variance + center**2
        else:  # pragma: no cover - constructors only
            raise ValueError(f"unknown kind {kind!r}")

    @property
    def radius(self) -> float:
        """``max |lambda|`` over the support of the law."""
        if self.kind == "wishart":
            s = math.sqrt(self.rho)
            return s * (1.0 + 1.0 / s) ** 2
        if self.kind == "atoms":
            return float(np.max(np.abs(self.eigenvalues)))
        return abs(self.center) + 2.0 * math.sqrt(self._variance)

    @property
    def variance(self) -> float:
        """``Q - mean^2`` (variance of an eigenvalue drawn from the law)."""
        return max(self.Q - self.mean**2, 0.0)

    @classmethod
    def wishart(cls, rho: float) -> "SpectralLaw":
        rho = check_positive(rho, "rho")
        return cls("wishart", rho=rho)

    @classmethod
    def atoms(cls, eigenvalues, weights=None) -> "SpectralLaw":
        lam = as_float_array(eigenvalues, "eigenvalues", ndim=1)
        if weights is None:
            w = np.full(lam.shape, 1.0 / lam.size)
        else:
            w = as_float_array(weights, "weights", ndim=1)
            if w.shape != lam.shape:
                raise ValueError(f"weights must have the shape of eigenvalues {lam.shape}, got {w.shape}")
            if np.any(w < 0) or w.sum() <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
            w = w / w.sum()
            lam, w = lam[w > 0], w[w > 0]
        order = np.argsort(lam, kind="stable")
        return cls("atoms", eigenvalues=lam[order].copy(), weights=w[order].copy())

    @classmethod
    def semicircle(cls, variance: float, mean: float = 0.0) -> "SpectralLaw":
        variance = check_positive(variance, "variance")
        if isinstance(mean, bool) or not isinstance(mean, numbers.Real) or not np.isfinite(mean):
            raise ValueError(f"mean must be a finite real number, got {mean!r}")
        return cls("semicircle", variance=variance, center=float(mean))

    def __repr__(self) -> str:
        if self.kind == "wishart":
            return f"SpectralLaw.wishart(rho={self.rho!r})"
        if self.kind == "semicircle":
            return f"SpectralLaw.semicircle(variance={self._variance!r}, mean={self.center!r})"
        return f"SpectralLaw.atoms(<{self.eigenvalues.size} eigenvalues>)"


def _check_law(law) -> SpectralLaw:
    if not isinstance(law, SpectralLaw):
        raise ValueError(f"law must be a SpectralLaw, got {type(law).__name__}")
    return law


# ---------------------------------------------------------------------------------------------
# Quadrature pieces
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _gl01(n: int):
    s, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (s + 1.0), 0.5 * w


def _piece_nodes(t0: float, t1: float, edge0: bool, edge1: bool, n: int):
    """Nodes/weights for ``int_{t0}^{t1} g(t) dt`` when ``g`` has square-root zeros at flagged ends."""
    L = t1 - t0
    if L <= 0:
        return np.empty(0), np.empty(0)
    s, ws = _gl01(n)
    if edge0 and edge1:
        m = 0.5 * (t0 + t1)
        ta, wa = _piece_nodes(t0, m, True, False, n)
        tb, wb = _piece_nodes(m, t1, False, True, n)
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


# ---------------------------------------------------------------------------------------------
# Biane kernels (atoms): Numba + NumPy twins
# ---------------------------------------------------------------------------------------------


@njit(cache=True)
def _biane_point_nb(u, V, alpha, w, Delta, inside):
    """Solve ``sum w/((u-alpha)^2 + V) = 1/Delta`` for V (concave monotone Newton), return sums."""
    K = alpha.shape[0]
    vfloor = _FLOOR * Delta
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
def _biane_nodes_nb(u, alpha, w, Delta):
    """Per node ``u``: columns ``(V, x, Re G, rho, dx/du)`` (u inside the u-support)."""
    n = u.shape[0]
    out = np.empty((n, 5))
    for i in range(n):
        V, P1, P2, Q1, Q2 = _biane_point_nb(u[i], 0.0, alpha, w, Delta, True)
        out[i, 0] = V
        out[i, 1] = u[i] + Delta * Q1
        out[i, 2] = Q1
        out[i, 3] = math.sqrt(V) / (math.pi * Delta)
        out[i, 4] = 2.0 * Delta * (V * P2 + Q2 * Q2 / P2)
    return out


def _biane_nodes_np(u, alpha, w, Delta):
    """NumPy twin of :func:`_biane_nodes_nb` (vectorised over nodes)."""
    u = np.asarray(u, dtype=np.float64)
    du = u[:, None] - alpha[None, :]
    du2 = du * du
    vfloor = _FLOOR * Delta
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
def _biane_invert_nb(xt, lo, hi, inside, alpha, w, Delta):
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
            V, P1, P2, Q1, Q2 = _biane_point_nb(u, V, alpha, w, Delta, inside[i])
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


def _biane_invert_np(xt, lo, hi, inside, alpha, w, Delta):
    """NumPy twin of :func:`_biane_invert_nb` (plain bisection on the same monotone map)."""
    xt = np.asarray(xt, float)
    a = np.array(lo, float)
    b = np.array(hi, float)
    inside = np.asarray(inside, bool)

    def xmap(u):
        du = u[:, None] - alpha[None, :]
        V = np.zeros(u.shape)
        if np.any(inside):
            V[inside] = _biane_nodes_np(u[inside], alpha, w, Delta)[:, 0]
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
def _fsum_nb(u, alpha, w):
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
def _fval_nb(mode, u, alpha, w, sD):
    """mode 0: F'(u) and F''(u); mode 1: r = 1/sqrt(F) - sqrt(Delta) and r'; mode 2: -r, -r'."""
    F, F1, F2 = _fsum_nb(u, alpha, w)
    if mode == 0:
        return F1, F2
    r = 1.0 / math.sqrt(F) - sD
    dr = -0.5 * F1 / (F * math.sqrt(F))
    if mode == 1:
        return r, dr
    return -r, -dr


@njit(cache=True)
def _safe_newton_nb(mode, lo, hi, u0, alpha, w, sD):
    """Root of an increasing function on ``(lo, hi)`` (negative at lo, positive at hi)."""
    a = lo
    b = hi
    u = u0
    if not (a < u < b):
        u = 0.5 * (a + b)
    for _ in range(200):
        f, df = _fval_nb(mode, u, alpha, w, sD)
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
def _support_nb(alpha, w, Delta, cand):
    """Biane support of mu (+) semicircle(Delta) for atoms ``alpha`` (sorted) with weights ``w``.

    Returns ``(left, right, umin, is_open, ga, gb)``: exterior edges, and for each candidate gap
    ``(alpha[c], alpha[c+1])`` the minimiser of ``F``, whether the gap is open, and its edges.
    """
    sD = math.sqrt(Delta)
    K = alpha.shape[0]
    left = _safe_newton_nb(2, alpha[0] - sD, alpha[0] - 0.999 * sD * math.sqrt(w[0]),
                           alpha[0] - sD * math.sqrt(w[0]), alpha, w, sD)
    right = _safe_newton_nb(1, alpha[K - 1] + 0.999 * sD * math.sqrt(w[K - 1]), alpha[K - 1] + sD,
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
        um = _safe_newton_nb(0, lo + eps, hi - eps, lo + g * c1 / (c1 + c2), alpha, w, sD)
        umin[j] = um
        F, _, _ = _fsum_nb(um, alpha, w)
        if F * Delta < 1.0:
            is_open[j] = True
            ga[j] = _safe_newton_nb(1, lo + eps, um, lo + sD * math.sqrt(w[c]), alpha, w, sD)
            gb[j] = _safe_newton_nb(2, um, hi - eps, hi - sD * math.sqrt(w[c + 1]), alpha, w, sD)
        else:
            ga[j] = np.nan
            gb[j] = np.nan
    return left, right, umin, is_open, ga, gb


# ---------------------------------------------------------------------------------------------
# Backends: map a parameter t on the support to (x, Re G, rho, dx/dt)
# ---------------------------------------------------------------------------------------------


class _SemicircleBackend:
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


def _graded_breakpoints(lo: float, hi: float, sing) -> np.ndarray:
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


class _CubicBackend:
    """Wishart(rho) teacher, ``a > 0``: the cubic of DESIGN.md section 7(b), solved in ``H = 1/G``."""

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
        self._bps = [_graded_breakpoints(lo, hi, p.roots()) for lo, hi in intervals]
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


class _AtomsBackend:
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
        support = _support_nb if self.use_numba else _support_np
        left, right, umin, is_open, ga, gb = support(al, w, D, cand)
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
            out = _biane_nodes_nb(t, self.alpha, self.w, self.Delta)
        else:
            out = _biane_nodes_np(t, self.alpha, self.w, self.Delta)
        return out[:, 1], out[:, 2], out[:, 3], out[:, 4]

    def _invert(self, x, lo, hi, inside):
        args = (np.ascontiguousarray(x, float), np.ascontiguousarray(lo, float),
                np.ascontiguousarray(hi, float), np.ascontiguousarray(inside, np.bool_),
                self.alpha, self.w, self.Delta)
        return _biane_invert_nb(*args) if self.use_numba else _biane_invert_np(*args)

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


def _support_np(alpha, w, Delta, cand):
    """NumPy twin of :func:`_support_nb` (vectorised secant/bisection brackets)."""
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

    left = _bracket_root(lambda u: -r(u), np.array([alpha[0] - sD]),
                         np.array([alpha[0] - 0.999 * sD * math.sqrt(w[0])]))[0]
    right = _bracket_root(r, np.array([alpha[-1] + 0.999 * sD * math.sqrt(w[-1])]), np.array([alpha[-1] + sD]))[0]
    n = cand.size
    umin = np.empty(n)
    is_open = np.zeros(n, bool)
    ga = np.full(n, np.nan)
    gb = np.full(n, np.nan)
    if n:
        lo = alpha[cand]
        hi = alpha[cand + 1]
        eps = 1e-9 * (hi - lo)
        umin = _bracket_root(lambda u: F(u, 1) * ((u - lo) * (hi - u)) ** 3, lo + eps, hi - eps)
        is_open = r(umin) > 0
        if np.any(is_open):
            o = is_open
            ga[o] = _bracket_root(r, lo[o] + eps[o], umin[o])
            gb[o] = _bracket_root(lambda u: -r(u), umin[o], hi[o] - eps[o])
    return left, right, umin, is_open, ga, gb


def _bracket_root(fun, lo, hi, maxit=200):
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


# ---------------------------------------------------------------------------------------------
# The density of R
# ---------------------------------------------------------------------------------------------


class RDensity:
    """Spectral density of ``R = a S* + sqrt(Delta) W`` (conventions in the module docstring).

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
    rie(x) -> ``(x - 2 Delta Re G_R(x)) / a`` (section 6; the Bayes estimate of the eigenvalue of
    ``S*`` attached to an eigenvalue ``x`` of ``R``).
    """

    def __init__(self, law: SpectralLaw, a: float, Delta: float, n_nodes: int | None = None,
                 use_numba: bool = True):
        self.law = _check_law(law)
        self.a = check_nonnegative(a, "a")
        self.Delta = check_positive(Delta, "Delta")
        if n_nodes is not None and (isinstance(n_nodes, bool) or not isinstance(n_nodes, numbers.Integral)
                                    or n_nodes < 4):
            raise ValueError(f"n_nodes must be None or an integer >= 4, got {n_nodes!r}")
        # a ||S*|| below 1e-9 sqrt(Delta): R is a semicircle to that relative accuracy; use the
        # a = 0 formulas (avoids the degenerate cubic / 0/0 in the m formula).
        self.a_negligible = self.a * law.radius <= 1e-9 * math.sqrt(self.Delta)
        if self.a_negligible:
            self._b = _SemicircleBackend(self.Delta, 0.0)
        elif law.kind == "semicircle":
            self._b = _SemicircleBackend(self.a**2 * law._variance + self.Delta, self.a * law.center)
        elif law.kind == "wishart":
            self._b = _CubicBackend(law.rho, self.a, self.Delta)
        else:
            self._b = _AtomsBackend(law.eigenvalues, law.weights, self.a, self.Delta, use_numba)
        if n_nodes is None:
            n_nodes = 16 if isinstance(self._b, _AtomsBackend) else 24
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
                t, dt = _piece_nodes(pts[p], pts[p + 1], p == 0, p == len(pts) - 2, self.n_nodes)
                yield j, t, dt, pts[p], pts[p + 1], p == 0, p == len(pts) - 2

    def grid(self, kinks: Sequence[float] = ()) -> QuadratureGrid:
        """Quadrature grid against ``rho_R``, with extra breakpoints at the x-points ``kinks``."""
        if len(kinks) == 0 and self._grid is not None:
            return self._grid
        pieces = list(self._pieces(kinks))
        t = np.concatenate([pc[1] for pc in pieces])
        dt = np.concatenate([pc[2] for pc in pieces])
        x, reg, rho, dxdt = self._b.state(t)
        order = np.argsort(x, kind="stable")
        g = QuadratureGrid(x[order], (dt * rho * dxdt)[order], reg[order], rho[order])
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
            kinks = _check_denoiser(f)
        g = self.grid(kinks)
        return float(np.dot(g.weights, _apply(f, g.x)))

    # -- pointwise -----------------------------------------------------------------------------
    def stieltjes(self, x) -> np.ndarray:
        """``G_R(x + i0)`` at real points ``x`` (any shape): ``Im <= 0``, real outside the support."""
        xa = as_float_array(x, "x", allow_empty=True)
        flat = xa.ravel()
        if flat.size == 0:
            return np.empty(xa.shape, complex)
        if isinstance(self._b, _CubicBackend):
            G = self._b.stieltjes(flat, self.grid())
        else:
            G = self._b.stieltjes(flat)
        return G.reshape(xa.shape)

    def re_stieltjes(self, x) -> np.ndarray:
        return self.stieltjes(x).real

    def density_at(self, x) -> np.ndarray:
        return np.maximum(-self.stieltjes(x).imag, 0.0) / np.pi

    def rie(self, x) -> np.ndarray:
        """Bayes RIE (section 6): ``(x - 2 Delta Re G_R(x)) / a`` at the points ``x`` (needs a > 0)."""
        if self.a == 0:
            raise ValueError("a must be > 0 for the RIE (R carries no information on S* at a = 0)")
        xa = as_float_array(x, "x", allow_empty=True)
        if self.a_negligible:  # a -> 0 limit of the Bayes estimate: the prior mean
            return np.full(xa.shape, self.law.mean)
        return (xa - 2.0 * self.Delta * self.re_stieltjes(xa)) / self.a

    def __repr__(self) -> str:
        return f"RDensity({self.law!r}, a={self.a!r}, Delta={self.Delta!r}, intervals={len(self.intervals)})"


def r_density(law: SpectralLaw, a: float, Delta: float, n_nodes: int | None = None) -> RDensity:
    """Density of ``R = a S* + sqrt(Delta) W`` (see :class:`RDensity`; DESIGN.md section 7(b)).

    ``n_nodes``: Gauss-Legendre nodes per quadrature piece (default 24 for the Wishart cubic and
    the semicircle, 16 for discrete laws, whose pieces run from atom to atom).  Pieces: each support
    interval is cut at its midpoint, at kinks of the integrand, at the atoms (discrete laws), and
    around nearly-closed gaps (geometrically graded); square-root edges get ``t = edge + L s^2``.
    """
    return RDensity(law, a, Delta, n_nodes=n_nodes)


# ---------------------------------------------------------------------------------------------
# SE input side
# ---------------------------------------------------------------------------------------------


class InputSide(NamedTuple):
    """SE input-side order parameters ``m = Tr(S S*)/d``, ``q = Tr(S^2)/d``, ``V`` (section 7)."""

    m: float
    q: float
    V: float


def free_input_side(law: SpectralLaw, a: float, Delta: float, f: Callable, A_hat: float,
                    density: RDensity | None = None) -> InputSide:
    """``d -> infinity`` input side by free probability (DESIGN.md section 7(b)).

    ``S = U f(L) U^T`` with ``R = U L U^T = a S* + sqrt(Delta) W``::

        q = int f^2 rho_R
        m = (1/a) int f rho_R (x - 2 Delta Re G_R)         (a > 0)
        m = mean(S*) int f rho_R                           (a = 0: R independent of S*)
        V = (1/A_hat) int f rho_R Re G_R

    ``m`` uses ``<u_x, S* u_x> -> (x - 2 Delta Re G_R(x)) / a`` for the eigenvector of eigenvalue
    ``x``; ``V`` is the ``d -> infinity`` limit of ``div / (d^2 A_hat)`` (the pair sum of the
    spectral divergence is ``(d^2/2) int int rho rho (f(x) - f(y))/(x - y) = d^2 int f rho Re G``;
    the ``sum_i f'(l_i)`` part is O(1/d)).  The ``a = 0`` formula is the ``a -> 0`` limit of the
    ``a > 0`` one (``x - 2 Delta Re G_R = O(a)``); it is used whenever ``density.a_negligible``.
    Returns :class:`InputSide` ``(m, q, V)``.
    ``f`` is a vectorised scalar function; its ``kinks`` attribute (e.g. ``SoftThreshold``) places
    quadrature breakpoints.  ``density`` may pass a precomputed :func:`r_density` for these
    ``(law, a, Delta)``.
    """
    law = _check_law(law)
    a = check_nonnegative(a, "a")
    Delta = check_positive(Delta, "Delta")
    A_hat = check_positive(A_hat, "A_hat")
    kinks = _check_denoiser(f)
    if density is None:
        density = RDensity(law, a, Delta)
    elif not isinstance(density, RDensity) or density.law is not law or density.a != a or density.Delta != Delta:
        raise ValueError("density must be an RDensity built for the same (law, a, Delta)")
    g = density.grid(kinks)
    fx = _apply(f, g.x)
    wf = g.weights * fx
    q = float(np.dot(wf, fx))
    V = float(np.dot(wf, g.re_g)) / A_hat
    if density.a_negligible:  # a = 0 (or a ||S*|| < 1e-9 sqrt(Delta)): R independent of S*
        m = float(np.sum(wf)) * law.mean
    else:
        m = float(np.dot(wf, g.x - 2.0 * Delta * g.re_g)) / a
    return InputSide(m, q, V)


def sample_goe(d: int, rng=None) -> np.ndarray:
    """GOE ``d x d``: off-diagonal variance ``1/d``, diagonal ``2/d`` (semicircle on [-2, 2])."""
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    rng = check_rng(rng)
    G = rng.standard_normal((d, d))
    return (G + G.T) / math.sqrt(2.0 * d)


def _divergence(eigenvalues, f: Callable, fprime: Callable | None = None) -> float:
    """Divergence of ``F(R) = U f(L) U^T`` in orthonormal coordinates of Sym_d (DESIGN.md section 5.6).

    ``sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j)) / (l_i - l_j)``, with ``f'`` at the midpoint for
    (numerically) equal eigenvalues.  ``fprime`` defaults to ``f.derivative`` (finite differences
    if absent).
    """
    l = as_float_array(eigenvalues, "eigenvalues", ndim=1)
    _check_denoiser(f)
    fl = _apply(f, l)
    if fprime is not None:
        der = lambda x: np.asarray(fprime(x), float) * np.ones_like(x)  # noqa: E731
    else:
        der = lambda x: _derivative(f, x)  # noqa: E731
    D = l[:, None] - l[None, :]
    Fd = fl[:, None] - fl[None, :]
    scale = np.max(np.abs(l)) + 1e-300
    close = np.abs(D) <= 1e-12 * scale
    np.fill_diagonal(close, False)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(close, 0.0, Fd / np.where(close, 1.0, D))
    np.fill_diagonal(ratio, 0.0)
    total = float(np.sum(der(l))) + 0.5 * float(np.sum(ratio))
    if np.any(close):
        i, j = np.nonzero(np.triu(close, 1))
        total += float(np.sum(der(0.5 * (l[i] + l[j]))))
    return total


def finite_input_side(eigenvalues, a: float, Delta: float, f: Callable, A_hat: float,
                      n_draws: int = 4, rng=None, return_stderr: bool = False):
    """Finite-d input side (DESIGN.md section 7(a)), averaged over ``n_draws`` GOE draws.

    ``R = a diag(eigenvalues) + sqrt(Delta) W`` (``W`` from :func:`sample_goe`; the teacher basis is
    irrelevant since ``W`` is orthogonally invariant), ``S = U f(L) U^T``, then
    ``m = Tr(S S*)/d``, ``q = Tr(S^2)/d``, ``V = div / (d^2 A_hat)`` with the spectral divergence
    ``sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j))/(l_i - l_j)`` (section 5.6; ``f'`` from
    ``f.derivative``, finite differences if absent).  ``f(l)`` must not depend on the other
    eigenvalues (no ``width``).  Returns :class:`InputSide` of the means, and with
    ``return_stderr=True`` also an :class:`InputSide` of their standard errors.
    """
    lam = as_float_array(eigenvalues, "eigenvalues", ndim=1)
    a = check_nonnegative(a, "a")
    Delta = check_positive(Delta, "Delta")
    A_hat = check_positive(A_hat, "A_hat")
    _check_denoiser(f)
    if isinstance(n_draws, bool) or not isinstance(n_draws, numbers.Integral) or n_draws < 1:
        raise ValueError(f"n_draws must be an integer >= 1, got {n_draws!r}")
    rng = check_rng(rng)
    d = lam.size
    vals = np.empty((n_draws, 3))
    for k in range(n_draws):
        R = math.sqrt(Delta) * sample_goe(d, rng)
        R[np.diag_indices(d)] += a * lam
        L, U = np.linalg.eigh(R)
        fl = _apply(f, L)
        Sdiag = (U * U) @ fl  # diag of U f(L) U^T
        vals[k, 0] = float(np.dot(Sdiag, lam)) / d
        vals[k, 1] = float(np.dot(fl, fl)) / d
        vals[k, 2] = _divergence(L, f) / (d * d * A_hat)
    mean = InputSide(*vals.mean(0))
    if not return_stderr:
        return mean
    se = vals.std(0, ddof=1) / math.sqrt(n_draws) if n_draws > 1 else np.full(3, np.nan)
    return mean, InputSide(*se)


# ---------------------------------------------------------------------------------------------
# Bayes RIE
# ---------------------------------------------------------------------------------------------


def rie_denoiser(x, law: SpectralLaw, Delta: float, a: float = 1.0, density: RDensity | None = None) -> np.ndarray:
    """Bayes-optimal RIE (DESIGN.md section 6): ``f(x) = (x - 2 Delta Re G_R(x)) / a``.

    ``R = a S* + sqrt(Delta) W`` (the BO input side has ``a = 1``).  ``x``: eigenvalues of ``R``
    (any shape); points outside the support use the real-axis Stieltjes transform (exact).
    """
    law = _check_law(law)
    a = check_positive(a, "a")
    Delta = check_positive(Delta, "Delta")
    if density is None:
        density = RDensity(law, a, Delta)
    return density.rie(x)


def rie_mmse(law: SpectralLaw, Delta: float, density: RDensity | None = None) -> float:
    """MMSE per ``Tr/d`` of the RIE for ``R = S* + sqrt(Delta) W`` (section 6):
    ``Delta - (4 pi^2 / 3) Delta^2 int rho_R^3``."""
    law = _check_law(law)
    Delta = check_positive(Delta, "Delta")
    if density is None:
        density = RDensity(law, 1.0, Delta)
    g = density.grid()
    return float(Delta - (4 * np.pi**2 / 3) * Delta**2 * np.dot(g.weights, g.density**2))


# ---------------------------------------------------------------------------------------------
# Spectrum of S_hat = f(R)
# ---------------------------------------------------------------------------------------------


class Pushforward(NamedTuple):
    """Spectrum of ``S_hat = U f(L) U^T`` in the ``d -> infinity`` limit (DESIGN.md section 7).

    ``atom_mass``: mass of the atom at ``f`` of the flat region (``0`` for the soft threshold: the
    ``rho_R`` mass below ``tau``).  ``y`` (N,) sorted points of the continuous part, ``density`` (N,)
    its density ``rho_R(x)/f'(x)`` at ``y = f(x)`` (integrates to ``1 - atom_mass``; the grid
    includes the images of the support edges and kinks, so ``np.trapezoid(density, y)`` is accurate).
    """

    atom_mass: float
    y: np.ndarray
    density: np.ndarray


def shat_spectrum(law: SpectralLaw, a: float, Delta: float, f: Callable,
                  density: RDensity | None = None) -> Pushforward:
    """Pushforward of ``rho_R`` through a non-decreasing scalar denoiser ``f``.

    ``f'(x) = 0`` regions (e.g. ``x < tau`` for :class:`SoftThreshold`) become the atom; elsewhere the
    density is ``rho_R(x) / f'(x)`` at ``y = f(x)``.  Uses ``f.derivative`` (finite differences if
    absent) and ``f.kinks``.
    """
    law = _check_law(law)
    a = check_nonnegative(a, "a")
    Delta = check_positive(Delta, "Delta")
    kinks = _check_denoiser(f)
    if density is None:
        density = RDensity(law, a, Delta)
    b = density._b
    atom = 0.0
    ys, ds = [], []
    for j, t, dt, t0, t1, e0, e1 in density._pieces(kinks):
        x, _, rho, dxdt = b.state(t)
        w = dt * rho * dxdt
        der = _derivative(f, x)
        if np.all(der <= 1e-14):
            atom += float(np.sum(w))
            continue
        if np.any(der < -1e-14):
            raise ValueError("f must be non-decreasing for shat_spectrum")
        xe, _, rhoe, _ = b.state(np.array([t0, t1]))
        rhoe = np.where([e0, e1], 0.0, rhoe)
        # one-sided derivative at the piece ends: from the nearest node
        dere = np.array([der[np.argmin(x)], der[np.argmax(x)]])
        xx = np.concatenate([xe[:1], x, xe[1:]])
        rr = np.concatenate([rhoe[:1], rho, rhoe[1:]])
        dd = np.concatenate([dere[:1], der, dere[1:]])
        ys.append(_apply(f, xx))
        ds.append(rr / dd)
    if ys:
        y = np.concatenate(ys)
        dens = np.concatenate(ds)
        order = np.argsort(y, kind="stable")
        y, dens = y[order], dens[order]
    else:
        y, dens = np.empty(0), np.empty(0)
    return Pushforward(atom, y, dens)
