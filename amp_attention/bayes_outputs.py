"""Bayes-optimal output factors: posterior-mean ``g_out`` of the model's channels (docs/theory.md §6).

Given the cavity mean ``omega (K,)`` and variance ``V`` (``K x K``; ``V^t Gamma_mu`` in GAMP, a
scalar ``v`` in the SE), the prior of ``z`` is ``N(omega, V)`` and::

    g  = V^{-1} (E[z | y, omega, V] - omega),      dg = -dg/domega = V^{-1} - V^{-1} Cov[z | y] V^{-1}.

* Softmax (:class:`BayesSoftmaxOutput`, any ``beta > 0``, ``T >= 2``, ``noise >= 0``): the
  row softmax of the symmetric ``h~ = h* + sqrt(noise) xi`` fixes ``h~`` up to the global shift
  ``h~ + c 11^T`` (the row offsets are pinned by symmetry), i.e. it observes
  ``B z~ = B z* + sqrt(noise) B w`` with ``B (K-1, K)`` an orthonormal basis of the complement of
  the flat direction ``u ~ (1/c_k)_k`` and ``w = whiten(xi) ~ N(0, I_K)``, so ``B w ~ N(0, I_{K-1})``:
  a linear Gaussian observation of ``K - 1`` components.  Conditioning ``N(omega, V)`` on it::

      g  = B^T (B V B^T + noise I)^{-1} B (z_y - omega),        dg = B^T (B V B^T + noise I)^{-1} B

  (``V = v I``: ``g = P (z_y - omega)/(v + noise)``, ``dg = P/(v + noise)``, ``P = B^T B = I - u u^T``).
  The posterior is Gaussian for every noise level; ``noise = 0`` is the noiseless channel.
* Linear channel (:class:`BayesLinearOutput`): ``z_y = whiten(y) = z* + sqrt(noise) xi``::

      g  = (V + noise I)^{-1} (z_y - omega),          dg = (V + noise I)^{-1}.

* Hardmax: not implemented (the posterior is a truncated Gaussian; Monte Carlo would be needed).

SE conjugates (closed form, Nishimori line ``m = q``, ``V = Q* - q``): with ``k_eff`` observed
whitened components per sample (``K - 1`` softmax, ``K`` linear) of noise ``s2`` (the channel's
``noise``),
``A_hat = m_hat = q_hat = alpha k_eff / (Q* - q + s2)``.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._validation import check_nonnegative, check_positive, check_real, check_T
from .factors import Conjugates, OutputFactor
from .losses.base import check_jacobian, check_targets, check_z
from .model import HardmaxChannel, LinearChannel, SoftmaxChannel, row_softmax
from .variance import prepare_variance
from .whitening import flat_direction, n_pairs, whiten

__all__ = ["BayesSoftmaxOutput", "BayesLinearOutput", "bayes_output"]

_HARDMAX_MSG = (
    "the Bayes-optimal output function of the hardmax channel is not implemented: y (one-hot "
    "argmax rows) only constrains z* to a polyhedral cone, so the posterior is a truncated Gaussian "
    "(docs/theory.md §6: Monte Carlo, optional). Use SoftmaxChannel(beta) or LinearChannel(noise)."
)


def _is_scalar(V) -> bool:
    return isinstance(V, (numbers.Number, np.generic)) or (isinstance(V, np.ndarray) and V.ndim == 0)


def _scalar_variance(V) -> float:
    """A scalar variance ``V`` (a number or a 0-d array) as a finite float > 0, else ``ValueError``."""
    if isinstance(V, np.ndarray):
        V = V.item() if V.dtype.kind in "iuf" else V
    return check_positive(V, "V")


def _complement_basis(T: int) -> np.ndarray:
    """Orthonormal basis ``B (K-1, K)`` of the complement of the flat direction ``u`` (rows)."""
    u = flat_direction(T)
    K = u.size
    Q, _ = np.linalg.qr(np.column_stack([u, np.eye(K)[:, : K - 1]]))
    return np.ascontiguousarray(Q[:, 1:].T)


class _BayesOutput(OutputFactor):
    """Common parts: ``value_z`` is NaN (no objective in the Bayes loop), ``info`` is trivial; the
    closed-form SE conjugates."""

    def _finish(self, g, dg, jacobian, n):
        """``(g, dg or Tr dg, info)`` as ``g_out`` returns it."""
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(dg))):
            raise ValueError(f"the Bayes output g_out of {self!r} overflows float64: y, omega too large "
                             "or V too small")
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

    def observed_components(self, T: int):  # pragma: no cover - abstract
        """``(k_eff, noise)``: whitened components per sample that ``y`` observes, their noise variance."""
        raise NotImplementedError

    def se_conjugates(self, sample, m, q, V) -> Conjugates:
        """Nishimori closed form ``A_hat = m_hat = q_hat = alpha k_eff / (Q* - q + noise)``."""
        k_eff, noise = self.observed_components(sample.T)
        for name, val in (("m", m), ("q", q), ("V", V)):
            check_real(val, name)
        if not q < sample.Q + noise:
            raise ValueError(f"q must be < Q* + noise = {sample.Q + noise!r} (the Nishimori line), got {q!r}")
        q_hat = sample.alpha * k_eff / (sample.Q - q + noise)
        if not np.isfinite(q_hat):
            raise ValueError(f"q = {q!r} is too close to Q* + noise = {sample.Q + noise!r}: q_hat overflows")
        return Conjugates(q_hat, q_hat, q_hat, {"A_hat": 0.0, "m_hat": 0.0, "q_hat": 0.0})


class BayesSoftmaxOutput(_BayesOutput):
    """Bayes output function of the softmax channel ``y_a = softmax(beta (h*_a + sqrt(noise) xi_a))``.

    docs/theory.md §6.  ``beta > 0`` only enters :meth:`z_target`; the posterior does not depend
    on it.  ``noise >= 0`` (default 0: noiseless) is the whitened variance of the symmetric
    noise ``xi`` of :class:`~amp_attention.model.SoftmaxChannel`.  ``T = 1`` is rejected (``y = 1``
    carries no information).

    ``g_out(y, omega, V) -> (g, dg, info)``:

    * ``y`` (n, T, T) softmax rows, all entries ``>= float64 tiny`` (entries that underflowed to 0
      at large beta make ``h*`` non-identifiable from ``y``: ``ValueError``);
    * ``omega`` (n, K);
    * ``V`` a positive scalar (``v I_K``, the SE), a ``(K, K)`` matrix or an ``(n, K, K)`` stack of
      symmetric positive definite matrices (GAMP's ``V^t Gamma_mu``);
    * ``g = B^T (B V B^T + noise I)^{-1} B (z_y - omega)`` (n, K) and
      ``dg = -dg/domega = B^T (B V B^T + noise I)^{-1} B`` (n, K, K), ``B`` (K-1, K) orthonormal rows
      spanning the complement of ``u ~ (1/c_k)`` (:func:`amp_attention.whitening.flat_direction`);
      for ``V = v I`` these are ``P (z_y - omega)/(v + noise)`` and ``P/(v + noise)``.
      ``g . u = 0``, ``dg u = 0``.
    """

    name = "bayes_softmax"
    flat_invariant = True
    smooth_g_out = True  # affine in omega

    def __init__(self, beta: float = 1.0, noise: float = 0.0):
        self.beta = check_positive(beta, "beta")
        self.noise = check_nonnegative(noise, "noise")

    def __repr__(self):
        extra = f", noise={self.noise!r}" if self.noise else ""
        return f"BayesSoftmaxOutput(beta={self.beta!r}{extra})"

    @staticmethod
    def basis(T: int) -> np.ndarray:
        """``B`` (K-1, K): orthonormal rows, ``B u = 0``, ``B^T B = I - u u^T``."""
        return _complement_basis(check_T(T))

    def check_T(self, T: int) -> None:
        if T == 1:
            raise ValueError("the softmax channel needs T >= 2 tokens: with T = 1 every target is y = 1")

    def observed_components(self, T: int):
        self.check_T(T)
        return n_pairs(T) - 1, self.noise

    def channel(self) -> SoftmaxChannel:
        """The model channel whose Bayes output this is."""
        return SoftmaxChannel(self.beta, noise=self.noise)

    def link(self, h):
        """Plug-in model output ``softmax(beta h)`` row-wise."""
        return row_softmax(h, self.beta)

    def _targets(self, y):
        y = check_targets(y, min_T=2)
        if np.any(y < np.finfo(np.float64).tiny):
            raise ValueError(
                "y has zero (or subnormal / negative) entries: softmax probabilities that underflowed "
                "(large beta * h ranges) do not determine the row differences beta (h_ab - h_ac); the "
                "noiseless-softmax Bayes output needs y > 0 everywhere (use a smaller beta)"
            )
        return y

    def z_target(self, y) -> np.ndarray:
        """A point ``z_y`` (n, K) with ``P z_y = P z~`` for ``y = softmax(beta h~)`` row-wise
        (``h~ = h* + sqrt(noise) xi``; below, ``h*`` stands for ``h~``).

        ``L = log y`` gives ``L_ab = beta h*_ab - lse_a``.  The row offsets are recovered from the
        symmetry of ``h*`` by least squares, ``l_a = (1/T) sum_b (L_ba - L_ab)`` (exact:
        ``l_a = lse_a - mean(lse)``), then ``h_y = sym(L + l 1^T)/beta = h* - c 11^T`` and
        ``z_y = P whiten(h_y)`` (the point of the affine set ``{z : P z = P z*}`` closest to 0).
        """
        y = self._targets(y)
        L = np.log(y)
        ell = np.mean(np.swapaxes(L, 1, 2) - L, axis=2)
        with np.errstate(over="ignore", invalid="ignore"):
            zy = whiten((L + ell[:, :, None]) / self.beta)
            u = flat_direction(y.shape[1])
            zy = zy - np.outer(zy @ u, u)
        if not np.all(np.isfinite(zy)):
            raise ValueError(f"beta = {self.beta!r} is too small for these y: the preactivations "
                             "log(y) / beta overflow float64")
        return zy

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """``(g (n, K), dg (n, K, K) or its trace (n,) if jacobian='trace', info)``; see the class doc."""
        check_jacobian(jacobian)
        zy = self.z_target(y)
        omega = check_z(omega, "omega", y)
        n, K = omega.shape
        B = _complement_basis(y.shape[1])
        r = zy - omega
        if _is_scalar(V):
            v = _scalar_variance(V) + self.noise
            P = B.T @ B
            with np.errstate(over="ignore", invalid="ignore"):
                g = (r @ P) / v
            dg = np.empty((n, K, K))
            dg[...] = P / v
        else:
            Vs, _ = prepare_variance(V, n, K)
            M = np.einsum("ik,nkl,jl->nij", B, Vs, B) + self.noise * np.eye(K - 1)
            Minv = np.linalg.inv(M)
            Minv = 0.5 * (Minv + np.swapaxes(Minv, 1, 2))
            dg = np.einsum("ik,nij,jl->nkl", B, Minv, B)
            if dg.shape[0] != n:
                dg = np.broadcast_to(dg, (n, K, K)).copy()
            g = np.einsum("nkl,nl->nk", dg, r)
        return self._finish(g, dg, jacobian, n)


class BayesLinearOutput(_BayesOutput):
    """Bayes output function of the linear channel ``y = h* + sqrt(noise) xi`` (docs/theory.md §1, §6).

    In whitened coordinates ``z_y = whiten(y) = z* + sqrt(noise) xi``, ``xi ~ N(0, I_K)``::

        g  = (V + noise I)^{-1} (z_y - omega)   (n, K),     dg = (V + noise I)^{-1}   (n, K, K).

    ``V``: positive scalar, ``(K, K)`` or ``(n, K, K)`` symmetric positive definite.  Any ``T`` in
    1..8; ``noise = 0`` is allowed (needs ``V`` positive definite).
    """

    name = "bayes_linear"
    smooth_g_out = True  # affine in omega

    def __init__(self, noise: float = 0.0):
        self.noise = check_nonnegative(noise, "noise")

    def __repr__(self):
        return f"BayesLinearOutput(noise={self.noise!r})"

    def observed_components(self, T: int):
        return n_pairs(T), self.noise

    def channel(self) -> LinearChannel:
        """The model channel whose Bayes output this is."""
        return LinearChannel(self.noise)

    def link(self, h):
        """Plug-in model output ``h``."""
        return h

    def z_target(self, y) -> np.ndarray:
        """``z_y = whiten(y)`` (n, K)."""
        return whiten(check_targets(y))

    def g_out(self, y, omega, V, p0=None, jacobian="full"):
        """``(g (n, K), dg (n, K, K) or its trace (n,) if jacobian='trace', info)``; see the class doc."""
        check_jacobian(jacobian)
        zy = self.z_target(y)
        omega = check_z(omega, "omega", y)
        n, K = omega.shape
        r = zy - omega
        if _is_scalar(V):
            v = _scalar_variance(V)
            with np.errstate(over="ignore", invalid="ignore"):
                g = r / (v + self.noise)
            dg = np.empty((n, K, K))
            dg[...] = np.eye(K) / (v + self.noise)
        else:
            Vs, _ = prepare_variance(V, n, K)
            Minv = np.linalg.inv(Vs + self.noise * np.eye(K))
            Minv = 0.5 * (Minv + np.swapaxes(Minv, 1, 2))
            dg = Minv if Minv.shape[0] == n else np.broadcast_to(Minv, (n, K, K)).copy()
            g = np.einsum("nkl,nl->nk", dg, r)
        return self._finish(g, dg, jacobian, n)


def bayes_output(channel):
    """Bayes output factor for a channel of :mod:`amp_attention.model` (``channel`` validated).

    ``SoftmaxChannel(beta, noise)`` -> :class:`BayesSoftmaxOutput(beta, noise)`, ``LinearChannel(noise)`` ->
    :class:`BayesLinearOutput(noise)`; Bayes output objects are returned unchanged;
    ``HardmaxChannel`` raises ``NotImplementedError``.
    """
    if isinstance(channel, (BayesSoftmaxOutput, BayesLinearOutput)):
        return channel
    if isinstance(channel, SoftmaxChannel):
        return BayesSoftmaxOutput(channel.beta, channel.noise)
    if isinstance(channel, LinearChannel):
        return BayesLinearOutput(channel.noise)
    if isinstance(channel, HardmaxChannel):
        raise NotImplementedError(_HARDMAX_MSG)
    raise ValueError(
        "channel must be SoftmaxChannel, LinearChannel (HardmaxChannel: not implemented) or a Bayes "
        f"output object, got {type(channel).__name__}"
    )
