"""scikit-learn estimators above the loops: ERM and Bayes-optimal attention (docs/theory.md §4-§6, §9).

* :class:`ERMAttention` -- ERM for a tied single-head attention layer, solved by GAMP with a loss
  (output factor) and a regulariser's prox (input factor);
* :class:`BayesAttention` -- Bayes-optimal GAMP-RIE.

Both are real scikit-learn estimators (:class:`sklearn.base.BaseEstimator`): the parameters are the
``__init__`` signature (``get_params``/``set_params``/``clone`` derive from it), validation happens
at ``fit``, and ``score`` (higher is better) makes ``GridSearchCV`` work.  Inputs: tokens
``X (n, T, d)`` and targets ``y (n, T, T)``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.base import BaseEstimator

from ._validation import check_nonnegative, check_positive, check_symmetric, check_targets, check_tokens
from .amp import AMPResult, gamp
from .bayes_outputs import bayes_output
from .denoisers import RIEDenoiser, make_denoiser
from .loop import check_callback, check_damping, check_max_iter
from .losses import make_loss
from .model import check_channel
from .operator import forward_whitened
from .se import state_evolution
from .spectral import SpectralLaw
from .whitening import unwhiten

__all__ = ["GAMPEstimator", "ERMAttention", "BayesAttention"]


def check_targets_for(y, X, loss=None) -> np.ndarray:
    """Targets ``y (n, T, T)`` matching tokens ``X (n, T, d)``, float64, C-contiguous; for
    ``loss='cross_entropy'`` the rows must be probability vectors (as :func:`~amp_attention.erm.direct_erm`
    requires)."""
    n, T, _ = X.shape
    return check_targets(y, n, T, stochastic=loss == "cross_entropy", what=f" for loss={loss!r}")


def _finite_output(out, what):
    """``out`` when finite; else a ValueError: the tokens' scale overflows the fitted model."""
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what} is not finite: X is too large for the fitted S_ (the preactivations "
                         f"x_a^T S x_b / sqrt(d) overflow float64); rescale X")
    return out


class GAMPEstimator(BaseEstimator):
    """Shared plumbing of :class:`ERMAttention` and :class:`BayesAttention`.

    Subclasses implement ``fit`` (which calls :meth:`_store`) and set ``output_`` (the fitted output
    factor, whose ``link`` maps preactivations to the model output).
    """

    def _check_loop_params(self):
        if not isinstance(self.variance, str) or self.variance not in ("sample", "scalar"):
            raise ValueError(f"variance must be 'sample' or 'scalar', got {self.variance!r}")
        check_max_iter(self.max_iter)
        check_nonnegative(self.tol, "tol")
        check_damping(self.damping)

    def _check_tokens(self, X):
        """Tokens for GAMP in the estimator's ``dtype``: None keeps a float32 array float32 (else
        float64), 'float32' / 'float64' convert (a copy when the dtype changes)."""
        dtype = getattr(self, "dtype", None)
        if dtype is None:
            return check_tokens(X, keep_float32=True)
        if dtype not in ("float32", "float64", np.float32, np.float64):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {dtype!r}")
        X = check_tokens(X, keep_float32=True)
        return np.ascontiguousarray(X, dtype=np.dtype(dtype))

    def _store(self, res: AMPResult, d: int):
        self.result_ = res
        self.S_ = res.S
        self.V_ = res.V
        self.n_iter_ = res.n_iter
        self.converged_ = res.converged
        self.diverged_ = res.diverged
        self.message_ = res.message
        self.history_ = res.history
        self.n_features_in_ = d

    def _check_fitted(self, X):
        if not hasattr(self, "S_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(X, y) first")
        X = check_tokens(X)
        if X.shape[2] != self.n_features_in_:
            raise ValueError(f"X has token dimension {X.shape[2]}, the model was fitted with {self.n_features_in_}")
        return X

    def decision_function(self, X):
        """Preactivations ``h(S_; X)``, shape (n, T, T); ValueError if they overflow."""
        X = self._check_fitted(X)
        with np.errstate(all="ignore"):
            return _finite_output(unwhiten(forward_whitened(X, self.S_), X.shape[1]), "decision_function(X)")

    def predict(self, X):
        """Model output per sample, shape (n, T, T): the output factor's link of ``h(S_; X)``."""
        h = self.decision_function(X)
        with np.errstate(all="ignore"):
            return _finite_output(self.output_.link(h), "predict(X)")

    def score(self, X, y):
        """Minus the mean per-sample test error ``||y - predict(X)||_F^2`` (higher is better)."""
        X = self._check_fitted(X)
        y = check_targets_for(y, X)
        with np.errstate(all="ignore"):
            return -float(_finite_output(np.mean(np.sum((y - self.predict(X)) ** 2, axis=(1, 2))), "score(X, y)"))


