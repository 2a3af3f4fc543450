"""Bayes-optimal GAMP-RIE and its state evolution (DESIGN.md sections 6 and 7).

The loop is :func:`amp_attention.amp.gamp` (section 5) run with Bayes output functions and the
rotationally invariant (RIE) input denoiser.

Output side (section 6), per sample, in whitened coordinates (section 2, ``K = T(T+1)/2``)
-----------------------------------------------------------------------------------------
Given the cavity mean ``omega (K,)`` and variance ``V`` (``K x K``; ``V^t Gamma_mu`` in GAMP, a
scalar ``v`` in the SE), the prior of ``z`` is ``N(omega, V)`` and::

    g  = V^{-1} (E[z | y, omega, V] - omega),      dg = -dg/domega = V^{-1} - V^{-1} Cov[z | y] V^{-1}.

* Noiseless softmax (:class:`BayesSoftmaxOutput`, any ``beta > 0``, ``T >= 2``): ``y`` fixes
  ``h*`` up to the global shift ``h* + c 11^T``, i.e. ``B z*`` with ``B (K-1, K)`` an orthonormal
  basis of the complement of the flat direction ``u ~ (1/c_k)_k``.  Conditioning ``N(omega, V)``
  on ``B z = B z_y`` gives::

      g  = B^T (B V B^T)^{-1} B (z_y - omega),        dg = B^T (B V B^T)^{-1} B

  (``V = v I``: ``g = P (z_y - omega)/v``, ``dg = P/v``, ``P = B^T B = I - u u^T``).
* Linear channel (:class:`BayesLinearOutput`): ``z_y = whiten(y) = z* + sqrt(noise) xi``::

      g  = (V + noise I)^{-1} (z_y - omega),          dg = (V + noise I)^{-1}.

* Hardmax: not implemented (the posterior is a truncated Gaussian; Monte Carlo would be needed).

Input side (section 6)
----------------------
``R = S^t + A*(g)/(d A_hat)`` is, in the Bayes-optimal setting (Nishimori: ``m_hat = q_hat = A_hat``,
so ``a = 1``), ``R = S* + sqrt(Delta) W`` with ``Delta = 1/(2 A_hat)``.  :class:`RIEDenoiser`
applies ``f(x) = x - 2 Delta Re G_R(x)`` (:func:`amp_attention.spectral.rie_denoiser`) to the
eigenvalues of ``R``; its divergence uses the analytic ``f'`` (:func:`rie_derivative`).  ``R``
contains the prior mean (e.g. ``sqrt(rho) I`` for a Wishart teacher) and so does the law of
``S*``, so nothing needs centring.

State evolution (section 7)
---------------------------
With Nishimori ``m = q`` and ``V = Q* - q`` (= the mse), one step is::

    A_hat = q_hat = alpha k_eff / (Q* - q + noise)     k_eff = K - 1 (softmax), K (linear)
    Delta = 1 / (2 q_hat),   q <- Q* - mmse_den(Delta)  (:func:`amp_attention.spectral.rie_mmse`)

Initialisation (BO-AMP vs BO-SE)
--------------------------------
Both start from the uninformed state ``S^0 = 0`` (``m = q = 0``).  The Bayes variance matching it
is ``V^0 = Q* - q^0 = Q*`` (given ``omega = 0`` the posterior of ``z*`` is its prior
``N(0, Q* I)``; ``E z* = 0`` because ``h`` subtracts the trace), not the ``V^0 = 1`` that
:func:`amp.gamp` uses for ERM: :class:`BayesAttention` calls ``gamp(..., V0=Q*)``.
At t = 0 ``omega = A(S^0) - V^0 Gamma g^{-1} = 0`` does not depend on ``V^0`` (``g^{-1} = 0``),
``V^0`` enters only through ``g_out``.  (The first ``R`` does not depend on ``V^0`` either, but the
RIE's ``Delta = 1/(2 A_hat) = V^0/(2 alpha k_eff)`` does: with ``V^0 = 1`` the first denoising
step would assume the wrong noise level: at d = 200, T = 2, alpha = 0.5, Wishart rho = 0.5 the
first-iterate gap to the SE is 0.035 with ``V^0 = 1`` against 0.008 with ``V^0 = Q*``.)  The SE
history index ``t`` is the state after step ``t``, aligned with ``AMPResult.history[key][t]`` (the
iterate ``S^{t+1}``).  ``bayes_state_evolution(q0=mean(S*)^2)`` is the prior-mean start
``S^0 = mean I``, ``V^0 = Q* - mean^2``, which ``gamp`` cannot start from (no ``S0`` argument).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ._validation import as_float_array, check_nonnegative, check_positive, check_symmetric, check_T, check_tokens
from .amp import GAMPEstimator, gamp
from .se import teacher_law
from .channels import _check_targets, _check_z, _prepare_V
from .denoisers import spectral_divergence
from .model import HardmaxChannel, LinearChannel, SoftmaxChannel, row_softmax
from .spectral import RDensity, SpectralLaw, rie_mmse
from .whitening import flat_direction, n_pairs, whiten

__all__ = [
    "BayesSoftmaxOutput",
    "BayesLinearOutput",
    "bayes_output",
    "RIEDenoiser",
    "rie_derivative",
    "BayesAttention",
    "BayesSEResult",
    "bayes_state_evolution",
    "perfect_recovery_threshold",
]

_HARDMAX_MSG = (
    "the Bayes-optimal output function of the hardmax channel is not implemented: y (one-hot "
    "argmax rows) only constrains z* to a polyhedral cone, so the posterior is a truncated Gaussian "
    "(DESIGN.md section 6: Monte Carlo, optional). Use SoftmaxChannel(beta) or LinearChannel(noise)."
)


# ---------------------------------------------------------------------------------------------
# Output side
# ---------------------------------------------------------------------------------------------


def _complement_basis(T: int) -> np.ndarray:
    """Orthonormal basis ``B (K-1, K)`` of the complement of the flat direction ``u`` (rows)."""
    u = flat_direction(T)
    K = u.size
    Q, _ = np.linalg.qr(np.column_stack([u, np.eye(K)[:, : K - 1]]))
    return np.ascontiguousarray(Q[:, 1:].T)


class _BayesOutput:
    """Common parts: ``value_z`` is NaN (no objective in the Bayes loop), ``info`` is trivial."""

    def _finish(self, g, dg, jacobian, n):
        """``(g, dg or Tr dg, info)`` as ``g_out`` returns it."""
        if jacobian == "trace":
            dg = np.trace(dg, axis1=1, axis2=2)
        elif jacobian != "full":
            raise ValueError(f"jacobian must be 'full' or 'trace', got {jacobian!r}")
        return g, dg, self._info(n)

    def value_z(self, y, z):
        """NaN per sample, shape (n,): the Bayes loop has no objective (AMP records NaN)."""
        return np.full(np.shape(y)[0], np.nan)

    @staticmethod
    def _info(n):
        return {"n_iter": 0, "n_failed": 0, "converged": np.ones(n, dtype=bool)}


class BayesSoftmaxOutput(_BayesOutput):
    """Bayes output function of the noiseless softmax channel ``y_a = softmax(beta h*_a)``.

    DESIGN.md section 6.  ``beta > 0`` only enters :meth:`z_target`; the posterior does not depend
    on it.  ``T = 1`` is rejected (``y = 1`` carries no information).

    ``g_out(y, omega, V) -> (g, dg, info)``:

    * ``y`` (n, T, T) softmax rows, all entries ``>= float64 tiny`` (entries that underflowed to 0
      at large beta make ``h*`` non-identifiable from ``y``: ``ValueError``);
    * ``omega`` (n, K);
    * ``V`` a positive scalar (``v I_K``, the SE), a ``(K, K)`` matrix or an ``(n, K, K)`` stack of
      symmetric positive definite matrices (GAMP's ``V^t Gamma_mu``);
    * ``g = B^T (B V B^T)^{-1} B (z_y - omega)`` (n, K) and
      ``dg = -dg/domega = B^T (B V B^T)^{-1} B`` (n, K, K), ``B`` (K-1, K) orthonormal rows spanning
      the complement of ``u ~ (1/c_k)`` (:func:`amp_attention.whitening.flat_direction`); for
      ``V = v I`` these are ``P (z_y - omega)/v`` and ``P/v``.  ``g . u = 0``, ``dg u = 0``.
    """

    name = "bayes_softmax"

    def __init__(self, beta: float = 1.0):
        self.beta = check_positive(beta, "beta")

    def __repr__(self):
        return f"BayesSoftmaxOutput(beta={self.beta!r})"

    @staticmethod
    def basis(T: int) -> np.ndarray:
        """``B`` (K-1, K): orthonormal rows, ``B u = 0``, ``B^T B = I - u u^T``."""
        return _complement_basis(check_T(T))

    def _targets(self, y):
        y = _check_targets(y, min_T=2)
        if np.any(y < np.finfo(np.float64).tiny):
            raise ValueError(
                "y has zero (or subnormal / negative) entries: softmax probabilities that underflowed "
                "(large beta * h ranges) do not determine the row differences beta (h_ab - h_ac); the "
                "noiseless-softmax Bayes output needs y > 0 everywhere (use a smaller beta)"
            )
        return y

    def z_target(self, y) -> np.ndarray:
        """A point ``z_y`` (n, K) with ``P z_y = P z*`` for ``y = softmax(beta h*)`` row-wise.

        ``L = log y`` gives ``L_ab = beta h*_ab - lse_a``.  The row offsets are recovered from the
        symmetry of ``h*`` by least squares, ``l_a = (1/T) sum_b (L_ba - L_ab)`` (exact:
        ``l_a = lse_a - mean(lse)``), then ``h_y = sym(L + l 1^T)/beta = h* - c 11^T`` and
        ``z_y = P whiten(h_y)`` (the point of the affine set ``{z : P z = P z*}`` closest to 0).
        """
        y = self._targets(y)
        L = np.log(y)
        ell = np.mean(np.swapaxes(L, 1, 2) - L, axis=2)
        zy = whiten((L + ell[:, :, None]) / self.beta)
        u = flat_direction(y.shape[1])
        return zy - np.outer(zy @ u, u)

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """``(g (n, K), dg (n, K, K) or its trace (n,) if jacobian='trace', info)``; see the class doc."""
        zy = self.z_target(y)
        omega = _check_z(omega, "omega", y)
        n, K = omega.shape
        B = _complement_basis(y.shape[1])
        r = zy - omega
        if np.ndim(V) == 0:
            v = check_positive(float(np.asarray(V, dtype=np.float64)), "V")
            P = B.T @ B
            g = (r @ P) / v
            dg = np.empty((n, K, K))
            dg[...] = P / v
        else:
            Vs, _ = _prepare_V(V, n, K)
            M = np.einsum("ik,nkl,jl->nij", B, Vs, B)
            Minv = np.linalg.inv(M)
            Minv = 0.5 * (Minv + np.swapaxes(Minv, 1, 2))
            dg = np.einsum("ik,nij,jl->nkl", B, Minv, B)
            if dg.shape[0] != n:
                dg = np.broadcast_to(dg, (n, K, K)).copy()
            g = np.einsum("nkl,nl->nk", dg, r)
        return self._finish(g, dg, jacobian, n)


class BayesLinearOutput(_BayesOutput):
    """Bayes output function of the linear channel ``y = h* + sqrt(noise) xi`` (DESIGN.md 1, 6).

    In whitened coordinates ``z_y = whiten(y) = z* + sqrt(noise) xi``, ``xi ~ N(0, I_K)``::

        g  = (V + noise I)^{-1} (z_y - omega)   (n, K),     dg = (V + noise I)^{-1}   (n, K, K).

    ``V``: positive scalar, ``(K, K)`` or ``(n, K, K)`` symmetric positive definite.  Any ``T`` in
    1..8; ``noise = 0`` is allowed (needs ``V`` positive definite).
    """

    name = "bayes_linear"

    def __init__(self, noise: float = 0.0):
        self.noise = check_nonnegative(noise, "noise")

    def __repr__(self):
        return f"BayesLinearOutput(noise={self.noise!r})"

    def z_target(self, y) -> np.ndarray:
        """``z_y = whiten(y)`` (n, K)."""
        return whiten(_check_targets(y))

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """``(g (n, K), dg (n, K, K) or its trace (n,) if jacobian='trace', info)``; see the class doc."""
        zy = self.z_target(y)
        omega = _check_z(omega, "omega", y)
        n, K = omega.shape
        r = zy - omega
        if np.ndim(V) == 0:
            v = check_positive(float(np.asarray(V, dtype=np.float64)), "V")
            g = r / (v + self.noise)
            dg = np.empty((n, K, K))
            dg[...] = np.eye(K) / (v + self.noise)
        else:
            Vs, _ = _prepare_V(V, n, K)
            Minv = np.linalg.inv(Vs + self.noise * np.eye(K))
            Minv = 0.5 * (Minv + np.swapaxes(Minv, 1, 2))
            dg = Minv if Minv.shape[0] == n else np.broadcast_to(Minv, (n, K, K)).copy()
            g = np.einsum("nkl,nl->nk", dg, r)
        return self._finish(g, dg, jacobian, n)


def bayes_output(channel):
    """Bayes output function for a channel of :mod:`amp_attention.model`.

    ``SoftmaxChannel(beta)`` -> :class:`BayesSoftmaxOutput(beta)`, ``LinearChannel(noise)`` ->
    :class:`BayesLinearOutput(noise)`; Bayes output objects are returned unchanged;
    ``HardmaxChannel`` raises ``NotImplementedError``.
    """
    if isinstance(channel, (BayesSoftmaxOutput, BayesLinearOutput)):
        return channel
    if isinstance(channel, SoftmaxChannel):
        return BayesSoftmaxOutput(channel.beta)
    if isinstance(channel, LinearChannel):
        return BayesLinearOutput(channel.noise)
    if isinstance(channel, HardmaxChannel):
        raise NotImplementedError(_HARDMAX_MSG)
    raise ValueError(
        "channel must be SoftmaxChannel, LinearChannel (HardmaxChannel: not implemented) or a Bayes "
        f"output object, got {type(channel).__name__}"
    )


def _k_eff_and_noise(output, T: int):
    """Number of observed whitened components per sample and their noise variance."""
    K = n_pairs(T)
    if isinstance(output, BayesSoftmaxOutput):
        if T == 1:
            raise ValueError("the softmax channel needs T >= 2 tokens: with T = 1 every target is y = 1")
        return K - 1, 0.0
    return K, output.noise


# ---------------------------------------------------------------------------------------------
# Input side: the RIE denoiser
# ---------------------------------------------------------------------------------------------


def rie_derivative(x, density: RDensity) -> np.ndarray:
    """``f'(x)`` of the RIE ``f(x) = (x - 2 Delta Re G_R(x)) / a`` (DESIGN.md section 6).

    ``f'(x) = (1 - 2 Delta Re G_R'(x)) / a`` with ``G_R'`` analytic (from ``G_R(x + i0)`` =
    ``density.stieltjes(x)``):

    * Wishart(rho) law: implicit derivative of the cubic of section 7(b),
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
            s2 = a * a * law._variance + D
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


