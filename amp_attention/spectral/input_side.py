"""Input side of the state evolution (docs/theory.md §7).

Holds :class:`InputSide` (the order parameters ``m, q, V``), its ``d -> infinity`` free-probability
value :func:`free_input_side` for any scalar map (docs/theory.md §7), and the GOE sampler
:func:`sample_goe`.  The finite-d input side lives with the input factors
(:meth:`amp_attention.factors.InputFactor.se_overlaps_finite`), which call the same spectral map and
divergence kernel as GAMP.  The scalar maps themselves (:class:`SoftThreshold`,
:class:`LinearShrinkage`) and their contract helpers are in :mod:`.scalar_maps`.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import numpy as np

from .._validation import check_memory, check_nonnegative, check_positive, check_rng
from .density import RDensity, check_density
from .laws import SpectralLaw, check_law
from .scalar_maps import apply_denoiser, check_denoiser

__all__ = ["InputSide", "free_input_side", "sample_goe"]


class InputSide(NamedTuple):
    """SE input-side order parameters ``m = Tr(S S*)/d``, ``q = Tr(S^2)/d``, ``V`` (§7)."""

    m: float
    q: float
    V: float


def free_input_side(law: SpectralLaw, a: float, Delta: float, f: Callable, A_hat: float,
                    density: RDensity | None = None) -> InputSide:
    """``d -> infinity`` input side by free probability (docs/theory.md §7(b)).

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
    law = check_law(law)
    a = check_nonnegative(a, "a")
    Delta = check_positive(Delta, "Delta")
    A_hat = check_positive(A_hat, "A_hat")
    kinks = check_denoiser(f)
    density = check_density(density, law, a, Delta)
    g = density.grid(kinks)
    fx = apply_denoiser(f, g.x)
    wf = g.weights * fx
    q = float(np.dot(wf, fx))
    V = float(np.dot(wf, g.re_g)) / A_hat
    if density.a_negligible:  # a = 0 (or a ||S*|| < 1e-9 sqrt(Delta)): R independent of S*
        m = float(np.sum(wf)) * law.mean
    else:
        m = float(np.dot(wf, g.x - 2.0 * Delta * g.re_g)) / a
    if not all(math.isfinite(v) for v in (m, q, V)):
        raise ValueError(f"the input side overflows float64 for f = {f!r}, A_hat = {A_hat!r}, "
                         f"a = {a!r}, Delta = {Delta!r}: got (m, q, V) = {(m, q, V)}")
    return InputSide(m, q, V)


def sample_goe(d: int, rng=None) -> np.ndarray:
    """GOE ``d x d``: off-diagonal variance ``1/d``, diagonal ``2/d`` (semicircle on [-2, 2])."""
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or not 1 <= d <= 2**62:
        raise ValueError(f"d must be an integer in 1..2^62, got {d!r}")
    rng = check_rng(rng)
    check_memory(3.0 * float(d) * d * 8, f"sample_goe(d={d})", "use a smaller d")
    G = rng.standard_normal((d, d))
    return (G + G.T) / math.sqrt(2.0 * d)


