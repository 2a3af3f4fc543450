"""Teacher spectral laws (docs/theory.md §1 and §7).

Holds :class:`SpectralLaw`, the limiting (or exact finite-d) spectral law of the teacher ``S*``,
with its three kinds (``'wishart'``: ``sqrt(rho)`` times a Marchenko-Pastur law; ``'atoms'``: a
discrete law; ``'semicircle'``), the validation done by its constructors, and :func:`check_law`
(argument check used by the functions of :mod:`.density` and :mod:`.input_side`).
"""

from __future__ import annotations

import math

import numpy as np

from .._validation import as_float_array, check_positive, check_real

__all__ = ["SpectralLaw", "check_law"]


class SpectralLaw:
    """Limiting (or exact finite-d) spectral law of the teacher ``S*``.

    Build with the constructors:

    * ``SpectralLaw.wishart(rho)``: the ``d -> infinity`` law of ``S* = W W^T / sqrt(r d)``,
      ``r = rho d`` (docs/theory.md §1): ``sqrt(rho)`` times a Marchenko-Pastur law of ratio
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
        self.semicircle_variance = variance
        self.center = center
        with np.errstate(over="ignore"):
            if kind == "wishart":
                self.mean = math.sqrt(rho)
                self.Q = 1.0 + rho
            elif kind == "atoms":
                self.mean = float(np.dot(weights, eigenvalues))
                self.Q = float(np.dot(weights, eigenvalues**2))
            elif kind == "semicircle":
                self.mean = center
                self.Q = variance + center * center
            else:  # pragma: no cover - constructors only
                raise ValueError(f"unknown kind {kind!r}")
        if not (math.isfinite(self.mean) and math.isfinite(self.Q)):
            what = {"wishart": "rho", "atoms": "eigenvalues", "semicircle": "variance and mean"}[kind]
            raise ValueError(f"{what}: the second moment Q = Tr(S*^2)/d of this law overflows float64 "
                             f"(max |eigenvalue| must stay below ~1e154); rescale the teacher")

    @property
    def radius(self) -> float:
        """``max |lambda|`` over the support of the law."""
        if self.kind == "wishart":
            s = math.sqrt(self.rho)
            return s * ((1.0 + 1.0 / s) * (1.0 + 1.0 / s))  # (not ** 2: no OverflowError)
        if self.kind == "atoms":
            return float(np.max(np.abs(self.eigenvalues)))
        return abs(self.center) + 2.0 * math.sqrt(self.semicircle_variance)

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
            if not np.isfinite(w.sum()):  # the sum overflows: normalise by the largest first
                w = w / w.max()
            w = w / w.sum()
            lam, w = lam[w > 0], w[w > 0]
        order = np.argsort(lam, kind="stable")
        return cls("atoms", eigenvalues=lam[order].copy(), weights=w[order].copy())

    @classmethod
    def semicircle(cls, variance: float, mean: float = 0.0) -> "SpectralLaw":
        variance = check_positive(variance, "variance")
        mean = check_real(mean, "mean")
        return cls("semicircle", variance=variance, center=mean)

    def __repr__(self) -> str:
        if self.kind == "wishart":
            return f"SpectralLaw.wishart(rho={self.rho!r})"
        if self.kind == "semicircle":
            return f"SpectralLaw.semicircle(variance={self.semicircle_variance!r}, mean={self.center!r})"
        return f"SpectralLaw.atoms(<{self.eigenvalues.size} eigenvalues>)"


def check_law(law, name: str = "law") -> SpectralLaw:
    """Return ``law`` if it is a :class:`SpectralLaw`, else a ``ValueError`` naming ``name`` (the
    argument's name in the caller)."""
    if not isinstance(law, SpectralLaw):
        raise ValueError(f"{name} must be a SpectralLaw, got {type(law).__name__}")
    return law
