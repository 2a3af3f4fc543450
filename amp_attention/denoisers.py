"""Input side of GAMP: spectral denoisers of the effective observation ``R`` (DESIGN.md section 5).

A denoiser maps the symmetric ``(d, d)`` matrix ``R = S^t + A*(g) / (d A_hat)`` to
``S^{t+1} = eta(R)``, the proximal map of the regulariser with precision ``d * A_hat`` per
orthonormal coordinate of Sym_d::

    eta(R) = argmin_S  reg(S) + (d A_hat / 2) ||S - R||_F^2

and returns the divergence of ``eta`` in orthonormal coordinates of Sym_d (N = d(d+1)/2 of them),
from which GAMP takes ``V^{t+1} = div / (d^2 A_hat)``.

For a spectral map ``F(R) = U f(L) U^T`` the divergence is (section 5, step 6)::

    div F = sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j)) / (l_i - l_j)      (equal l: use f')

Denoisers: ``NuclearDenoiser`` (``reg = lam d Tr S``, S PSD: soft threshold of the eigenvalues at
``lam / A_hat``, optional width m keeps the m largest) and ``FrobeniusDenoiser``
(``reg = lam d / 2 ||S||_F^2``: shrinkage ``A_hat R / (A_hat + lam)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ._validation import check_nonnegative

__all__ = [
    "nuclear_prox",
    "soft_threshold_spectrum",
    "spectral_divergence",
    "frobenius_shrinkage",
    "NuclearDenoiser",
    "FrobeniusDenoiser",
]


def soft_threshold_spectrum(eigenvalues: np.ndarray, threshold: float, width: int | None = None):
    """Scalar map of the PSD nuclear prox on a spectrum: ``(f(l), f'(l))``.

    ``f(l) = max(l - threshold, 0)``; with ``width = m`` only the m largest eigenvalues are kept
    (the others map to 0), which is the prox restricted to rank <= m.
    """
    l = np.asarray(eigenvalues, dtype=np.float64)
    f = np.maximum(l - threshold, 0.0)
    fp = (l > threshold).astype(np.float64)
    if width is not None and width < l.size:
        drop = np.argsort(l)[: l.size - width]
        f[drop] = 0.0
        fp[drop] = 0.0
    return f, fp


@njit(cache=True)
def _spectral_divergence(l, f, fp):
    # Serial on purpose: d^2/2 cheap pairs (~1e-4 s at d = 1000) cost less than waking a thread
    # pool right after a multithreaded BLAS call.
    d = l.shape[0]
    rows = np.zeros(d)
    for i in range(d):
        s = fp[i]
        for j in range(i + 1, d):
            dl = l[i] - l[j]
            df = f[i] - f[j]
            if dl != 0.0 and abs(dl) > 1e-12 * (abs(l[i]) + abs(l[j])):
                s += df / dl
            else:
                s += 0.5 * (fp[i] + fp[j])
        rows[i] = s
    return rows.sum()


def _spectral_divergence_numpy(l, f, fp):
    dl = l[:, None] - l[None, :]
    df = f[:, None] - f[None, :]
    close = np.abs(dl) <= 1e-12 * (np.abs(l)[:, None] + np.abs(l)[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(close, 0.5 * (fp[:, None] + fp[None, :]), df / np.where(close, 1.0, dl))
    iu = np.triu_indices(l.size, 1)
    return fp.sum() + q[iu].sum()


def spectral_divergence(eigenvalues, f, fprime) -> float:
    """Divergence of ``R -> U f(L) U^T`` in orthonormal coordinates of Sym_d (section 5, step 6).

    Parameters: ``eigenvalues``, ``f`` (values ``f(l_i)``), ``fprime`` (``f'(l_i)``), all shape (d,).
    Equal (to 1e-12 relative) eigenvalue pairs use the derivative (the mean of ``f'``).
    """
    l = np.ascontiguousarray(eigenvalues, dtype=np.float64)
    return float(_spectral_divergence(l, np.ascontiguousarray(f, dtype=np.float64),
                                      np.ascontiguousarray(fprime, dtype=np.float64)))


def nuclear_prox(R: np.ndarray, threshold: float, width: int | None = None):
    """PSD nuclear prox ``U max(L - threshold, 0) U^T`` (top ``width`` eigenvalues if given).

    Returns ``(S, eigenvalues, f, fprime)`` so callers can form the divergence without a second
    eigendecomposition.
    """
    S, L, f, fp, _ = _nuclear_prox_factored(R, threshold, width)
    return S, L, f, fp


def _nuclear_prox_factored(R, threshold, width):
    """:func:`nuclear_prox` plus the factor ``F = U_+ sqrt(f_+) (d, r)`` with ``S = F F^T``
    (``r`` = number of eigenvalues above the threshold)."""
    L, U = np.linalg.eigh(R)
    f, fp = soft_threshold_spectrum(L, threshold, width)
    keep = f > 0.0
    F = U[:, keep] * np.sqrt(f[keep])
    S = F @ F.T
    S = 0.5 * (S + S.T)
    return S, L, f, fp, F


def frobenius_shrinkage(R: np.ndarray, A_hat: float, lam: float) -> np.ndarray:
    """Frobenius prox ``A_hat R / (A_hat + lam)``."""
    return (A_hat / (A_hat + lam)) * R


@dataclass(frozen=True)
class NuclearDenoiser:
    """Prox of ``lam * d * Tr(S)`` over PSD S (weight decay on ``S = W W^T``), optional width m."""

    lam: float
    width: int | None = None

    def __post_init__(self):
        check_nonnegative(self.lam, "lam")
        if self.width is not None and (
            isinstance(self.width, bool) or not isinstance(self.width, (int, np.integer)) or self.width < 1
        ):
            raise ValueError(f"width must be None or an integer >= 1, got {self.width!r}")

    def __call__(self, R: np.ndarray, A_hat: float):
        """``(S, div)`` with ``S = eta(R)`` and ``div`` its divergence in orthonormal coordinates."""
        S, L, f, fp = nuclear_prox(R, self.lam / A_hat, self.width)
        return S, spectral_divergence(L, f, fp)

    def factored(self, R: np.ndarray, A_hat: float):
        """``(S, div, F)`` as :meth:`__call__` plus ``F (d, r)`` with ``S = F F^T``, ``r = rank S``
        (GAMP's next forward map then costs ``2 n T d r`` flops instead of ``2 n T d^2``)."""
        S, L, f, fp, F = _nuclear_prox_factored(R, self.lam / A_hat, self.width)
        return S, spectral_divergence(L, f, fp), F

    def scalar_map(self, x: np.ndarray, A_hat: float) -> np.ndarray:
        """The d -> infinity scalar map ``f(x) = max(x - lam/A_hat, 0)`` (no width cut)."""
        return np.maximum(np.asarray(x) - self.lam / A_hat, 0.0)

    def penalty(self, S: np.ndarray) -> float:
        return self.lam * S.shape[0] * float(np.trace(S))


@dataclass(frozen=True)
class FrobeniusDenoiser:
    """Prox of ``(lam * d / 2) ||S||_F^2`` (S trained entry-wise)."""

    lam: float

    def __post_init__(self):
        check_nonnegative(self.lam, "lam")

    def __call__(self, R: np.ndarray, A_hat: float):
        d = R.shape[0]
        c = A_hat / (A_hat + self.lam)
        return frobenius_shrinkage(R, A_hat, self.lam), c * d * (d + 1) / 2

    def scalar_map(self, x: np.ndarray, A_hat: float) -> np.ndarray:
        return (A_hat / (A_hat + self.lam)) * np.asarray(x)

    def penalty(self, S: np.ndarray) -> float:
        return 0.5 * self.lam * S.shape[0] * float(np.sum(S * S))