class ERMAttention(GAMPEstimator):
    """ERM for a tied single-head attention layer, solved by GAMP (docs/theory.md §4, §5, §9).

    Minimises ``sum_mu loss(y_mu, h(S; X_mu)) + reg(S)`` with ``loss`` in {'square',
    'cross_entropy'} (cross-entropy at inverse temperature ``beta``) and ``reg`` in
    {'nuclear' (``lam d Tr S``, S PSD, i.e. weight decay on ``S = W W^T`` of width ``width``),
    'frobenius' (``lam d / 2 ||S||_F^2``)}.  ``variance``, ``max_iter``, ``tol``, ``damping``
    (``'auto'``: adaptive, the default; a float; or a schedule) as in :func:`amp_attention.amp.gamp`.
    ``dtype``: None (default: float32 tokens stay float32, anything else is float64), 'float32'
    or 'float64'; float32 tokens halve the memory and run the GEMMs in float32, with every sum over
    samples and every iterate in float64 (docs/theory.md §10; the stop tolerance is at least 1e-6).
    A fit that stops at ``max_iter`` without converging warns
    (:class:`sklearn.exceptions.ConvergenceWarning`) and sets ``converged_ = False``.  GAMP starts from ``S = 0`` and is deterministic (no random
    state).

    Fitted attributes: ``S_`` (d, d), ``V_``, ``n_iter_``, ``converged_``, ``diverged_``,
    ``message_``, ``history_`` (dict of per-iteration arrays, see :class:`AMPResult`), ``result_``,
    ``output_`` (the loss object), ``denoiser_``.

    ``predict(X)`` returns the model output per sample, shape ``(n, T, T)``: the row-wise
    ``softmax(beta h)`` for cross-entropy, ``h`` itself for the square loss.  ``score(X, y)`` is
    minus the mean per-sample test error ``||y - predict(X)||_F^2`` (higher is better).
    """

    def __init__(self, loss="cross_entropy", reg="nuclear", lam=0.01, beta=1.0, width=None,
                 variance="sample", max_iter=200, tol=1e-8, damping="auto", dtype=None):
        self.loss = loss
        self.reg = reg
        self.lam = lam
        self.beta = beta
        self.width = width
        self.variance = variance
        self.max_iter = max_iter
        self.tol = tol
        self.damping = damping
        self.dtype = dtype

    def fit(self, X, y, S_star=None, callback=None, channel=None):
        """Run GAMP on ``X (n, T, d)``, ``y (n, T, T)``.

        ``S_star`` (optional) records m and mse per iteration.  With ``S_star`` and the ``channel``
        that made ``y`` (``SoftmaxChannel``/``HardmaxChannel``/``LinearChannel``), the state
        evolution's prediction is recorded next to each iterate as ``history_['se_mse']``,
        ``['se_m']``, ``['se_q']`` (same initialisation, free input side at ``S_star``'s exact
        spectrum, ``alpha = n/d^2``).
        """
        check_positive(self.beta, "beta")
        output = make_loss(self.loss, self.beta)
        denoiser = make_denoiser(self.reg, self.lam, self.width)
        self._check_loop_params()
        X = self._check_tokens(X)
        output.check_T(X.shape[1])
        y = check_targets_for(y, X, self.loss)
        if S_star is not None:
            S_star = check_symmetric(S_star, "S_star", d=X.shape[2])
        check_callback(callback)
        if channel is not None:
            check_channel(channel)
            if S_star is None:
                raise ValueError("recording the SE prediction (channel=...) needs S_star")
        res = gamp(X, y, output, denoiser, variance=self.variance, damping=self.damping,
                   max_iter=int(self.max_iter), tol=float(self.tol), S_star=S_star, callback=callback)
        self._store(res, X.shape[2])
        self.output_, self.denoiser_ = output, denoiser
        if channel is not None:
            self._record_se(X, S_star, channel)
        return self

    def _record_se(self, X, S_star, channel):
        n, T, d = X.shape
        law = SpectralLaw.atoms(np.linalg.eigvalsh(S_star))
        # the SE replays GAMP's damping schedule, so the two compare iteration by iteration
        schedule = tuple(self.history_["damping"]) or 0.0
        se = state_evolution(n / d**2, T, law, channel, self.loss, self.reg, self.lam, self.beta,
                             max_iter=max(self.n_iter_, 1), tol=0.0, damping=schedule, predictions=False)
        for key in ("mse", "m", "q"):
            self.history_[f"se_{key}"] = se.history[key][: self.n_iter_]
        self.se_result_ = se


