"""The GAMP loop run on sampled sequences (docs/theory.md §5; Bayes-optimal factors: §6).

One iteration ``t`` (state ``S^t``, scalar ``V^t``, previous ``g^{t-1}``, zeros at t = 0)::

    1. omega   = A(S^t) - V^t_mu g^{t-1}                 Onsager term, V^t_mu = V^t Gamma_mu
    2. g, dg   = g_out(y, omega, V^t_mu)                 output factor (loss prox or Bayes output)
    3. A_hat   = (1/d^2) sum_mu Tr(Gamma_mu dg_mu)       dg = -dg/domega
    4. R       = S^t + A*(g) / (d A_hat)
    5. S^{t+1} = eta(R)                                  input factor (spectral denoiser)
    6. V^{t+1} = div eta(R) / (d^2 A_hat)

from ``S^0 = 0``, ``V^0 = 1`` (Bayes: ``V^0 = Q*``).  :mod:`amp_attention.se` runs the same six
steps on scalars with the same factors (:mod:`amp_attention.factors`); the two loops are meant to
be read side by side, and both run on the scaffold of :mod:`amp_attention.loop` (history, damping,
stop rule, callback, divergence flag).

At a fixed point ``p = A(S)`` and ``A*(grad l(A S)) + d reg'(S) = 0``: the fixed point is the ERM
minimiser of §4 whatever the variances, which is what tests/test_fixed_point.py checks.

How the steps are computed (the equations are unchanged; tests/test_amp.py compares the iterates
with a plain transcription that materialises the sensing matrices, tests/naive.py):

- the sensing operator (:class:`~amp_attention.operator.SensingOperator`) is built once from X; it
  works one block of samples at a time, with the GEMMs inside Numba threads, so no ``n T d``
  intermediate exists and the whole loop runs with BLAS limited to one thread
  (:mod:`amp_attention.threads`); float32 tokens give float32 GEMMs and float64 everything else;
- steps 2-3: ``Gamma_mu`` is validated and Cholesky-factored once per run
  (:class:`~amp_attention.variance.GramVariance`); the output factor's ``g_out_gram`` returns ``g``
  and ``Tr(Gamma_mu dg_mu)`` (the cross-entropy kernel never forms the ``(n, K, K)`` Jacobian),
  warm-started at the previous prox;
- step 4: the adjoint by symmetric rank-k updates (docs/theory.md §3);
- step 5 -> next step 1: a nonnegative denoiser (nuclear) also returns ``S^{t+1} = F F^T`` with
  ``F (d, r)``, and the forward map is applied through F (``2 n T d r`` flops instead of
  ``2 n T d^2``) when ``r < d`` and no damping mixes iterates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ._validation import check_nonnegative, check_symmetric, check_targets
from .factors import InputFactor, OutputFactor
from .losses import gram_g_out
from .loop import Loop
from .operator import SensingOperator
from .threads import single_threaded_blas
from .variance import GramVariance, sample_variance

__all__ = ["AMPResult", "gamp", "HISTORY_KEYS", "FLOAT32_TOL"]

#: the smallest stop tolerance used with float32 tokens (their rounding floor of the relative step
#: is ~1e-7, docs/theory.md §10)
FLOAT32_TOL = 1e-6

HISTORY_KEYS = (
    "m", "q", "mse", "V", "A_hat", "objective", "train_objective", "train_loss", "step", "time",
    "prox_iters", "prox_failed",
)


@dataclass(frozen=True, eq=False)
class AMPResult:
    """Outcome of :func:`gamp`.

    ``history[key][t]`` describes the iterate ``S^{t+1}`` produced by iteration ``t``
    (``m = Tr(S S*)/d``, ``q = Tr(S^2)/d``, ``mse = ||S - S*||_F^2/d`` when ``S_star`` is given,
    else NaN; ``V = V^{t+1}``; ``A_hat`` of iteration t; ``objective`` = ERM objective of
    §4 at ``S^{t+1}``; ``train_objective`` = objective / d^2 (the SE's prediction of it is
    ``SEResult.train_objective``); ``train_loss`` = its mean per-sample loss; ``step`` =
    ``||S^{t+1} - S^t||_F / max(||S^{t+1}||_F, 1e-300)``; ``time`` = seconds for the iteration;
    ``prox_iters`` = most Newton steps any sample needed; ``prox_failed`` = samples whose prox did
    not reach its tolerance; ``damping`` = the damping used at iteration t).
    """

    S: np.ndarray
    V: float
    n_iter: int
    converged: bool
    diverged: bool
    message: str
    history: dict = field(default_factory=dict)


@np.errstate(over="ignore", invalid="ignore", divide="ignore")  # overflow is flagged, not warned about
def gamp(
    X,
    y,
    loss: OutputFactor,
    denoiser: InputFactor,
    *,
    variance: str = "sample",
    damping="auto",
    max_iter: int = 200,
    tol: float = 1e-8,
    S_star=None,
    callback=None,
    V0: float = 1.0,
) -> AMPResult:
    """Run GAMP (docs/theory.md §5) on tokens ``X (n, T, d)`` and targets ``y (n, T, T)``.

    ``X`` as float32 keeps the tokens in float32 (half the memory; GEMMs in float32, every sum
    over samples and every iterate in float64; the fixed point agrees with float64's to ~1e-6).

    Parameters
    ----------
    loss : an output factor (a loss of :mod:`amp_attention.losses` or a Bayes output of
        :mod:`amp_attention.bayes_outputs`).
    denoiser : an input factor of :mod:`amp_attention.denoisers`.
    variance : ``'sample'`` (``V_mu = V Gamma_mu``, converges undamped at finite d in most cases) or ``'scalar'``
        (``V_mu = V I_K``; usually needs damping at d <= 80). Undamped sample variances can still
        cycle at small d near ``n K ~ d^2/2``; the default adaptive damping handles both.  When some
        ``Gamma_mu`` is singular (``K > d(d+1)/2``: a tiny d; degenerate tokens) or overflows,
        ``'sample'`` falls back to ``'scalar'`` with a warning (:func:`~amp_attention.variance.sample_variance`).
    damping : ``'auto'`` (default: undamped while the iteration contracts, damped automatically
        when the updates oscillate or grow; see :mod:`amp_attention.loop`), a fixed
        ``0 <= damping < 1`` (``S <- (1 - damping) S_new + damping S_old``, same for V), or a
        schedule (one value per iteration).  Damping never changes a fixed point;
        ``history['damping']`` records the value used at each iteration.
    tol : stop when the relative step ``||S^{t+1} - S^t||_F / ||S^{t+1}||_F`` and the change of the
        variance ``|V^{t+1} - V^t| / max(V^{t+1}, V0)`` are both ``< tol`` (a ``V`` still drifting,
        e.g. running away, is not a fixed point; one decaying to 0 is measured against ``V0``);
        ``tol = 0`` runs exactly ``max_iter`` iterations.  With float32 tokens a tol below
        :data:`FLOAT32_TOL` = 1e-6 is raised to it (the step stalls near 1e-7 there).
    S_star : optional teacher matrix, to record ``m`` and ``mse`` per iteration.
    callback : optional ``callback(t, S, history)`` called after every iteration; returning True stops.
    V0 : initial variance ``V^0`` (1 for ERM, matching the SE's ``V = 1``; the Bayes loop starts
        from the prior variance ``Q*``).

    Non-finite iterates or intermediates (``omega``, ``g``, ``R`` before the denoiser, ``z``, any history
    entry) stop the loop with ``diverged=True``, a message naming the iteration and the quantity, and the
    last finite state kept (``m``, ``mse`` without ``S_star`` and the objective of a Bayes output are NaN
    by design);
    stopping at ``max_iter`` with ``tol > 0`` warns (:class:`sklearn.exceptions.ConvergenceWarning`).
    """
    for name, obj, cls in (("loss", loss, OutputFactor), ("denoiser", denoiser, InputFactor)):
        if not isinstance(obj, cls):
            raise ValueError(f"{name} must be an {cls.__name__} (see amp_attention.factors), got {type(obj).__name__}")
    op = SensingOperator(X)  # X validated once (float32 tokens stay float32: float32 GEMMs)
    n, T, d, K = op.n, op.T, op.d, op.K
    y = check_targets(y, n, T)
    S_star = None if S_star is None else check_symmetric(S_star, "S_star", d=d)
    V0 = check_nonnegative(V0, "V0")
    variance = variance if isinstance(variance, str) else repr(variance)
    if variance == "sample":
        gram = sample_variance(op.gram())  # Gamma_mu validated and Cholesky-factored once
    elif variance == "scalar":
        gram = GramVariance(np.eye(K))
    else:
        raise ValueError(f"variance must be 'sample' or 'scalar', got {variance!r}")
    # NaN by design: m, mse without S_star; the objective of an output factor without one (Bayes)
    nan_ok = (("m", "mse") if S_star is None else ()) + (
        ("objective", "train_objective", "train_loss") if _objective_is_nan(loss, y, K) else ())
    loop = Loop(HISTORY_KEYS, max_iter=max_iter, tol=tol, damping=damping, callback=callback, nan_ok=nan_ok)
    if op.dtype == np.float32 and 0 < loop.tol < FLOAT32_TOL:
        loop.tol = FLOAT32_TOL  # float32 GEMMs: the relative step stalls near 1e-7

    with single_threaded_blas():  # the GEMMs run inside Numba threads (amp_attention.threads)
        return _gamp_loop(op, gram, y, loss, denoiser, loop, V0, S_star)


def _objective_is_nan(loss, y, K) -> bool:
    """Whether the output factor has no objective (a Bayes output's ``value_z`` is NaN by design).
    A loss that overflows on these targets does have one (the loop then flags the overflow)."""
    try:
        return bool(np.isnan(loss.value_z(y[:1], np.zeros((1, K)))[0]))
    except (ValueError, ArithmeticError):
        return False


def _gamp_loop(op, gram, y, loss, denoiser, loop, V0, S_star):
    """The six steps of the module docstring, iterated by ``loop``; returns the :class:`AMPResult`."""
    n, d, K = op.n, op.d, op.K
    Gamma = gram.gamma if not gram.shared else gram.gamma[0]
    S = np.zeros((d, d))
    V = V0
    g_prev = np.zeros((n, K))
    p_prev = None
    z = op.forward(S, check=False)  # iterates are trusted: no re-validation in the loop

    for t in loop:
        t0 = time.perf_counter()
        Gg = g_prev @ Gamma if gram.shared else np.einsum("nkl,nl->nk", Gamma, g_prev)
        omega = z - V * Gg                                                     # step 1
        if not loop.finite(omega=omega):
            break
        g, a_mu, info = gram_g_out(loss, y, omega, V, gram, p0=p_prev)         # step 2
        p_prev = info.get("p")  # warm start of the next prox (Newton for cross-entropy)
        A_hat = float(np.sum(a_mu)) / d**2                                     # step 3
        if not np.isfinite(A_hat) or A_hat <= 0:
            loop.diverge(f"iteration {t}: A_hat = {A_hat} (not finite and > 0)")
            break
        R = S + op.adjoint(g, check=False) / (d * A_hat)                       # step 4
        if not loop.finite(g=g, R=R):  # before the denoiser's eigh
            break
        try:
            S_new, div, F = denoiser.factored(R, A_hat)                        # step 5
        except ValueError as exc:  # numerical (e.g. lam / A_hat overflows): the arguments were checked
            loop.diverge(f"iteration {t}: the denoiser failed at A_hat = {A_hat:.3g}: {exc}")
            break
        V_new = div / (d**2 * A_hat)                                           # step 6
        S_new, V_new = loop.update((S_new, V_new), (S, V))
        if not (np.all(np.isfinite(S_new)) and np.isfinite(V_new)):
            loop.diverge(f"iteration {t}: non-finite iterate; kept the last finite one")
            break
        norm = max(float(np.linalg.norm(S_new)), 1e-300)
        step = float(np.linalg.norm(S_new - S)) / norm
        # V must settle too (relative to max(V, V0): a V that runs away is not converged; one that
        # decays to 0 geometrically, as in Bayes perfect recovery, is once its change is below tol V0)
        change = max(step, abs(V_new - V) / max(abs(V_new), V0, 1e-300))
        S, V, g_prev = S_new, V_new, g
        if loop.last_damping == 0.0 and F is not None and F.shape[1] < d:  # S = F F^T unless mixed
            z = op.forward_factored(F, check=False)  # sigma = ones: S = F F^T
        else:
            z = op.forward(S, check=False)
        if not loop.finite(z=z):
            break
        try:  # the factors refuse to return a loss or penalty that overflows float64
            obj_loss = float(np.sum(loss.value_z(y, z)))
            objective = obj_loss + denoiser.penalty(S)
        except (ValueError, ArithmeticError) as exc:
            loop.diverge(f"iteration {t}: non-finite objective: {exc}")
            break
        if S_star is not None:
            m_t, mse_t = float(np.sum(S * S_star)) / d, float(np.sum((S - S_star) ** 2)) / d
        else:
            m_t = mse_t = np.nan
        if not loop.record(m=m_t, q=float(np.sum(S * S)) / d, mse=mse_t, V=V, A_hat=A_hat,
                    objective=objective, train_objective=objective / d**2, train_loss=obj_loss / n, step=step,
                    time=time.perf_counter() - t0, prox_iters=int(info.get("n_iter", 0)),
                    prox_failed=int(info.get("n_failed", 0))):
            break
        if loop.finished(change, callback_args=(t, S, loop.history)):
            break
    return AMPResult(S=S, V=V, **loop.outcome("GAMP"))
