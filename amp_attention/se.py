"""State evolution: the scalar loop that mirrors GAMP, for ERM and Bayes-optimal factors (docs/theory.md §7).

One SE step mirrors one GAMP step (:func:`amp_attention.amp.gamp`), term by term, and calls the
same two factors (:mod:`amp_attention.factors`)::

    GAMP                                             SE
    1. omega = A(S^t) - V^t_mu g^{t-1}               (z*, omega) ~ N(0, [[Q*, m], [m, q]]) per component
    2. g, dg = g_out(y, omega, V^t_mu)               output.se_conjugates(sample, m, q, V):
    3. A_hat = (1/d^2) sum Tr(Gamma dg)                A_hat = alpha E Tr(dg),  q_hat = alpha E||g||^2,
                                                       m_hat = alpha E[g.(z* - (m/q) omega)] / (Q* - m^2/q)
    4. R = S^t + A*(g)/(d A_hat)                     R = a S* + sqrt(Delta) W,  a = m_hat/A_hat,
                                                       Delta = q_hat/(2 A_hat^2)
    5. S^{t+1} = eta(R)                              denoiser.se_overlaps(law, a, Delta, A_hat):
    6. V^{t+1} = div eta / (d^2 A_hat)                 m = E Tr(S S*)/d, q = E Tr(S^2)/d, V = E div/(d^2 A_hat)

ERM (:func:`state_evolution`) starts from ``m = q = 0``, ``V = 1`` (GAMP's ``S^0 = 0``,
``V^0 = 1``); the Bayes-optimal SE (:func:`bayes_state_evolution`) runs the same loop with a Bayes
output (closed-form conjugates on the Nishimori line) and the RIE (closed-form overlaps), from
``q = q0``, ``V = Q* - q0``.

The output sample (:class:`OutputSample`) holds the Gaussian draws of ``(z*, omega)`` and the
labels ``y`` made from ``z*`` by the channel; the draws are fixed at construction (common random
numbers, so the map is deterministic) and made only when a factor needs them.
Input side: ``'free'`` (d -> infinity, free probability, at the teacher's limit law or its exact
finite-d atoms) or ``'finite'`` (GOE draws at the exact spectrum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._validation import check_nonnegative, check_positive, check_rng, check_T
from .bayes_outputs import bayes_output
from .denoisers import RIEDenoiser, make_denoiser
from .factors import Overlaps
from .loop import warn_user
from .losses import make_loss
from .model import Teacher, as_spectral_law, check_channel
from .output_sample import METHODS as RULES
from .output_sample import DEFAULT_N_MC, OutputSample
from .se_levels import (check_precision, coarse_budget, fixed_point_stderr, integrates_numerically,
                        iterate_two_level, refine_to_precision)
from .se_loop import QUIET, check_acceleration, check_init, erm_change, iterate_se
from .whitening import n_pairs

__all__ = ["SEResult", "BayesSEResult", "state_evolution", "bayes_state_evolution", "iterate_se"]


@dataclass(frozen=True, eq=False)
class SEResult:
    """State-evolution trajectory and fixed-point predictions (ERM and Bayes-optimal).

    ``history[key][t]`` holds the order parameters after SE step t (mirroring GAMP's iterate
    ``S^{t+1}``), the conjugates of step t, the Monte Carlo standard errors of the output side and
    the step's wall time.  ``m, q, V, mse`` are the last values.  Predictions at the last iterate
    (None if not computed): ``test_error = E||phi(h*) - phi(h_hat)||_F^2`` against the noiseless
    teacher map, ``test_error_noisy = E||y - phi(h_hat)||_F^2`` against fresh labels drawn from the
    channel (noise included), ``train_loss = E l_y(prox(omega))`` (mean per-sample loss) and
    ``train_objective = (sum_mu loss + reg) / d^2 = alpha train_loss + reg/d^2``.  ``diverged``: the loop met a
    non-finite or out-of-domain quantity and kept the last finite state.

    ``stderr`` (ERM, default two-level rule, free input side, converged, preconditioned full
    level): the estimated quadrature error of the fixed point, ``{'m', 'q', 'V', 'mse'}``: the
    spread of the conjugates over the rule's independent scramblings at the last step, carried to
    the fixed point by ``(I - J)^{-1}`` (docs/theory.md §7.3); None otherwise.

    Bayes-optimal runs also set ``perfect_recovery`` (the mse fell below ``mse_floor Q*``; the
    iteration then stops), ``mse_prior = Q* - mean(S*)^2`` (the ``alpha -> 0`` limit), ``q0`` and
    ``mse0`` (the initial state).
    """

    m: float
    q: float
    V: float
    mse: float
    Q: float
    n_iter: int
    converged: bool
    message: str
    history: dict = field(default_factory=dict)
    test_error: float | None = None
    test_error_noisy: float | None = None
    train_loss: float | None = None
    train_objective: float | None = None
    a: float | None = None
    Delta: float | None = None
    A_hat: float | None = None
    params: dict = field(default_factory=dict)
    diverged: bool = False
    perfect_recovery: bool = False
    mse_prior: float | None = None
    q0: float | None = None
    mse0: float | None = None
    stderr: dict | None = None


BayesSEResult = SEResult  # the Bayes-optimal SE returns the same result type




def _channel_beta(channel, beta):
    if beta is not None:
        return check_positive(beta, "beta")
    return getattr(channel, "beta", 1.0)




def _check_flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {x!r}")
    return bool(x)


def _predict(compute):
    """``compute()`` -> dict of predictions at the last state, or (None, reason) when one is not
    finite or its evaluation fails numerically."""
    try:
        with np.errstate(all="ignore"):
            out = compute()
    except (ValueError, ArithmeticError, RuntimeError, np.linalg.LinAlgError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    bad = [k for k, v in out.items() if v is not None and not np.isfinite(v)]
    if bad:
        return None, f"{', '.join(bad)} not finite"
    return out, None


def _flag_predictions(outcome, reason, n_iter):
    """The result carries no predictions: flag it (a fixed point without finite predictions)."""
    outcome.update(converged=False, diverged=True,
                   message=f"{outcome['message']}; step {max(n_iter - 1, 0)}: the predictions at the last "
                           f"state failed ({reason}); predictions set to None")


def _input_overlaps(denoiser, law, input_side, eigenvalues, n_draws, seed):
    if input_side == "free":
        return lambda a, Delta, A_hat: denoiser.se_overlaps(law, a, Delta, A_hat)
    if input_side == "finite":
        if eigenvalues is None:
            raise ValueError("input_side='finite' needs the teacher's exact eigenvalues (pass a Teacher)")
        if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
            raise ValueError(f"n_draws must be an integer >= 1, got {n_draws!r}")
        return lambda a, Delta, A_hat: denoiser.se_overlaps_finite(
            eigenvalues, a, Delta, A_hat, n_draws=int(n_draws), rng=np.random.default_rng(seed))
    raise ValueError(f"input_side must be 'free' or 'finite', got {input_side!r}")




@QUIET
def state_evolution(alpha, T, teacher, channel, loss="cross_entropy", reg="nuclear", lam=0.05,
                    beta=None, *, spectrum="exact", input_side="free", n_mc=DEFAULT_N_MC, n_draws=4,
                    max_iter=200, tol=1e-8, damping="auto", seed=0, predictions=True,
                    callback=None, init=None, output_rule="auto", prox_start="global",
                    acceleration="anderson", precision=None) -> SEResult:
    """Run the ERM state evolution from ``m = q = 0, V = 1`` (docs/theory.md §7).

    Parameters
    ----------
    alpha : n / d^2.    T : tokens per sequence (1..8).
    teacher : :class:`Teacher` (``spectrum='exact'``: its finite-d eigenvalues; ``'limit'``: its
        d -> infinity law if known) or a :class:`SpectralLaw`.
    channel : SoftmaxChannel / HardmaxChannel / LinearChannel (makes y from z*).
    loss, reg, lam, beta : the ERM of §4 (beta defaults to the softmax channel's).
    input_side : ``'free'`` or ``'finite'`` (needs a Teacher).
    n_mc : node budget of the output side's Gaussian averages (losses without a closed form;
        default :data:`~amp_attention.output_sample.DEFAULT_N_MC` = 4e5).
    output_rule : how the output side averages (:class:`~amp_attention.output_sample.OutputSample`):
        ``'auto'`` (``'qmc'`` on two levels: first ``n_mc // 16`` nodes until the change is below
        1e-5, then ``n_mc`` nodes from there to ``tol``, with acceleration by steps preconditioned
        with the coarse map's Jacobian (usually 2-3 steps); the fixed point is the full rule's, at
        about the cost of 1e5 plain draws with plain steps; one level under a damping schedule,
        with a callback, for closed-form losses, or below 4096 coarse nodes;
        ``params['coarse_n_mc']``, ``params['coarse_steps']`` and ``params['coarse_jacobian']``
        report it; docs/theory.md §7.1, §7.3), ``'qmc'`` (scrambled Sobol points
        with a fixed internal seed, in the dimensions the factor depends on; deterministic and
        independent of ``seed``), ``'mc'`` (plain Monte Carlo with ``seed``, the historical rule)
        or ``'gauss_hermite'``.
    seed : seeds the ``'mc'`` rule and the finite-d input side's GOE draws.
    prox_start : non-convex losses (``'softmax_square'``) only: ``'global'`` (default; the SE uses
        the global minimiser of the prox, as GAMP does) or ``'teacher'`` (the local minimiser
        reached from the teacher's ``z*``, the convention of a published SE: the two agree before
        the interpolation peak and can differ after it at small lam).
    tol : stop when ``max(|dm|, |dq|, |dV|) < tol * max(1, |m|, |q|, |V|)``; ``tol = 0`` runs max_iter.
    damping : ``'auto'`` (adaptive, see :mod:`amp_attention.loop`), a fixed ``0 <= damping < 1``
        (``m, q, V <- (1 - damping) new + damping old``) or a schedule (e.g. GAMP's
        ``history['damping']``, to compare the two iteration by iteration).
    acceleration : ``'anderson'`` (default: Anderson mixing of ``(m, q, V)`` with the current
        damping, safeguarded, docs/theory.md §7.3; it never moves a fixed point) or ``None`` (also
        spelled ``'none'``: plain damped steps, the behaviour before acceleration existed).  With a
        ``damping`` schedule the steps are always plain (the schedule replays another run step by
        step).
        ``history['anderson']`` records per step the number of differences used (0: plain step,
        -1: an accelerated step undone, see :func:`iterate_se`).
    precision : optional absolute target for :attr:`SEResult.stderr` (e.g. ``1e-4``; default None: no
        target).  While the converged fixed point's estimated quadrature error in ``m``, ``q``, ``V``
        or ``mse`` exceeds it, the full rule grows in proportion, with a margin of 1.25 (the QMC
        error falls about as ``1 / N``; at most ``PRECISION_MAX_GROWTH = 16`` times ``n_mc`` nodes),
        and the SE continues from the fixed point with a few preconditioned steps (docs/theory.md
        §7.3).
        ``params['n_mc_used']`` lists the budgets used; a target not reached is said in ``message``
        and warned about (:class:`~sklearn.exceptions.ConvergenceWarning`).  Needs the defaults
        ``output_rule='auto'``, ``acceleration='anderson'``, ``input_side='free'``, no callback or
        damping schedule, and ``n_mc >= 65536`` (the two-level rule); closed-form output sides
        have no quadrature error and ignore it.  ``precision`` bounds one standard error: the
        spread over independent rules is typically 2-3 times larger.
    callback : optional ``callback(t, history)``; returning True stops.
    init : optional starting ``(m, q, V)`` (default ``(0, 0, 1)``, GAMP's ``S^0 = 0, V^0 = 1``): three
        finite numbers, as a sequence or a mapping (or object) with ``m``, ``q``, ``V``, with ``q >= 0``,
        ``V > 0``, ``m^2 <= q Q*``; a neighbouring fixed point speeds up curves in alpha.

    Every argument is checked before the first step (a ValueError naming it).  The loop never
    raises on a valid problem: a non-finite or out-of-domain quantity stops it with
    ``diverged=True`` and a message naming the step (:func:`iterate_se`), and predictions that are
    not finite at the last state are set to None with the result flagged the same way.  Any
    ``alpha > 0`` that is a float is accepted: ``A_hat^2`` is never formed when it would over- or
    underflow.
    """
    alpha = check_positive(alpha, "alpha")
    T = check_T(T)
    channel = check_channel(channel)
    beta = _channel_beta(channel, beta)
    check_rng(seed, "seed")
    predictions = _check_flag(predictions, "predictions")
    if not isinstance(output_rule, str) or output_rule not in RULES:
        raise ValueError(f"output_rule must be one of {RULES}, got {output_rule!r}")
    acceleration = check_acceleration(acceleration, damping)
    output = make_loss(loss, beta)
    output.check_T(T)
    if prox_start != "global":
        if not hasattr(output, "prox_start"):
            raise ValueError(f"prox_start applies to non-convex losses ('softmax_square'), not loss={loss!r}")
        output = make_loss(loss, beta, prox_start=prox_start)
    denoiser = make_denoiser(reg, lam)
    denoiser.check_se()
    law = as_spectral_law(teacher, spectrum)
    eig = teacher.eigenvalues if isinstance(teacher, Teacher) else None
    Q = law.Q
    sample = OutputSample(alpha, T, Q, channel, n_mc=n_mc, seed=seed, method=output_rule)
    overlaps = _input_overlaps(denoiser, law, input_side, eig, n_draws, seed)
    m, q, V = check_init(init, Q)
    precision = check_precision(precision, output, sample, output_rule, acceleration, input_side, damping,
                                callback)
    n_coarse = coarse_budget(output, sample, output_rule, damping, callback)
    coarse = None if n_coarse is None else OutputSample(alpha, T, Q, channel, n_mc=n_coarse, method="qmc")
    kw = dict(output=output, denoiser=denoiser, overlaps=overlaps, damping=damping, callback=callback,
              change=erm_change, what="the ERM state evolution", acceleration=acceleration)
    *fixed, outcome, coarse_steps, M = iterate_two_level(coarse, sample, init=(m, q, V), max_iter=max_iter,
                                                         tol=tol, **kw)
    stderr = (fixed_point_stderr(output, overlaps, sample, M)  # (R + 1 input-side calls: cheap if free)
              if outcome["converged"] and input_side == "free" else None)
    budgets = [sample.n_mc]
    if precision is not None and outcome["converged"] and integrates_numerically(output):  # (else: exact)
        fixed, outcome, sample, stderr, budgets, reason = refine_to_precision(
            precision, sample, fixed, outcome, M, stderr, max_iter=max_iter, tol=tol, **kw)
        if reason is None:
            outcome["message"] += f"; precision {precision:g} reached with n_mc = {sample.n_mc}"
        else:
            outcome["message"] += f"; precision {precision:g} not reached: {reason}"
            warn_user(f"the ERM state evolution converged but its precision target {precision:g} was not "
                      f"reached: {reason} (stderr = {stderr}); raise n_mc")
    (m, q, V), (A_hat, a, Delta) = fixed
    test_error = test_error_noisy = train_loss = train_objective = None
    if predictions and outcome["n_iter"]:
        def compute():  # (in this order: the 'mc' rule may draw as it goes)
            out = {"test_error": sample.test_error(m, q), "test_error_noisy": sample.test_error_noisy(m, q),
                   "train_loss": output.se_train_loss(sample, m, q, V)}
            penalty = denoiser.se_penalty(law, a, Delta, A_hat, Overlaps(m, q, V))
            return dict(out, train_objective=alpha * out["train_loss"] + penalty)
        pred, reason = _predict(compute)
        if pred is None:
            _flag_predictions(outcome, reason, outcome["n_iter"])
        else:
            test_error, test_error_noisy, train_loss, train_objective = pred.values()
    params = {"alpha": alpha, "T": T, "loss": loss, "reg": reg, "lam": lam, "beta": beta,
              "spectrum": spectrum, "input_side": input_side, "n_mc": n_mc, "output_rule": output_rule,
              "prox_start": prox_start, "law": repr(law), "acceleration": acceleration,
              "coarse_n_mc": n_coarse, "coarse_steps": coarse_steps, "coarse_jacobian": M is not None,
              "precision": precision, "n_mc_used": budgets}
    return SEResult(m=m, q=q, V=V, mse=Q - 2 * m + q, Q=Q, test_error=test_error,
                    test_error_noisy=test_error_noisy, train_loss=train_loss,
                    train_objective=train_objective, a=a, Delta=Delta, A_hat=A_hat, params=params,
                    stderr=stderr, **outcome)


def _bayes_change(old, new):
    """``|mse_new - mse_old| / mse_new`` on the Nishimori line (``mse = V``): relative, so a
    geometric decay to 0 above a perfect-recovery threshold runs on until ``mse_floor``."""
    return abs(new[2] - old[2]) / new[2] if new[2] > 0 else 0.0


@QUIET
def bayes_state_evolution(alpha, T, law, channel, max_iter=1000, tol=1e-10, damping="auto", *,
                          q0=0.0, mse_floor=1e-12, callback=None, predictions=False, n_mc=DEFAULT_N_MC,
                          seed=0, output_rule="auto", acceleration="anderson") -> SEResult:
    """Bayes-optimal state evolution (docs/theory.md §7, "Bayes-optimal SE").

    Parameters
    ----------
    alpha : ``n / d^2 > 0``.   T : tokens per sequence (1..8; softmax needs T >= 2).
    law : :class:`SpectralLaw` of ``S*`` (or a :class:`Teacher`: its exact eigenvalues).
    channel : ``SoftmaxChannel(beta)`` (noiseless; the SE does not depend on beta),
        ``LinearChannel(noise)`` or a Bayes output object; ``HardmaxChannel``: NotImplementedError.
    max_iter : maximum number of steps.   tol : stop when ``|mse_{t+1} - mse_t| < tol * mse_{t+1}``
        (relative, so a geometric decay to 0 above a perfect-recovery threshold runs on until
        ``mse_floor``; ``tol = 0``: run ``max_iter`` steps unless perfect recovery stops earlier).
    damping : ``'auto'``, a fixed float or a schedule, as for :func:`state_evolution`.
    acceleration : ``'anderson'`` (default) or ``None`` (plain damped steps), as for
        :func:`state_evolution` (a schedule takes plain steps).
    q0 : initial ``q = m`` (default 0: GAMP's ``S^0 = 0``, ``V^0 = Q*``; ``q0 = mean(S*)^2`` is the
        prior-mean start ``S^0 = mean I``).
    mse_floor : ``mse <= mse_floor * Q*`` counts as perfect recovery and stops the iteration.
    callback : optional ``callback(t, history)``; returning True stops.
    predictions : also predict the test errors (``n_mc``, ``seed`` and ``output_rule`` as for
        :func:`state_evolution`).

    One step, with ``k_eff = K - 1`` (softmax) or ``K`` (linear, noise s2)::

        q_hat = m_hat = A_hat = alpha k_eff / (Q* - q + s2),   Delta = 1 / (2 q_hat),
        mse = mmse_den(Delta) = Delta - (4 pi^2/3) Delta^2 int rho_R^3   (rie_mmse),
        q = m = Q* - mse,   V = mse.

    The noiseless-softmax fixed point is ``mse = mmse_den(mse / (2 alpha (K - 1)))``.
    """
    alpha = check_positive(alpha, "alpha")
    T = check_T(T)
    check_rng(seed, "seed")
    predictions = _check_flag(predictions, "predictions")
    if not isinstance(output_rule, str) or output_rule not in RULES:
        raise ValueError(f"output_rule must be one of {RULES}, got {output_rule!r}")
    acceleration = check_acceleration(acceleration, damping)
    output = bayes_output(channel)
    output.check_T(T)
    denoiser = RIEDenoiser(law, name="law")
    law = denoiser.law
    Q = law.Q
    q0 = check_nonnegative(q0, "q0")
    if q0 >= Q:
        raise ValueError(f"q0 must be < Q* = {Q!r}, got {q0!r}")
    mse_floor = check_nonnegative(mse_floor, "mse_floor")
    sample = OutputSample(alpha, T, Q, output.channel(), n_mc=n_mc, seed=seed, method=output_rule)
    overlaps = lambda a, Delta, A_hat: denoiser.se_overlaps(law, a, Delta, A_hat)  # noqa: E731
    (m, q, V), (A_hat, a, Delta), outcome = iterate_se(
        output, denoiser, sample, overlaps, init=(q0, q0, Q - q0), max_iter=max_iter, tol=tol,
        damping=damping, callback=callback, change=_bayes_change, mse_floor=mse_floor,
        what="the Bayes-optimal state evolution", acceleration=acceleration)
    perfect = outcome["converged"] and outcome["message"].startswith("perfect recovery")
    test_error = test_error_noisy = None
    if predictions and outcome["n_iter"]:
        pred, reason = _predict(lambda: {"test_error": sample.test_error(m, q),
                                         "test_error_noisy": sample.test_error_noisy(m, q)})
        if pred is None:
            _flag_predictions(outcome, reason, outcome["n_iter"])
        else:
            test_error, test_error_noisy = pred.values()
    k_eff, noise = output.observed_components(T)
    params = {"alpha": alpha, "T": T, "K": n_pairs(T), "k_eff": k_eff, "noise": noise,
              "channel": repr(output), "law": repr(law), "damping": damping, "acceleration": acceleration}
    return SEResult(m=m, q=q, V=V, mse=Q - q, Q=Q, test_error=test_error, test_error_noisy=test_error_noisy,
                    a=a, Delta=Delta, A_hat=A_hat,
                    params=params, perfect_recovery=perfect, mse_prior=law.variance, q0=q0, mse0=Q - q0,
                    **outcome)