_BLOWUP = 2.0  # BayesAttention stops (diverged) when V exceeds this multiple of Q*


class BayesAttention(GAMPEstimator):
    """Bayes-optimal GAMP-RIE for the tied attention layer (docs/theory.md §6, §9).

    Parameters
    ----------
    channel : ``SoftmaxChannel(beta)`` (noiseless, T >= 2) or ``LinearChannel(noise)``, the channel
        that made ``y`` (``HardmaxChannel``: ``NotImplementedError`` at fit), or a Bayes output object.
    teacher_spectrum : :class:`SpectralLaw` of ``S*`` (prior: Haar eigenbasis, this spectrum), or a
        :class:`Teacher` (its exact finite-d eigenvalues are used as atoms).
    variance : ``'sample'`` (``V_mu = V Gamma_mu``) or ``'scalar'``; ``max_iter``, ``tol``,
        ``damping`` as in :func:`amp_attention.amp.gamp`; ``dtype`` as in :class:`ERMAttention`.

    Initialisation: ``S^0 = 0``, ``V^0 = Q*`` (the prior variance of ``z`` given ``omega = 0``;
    docs/theory.md §6), matching :func:`bayes_state_evolution` from ``q = 0``.

    Stability: undamped BO-GAMP tracks the SE at d = 200 for alpha >= 0.3 (tests), but for small
    ``n = alpha d^2`` (e.g. d = 100, alpha in 0.1-0.2, Wishart rho = 0.5) the actual noise in ``R``
    exceeds the predicted ``Delta``, eigenvalues of ``R`` leave the predicted support, the RIE
    passes them through (``f(x) ~ x`` outside the support) and the iteration blows up after
    ~10 steps.  ``damping=0.5`` cures it there.  The fit stops with ``diverged_ = True`` as soon
    as ``V`` exceeds ``2 Q*`` (a Bayes posterior variance cannot exceed the prior's).

    Fitted attributes: ``S_`` (d, d) the estimate of the posterior mean of ``S*``, ``V_`` (its
    predicted mse ``||S_ - S*||_F^2/d``), ``n_iter_``, ``converged_``, ``diverged_``, ``message_``,
    ``history_`` (per-iteration arrays of :class:`amp_attention.amp.AMPResult`;
    ``objective``/``train_loss`` are NaN), ``result_``, ``law_``, ``output_``.

    ``predict(X)``: plug-in output ``softmax(beta h(S_))`` (softmax channel) or ``h(S_)`` (linear),
    shape (n, T, T) -- not the Bayes predictive average.  ``score(X, y)`` = minus the mean
    per-sample ``||y - predict(X)||_F^2``.
    """

    def __init__(self, channel, teacher_spectrum, variance="sample", max_iter=200, tol=1e-8, damping="auto",
                 dtype=None):
        self.channel = channel
        self.teacher_spectrum = teacher_spectrum
        self.variance = variance
        self.max_iter = max_iter
        self.tol = tol
        self.damping = damping
        self.dtype = dtype

    def fit(self, X, y, S_star=None, callback=None):
        """Run BO-GAMP on ``X (n, T, d)``, ``y (n, T, T)``; ``S_star`` (optional) records m and mse."""
        output = bayes_output(self.channel)
        denoiser = RIEDenoiser(self.teacher_spectrum, name="teacher_spectrum")
        law = denoiser.law
        self._check_loop_params()
        X = self._check_tokens(X)
        n, T, d = X.shape
        y = check_targets_for(y, X)
        output.check_T(T)
        output.z_target(y)  # validates y early (softmax: no zero entries)
        if S_star is not None:
            S_star = check_symmetric(S_star, "S_star", d=d)
        check_callback(callback)  # before it is wrapped by the blow-up guard
        Q = law.Q
        blowup = []

        def guard(t, S, hist):
            V = hist["V"][-1]
            if not np.isfinite(V) or V > _BLOWUP * Q:
                blowup.append((t, V))
                return True
            return bool(callback(t, S, hist)) if callback is not None else False

        res = gamp(X, y, output, denoiser, variance=self.variance, damping=self.damping,
                   max_iter=int(self.max_iter), tol=float(self.tol), S_star=S_star, callback=guard, V0=Q)
        if blowup:
            t, V = blowup[0]
            res = replace(res, diverged=True, message=(
                f"iteration {t}: V = {V:.3g} > {_BLOWUP:g} Q* (a Bayes variance cannot exceed the prior "
                f"variance): BO-GAMP is unstable at this size (small n = alpha d^2); use damping ~0.5"))
        self._store(res, d)
        self.law_ = law
        self.output_ = output
        return self