def _law_from(teacher_spectrum) -> SpectralLaw:
    """A :class:`SpectralLaw`, or a :class:`Teacher`'s exact eigenvalues as atoms."""
    return teacher_law(teacher_spectrum, "exact", name="teacher_spectrum")


class RIEDenoiser:
    """Bayes input function of GAMP-RIE: ``eta(R) = U f(L) U^T`` (DESIGN.md section 6).

    ``__call__(R (d, d) symmetric, A_hat > 0) -> (S (d, d), div)``: ``Delta = 1/(2 A_hat)``,
    ``R = U L U^T``, ``f(x) = x - 2 Delta Re G_R(x)`` with ``G_R`` the Stieltjes transform of
    ``S* + sqrt(Delta) W`` for the teacher law ``law`` (:func:`amp_attention.spectral.rie_denoiser`),
    and ``div = sum_i f'(l_i) + sum_{i<j} (f(l_i) - f(l_j))/(l_i - l_j)``
    (:func:`amp_attention.denoisers.spectral_divergence`, ``f'`` from :func:`rie_derivative`), so
    that GAMP sets ``V = div / (d^2 A_hat)`` (section 5, step 6).

    ``law``: a :class:`SpectralLaw` (or a :class:`Teacher`, whose exact eigenvalues are used).
    ``penalty(S)`` is NaN (no objective).  ``last_density`` keeps the :class:`RDensity` of the last
    call.
    """

    def __init__(self, law):
        self.law = _law_from(law)
        self.last_density = None

    def __repr__(self):
        return f"RIEDenoiser({self.law!r})"

    def density(self, A_hat: float) -> RDensity:
        """:class:`RDensity` of ``R = S* + sqrt(Delta) W``, ``Delta = 1/(2 A_hat)``."""
        A_hat = check_positive(A_hat, "A_hat")
        return RDensity(self.law, 1.0, 1.0 / (2.0 * A_hat))

    def scalar_map(self, x, A_hat: float) -> np.ndarray:
        """``f(x) = x - 2 Delta Re G_R(x)``, ``Delta = 1/(2 A_hat)``, at the points ``x``."""
        return self.density(A_hat).rie(x)

    def derivative(self, x, A_hat: float) -> np.ndarray:
        """``f'(x)`` (see :func:`rie_derivative`)."""
        return rie_derivative(x, self.density(A_hat))

    def __call__(self, R, A_hat):
        A_hat = check_positive(A_hat, "A_hat")
        L, U = np.linalg.eigh(R)
        dens = self.density(A_hat)
        self.last_density = dens
        f = dens.rie(L)
        fp = rie_derivative(L, dens)
        S = (U * f) @ U.T
        S = 0.5 * (S + S.T)
        return S, spectral_divergence(L, f, fp)

    def penalty(self, S) -> float:
        return float("nan")


