"""The two factor contracts that GAMP and its state evolution share (docs/theory.md §5, §7).

GAMP (:mod:`amp_attention.amp`) and the state evolution (:mod:`amp_attention.se`) are two loops
calling the same two factors:

* an **output factor** (a loss of :mod:`amp_attention.losses`, or a Bayes output of
  :mod:`amp_attention.bayes_outputs`) acts per sample on the whitened coordinates:
  ``g_out(y, omega, V) -> (g, dg, info)`` with ``g (n, K)``, ``dg = -dg/domega`` (full ``(n, K, K)``
  or its trace ``(n,)``).  In the SE its Gaussian averages over the output sample
  ``(z*, omega, y)`` give the conjugates ``(A_hat, m_hat, q_hat)``; the generic path
  (:meth:`OutputFactor.se_conjugates`) averages ``g_out`` over the sample's draws, and factors with
  a closed form (square loss, Bayes outputs) override it.
* an **input factor** (a denoiser of :mod:`amp_attention.denoisers`) is a spectral map
  ``eta(R) = U f(L) U^T`` defined by its scalar map ``f(x; A_hat)`` (with ``f'`` and the kinks of
  ``f``, :meth:`InputFactor.scalar_map`).  From it derive the matrix denoiser
  ``(R, A_hat) -> (S, div)`` used by GAMP (steps 5-6) and the SE overlaps ``(m, q, V)``, in the
  ``d -> infinity`` limit by free probability (:meth:`InputFactor.se_overlaps`) or at finite d by
  GOE draws (:meth:`InputFactor.se_overlaps_finite`).  Factors with closed forms (Frobenius, RIE)
  override them.

The output sample (the object passed to :meth:`OutputFactor.se_conjugates`) is built by the SE
(:class:`amp_attention.output_sample.OutputSample`): it exposes ``alpha``, ``K``, ``Q``, ``y``,
``z_star``, ``omega(m, q)``, per-node ``weights`` and a weighted ``mean``/``error``, and a
``view(factor)`` that integrates in the dimensions the factor really depends on (quasi-Monte Carlo
by default, seed-independent; ``'mc'`` is plain Monte Carlo).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from ._spectral_kernels import spectral_divergence
from ._validation import as_float_array, check_nonnegative, check_positive, check_rng, check_symmetric
from .spectral import free_input_side, sample_goe
from .spectral.laws import check_law

__all__ = ["Conjugates", "Overlaps", "OutputFactor", "InputFactor"]


class Conjugates(NamedTuple):
    """SE output-side conjugates of one step (docs/theory.md §7) and their Monte Carlo errors."""

    A_hat: float
    m_hat: float
    q_hat: float
    stderr: dict


class Overlaps(NamedTuple):
    """SE input-side order parameters ``m = Tr(S S*)/d``, ``q = Tr(S^2)/d``, ``V`` (docs/theory.md §7)."""

    m: float
    q: float
    V: float


# --------------------------------------------------------------------------------------------
# Output side
# --------------------------------------------------------------------------------------------


def stein_controlled(values, g, view, tr, r):
    """``values - beta h`` with the Stein control variate ``h = g . xi_2 - r Tr(dg/domega)``
    (``tr = Tr(-dg/domega)`` per node, ``r = sqrt(q - m^2/Qz)`` the scale of the part ``r xi_2`` of
    ``omega`` independent of the labels): ``E h = 0`` by Stein's lemma when ``g`` is Lipschitz in
    ``omega``, so the mean is unchanged, and ``beta`` (the regression coefficient of ``values`` on
    ``h`` over the nodes) removes the part of the rule's error they share (docs/theory.md §7.1;
    about 1.6x smaller error for ``q_hat`` with the default rule).  Shapes (N,) except ``g`` (N, K)."""
    h = np.sum(g * view.xi2, axis=1) + r * tr
    hc = h - view.mean(h)
    var = float(view.mean(hc * hc))
    if not (math.isfinite(var) and var > 0):
        return values
    beta = float(view.mean((values - view.mean(values)) * hc)) / var
    return values - beta * h if math.isfinite(beta) else values


class OutputFactor:
    """Contract of an output factor (loss or Bayes output), per sample in whitened coordinates.

    Subclasses implement

    * ``g_out(y, omega, V, p0=None, jacobian='full') -> (g, dg, info)``: ``y (n, T, T)`` targets,
      ``omega (n, K)``, ``V`` a positive scalar, a shared ``(K, K)`` or a per-sample ``(n, K, K)``
      variance; ``g (n, K)``; ``dg = -dg/domega`` ``(n, K, K)`` or its trace ``(n,)`` with
      ``jacobian='trace'``; ``info`` a dict (``p`` the prox point if any, ``n_iter``, ``n_failed``);
    * ``value_z(y, z) -> (n,)``: the per-sample loss at ``z`` (NaN for Bayes outputs: no objective);
    * ``link(h)``: the model output from preactivations ``h (n, T, T)`` (``predict`` of the
      estimators).

    and may override :meth:`g_out_gram` (a fused kernel at GAMP's variances),
    :meth:`se_conjugates` (closed forms), :meth:`check_T` (T constraints) and
    :meth:`min_value` (``min_z l_y(z)`` per sample, used by the interpolation threshold).
    """

    name = "output"
    #: ``g``, ``Tr dg`` and the per-sample value are invariant to ``omega -> omega + c u`` at scalar
    #: ``V`` and ``g . u = 0`` whenever the rows of ``y`` sum to one (softmax-based factors): the SE
    #: output side may then integrate in the complement of the flat direction ``u``.
    flat_invariant = False
    #: ``g = g_out(y, omega, V)`` is Lipschitz in ``omega`` with ``dg = -dg/domega`` (convex losses,
    #: Bayes outputs), so Stein's lemma ``E[g . xi] = -r E[Tr dg]`` holds pointwise.  A loss whose
    #: prox can jump between minimisers (non-convex) leaves it False: the SE then computes
    #: ``A_hat`` by Stein's identity on ``g`` itself, which stays right across the jumps.
    smooth_g_out = False

    def g_out(self, y, omega, V, p0=None, jacobian="full"):  # pragma: no cover - abstract
        raise NotImplementedError

    def value_z(self, y, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def link(self, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def check_T(self, T: int) -> None:
        """Raise ``ValueError`` if this factor cannot be used with ``T`` tokens (default: any T)."""

    def se_start(self, z_star):
        """The SE's prox start given the teacher's ``z*`` per node: None (the factor's own rule)
        unless a loss offers a start convention (the softmax-square loss's ``prox_start``)."""
        return None

    def _se_prox(self, y, omega, V, p0, z_star):
        start = self.se_start(z_star)
        if start is None:
            return self.prox(y, omega, V, p0=p0)[0]
        return self.prox(y, omega, V, start=start)[0]

    def _se_g_out(self, y, omega, V, p0, z_star):
        start = self.se_start(z_star)
        if start is None:
            return self.g_out(y, omega, V, p0=p0, jacobian="trace")
        return self.g_out(y, omega, V, jacobian="trace", start=start)

    def g_out_gram(self, y, omega, v: float, gram, p0=None):
        """``g_out`` at GAMP's ``V_mu = v Gamma_mu`` (``gram`` a :class:`~amp_attention.variance.GramVariance`):
        ``(g (n, K), a (n,), info)`` with ``a_mu = Tr(Gamma_mu dg_mu)``.  Generic path: the full
        Jacobian, then the weighted trace; a factor with a fused kernel overrides it."""
        g, dg, info = self.g_out(y, omega, gram.scaled(v), p0=p0)
        return g, gram.weighted_trace(dg), info

    def min_value(self, y) -> np.ndarray:  # pragma: no cover - abstract
        """``min_z l_y(z)`` per sample, shape (n,)."""
        raise NotImplementedError(f"{type(self).__name__} has no min_value")

    def se_conjugates(self, sample, m: float, q: float, V: float) -> Conjugates:
        """``(A_hat, m_hat, q_hat)`` at ``(m, q, V)`` by averaging over ``sample`` (docs/theory.md §7)::

            A_hat = alpha E Tr(-dg/domega),   q_hat = alpha E ||g||^2,
            m_hat = alpha E[g . (z* - (m/q) omega)] / (Q* - m^2/q)      (q = 0: alpha E[g . z*] / Q*)

        with ``g = g_out(y, omega, V)`` (scalar V: ``Gamma -> I``), warm-started at the previous
        call's prox point (kept on the sample's view).  ``stderr`` holds the rule's error estimates.

        Rule ``'mc'`` (:class:`~amp_attention.output_sample.OutputSample`): the historical plain
        Monte Carlo means and standard errors, bit for bit.  Other rules: weighted means over the
        nodes of ``sample.view(self)`` (the flat direction dropped when it is exact, the channel
        noise integrated out by conditioning), and, when ``g`` is Lipschitz in ``omega``
        (:func:`~amp_attention.output_sample.has_smooth_g_out`), ``m_hat`` in the equivalent form
        ``alpha (E[g . z*] + m E Tr dg) / Q*`` (Stein's lemma on the part of ``omega`` independent
        of ``z*``), which has no ``1/(Q* - m^2/q)`` amplification as ``m^2 -> q Q*``, and ``q_hat``
        with the Stein control variate of :func:`stein_controlled`.
        """
        alpha, Q = sample.alpha, sample.Q
        if getattr(sample, "method", "mc") == "mc":  # the historical estimator
            omega = sample.omega(m, q)
            g, dg, info = self._se_g_out(sample.y, omega, float(V), sample.warm_start, sample.z_star)
            sample.warm_start = info.get("p")
            tr = dg if dg.ndim == 1 else np.trace(dg, axis1=1, axis2=2)
            gg = np.sum(g * g, axis=1)
            if q > 0:
                resid = sample.z_star - (m / q) * omega
                denom = Q - m * m / q
            else:
                resid, denom = sample.z_star, Q
            gz = np.sum(g * resid, axis=1) / denom
            sq = math.sqrt(sample.n_mc)
            A_hat, q_hat, m_hat = alpha * tr.mean(), alpha * gg.mean(), alpha * gz.mean()
            stderr = {"A_hat": alpha * tr.std() / sq, "m_hat": alpha * gz.std() / sq, "q_hat": alpha * gg.std() / sq}
            return Conjugates(float(A_hat), float(m_hat), float(q_hat), stderr)
        view = sample.view(self)
        omega = view.omega(m, q)
        g, dg, info = self._se_g_out(view.y, omega, float(V), view.warm_start,
                                     view.z_star_mean(m, q, omega))
        view.warm_start = sample.warm_start = info.get("p")
        tr = dg if dg.ndim == 1 else np.trace(dg, axis1=1, axis2=2)
        r2 = q - m * m / view.Qz  # variance of the part of omega independent of the labels
        stein = r2 > 1e-12 * max(q, 1e-300)  # (Stein's lemma in that part applies)
        if not self.smooth_g_out and stein:
            # Stein's identity on g: E Tr(-dg/domega) = -E[g . xi_2] / sqrt(r2), which counts the
            # jumps of a discontinuous g (a global minimiser switching branch) that the pointwise
            # Jacobian misses
            tr = -np.sum(g * view.xi2, axis=1) / math.sqrt(r2)
        gg = np.sum(g * g, axis=1)
        zs = view.z_star_mean(m, q, omega)           # E[z* | channel input, omega]
        if self.smooth_g_out:
            gz = (np.sum(g * zs, axis=1) + m * tr) / Q
        elif q > 0:
            gz = np.sum(g * (zs - (m / q) * omega), axis=1) / (Q - m * m / q)
        else:
            gz = np.sum(g * zs, axis=1) / Q
        vals = np.stack([tr, gz, gg], axis=1)
        if self.smooth_g_out and stein:
            vals[:, 2] = stein_controlled(gg, g, view, tr, math.sqrt(r2))
        view.last_values = vals                       # (for the SE's error estimate of its fixed point)
        (A_hat, m_hat, q_hat), err = alpha * view.mean(vals), alpha * view.error(vals)
        stderr = {"A_hat": float(err[0]), "m_hat": float(err[1]), "q_hat": float(err[2])}
        return Conjugates(float(A_hat), float(m_hat), float(q_hat), stderr)

    def se_train_loss(self, sample, m: float, q: float, V: float) -> float:
        """Predicted mean per-sample training loss ``E l_y(prox(omega; V))`` (docs/theory.md §7),
        averaged with the sample's rule (rule ``'mc'``: the historical plain mean).  At ``V = 0``
        (a locally constant denoiser, e.g. ``S = 0``) the prox is ``omega`` itself."""
        if getattr(sample, "method", "mc") == "mc":
            omega = sample.omega(m, q)
            p = self._se_prox(sample.y, omega, float(V), None, sample.z_star) if V > 0 else omega
            return float(np.mean(self.value_z(sample.y, p)))
        view = sample.view(self)
        omega = view.omega(m, q)
        p0 = view.warm_start if view.warm_start is not None and view.warm_start.shape == omega.shape else None
        p = self._se_prox(view.y, omega, float(V), p0, view.z_star_mean(m, q, omega)) if V > 0 else omega
        return float(view.mean(self.value_z(view.y, p)))

    def se_loss_floor(self, sample) -> float:
        """``E min_z l_y(z)`` over the sample's labels, averaged by the same rule as
        :meth:`se_train_loss` (the floor of the interpolation threshold's excess training loss)."""
        if getattr(sample, "method", "mc") == "mc":
            return float(np.mean(self.min_value(sample.y)))
        view = sample.view(self)
        return float(view.mean(self.min_value(view.y)))


# --------------------------------------------------------------------------------------------
# Input side
# --------------------------------------------------------------------------------------------


def check_R(R) -> np.ndarray:
    """``R`` as a square float64 ``(d, d)`` array, symmetric where finite (``ValueError`` naming
    ``R`` otherwise); NaN/inf entries are let through (a diverging GAMP iterate)."""
    R = as_float_array(R, "R", ndim=2) if np.all(np.isfinite(_try_array(R))) else _try_array(R)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.size == 0:
        raise ValueError(f"R must be a square (d, d) matrix, got shape {R.shape}")
    if np.all(np.isfinite(R)):
        return check_symmetric(R, "R")
    return R


def _try_array(R) -> np.ndarray:
    try:
        arr = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError):
        return as_float_array(R, "R")  # raises, naming R
    return arr


def check_se_args(law, a, Delta, A_hat):
    """Validated ``(law, a, Delta, A_hat)`` of the SE input side (``a >= 0``, ``Delta, A_hat > 0``)."""
    return (check_law(law), check_nonnegative(a, "a"), check_positive(Delta, "Delta"),
            check_positive(A_hat, "A_hat"))


class InputFactor:
    """Contract of an input factor: the spectral denoiser ``eta(R) = U f(L) U^T`` (docs/theory.md §5).

    Subclasses implement :meth:`scalar_map` (``A_hat -> f``, a vectorised callable with a
    ``derivative`` method and a ``kinks`` tuple, as :class:`amp_attention.spectral.SoftThreshold`)
    and :meth:`penalty`; everything else derives from the scalar map:

    * :meth:`spectrum` -- ``(f(l), f'(l))`` on the eigenvalues of ``R`` (override for maps that
      look at the whole spectrum, e.g. a width cut);
    * :meth:`factored` / ``__call__`` -- GAMP's steps 5-6: ``S = eta(R)`` and its divergence in
      orthonormal coordinates of Sym_d, ``div = sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j))/(l_i - l_j)``;
    * :meth:`se_overlaps` -- the ``d -> infinity`` SE input side ``(m, q, V)`` by free probability
      (:func:`amp_attention.spectral.free_input_side`);
    * :meth:`se_overlaps_finite` -- the finite-d SE input side by GOE draws at the teacher's exact
      spectrum, through the same :meth:`spectrum` and divergence kernel as GAMP.

    ``nonnegative = True`` declares ``f >= 0`` (then :meth:`factored` also returns ``F`` with
    ``S = F F^T``, which GAMP uses for a cheaper forward map).
    """

    nonnegative = False

    def scalar_map(self, A_hat: float):  # pragma: no cover - abstract
        raise NotImplementedError

    def penalty(self, S) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def spectrum(self, eigenvalues: np.ndarray, A_hat: float):
        """``(f(l), f'(l))`` for the eigenvalues ``l`` of ``R`` (shape (d,) each)."""
        f = self.scalar_map(A_hat)
        return f(eigenvalues), f.derivative(eigenvalues)

    def factored(self, R: np.ndarray, A_hat: float):
        """``(S, div, F)``: ``S = U f(L) U^T``, its divergence, and ``F (d, r)`` with ``S = F F^T``
        when the factor is ``nonnegative`` (``r`` = number of nonzero ``f(l_i)``), else None.

        ``R``: a symmetric ``(d, d)`` matrix (relative tolerance 1e-10); ``A_hat > 0`` finite;
        ``ValueError`` naming them otherwise.  GAMP's path: an ``R`` with NaN or inf entries (a
        diverging iterate) gives ``S`` and ``div`` NaN, for the caller's divergence check, and an
        output that overflows is returned as it is; :meth:`__call__` rejects both."""
        R = check_R(R)
        A_hat = check_positive(A_hat, "A_hat")
        if not np.all(np.isfinite(R)):
            return np.full(R.shape, np.nan), float("nan"), None
        L, U = np.linalg.eigh(R)
        f, fp = self.spectrum(L, A_hat)
        if self.nonnegative:
            keep = f > 0.0
            F = U[:, keep] * np.sqrt(f[keep])
            S = F @ F.T
        else:
            F = None
            S = (U * f) @ U.T
        S = 0.5 * (S + S.T)
        return S, spectral_divergence(L, f, fp), F

    def __call__(self, R: np.ndarray, A_hat: float):
        """``(S, div)`` with ``S = eta(R)`` and ``div`` its divergence (GAMP steps 5-6).

        ``R`` finite symmetric ``(d, d)``, ``A_hat > 0``; an output that overflows float64 is a
        ``ValueError``."""
        R = check_symmetric(R, "R")
        with np.errstate(over="ignore", invalid="ignore"):
            S, div, _ = self.factored(R, A_hat)
        if not (np.isfinite(div) and np.all(np.isfinite(S))):
            raise ValueError(f"the denoiser's output overflows float64 at A_hat = {A_hat!r} "
                             f"(max |R| = {float(np.max(np.abs(R))):.3g}): rescale R")
        return S, div

    def check_se(self) -> None:
        """Raise ``ValueError`` if the SE has no counterpart of this factor's settings."""

    def se_overlaps(self, law, a: float, Delta: float, A_hat: float) -> Overlaps:
        """``d -> infinity`` overlaps for ``R = a S* + sqrt(Delta) W`` (docs/theory.md §7, free)."""
        law, a, Delta, A_hat = check_se_args(law, a, Delta, A_hat)
        return Overlaps(*free_input_side(law, a, Delta, self.scalar_map(A_hat), A_hat))

    def se_penalty(self, law, a: float, Delta: float, A_hat: float, overlaps: Overlaps) -> float:
        """``reg(S_hat) / d^2`` at the SE fixed point (d -> infinity), for the predicted training
        objective ``(sum_mu loss + reg) / d^2``; NaN when the factor has no penalty."""
        return float("nan")

    def se_overlaps_finite(self, eigenvalues, a: float, Delta: float, A_hat: float,
                           n_draws: int = 4, rng=None, return_stderr: bool = False):
        """Finite-d overlaps, averaged over ``n_draws`` GOE draws (docs/theory.md §7, finite d).

        ``R = a diag(eigenvalues) + sqrt(Delta) W`` (``W`` orthogonally invariant, so the teacher's
        basis is irrelevant), ``S = U f(L) U^T``; ``m = Tr(S S*)/d``, ``q = Tr(S^2)/d``,
        ``V = div / (d^2 A_hat)``.  ``rng``: a ``numpy.random.Generator`` or an int seed (common
        random numbers when the caller reuses a fixed seed).  With ``return_stderr=True`` also the
        standard errors of the three means over the draws (NaN for one draw).
        """
        lam = as_float_array(eigenvalues, "eigenvalues", ndim=1)
        a = check_nonnegative(a, "a")
        Delta = check_positive(Delta, "Delta")
        A_hat = check_positive(A_hat, "A_hat")
        if isinstance(n_draws, bool) or not isinstance(n_draws, numbers.Integral) or n_draws < 1:
            raise ValueError(f"n_draws must be an integer >= 1, got {n_draws!r}")
        if not isinstance(return_stderr, (bool, np.bool_)):
            raise ValueError(f"return_stderr must be True or False, got {return_stderr!r}")
        rng = check_rng(rng)
        d = lam.size
        vals = np.empty((n_draws, 3))
        for k in range(n_draws):
            R = math.sqrt(Delta) * sample_goe(d, rng)
            R[np.diag_indices(d)] += a * lam
            L, U = np.linalg.eigh(R)
            f, fp = self.spectrum(L, A_hat)
            Sdiag = (U * U) @ f  # diag of U f(L) U^T
            vals[k, 0] = float(np.dot(Sdiag, lam)) / d
            vals[k, 1] = float(np.dot(f, f)) / d
            vals[k, 2] = spectral_divergence(L, f, fp) / (d * d * A_hat)
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"the finite-d input side overflows float64 (a = {a!r}, Delta = {Delta!r}, "
                             f"A_hat = {A_hat!r}, max |eigenvalues| = {float(np.max(np.abs(lam))):.3g})")
        mean = Overlaps(*(float(v) for v in vals.mean(0)))
        if not return_stderr:
            return mean
        se = vals.std(0, ddof=1) / math.sqrt(n_draws) if n_draws > 1 else np.full(3, np.nan)
        return mean, Overlaps(*(float(v) for v in se))
