"""Input factors: spectral denoisers of the effective observation ``R`` (docs/theory.md §5, §6, §7).

A denoiser maps the symmetric ``(d, d)`` matrix ``R = S^t + A*(g) / (d A_hat)`` to
``S^{t+1} = eta(R) = U f(L) U^T`` and returns the divergence of ``eta`` in orthonormal coordinates
of Sym_d (``N = d(d+1)/2`` of them), from which GAMP takes ``V^{t+1} = div / (d^2 A_hat)``::

    div = sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j)) / (l_i - l_j)      (equal l: mean of f')

Every denoiser here is an :class:`~amp_attention.factors.InputFactor`: it defines its scalar map
``f(x; A_hat)`` once, and the matrix denoiser and the SE overlaps derive from it (closed forms
override where they exist).

* :class:`NuclearDenoiser` -- prox of ``lam d Tr S`` over PSD S (weight decay on ``S = W W^T``):
  soft threshold of the eigenvalues at ``lam / A_hat``; optional ``width = m`` keeps the m largest.
* :class:`FrobeniusDenoiser` -- prox of ``(lam d / 2) ||S||_F^2``: shrinkage ``A_hat R / (A_hat + lam)``;
  closed-form divergence ``N A_hat / (A_hat + lam)`` and closed-form free SE overlaps.
* :class:`RIEDenoiser` -- the Bayes-optimal rotationally invariant estimator
  ``f(x) = x - 2 Delta Re G_R(x)``, ``Delta = 1/(2 A_hat)`` (docs/theory.md §6); closed-form SE
  overlaps on the Nishimori line ``m = q = Q* - mmse(Delta)``, ``V = mmse``.
"""

from __future__ import annotations

import math

import numpy as np

from ._spectral_kernels import spectral_divergence as _divergence_kernel
from ._validation import as_float_array, check_nonnegative, check_positive, check_real, check_symmetric
from .factors import InputFactor, Overlaps, check_R, check_se_args
from .model import as_spectral_law
from .spectral import LinearShrinkage, RDensity, SoftThreshold, rie_mmse

__all__ = [
    "nuclear_prox",
    "soft_threshold_spectrum",
    "spectral_divergence",
    "frobenius_shrinkage",
    "NuclearDenoiser",
    "FrobeniusDenoiser",
    "RIEDenoiser",
    "rie_derivative",
    "make_denoiser",
]


def spectral_divergence(eigenvalues, f, fprime) -> float:
    """Divergence of ``R -> U f(L) U^T`` in orthonormal coordinates of Sym_d (docs/theory.md §5, step 6).

    Parameters: ``eigenvalues``, ``f`` (values ``f(l_i)``), ``fprime`` (``f'(l_i)``), finite, all
    of the same shape (d,).  Equal (to 1e-12 relative) eigenvalue pairs use the mean of ``f'``.
    """
    l = as_float_array(eigenvalues, "eigenvalues", ndim=1)
    f = as_float_array(f, "f", ndim=1)
    fp = as_float_array(fprime, "fprime", ndim=1)
    if not (l.shape == f.shape == fp.shape):
        raise ValueError(f"eigenvalues, f and fprime must have the same shape (d,), got "
                         f"{l.shape}, {f.shape}, {fp.shape}")
    div = _divergence_kernel(l, f, fp)
    if not np.isfinite(div):
        raise ValueError("the divergence overflows float64: the divided differences "
                         "(f(l_i) - f(l_j)) / (l_i - l_j) of f and eigenvalues, or fprime, are too large")
    return div


def soft_threshold_spectrum(eigenvalues: np.ndarray, threshold: float, width: int | None = None):
    """Scalar map of the PSD nuclear prox on a spectrum: ``(f(l), f'(l))``.

    ``f(l) = max(l - threshold, 0)`` (:class:`~amp_attention.spectral.SoftThreshold`); with
    ``width = m`` only the m largest eigenvalues are kept (the others map to 0), which is the prox
    restricted to rank <= m.
    """
    l = as_float_array(eigenvalues, "eigenvalues", ndim=1)
    st = SoftThreshold(check_real(threshold, "threshold"))
    width = _check_width(width)
    f, fp = st(l), st.derivative(l)
    if width is not None and width < l.size:
        drop = np.argsort(l)[: l.size - width]
        f[drop] = 0.0
        fp[drop] = 0.0
    return f, fp