# ---------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------


_BLOWUP = 2.0  # BayesAttention stops (diverged) when V exceeds this multiple of Q*


class BayesAttention(GAMPEstimator):
    """Bayes-optimal GAMP-RIE for the tied attention layer (DESIGN.md sections 6, 9).

    Parameters
    ----------
    channel : ``SoftmaxChannel(beta)`` (noiseless, T >= 2) or ``LinearChannel(noise)``, the channel
        that made ``y`` (``HardmaxChannel``: ``NotImplementedError`` at fit), or a Bayes output object.
    teacher_spectrum : :class:`SpectralLaw` of ``S*`` (prior: Haar eigenbasis, this spectrum), or a
        :class:`Teacher` (its exact finite-d eigenvalues are used as atoms).
    variance : ``'sample'`` (``V_mu = V Gamma_mu``) or ``'scalar'``; ``max_iter``, ``tol``,
        ``damping`` as in :func:`amp_attention.amp.gamp`.

    Initialisation: ``S^0 = 0``, ``V^0 = Q*`` (module docstring), matching
    :func:`bayes_state_evolution` from ``q = 0``.

    Stability: undamped BO-GAMP tracks the SE at d = 200 for alpha >= 0.3 (tests), but for small
    ``n = alpha d^2`` (e.g. d = 100, alpha in 0.1-0.2, Wishart rho = 0.5) the actual noise in ``R``
    exceeds the predicted ``Delta``, eigenvalues of ``R`` leave the predicted support, the RIE
    passes them through (``f(x) ~ x`` outside the support) and the iteration blows up after
    ~10 steps.  ``damping=0.5`` cures it there.  The fit stops with ``diverged_ = True`` as soon
    as ``V`` exceeds ``2 Q*`` (a Bayes posterior variance cannot exceed the prior's).

    Fitted attributes: ``S_`` (d, d) the estimate of the posterior mean of ``S*``, ``V_`` (its
    predicted mse ``||S_ - S*||_F^2/d``), ``n_iter_``, ``converged_``, ``diverged_``, ``history_``
    (per-iteration arrays of :class:`amp_attention.amp.AMPResult`; ``objective``/``train_loss``
    are NaN), ``result_``, ``law_``.

    ``predict(X)``: plug-in output ``softmax(beta h(S_))`` (softmax channel) or ``h(S_)`` (linear),
    shape (n, T, T) -- not the Bayes predictive average.  ``score(X, y)`` = minus the mean
    per-sample ``||y - predict(X)||_F^2``.
    """

    def __init__(self, channel, teacher_spectrum, variance="sample", max_iter=200, tol=1e-8, damping=0.0):
        self.channel = channel
        self.teacher_spectrum = teacher_spectrum
        self.variance = variance
        self.max_iter = max_iter
        self.tol = tol
        self.damping = damping

    _param_names = ("channel", "teacher_spectrum", "variance", "max_iter", "tol", "damping")

    def _validate_params(self):
        output = bayes_output(self.channel)
        law = _law_from(self.teacher_spectrum)
        self._validate_loop_params()
        return output, law

    def fit(self, X, y, S_star=None, callback=None):
        """Run BO-GAMP on ``X (n, T, d)``, ``y (n, T, T)``; ``S_star`` (optional) records m and mse."""
        output, law = self._validate_params()
        X = check_tokens(X)
        n, T, d = X.shape
        y = as_float_array(y, "y", ndim=3)
        if y.shape != (n, T, T):
            raise ValueError(f"y must have shape (n, T, T) = {(n, T, T)} to match X, got {y.shape}")
        _k_eff_and_noise(output, T)  # rejects softmax with T = 1
        output.z_target(y)  # validates y early (softmax: no zero entries)
        if S_star is not None:
            S_star = check_symmetric(S_star, "S_star", d=d)
        Q = law.Q
        blowup = []

        def guard(t, S, hist):
            V = hist["V"][-1]
            if not np.isfinite(V) or V > _BLOWUP * Q:
                blowup.append((t, V))
                return True
            return bool(callback(t, S, hist)) if callback is not None else False

        res = gamp(X, np.ascontiguousarray(y), output, RIEDenoiser(law),
                   variance=self.variance, damping=float(self.damping), max_iter=int(self.max_iter),
                   tol=float(self.tol), S_star=S_star, callback=guard, V0=Q)
        if blowup:
            t, V = blowup[0]
            res = replace(res, diverged=True, message=(
                f"iteration {t}: V = {V:.3g} > {_BLOWUP:g} Q* (a Bayes variance cannot exceed the prior "
                f"variance): BO-GAMP is unstable at this size (small n = alpha d^2); use damping ~0.5"))
        self._store(res, d)
        self.message_ = res.message
        self.law_ = law
        self.output_ = output
        return self

    def _link(self, h):
        if isinstance(self.output_, BayesSoftmaxOutput):
            return row_softmax(h, self.output_.beta)
        return h


