"""Free probability for the input side of the state evolution and for the Bayes RIE denoiser.

Setting (docs/theory.md §6 and §7): ``R = a S* + sqrt(Delta) W`` with ``S*`` a symmetric ``d x d``
teacher whose spectral law is a :class:`SpectralLaw`, ``W`` a GOE matrix (off-diagonal variance
``1/d``, diagonal ``2/d``, semicircle on ``[-2, 2]``), ``a >= 0`` and ``Delta > 0``.

Conventions
-----------
* Stieltjes transform ``G_R(z) = int rho_R(y) / (z - y) dy`` (so ``G ~ 1/z`` at infinity).
* On the real axis it is taken from above, ``G_R(x) = G_R(x + i0)``: ``Im G <= 0``, the density is
  ``rho_R(x) = -Im G_R(x) / pi`` and ``Re G_R(x)`` is the principal-value Hilbert transform
  ``PV int rho_R(y) / (x - y) dy`` (no ``1/pi``).  Outside the support ``G_R`` is real.
* Traces are normalised by ``d``: ``mean(S*) = Tr S*/d``, ``Q* = Tr S*^2/d``.

Modules
-------
* :mod:`.laws` -- :class:`SpectralLaw` (teacher laws: Wishart, atoms, semicircle).
* :mod:`.quadrature` -- Gauss-Legendre pieces, graded breakpoints, :class:`QuadratureGrid`.
* :mod:`._kernels` -- Numba kernels of the discrete-law back-end with their NumPy twins.
* :mod:`.backends` -- semicircle, Wishart-cubic and atoms (subordination) back-ends: how ``G_R`` is
  computed.
* :mod:`.density` -- :class:`RDensity` / :func:`r_density`, the Bayes RIE (:func:`rie_denoiser`,
  :func:`rie_mmse`), :class:`Pushforward` / :func:`shat_spectrum`.
* :mod:`.scalar_maps` -- :class:`SoftThreshold`, :class:`LinearShrinkage` and the scalar-map helpers.
* :mod:`.input_side` -- :class:`InputSide`, :func:`free_input_side`, :func:`sample_goe`.

Import order (no cycles): ``_kernels``, ``quadrature``, ``laws``, ``scalar_maps`` are leaves;
``backends`` uses ``_kernels`` and ``quadrature``; ``density`` uses ``backends``, ``laws``,
``quadrature``, ``scalar_maps``; ``input_side`` uses ``density``, ``laws``, ``scalar_maps``.
"""

from __future__ import annotations

from .density import Pushforward, RDensity, r_density, rie_denoiser, rie_mmse, shat_spectrum
from .input_side import InputSide, free_input_side, sample_goe
from .laws import SpectralLaw
from .quadrature import QuadratureGrid
from .scalar_maps import LinearShrinkage, SoftThreshold

__all__ = [
    "SoftThreshold",
    "LinearShrinkage",
    "SpectralLaw",
    "QuadratureGrid",
    "RDensity",
    "r_density",
    "InputSide",
    "free_input_side",
    "sample_goe",
    "rie_denoiser",
    "rie_mmse",
    "Pushforward",
    "shat_spectrum",
]