def _check_width(width):
    if width is not None and (
        isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1
    ):
        raise ValueError(f"width must be None or an integer >= 1, got {width!r}")
    return width


def _finite_penalty(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"the penalty overflows float64 (got {value}): lam or S is too large")
    return value


def _check_overlaps(overlaps) -> Overlaps:
    try:
        m, q, V = (float(v) for v in overlaps)
    except (TypeError, ValueError):
        raise ValueError(f"overlaps must be an Overlaps (m, q, V) of finite numbers, got {overlaps!r}") from None
    if not all(math.isfinite(v) for v in (m, q, V)):
        raise ValueError(f"overlaps must be finite, got {overlaps!r}")
    return Overlaps(m, q, V)


class NuclearDenoiser(InputFactor):
    """Prox of ``lam * d * Tr(S)`` over PSD S (weight decay on ``S = W W^T``), optional width m.

    Scalar map: ``f(x) = max(x - lam/A_hat, 0)``; ``width = m`` keeps the m largest eigenvalues
    (GAMP only: the SE has no counterpart, :meth:`check_se` raises).
    """

    nonnegative = True

    def __init__(self, lam: float, width: int | None = None):
        self.lam = check_nonnegative(lam, "lam")
        self.width = _check_width(width)

    def __repr__(self):
        return f"NuclearDenoiser(lam={self.lam!r}, width={self.width!r})"

    def _threshold(self, A_hat) -> float:
        A_hat = check_positive(A_hat, "A_hat")
        tau = self.lam / A_hat
        if not math.isfinite(tau):
            raise ValueError(f"the threshold lam / A_hat overflows float64 (lam = {self.lam!r}, "
                             f"A_hat = {A_hat!r})")
        return tau

    def scalar_map(self, A_hat: float) -> SoftThreshold:
        return SoftThreshold(self._threshold(A_hat))

    def spectrum(self, eigenvalues, A_hat):
        return soft_threshold_spectrum(eigenvalues, self._threshold(A_hat), self.width)

    def se_penalty(self, law, a, Delta, A_hat, overlaps) -> float:
        """``lam d Tr(S) / d^2 = lam Tr(S)/d = lam int f rho_R`` (free probability)."""
        law, a, Delta, A_hat = check_se_args(law, a, Delta, A_hat)
        return self.lam * RDensity(law, a, Delta).integrate(self.scalar_map(A_hat))

    def check_se(self):
        if self.width is not None:
            raise ValueError("the state evolution has no counterpart of width: use width=None")

    def penalty(self, S: np.ndarray) -> float:
        """``lam d Tr(S)`` for a finite symmetric ``S``."""
        S = check_symmetric(S, "S")
        return _finite_penalty(self.lam * S.shape[0] * float(np.trace(S)))


class FrobeniusDenoiser(InputFactor):
    """Prox of ``(lam * d / 2) ||S||_F^2`` (S trained entry-wise): ``f(x) = c x``, ``c = A_hat/(A_hat + lam)``.

    Closed forms: ``S = c R``, ``div = c d(d+1)/2``; free SE overlaps ``m = c a Q*``,
    ``q = c^2 (a^2 Q* + Delta)``, ``V = c / (2 A_hat)``.
    """

    def __init__(self, lam: float):
        self.lam = check_nonnegative(lam, "lam")

    def __repr__(self):
        return f"FrobeniusDenoiser(lam={self.lam!r})"

    def scalar_map(self, A_hat: float) -> LinearShrinkage:
        A_hat = check_positive(A_hat, "A_hat")
        return LinearShrinkage(A_hat / (A_hat + self.lam) if A_hat + self.lam < math.inf
                               else 1.0 / (1.0 + self.lam / A_hat))

    def factored(self, R: np.ndarray, A_hat: float):
        R = check_R(R)
        d = R.shape[0]
        c = self.scalar_map(A_hat).c
        return c * R, c * d * (d + 1) / 2, None

    def se_overlaps(self, law, a, Delta, A_hat) -> Overlaps:
        law, a, Delta, A_hat = check_se_args(law, a, Delta, A_hat)
        c, Q = self.scalar_map(A_hat).c, law.Q
        out = Overlaps(c * a * Q, c * c * (a * a * Q + Delta), c / (2 * A_hat))
        if not all(math.isfinite(v) for v in out):
            raise ValueError(f"the Frobenius SE overlaps overflow float64 at a = {a!r}, Delta = {Delta!r}, "
                             f"A_hat = {A_hat!r} (Q* = {Q!r})")
        return out

    def se_penalty(self, law, a, Delta, A_hat, overlaps) -> float:
        """``(lam d / 2) ||S||_F^2 / d^2 = lam q / 2``."""
        return _finite_penalty(0.5 * self.lam * _check_overlaps(overlaps).q)

    def penalty(self, S: np.ndarray) -> float:
        """``(lam d / 2) ||S||_F^2`` for a finite symmetric ``S``."""
        S = check_symmetric(S, "S")
        return _finite_penalty(0.5 * self.lam * S.shape[0] * float(np.sum(S * S)))