# ---------------------------------------------------------------------------------------------
# Bayes-optimal state evolution
# ---------------------------------------------------------------------------------------------


def perfect_recovery_threshold(rho: float, T: int) -> float:
    """``alpha = (rho - rho^2/2)/(K - 1)`` (noiseless softmax, Wishart(rho <= 1); DESIGN.md 7, 8.5).

    Counting bound: ``rho d^2 - rho^2 d^2/2`` degrees of freedom of a rank-``rho d`` symmetric
    matrix against ``K - 1`` equations per sample.  Equivalently ``mmse_den(Delta) ~ (2 rho - rho^2)
    Delta`` as ``Delta -> 0``, and ``mse = 0`` is a stable fixed point of the BO-SE iff
    ``(2 rho - rho^2) / (2 alpha (K - 1)) < 1``.  For ``rho > 1`` (full rank) use ``rho = 1``.
    """
    rho = min(check_positive(rho, "rho"), 1.0)
    T = check_T(T)
    if T == 1:
        raise ValueError("the softmax channel needs T >= 2")
    return (rho - rho * rho / 2.0) / (n_pairs(T) - 1)


BAYES_SE_HISTORY_KEYS = ("m", "q", "V", "mse", "A_hat", "q_hat", "Delta", "time")


@dataclass(frozen=True, eq=False)
class BayesSEResult:
    """Bayes-optimal SE trajectory (DESIGN.md section 7).

    ``history[key][t]`` = state after step t (aligned with AMP's iterate ``S^{t+1}``): ``m = q``
    (Nishimori), ``V = mse = Q* - q``, ``A_hat = q_hat`` and ``Delta = 1/(2 q_hat)`` of step t.
    Scalars ``m, q, V, mse`` are the last values (the fixed point if ``converged`` or
    ``perfect_recovery``); ``q0, mse0`` the initial state.  ``perfect_recovery``: the mse fell
    below ``mse_floor`` (the iteration then stops: ``Delta = 0`` is outside the RIE's domain).
    ``mse_prior = Q* - mean(S*)^2`` is the ``alpha -> 0`` limit (estimate = prior mean).
    """

    m: float
    q: float
    V: float
    mse: float
    Q: float
    mse_prior: float
    q0: float
    mse0: float
    n_iter: int
    converged: bool
    perfect_recovery: bool
    message: str
    history: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


