"""The GAMP loop run on sampled sequences, and the scikit-learn style ERM estimator (DESIGN.md section 5).

One iteration ``t`` (state ``S^t``, scalar ``V^t``, previous ``g^{t-1}``, zeros at t = 0)::

    1. omega   = A(S^t) - V^t_mu g^{t-1}                 Onsager term, V^t_mu = V^t Gamma_mu
    2. g, dg   = g_out(y, omega, V^t_mu)                 channel prox (output side)
    3. A_hat   = (1/d^2) sum_mu Tr(Gamma_mu dg_mu)       dg = -dg/domega
    4. R       = S^t + A*(g) / (d A_hat)
    5. S^{t+1} = eta(R)                                  spectral denoiser (input side)
    6. V^{t+1} = div eta(R) / (d^2 A_hat)

from ``S^0 = 0``, ``V^0 = 1``.  ``se.py`` runs the same six steps on scalars; the two loops are
meant to be read side by side.

At a fixed point ``p = A(S)`` and ``A*(grad l(A S)) + d reg(S) = 0``: the fixed point is the ERM
minimiser of section 4 whatever the variances, which is what tests/test_fixed_point.py checks.

How the steps are computed (the equations are unchanged; tests/test_amp.py compares the iterates
with a plain transcription that materialises the sensing matrices):

- steps 2-3: ``Gamma_mu`` is validated and Cholesky-factored once per run
  (:class:`~amp_attention.channels.GramVariance`); :func:`~amp_attention.channels.gram_g_out`
  returns ``g`` and ``Tr(Gamma_mu dg_mu)`` (the cross-entropy kernel never forms the
  ``(n, K, K)`` Jacobian), warm-started at the previous prox;
- step 4: the adjoint by symmetric rank-k updates (``operator._backproject``);
- step 5 -> next step 1: a nuclear denoiser also returns ``S^{t+1} = F F^T`` with ``F (d, r)``,
  and the forward map is applied through F (``2 n T d r`` flops instead of ``2 n T d^2``) when
  ``r < d`` and no damping mixes iterates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ._validation import as_float_array, check_nonnegative, check_positive, check_symmetric, check_tokens
from .channels import CrossEntropyLoss, GramVariance, SquareLoss, gram_g_out
from .denoisers import FrobeniusDenoiser, NuclearDenoiser
from .model import row_softmax
from .operator import _adjoint_whitened, _forward_whitened, _forward_whitened_factored, sample_gram
from .whitening import n_pairs, unwhiten

__all__ = ["AMPResult", "gamp", "GAMPEstimator", "ERMAttention", "make_loss", "make_denoiser"]

HISTORY_KEYS = (
    "m", "q", "mse", "V", "A_hat", "objective", "train_loss", "step", "time", "prox_iters", "prox_failed",
)


@dataclass(frozen=True, eq=False)
class AMPResult:
    """Outcome of :func:`gamp`.

    ``history[key][t]`` describes the iterate ``S^{t+1}`` produced by iteration ``t``
    (``m = Tr(S S*)/d``, ``q = Tr(S^2)/d``, ``mse = ||S - S*||_F^2/d`` when ``S_star`` is given,
    else NaN; ``V = V^{t+1}``; ``A_hat`` of iteration t; ``objective`` = ERM objective of
    section 4 at ``S^{t+1}``; ``train_loss`` = its mean per-sample loss; ``step`` =
    ``||S^{t+1} - S^t||_F / max(||S^{t+1}||_F, 1e-300)``; ``time`` = seconds for the iteration;
    ``prox_iters`` = most Newton steps any sample needed; ``prox_failed`` = samples whose prox did
    not reach its tolerance).
    """

    S: np.ndarray
    V: float
    n_iter: int
    converged: bool
    diverged: bool
    message: str
    history: dict = field(default_factory=dict)


def make_loss(loss: str, beta: float = 1.0):
    if loss == "square":
        return SquareLoss()
    if loss == "cross_entropy":
        return CrossEntropyLoss(check_positive(beta, "beta"))
    raise ValueError(f"loss must be 'square' or 'cross_entropy', got {loss!r}")


def make_denoiser(reg: str, lam: float, width: int | None = None):
    if reg == "nuclear":
        return NuclearDenoiser(check_nonnegative(lam, "lam"), width)
    if reg == "frobenius":
        if width is not None:
            raise ValueError("width applies to reg='nuclear' only")
        return FrobeniusDenoiser(check_nonnegative(lam, "lam"))
    raise ValueError(f"reg must be 'nuclear' or 'frobenius', got {reg!r}")


def gamp(
    X,
    y,
    loss,
    denoiser,
    *,
    variance: str = "sample",
    damping: float = 0.0,
    max_iter: int = 200,
    tol: float = 1e-8,
    S_star=None,
    callback=None,
    V0: float = 1.0,
) -> AMPResult:
    """Run ERM-GAMP (section 5) on tokens ``X (n, T, d)`` and targets ``y (n, T, T)``.

    Parameters
    ----------
    loss : a loss object from :mod:`amp_attention.channels` (``g_out``, ``value_z``).
    denoiser : a denoiser from :mod:`amp_attention.denoisers` (``__call__(R, A_hat) -> (S, div)``).
    variance : ``'sample'`` (``V_mu = V Gamma_mu``, converges undamped at finite d in most cases) or ``'scalar'``
        (``V_mu = V I_K``; usually needs damping at d <= 80). Undamped sample variances can still
        cycle at small d near ``n K ~ d^2/2``: use damping ~0.5 there.
    damping : ``0 <= damping < 1``; ``S <- (1 - damping) S_new + damping S_old``, same for V.
    tol : stop when the relative step ``||S^{t+1} - S^t||_F / ||S^{t+1}||_F < tol``; ``tol = 0``
        runs exactly ``max_iter`` iterations.
    S_star : optional teacher matrix, to record ``m`` and ``mse`` per iteration.
    callback : optional ``callback(t, S, history)`` called after every iteration; returning True stops.
    V0 : initial variance ``V^0`` (1 for ERM, matching the SE's ``V = 1``; the Bayes loop starts
        from the prior variance ``Q*``).

    Non-finite iterates stop the loop with ``diverged=True`` and the last finite state kept.
    """
    n, T, d = X.shape
    K = n_pairs(T)
    if variance == "sample":
        gram = GramVariance(sample_gram(X))  # Gamma_mu validated and Cholesky-factored once
    elif variance == "scalar":
        gram = GramVariance(np.eye(K))
    else:
        raise ValueError(f"variance must be 'sample' or 'scalar', got {variance!r}")
    Gamma = gram.gamma if not gram.shared else gram.gamma[0]
    theta = 1.0 - damping
    # a nuclear denoiser also returns S^{t+1} = F F^T; the next forward then costs 2 n T d r
    # flops instead of 2 n T d^2 (r = rank of S, often well below d)
    factored = getattr(denoiser, "factored", None) if theta == 1.0 else None

    S = np.zeros((d, d))
    V = float(V0)
    g_prev = np.zeros((n, K))
    p_prev = None
    hist = {k: [] for k in HISTORY_KEYS}
    converged = diverged = False
    message = f"reached max_iter={max_iter}"
    work = np.empty(X.shape)  # one n T d buffer for every GEMM intermediate of the run
    z = _forward_whitened(X, S, work)
    n_iter = 0

    def record_state(S_t, z_t):
        obj_loss = float(np.sum(loss.value_z(y, z_t)))
        hist["objective"].append(obj_loss + denoiser.penalty(S_t))
        hist["train_loss"].append(obj_loss / n)
        hist["q"].append(float(np.sum(S_t * S_t)) / d)
        if S_star is not None:
            hist["m"].append(float(np.sum(S_t * S_star)) / d)
            hist["mse"].append(float(np.sum((S_t - S_star) ** 2)) / d)
        else:
            hist["m"].append(np.nan)
            hist["mse"].append(np.nan)

    for t in range(max_iter):
        t0 = time.perf_counter()
        Gg = g_prev @ Gamma if gram.shared else np.einsum("nkl,nl->nk", Gamma, g_prev)
        omega = z - V * Gg                                                     # step 1
        g, a_mu, info = gram_g_out(loss, y, omega, V, gram, p0=p_prev)         # step 2
        p_prev = info.get("p")  # warm start of the next prox (Newton for cross-entropy)
        A_hat = float(np.sum(a_mu)) / d**2                                     # step 3
        if not np.isfinite(A_hat) or A_hat <= 0:
            diverged, message = True, f"iteration {t}: A_hat = {A_hat} (not finite and > 0)"
            break
        R = S + _adjoint_whitened(X, g, work) / (d * A_hat)                    # step 4
        F = None
        if factored is not None:
            S_new, div, F = factored(R, A_hat)                                 # step 5
        else:
            S_new, div = denoiser(R, A_hat)                                    # step 5
        V_new = div / (d**2 * A_hat)                                           # step 6
        if theta != 1.0:
            S_new = theta * S_new + (1.0 - theta) * S
            V_new = theta * V_new + (1.0 - theta) * V
        if not (np.all(np.isfinite(S_new)) and np.isfinite(V_new)):
            diverged, message = True, f"iteration {t}: non-finite iterate; kept the last finite one"
            break
        norm = max(float(np.linalg.norm(S_new)), 1e-300)
        step = float(np.linalg.norm(S_new - S)) / norm
        S, V, g_prev = S_new, V_new, g
        if F is not None and F.shape[1] < d:
            z = _forward_whitened_factored(X, F, np.ones(F.shape[1]), work)
        else:
            z = _forward_whitened(X, S, work)
        n_iter = t + 1
        record_state(S, z)
        hist["V"].append(V)
        hist["A_hat"].append(A_hat)
        hist["step"].append(step)
        hist["prox_iters"].append(int(info.get("n_iter", 0)))
        hist["prox_failed"].append(int(info.get("n_failed", 0)))
        hist["time"].append(time.perf_counter() - t0)
        if callback is not None and callback(t, S, hist):
            message = f"stopped by callback at iteration {t}"
            break
        if tol > 0 and step < tol:
            converged, message = True, f"converged: step {step:.2e} < tol {tol:g} after {n_iter} iterations"
            break
    history = {k: np.asarray(v, dtype=float) for k, v in hist.items()}
    return AMPResult(S=S, V=V, n_iter=n_iter, converged=converged, diverged=diverged,
                     message=message, history=history)


def _check_targets(y, X) -> np.ndarray:
    y = as_float_array(y, "y", ndim=3)
    n, T, _ = X.shape
    if y.shape != (n, T, T):
        raise ValueError(f"y must have shape (n, T, T) = {(n, T, T)} to match X, got {y.shape}")
    return np.ascontiguousarray(y)


class GAMPEstimator:
    """Shared scikit-learn style plumbing of :class:`ERMAttention` and ``BayesAttention``.

    Subclasses set ``_param_names`` and implement ``fit`` (which calls :meth:`_store`) and
    ``_link(h)`` (the map from preactivations to the model output).
    """

    _param_names: tuple = ()

    def get_params(self, deep=True):
        return {k: getattr(self, k) for k in self._param_names}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self._param_names:
                raise ValueError(f"unknown parameter {k!r}")
            setattr(self, k, v)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _validate_loop_params(self):
        if self.variance not in ("sample", "scalar"):
            raise ValueError(f"variance must be 'sample' or 'scalar', got {self.variance!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        check_nonnegative(self.tol, "tol")
        d = check_nonnegative(self.damping, "damping")
        if d >= 1:
            raise ValueError(f"damping must be in [0, 1), got {self.damping!r}")

    def _store(self, res: AMPResult, d: int):
        self.result_ = res
        self.S_ = res.S
        self.V_ = res.V
        self.n_iter_ = res.n_iter
        self.converged_ = res.converged
        self.diverged_ = res.diverged
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
        """Preactivations ``h(S_; X)``, shape (n, T, T)."""
        X = self._check_fitted(X)
        return unwhiten(_forward_whitened(X, self.S_), X.shape[1])

    def predict(self, X):
        """Model output per sample, shape (n, T, T): ``_link(h(S_; X))``."""
        return self._link(self.decision_function(X))

    def score(self, X, y):
        """Minus the mean per-sample test error ``||y - predict(X)||_F^2`` (higher is better)."""
        X = self._check_fitted(X)
        y = _check_targets(y, X)
        return -float(np.mean(np.sum((y - self.predict(X)) ** 2, axis=(1, 2))))


class ERMAttention(GAMPEstimator):
    """ERM for a tied single-head attention layer, solved by GAMP (DESIGN.md sections 4, 5, 9).

    Minimises ``sum_mu loss(y_mu, h(S; X_mu)) + reg(S)`` with ``loss`` in {'square',
    'cross_entropy'} (cross-entropy at inverse temperature ``beta``) and ``reg`` in
    {'nuclear' (``lam d Tr S``, S PSD, i.e. weight decay on ``S = W W^T`` of width ``width``),
    'frobenius' (``lam d / 2 ||S||_F^2``)}.

    Fitted attributes: ``S_`` (d, d), ``n_iter_``, ``converged_``, ``history_`` (dict of
    per-iteration arrays, see :class:`AMPResult`), ``result_``.

    ``predict(X)`` returns the model output per sample, shape ``(n, T, T)``: the row-wise
    ``softmax(beta h)`` for cross-entropy, ``h`` itself for the square loss.  ``score(X, y)`` is
    minus the mean per-sample test error ``||y - predict(X)||_F^2`` (higher is better).
    """

    def __init__(self, loss="cross_entropy", reg="nuclear", lam=0.01, beta=1.0, width=None,
                 variance="sample", max_iter=200, tol=1e-8, damping=0.0, random_state=None):
        self.loss = loss
        self.reg = reg
        self.lam = lam
        self.beta = beta
        self.width = width
        self.variance = variance
        self.max_iter = max_iter
        self.tol = tol
        self.damping = damping
        self.random_state = random_state

    _param_names = ("loss", "reg", "lam", "beta", "width", "variance", "max_iter", "tol", "damping",
                    "random_state")

    def _validate_params(self):
        loss = make_loss(self.loss, self.beta)
        denoiser = make_denoiser(self.reg, self.lam, self.width)
        self._validate_loop_params()
        return loss, denoiser

    def fit(self, X, y, S_star=None, callback=None, channel=None):
        """Run GAMP on ``X (n, T, d)``, ``y (n, T, T)``.

        ``S_star`` (optional) records m and mse per iteration.  With ``S_star`` and the ``channel``
        that made ``y`` (``SoftmaxChannel``/``HardmaxChannel``/``LinearChannel``), the state
        evolution's prediction is recorded next to each iterate as ``history_['se_mse']``,
        ``['se_m']``, ``['se_q']`` (same initialisation, free input side at ``S_star``'s exact
        spectrum, ``alpha = n/d^2``).
        """
        loss, denoiser = self._validate_params()
        X = check_tokens(X)
        y = _check_targets(y, X)
        if self.loss == "cross_entropy" and X.shape[1] == 1:
            raise ValueError("loss='cross_entropy' needs T >= 2: with T = 1 the softmax target is y = 1")
        if S_star is not None:
            S_star = check_symmetric(S_star, "S_star", d=X.shape[2])
        res = gamp(X, y, loss, denoiser, variance=self.variance, damping=self.damping,
                   max_iter=int(self.max_iter), tol=float(self.tol), S_star=S_star, callback=callback)
        self._store(res, X.shape[2])
        if channel is not None:
            if S_star is None:
                raise ValueError("recording the SE prediction (channel=...) needs S_star")
            self._record_se(X, S_star, channel)
        return self

    def _record_se(self, X, S_star, channel):
        from .se import state_evolution
        from .spectral import SpectralLaw

        n, T, d = X.shape
        law = SpectralLaw.atoms(np.linalg.eigvalsh(S_star))
        se = state_evolution(n / d**2, T, law, channel, self.loss, self.reg, self.lam, self.beta,
                             max_iter=max(self.n_iter_, 1), tol=0.0, damping=float(self.damping),
                             predictions=False)
        for key in ("mse", "m", "q"):
            self.history_[f"se_{key}"] = se.history[key][: self.n_iter_]
        self.se_result_ = se

    def _link(self, h):
        if self.loss == "cross_entropy":
            return row_softmax(h, float(self.beta))
        return h