def nuclear_prox(R: np.ndarray, threshold: float, width: int | None = None):
    """PSD nuclear prox ``U max(L - threshold, 0) U^T`` (top ``width`` eigenvalues if given).

    Returns ``(S, eigenvalues, f, fprime)`` so callers can form the divergence without a second
    eigendecomposition.
    """
    R = check_symmetric(R, "R")
    threshold = check_real(threshold, "threshold")
    _check_width(width)
    L, U = np.linalg.eigh(R)
    f, fp = soft_threshold_spectrum(L, float(threshold), width)
    keep = f > 0.0
    F = U[:, keep] * np.sqrt(f[keep])
    S = F @ F.T
    return 0.5 * (S + S.T), L, f, fp


def frobenius_shrinkage(R: np.ndarray, A_hat: float, lam: float) -> np.ndarray:
    """Frobenius prox ``A_hat R / (A_hat + lam)`` (``R`` finite symmetric, ``A_hat > 0``, ``lam >= 0``)."""
    R = check_symmetric(R, "R")
    return FrobeniusDenoiser(lam).scalar_map(A_hat).c * R


# ---------------------------------------------------------------------------------------------
# The Bayes-optimal RIE
# ---------------------------------------------------------------------------------------------


def rie_derivative(x, density: RDensity) -> np.ndarray:
    """``f'(x)`` of the RIE ``f(x) = (x - 2 Delta Re G_R(x)) / a`` (docs/theory.md §6).

    ``f'(x) = (1 - 2 Delta Re G_R'(x)) / a`` with ``G_R'`` analytic (from ``G_R(x + i0)`` =
    ``density.stieltjes(x)``):

    * Wishart(rho) law: implicit derivative of the cubic of §7,
      ``P(G, x) = Delta a G^3 - (x a + Delta s) G^2 + (x s - a rho + a) G - s``:
      ``G' = (a G^2 - s G) / (3 Delta a G^2 - 2 (x a + Delta s) G + x s - a rho + a)``;
    * discrete laws (atoms ``lambda_k``, weights ``w_k``): subordination ``G_R(z) = G_mu(omega)``,
      ``omega = z - Delta G_R(z)``, ``mu`` the law of ``a S*``:
      ``G' = G_mu'(omega) / (1 + Delta G_mu'(omega))``, ``G_mu'(omega) = -sum_k w_k/(omega - a lambda_k)^2``;
    * semicircle law (``R`` semicircle of variance ``s2 = a^2 var + Delta`` centred at ``c``):
      ``G' = G / (2 s2 G - (x - c))``;
    * ``density.a_negligible``: ``f`` is the constant prior mean, ``f' = 0``.

    Inside the support ``f'`` is finite up to the edges; outside it is ``> 1/a`` and diverges like
    ``|x - edge|^{-1/2}`` at a square-root edge (eigenvalues of a finite-d ``R`` beyond the edge
    by ``O(d^{-2/3})`` get ``f' = O(d^{1/3})``, an ``O(d^{-5/3})`` effect on ``V``).  Non-finite
    values (x exactly at an edge) are replaced by the largest finite value.  ``x``: any shape.
    """
    if not isinstance(density, RDensity):
        raise ValueError(f"density must be an RDensity, got {type(density).__name__}")
    if density.a == 0:
        raise ValueError("density must have a > 0 for the RIE (R carries no information on S* at a = 0)")
    xa = as_float_array(x, "x", allow_empty=True)
    if density.a_negligible:
        return np.zeros(xa.shape)
    law, a, D = density.law, density.a, density.Delta
    flat = xa.ravel()
    G = np.asarray(density.stieltjes(flat), dtype=complex)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if law.kind == "wishart":
            s, rho = math.sqrt(law.rho), law.rho
            Gp = (a * G * G - s * G) / (3 * D * a * G * G - 2 * (flat * a + D * s) * G + flat * s - a * rho + a)
        elif law.kind == "semicircle":
            s2 = a * a * law.semicircle_variance + D
            Gp = G / (2 * s2 * G - (flat - a * law.center))
        else:
            om = flat - D * G
            al, w = a * law.eigenvalues, law.weights
            Gmu_p = np.empty(flat.shape, complex)
            step = max(1, 2_000_000 // max(al.size, 1))
            for i0 in range(0, flat.size, step):
                dz = om[i0:i0 + step, None] - al[None, :]
                Gmu_p[i0:i0 + step] = -np.sum(w / (dz * dz), axis=1)
            Gp = Gmu_p / (1.0 + D * Gmu_p)
        fp = (1.0 - 2.0 * D * Gp.real) / a
    bad = ~np.isfinite(fp)
    if np.any(bad):
        good = fp[~bad]
        fp[bad] = np.max(good) if good.size else 1.0 / a
    return fp.reshape(xa.shape)


class _RIEMap:
    """The RIE's scalar map at one ``Delta``: ``f(x) = x - 2 Delta Re G_R(x)`` with its derivative."""

    kinks: tuple = ()

    def __init__(self, density: RDensity):
        self.density = density

    def __call__(self, x):
        return self.density.rie(x)

    def derivative(self, x):
        return rie_derivative(x, self.density)


class RIEDenoiser(InputFactor):
    """Bayes input factor of GAMP-RIE: ``eta(R) = U f(L) U^T`` (docs/theory.md §6).

    Scalar map: ``Delta = 1/(2 A_hat)``, ``f(x) = x - 2 Delta Re G_R(x)`` with ``G_R`` the
    Stieltjes transform of ``S* + sqrt(Delta) W`` for the teacher law ``law``; ``f'`` analytic
    (:func:`rie_derivative`).  GAMP sets ``V = div / (d^2 A_hat)`` (§5, step 6).

    ``law``: a :class:`SpectralLaw` (or a :class:`Teacher`, whose exact eigenvalues are used);
    ``name`` is the argument named in error messages.  ``penalty(S)`` is NaN (no objective).
    ``last_density`` keeps the :class:`RDensity` of the last matrix call.

    SE overlaps (closed form, Nishimori line ``a = 1``): ``q = m = Q* - mmse(Delta)``,
    ``V = mmse(Delta)`` with ``mmse`` from :func:`amp_attention.spectral.rie_mmse`.
    """

    def __init__(self, law, name: str = "law"):
        self.law = as_spectral_law(law, "exact", name=name)
        self.last_density = None

    def __repr__(self):
        return f"RIEDenoiser({self.law!r})"

    def density(self, A_hat: float) -> RDensity:
        """:class:`RDensity` of ``R = S* + sqrt(Delta) W``, ``Delta = 1/(2 A_hat)``."""
        A_hat = check_positive(A_hat, "A_hat")
        return RDensity(self.law, 1.0, 1.0 / (2.0 * A_hat))

    def scalar_map(self, A_hat: float) -> _RIEMap:
        return _RIEMap(self.density(A_hat))

    def spectrum(self, eigenvalues, A_hat):
        eigenvalues = as_float_array(eigenvalues, "eigenvalues", ndim=1)
        f = self.scalar_map(A_hat)
        self.last_density = f.density
        return f(eigenvalues), f.derivative(eigenvalues)

    def se_overlaps(self, law, a, Delta, A_hat) -> Overlaps:
        law, a, Delta, A_hat = check_se_args(law, a, Delta, A_hat)
        Q = law.Q
        q = min(Q - rie_mmse(law, Delta), Q)
        return Overlaps(q, q, Q - q)

    def penalty(self, S) -> float:
        return float("nan")


def make_denoiser(reg: str, lam: float, width: int | None = None) -> InputFactor:
    """``'nuclear'`` -> :class:`NuclearDenoiser` (optional width); ``'frobenius'`` -> :class:`FrobeniusDenoiser`."""
    if not isinstance(reg, str) or reg not in ("nuclear", "frobenius"):
        raise ValueError(f"reg must be 'nuclear' or 'frobenius', got {reg!r}")
    if reg == "nuclear":
        return NuclearDenoiser(lam, width)
    if reg == "frobenius":
        if width is not None:
            raise ValueError("width applies to reg='nuclear' only")
        return FrobeniusDenoiser(lam)
    raise ValueError(f"reg must be 'nuclear' or 'frobenius', got {reg!r}")