def bayes_state_evolution(alpha, T, law, channel, max_iter=1000, tol=1e-10, damping=0.0, *,
                          q0=0.0, mse_floor=1e-12, callback=None) -> BayesSEResult:
    """Bayes-optimal state evolution (DESIGN.md section 7, "Bayes-optimal SE").

    Parameters
    ----------
    alpha : ``n / d^2 > 0``.   T : tokens per sequence (1..8; softmax needs T >= 2).
    law : :class:`SpectralLaw` of ``S*`` (or a :class:`Teacher`: its exact eigenvalues).
    channel : ``SoftmaxChannel(beta)`` (noiseless; the SE does not depend on beta),
        ``LinearChannel(noise)`` or a Bayes output object; ``HardmaxChannel``: NotImplementedError.
    max_iter : maximum number of steps.   tol : stop when ``|mse_{t+1} - mse_t| < tol * mse_{t+1}``
        (relative, so a geometric decay to 0 above a perfect-recovery threshold runs on until
        ``mse_floor``; ``tol = 0``: run ``max_iter`` steps unless perfect recovery stops earlier).
    damping : ``q <- (1 - damping) q_new + damping q`` (as :func:`amp.gamp` damps ``S``).
    q0 : initial ``q = m`` (default 0: AMP's ``S^0 = 0``, ``V^0 = Q*``; ``q0 = mean(S*)^2`` is the
        prior-mean start ``S^0 = mean I``).
    mse_floor : ``mse <= mse_floor * Q*`` counts as perfect recovery and stops the iteration.
    callback : optional ``callback(t, history)``; returning True stops.

    One step, with ``k_eff = K - 1`` (softmax) or ``K`` (linear, noise s2)::

        q_hat = A_hat = alpha k_eff / (Q* - q + s2),   Delta = 1 / (2 q_hat),
        mse = mmse_den(Delta) = Delta - (4 pi^2/3) Delta^2 int rho_R^3   (rie_mmse),
        q = m = Q* - mse,   V = mse.

    The noiseless-softmax fixed point is ``mse = mmse_den(mse / (2 alpha (K - 1)))``.
    """
    alpha = check_positive(alpha, "alpha")
    T = check_T(T)
    output = bayes_output(channel)
    k_eff, noise = _k_eff_and_noise(output, T)
    law = _law_from(law)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    tol = check_nonnegative(tol, "tol")
    damping = check_nonnegative(damping, "damping")
    if damping >= 1:
        raise ValueError(f"damping must be in [0, 1), got {damping!r}")
    Q = law.Q
    q0 = check_nonnegative(q0, "q0")
    if q0 >= Q:
        raise ValueError(f"q0 must be < Q* = {Q!r}, got {q0!r}")
    mse_floor = check_nonnegative(mse_floor, "mse_floor")

    q = q0
    hist = {k: [] for k in BAYES_SE_HISTORY_KEYS}
    converged = perfect = False
    message = f"reached max_iter={max_iter}"
    n_iter = 0
    for t in range(max_iter):
        t0 = time.perf_counter()
        mse_old = Q - q
        q_hat = alpha * k_eff / (mse_old + noise)
        Delta = 1.0 / (2.0 * q_hat)
        mmse = rie_mmse(law, Delta)
        q_new = Q - mmse
        if damping:
            q_new = (1.0 - damping) * q_new + damping * q
        if not np.isfinite(q_new):
            message = f"step {t}: non-finite mse; kept the last finite state"
            break
        q = min(float(q_new), Q)
        mse = Q - q
        n_iter = t + 1
        for k, v in (("m", q), ("q", q), ("V", mse), ("mse", mse), ("A_hat", q_hat), ("q_hat", q_hat),
                     ("Delta", Delta), ("time", time.perf_counter() - t0)):
            hist[k].append(v)
        if callback is not None and callback(t, hist):
            message = f"stopped by callback at step {t}"
            break
        if mse <= mse_floor * Q:
            perfect = converged = True
            message = f"perfect recovery: mse = {mse:.3g} <= {mse_floor:g} Q* after {n_iter} steps"
            break
        if tol > 0 and abs(mse - mse_old) < tol * mse:
            converged = True
            message = f"converged after {n_iter} steps"
            break
    history = {k: np.asarray(v, dtype=float) for k, v in hist.items()}
    params = {"alpha": alpha, "T": T, "K": n_pairs(T), "k_eff": k_eff, "noise": noise,
              "channel": repr(output), "law": repr(law), "damping": damping}
    return BayesSEResult(m=q, q=q, V=Q - q, mse=Q - q, Q=Q, mse_prior=law.variance, q0=q0, mse0=Q - q0,
                         n_iter=n_iter, converged=converged, perfect_recovery=perfect, message=message,
                         history=history, params=params)
