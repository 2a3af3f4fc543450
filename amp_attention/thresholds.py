"""Thresholds in alpha predicted by the state evolution (docs/theory.md §7, "Predictions").

* :func:`recovery_threshold` -- the smallest alpha whose ERM-SE fixed point recovers ``S*``
  (``mse / Q* < eps``) at small ``lam``;
* :func:`interpolation_threshold` -- the largest alpha whose ERM-SE fixed point still fits the
  training data (excess train loss ``< eps``) at small ``lam``;
* :func:`bayes_threshold` -- the Bayes-optimal recovery threshold, from the Bayes-optimal SE map;
* :func:`perfect_recovery_threshold` -- the Bayes-optimal counting bound (noiseless softmax), in
  closed form.

Method (the three numerical thresholds).  Each threshold is the root of a continuous criterion
``f(alpha)`` that is positive below the threshold and negative above it:

=========================  ======================================================================
recovery                   ``f = log(mse/Q*) - log(eps)`` at the ERM-SE fixed point
interpolation              ``f = log(eps) - log(train_loss - E min_z l_y(z))`` at the ERM-SE fixed point
bayes                      ``f = log(mse_1/mse_0)``: one Bayes-SE step from ``mse_0 = eps Q*``
=========================  ======================================================================

The root is located by :func:`scipy.optimize.brentq` in ``log(alpha)`` inside a sign-change
bracket.  The search starts on ``bracket = (lo, hi)``; when ``f`` has the same sign at both ends
the bracket is expanded, by doubling ``hi`` (``f > 0`` at both ends: the threshold lies higher) or
halving ``lo`` (``f < 0`` at both ends), at most ``max_expand`` times.  If no sign change is found
the result says so (``found=False``, ``message='none in [lo, hi]: ...'``); nothing is raised.

Every SE run is recorded in the result (``evaluations``: ``(alpha, f)`` pairs, with the SE's
``converged`` flag and message per point).  ERM-SE runs are warm-started from the fixed point of
the nearest evaluated alpha (in ``log alpha``; the ERM fixed point is unique, so the start changes
only the number of steps); a run that fails from a warm start is repeated from the cold start.  A
run that still fails (an exception from inside the SE, a diverged or non-finite result) gives a
NaN point; a NaN at an end of the bracket or during the root search ends the search with
``found=False`` and a message naming the alpha and the SE's reason.  Arguments are checked before
any SE run: the threshold's own (``T``, ``bracket``, ``eps``, ``xtol``, ``lam``, ``max_expand``)
here, the model's (``teacher``, ``channel``, ``loss``, ``reg`` and the SE keywords) by the SE's
own checks in a probe run stopped after one step, whose ``ValueError`` propagates: a mistake in
the caller's input is never reported as a failed point.  ``progress(alpha, value, converged)``, if
given, is called after every SE evaluation (the CLI shows a progress line from it).
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from ._validation import check_nonnegative, check_positive, check_T
from .loop import ConvergenceWarning, check_callback
from .losses import make_loss
from .model import as_spectral_law, check_channel
from .output_sample import DEFAULT_N_MC, OutputSample
from .se import bayes_state_evolution, state_evolution
from .whitening import n_pairs

__all__ = ["ThresholdResult", "recovery_threshold", "interpolation_threshold", "bayes_threshold",
           "perfect_recovery_threshold"]

# Errors that one SE evaluation may raise from inside (numerical trouble at an extreme alpha).
# Argument errors are caught before the search by the probe run, which lets them propagate.
_SE_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError)
_LOG_FLOOR = 1e-300  # log(max(x, _LOG_FLOOR)): a recovered mse of exactly 0 gives a finite value


@dataclass(frozen=True)
class ThresholdResult:
    """A threshold in alpha located by root finding on a continuous criterion ``f(alpha)``
    (positive below the threshold, negative above).

    Attributes
    ----------
    alpha : the threshold (brentq's root estimate), or None when none was found.
    found : whether a root was located.
    message : how the search ended; ``'none in [lo, hi]: ...'`` when ``f`` has one sign on the
        searched interval, or the alpha and reason of an SE failure.
    bracket : ``found``: brentq's last sign-change bracket (``alpha`` and the nearest evaluated
        point where the criterion has the other sign), at most ``xtol`` wide; otherwise the
        searched interval, or the tightest known sign-change bracket when an SE failure
        interrupted the root search.
    searched : the interval searched, after expansion.   expansions : how many times it was expanded.
    evaluations : ``(alpha, f(alpha))`` pairs in evaluation order (``f = nan``: the SE failed there).
    converged : per evaluation, whether the SE run (the last attempt) converged.
    se_messages : per evaluation, the SE's message (and the start used, or the failure).
    criterion : the criterion ``f``, in words.   xtol : the requested absolute tolerance in alpha.
    verified : :func:`bayes_threshold` with ``verify=True``: whether full SE runs from the
        uninformative start confirm the threshold (see there); None when not checked.
    """

    alpha: float | None
    found: bool
    message: str
    bracket: tuple
    searched: tuple
    expansions: int
    evaluations: tuple
    converged: tuple
    se_messages: tuple
    criterion: str
    xtol: float
    verified: bool | None = None

    @property
    def all_converged(self) -> bool:
        """Every SE run behind the evaluations converged."""
        return all(self.converged)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_real(x, name):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    return float(x)


def _check_bracket(bracket):
    if isinstance(bracket, (str, bytes)) or not hasattr(bracket, "__len__") or len(bracket) != 2:
        raise ValueError(f"bracket must be two numbers (lo, hi) with 0 < lo < hi, got {bracket!r}")
    lo, hi = (_check_real(v, "bracket") for v in bracket)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"bracket must be two finite numbers (lo, hi) with 0 < lo < hi, got {bracket!r}")
    return lo, hi


def _check_xtol(xtol):
    x = _check_real(xtol, "xtol")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"xtol must be a finite number > 0, got {xtol!r}")
    return x


def _check_eps(eps, below_one):
    e = _check_real(eps, "eps")
    if not (math.isfinite(e) and e > 0 and (e < 1 or not below_one)):
        rng = "0 < eps < 1" if below_one else "eps > 0"
        raise ValueError(f"eps must be a finite number with {rng}, got {eps!r}")
    return e


def _check_max_expand(max_expand):
    if isinstance(max_expand, bool) or not isinstance(max_expand, numbers.Integral) or not 0 <= max_expand <= 60:
        raise ValueError(f"max_expand must be an integer in 0..60, got {max_expand!r}")
    return int(max_expand)


def _check_flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {x!r}")
    return bool(x)


def _check_se_kwargs(se_kwargs, func, managed):
    """Unknown keywords -> TypeError (as Python would); keywords the search sets -> ValueError."""
    params = inspect.signature(func).parameters
    fixed = [p for p in list(params)[:4]]  # alpha, T, teacher/law, channel: given by the search
    for key in se_kwargs:
        if key not in params or key in fixed:
            raise TypeError(f"unexpected keyword argument {key!r} (not a keyword of {func.__name__})")
        if key in managed:
            raise ValueError(f"{key} is set by the threshold search ({managed[key]}); do not pass it")


def _check_common(T, bracket, eps, xtol, max_expand, eps_below_one=True):
    return (check_T(T), _check_bracket(bracket), _check_eps(eps, eps_below_one), _check_xtol(xtol),
            _check_max_expand(max_expand))


def _quiet(func, *args, **kwargs):
    """Run one SE without its ConvergenceWarning (non-convergence is reported per point)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with np.errstate(all="ignore"):
            return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


class _SEFailure(Exception):
    """Raised inside brentq's objective when an SE evaluation fails (NaN)."""


class _Search:
    """Bookkeeping of one threshold search: evaluations, the expansion and the root search."""

    def __init__(self, evaluate, criterion, describe, progress=None):
        self.evaluate = evaluate      # alpha -> (value, converged, message)
        self.criterion = criterion
        self.describe = describe      # value -> short text, e.g. "mse/Q* = 0.31"
        self.points = []              # (alpha, value, converged, message)
        self.progress = progress      # None or (alpha, value, converged) -> None, after each evaluation

    def f(self, alpha):
        value, converged, message = self.evaluate(alpha)
        value = float(value)
        self.add(alpha, value, bool(converged), str(message))
        return value

    def add(self, alpha, value, converged, message):
        """Record one evaluation (and report it to ``progress``)."""
        self.points.append((alpha, value, converged, message))
        if self.progress is not None:
            self.progress(float(alpha), value, converged)

    def tightest(self):
        """Largest alpha with f > 0 below the smallest alpha with f < 0 (a sign-change bracket)."""
        neg = [a for a, v, _, _ in self.points if v < 0]
        if not neg:
            return None
        b = min(neg)
        pos = [a for a, v, _, _ in self.points if v > 0 and a < b]
        return (max(pos), b) if pos else None

    def around(self, alpha):
        """brentq's last bracket: ``alpha`` (an evaluated point) and the nearest evaluated point
        where the criterion has the opposite sign."""
        fa = min(self.points, key=lambda p: abs(p[0] - alpha))[1]
        if fa == 0:
            return alpha, alpha
        other = [a for a, v, _, _ in self.points if v * fa < 0]
        if not other:
            return None
        b = min(other, key=lambda a: abs(a - alpha))
        return min(alpha, b), max(alpha, b)

    def result(self, alpha, found, message, bracket, searched, expansions, xtol, verified=None):
        return ThresholdResult(
            alpha=None if alpha is None else float(alpha), found=found, message=message,
            bracket=tuple(float(v) for v in bracket), searched=tuple(float(v) for v in searched),
            expansions=expansions, evaluations=tuple((a, v) for a, v, _, _ in self.points),
            converged=tuple(c for _, _, c, _ in self.points), se_messages=tuple(m for *_, m in self.points),
            criterion=self.criterion, xtol=xtol, verified=verified)

    def _at(self, alpha, value):
        return f"{self.describe(value)} at alpha={alpha:.6g}"

    def _failure(self, alpha):
        msg = next(m for a, v, _, m in reversed(self.points) if a == alpha)
        return f"the SE failed at alpha={alpha:.6g} ({msg})"

    def run(self, bracket, xtol, max_expand):
        lo, hi = bracket
        flo, fhi = self.f(lo), self.f(hi)
        span = [(lo, flo), (hi, fhi)]  # the ends of the searched interval and their values
        expansions = 0
        while True:
            searched = (span[0][0], span[1][0])
            if math.isnan(flo) or math.isnan(fhi):
                bad = lo if math.isnan(flo) else hi
                return self.result(None, False, f"no threshold located: {self._failure(bad)}",
                                   searched, searched, expansions, xtol)
            if flo == 0 or fhi == 0:
                a = lo if flo == 0 else hi
                return self.result(a, True, f"the criterion {self.criterion} is 0 at alpha={a:.6g}",
                                   (a, a), searched, expansions, xtol)
            if flo > 0 > fhi:
                break
            ends = f"{self._at(*span[0])}, {self._at(*span[1])}"
            if flo < 0 < fhi:
                return self.result(
                    None, False,
                    f"none in [{searched[0]:.6g}, {searched[1]:.6g}]: the criterion {self.criterion} "
                    f"increases through 0 ({ends}), the opposite of a threshold", searched, searched,
                    expansions, xtol)
            if expansions >= max_expand:
                side = (f"the threshold, if any, is above alpha={hi:.6g}" if flo > 0 else
                        f"the condition already holds at alpha={lo:.6g}")
                return self.result(
                    None, False,
                    f"none in [{searched[0]:.6g}, {searched[1]:.6g}]: the criterion {self.criterion} is "
                    f"{'positive' if flo > 0 else 'negative'} at both ends ({ends}; bracket expanded "
                    f"{expansions} time(s)); {side}", searched, searched, expansions, xtol)
            expansions += 1
            if flo > 0:   # positive at both ends: the threshold lies higher
                lo, flo = hi, fhi
                hi = 2.0 * hi
                fhi = self.f(hi)
                span[1] = (hi, fhi)
            else:         # negative at both ends: the threshold lies lower
                hi, fhi = lo, flo
                lo = 0.5 * lo
                flo = self.f(lo)
                span[0] = (lo, flo)

        ulo, uhi = math.log(lo), math.log(hi)
        ends = {ulo: flo, uhi: fhi}  # brentq starts by evaluating both ends: reuse them

        def g(u):
            if u in ends:
                return ends.pop(u)
            v = self.f(math.exp(u))
            if math.isnan(v):
                raise _SEFailure(math.exp(u))
            return v

        # brentq stops when its sign-change bracket in u is narrower than xtol_u; with
        # xtol_u = log(1 + xtol/hi) that bracket is narrower than xtol in alpha.
        try:
            u, info = brentq(g, ulo, uhi, xtol=math.log1p(xtol / hi), maxiter=200,
                             full_output=True, disp=False)
        except _SEFailure as exc:
            a = exc.args[0]
            tight = self.tightest() or searched
            return self.result(None, False, f"root search interrupted: {self._failure(a)}; the "
                               f"threshold lies in [{tight[0]:.6g}, {tight[1]:.6g}]",
                               tight, searched, expansions, xtol)
        alpha = lo if u == ulo else hi if u == uhi else math.exp(u)  # the evaluated alpha
        tight = self.around(alpha) or (lo, hi)
        if not info.converged:
            return self.result(None, False, f"brentq did not converge ({info.flag}); the threshold lies in "
                               f"[{tight[0]:.6g}, {tight[1]:.6g}]", tight, searched, expansions, xtol)
        msg = (f"threshold at alpha={alpha:.6g} (bracket [{tight[0]:.6g}, {tight[1]:.6g}], "
               f"{len(self.points)} SE evaluations")
        n_bad = sum(not c for _, _, c, _ in self.points)
        msg += f", {n_bad} of them not converged)" if n_bad else ")"
        return self.result(alpha, True, msg, tight, searched, expansions, xtol)


# --------------------------------------------------------------------------------------------
# ERM thresholds
# --------------------------------------------------------------------------------------------


def _valid_init(state, Q):
    m, q, V = state
    return (all(math.isfinite(v) for v in state) and q >= 0 and V > 0 and m * m <= q * Q * (1 + 1e-10))


def _erm_evaluator(T, teacher, channel, loss, reg, lam, se_kwargs, warm_start, value_of):
    """``alpha -> (value, converged, message)`` over ERM-SE runs, warm-started along the search."""
    states = []  # (log alpha, (m, q, V), Q) of converged runs

    def start_for(alpha):
        if not (warm_start and states):
            return None, None
        la = math.log(alpha)
        lb, state, Q = min(states, key=lambda s: abs(s[0] - la))
        return (state, math.exp(lb)) if _valid_init(state, Q) else (None, None)

    def evaluate(alpha):
        init, source = start_for(alpha)
        starts = [(init, f"warm start from alpha={source:.6g}")] if init is not None else []
        starts.append((None, "cold start"))
        reasons = []
        for start, label in starts:
            try:
                r = _quiet(state_evolution, alpha, T, teacher, channel, loss, reg, lam, init=start, **se_kwargs)
            except _SE_ERRORS as exc:
                reasons.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            if getattr(r, "diverged", False) or not math.isfinite(r.mse):
                reasons.append(f"{label}: {r.message}")
                continue
            value = value_of(r)
            if not math.isfinite(value):
                reasons.append(f"{label}: non-finite criterion after '{r.message}'")
                continue
            if r.converged:
                states.append((math.log(alpha), (r.m, r.q, r.V), r.Q))
            return value, r.converged, f"{r.message} ({label})"
        return math.nan, False, "; ".join(reasons)

    return evaluate


def _erm_setup(T, teacher, channel, loss, reg, lam, bracket, se_kwargs, predictions):
    """Check the SE keywords, then probe one SE step (its argument errors propagate)."""
    lam = check_nonnegative(lam, "lam")
    _check_se_kwargs(se_kwargs, state_evolution,
                     {"init": "warm starts along the search; use warm_start=False for cold starts"})
    se_kwargs.setdefault("max_iter", 2000)
    se_kwargs.setdefault("tol", 1e-10)
    if predictions is not None:
        if se_kwargs.get("predictions", predictions) != predictions:
            raise ValueError(f"predictions must be {predictions} for this threshold")
        se_kwargs["predictions"] = predictions
    else:
        se_kwargs.setdefault("predictions", False)
    check_callback(se_kwargs.get("callback"))
    # the probe stops after its first step through the callback, so that the SE still checks
    # the caller's max_iter and tol
    probe = dict(se_kwargs, callback=lambda t, history: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with np.errstate(all="ignore"):
            try:
                state_evolution(bracket[0], T, teacher, channel, loss, reg, lam, **probe)
            except (ArithmeticError, np.linalg.LinAlgError):
                pass  # numerical trouble in the probe step is not an argument error
    return lam


def recovery_threshold(T, teacher, channel, loss="square", reg="nuclear", lam=1e-5, *,
                       bracket=(0.02, 1.0), eps=1e-3, xtol=2e-3, max_expand=3, warm_start=True,
                       progress=None, **se_kwargs) -> ThresholdResult:
    """Smallest alpha whose ERM-SE fixed point has ``mse / Q* < eps`` (docs/theory.md §7.5).

    Root of ``f(alpha) = log(mse/Q*) - log(eps)`` (the fixed point at the given small ``lam``,
    which approximates ``lam -> 0+``), by brentq in ``log(alpha)``; see the module docstring for
    the bracket expansion, warm starts and failures.

    Parameters
    ----------
    T, teacher, channel, loss, reg, lam : the problem, as for
        :func:`~amp_attention.se.state_evolution` (``lam >= 0``).
    bracket : ``(lo, hi)``, two finite numbers with ``0 < lo < hi``: where to search first.
    eps : ``0 < eps < 1``.   xtol : absolute tolerance in alpha (finite, > 0).
    max_expand : how many times (0..60) the bracket may be doubled up / halved down.
    warm_start : start each SE run from the nearest evaluated fixed point.
    progress : None, or a callable ``progress(alpha, value, converged)`` called after every SE
        evaluation (``value``: the criterion ``f(alpha)``, NaN where the SE failed).
    se_kwargs : further keywords of :func:`~amp_attention.se.state_evolution` (defaults here:
        ``max_iter=2000, tol=1e-10, predictions=False``); ``init`` is managed by the search.

    Returns a :class:`ThresholdResult`; ``found=False`` with ``'none in [lo, hi]: ...'`` when
    ``mse/Q*`` stays above (or below) ``eps`` on the whole searched interval, e.g. for a loss
    that cannot recover ``S*`` from the channel's targets (square loss on softmax targets), or
    for the cross-entropy at a ``lam`` not small enough.
    """
    T, bracket, eps, xtol, max_expand = _check_common(T, bracket, eps, xtol, max_expand)
    _check_flag(warm_start, "warm_start")
    progress = check_callback(progress, "progress")
    se_kwargs = dict(se_kwargs)
    lam = _erm_setup(T, teacher, channel, loss, reg, lam, bracket, se_kwargs, None)
    log_eps = math.log(eps)

    def value_of(r):
        return math.log(max(r.mse / r.Q, _LOG_FLOOR)) - log_eps

    search = _Search(_erm_evaluator(T, teacher, channel, loss, reg, lam, se_kwargs, bool(warm_start), value_of),
                     f"log(mse/Q*) - log(eps) (eps={eps:g})",
                     lambda v: f"mse/Q* = {eps * math.exp(v):.3g}", progress)
    return search.run(bracket, xtol, max_expand)


def interpolation_threshold(T, teacher, channel, loss="square", reg="frobenius", lam=1e-5, *,
                            bracket=(0.02, 1.0), eps=1e-3, xtol=2e-3, max_expand=3, warm_start=True,
                            progress=None, **se_kwargs) -> ThresholdResult:
    """Largest alpha whose ERM-SE fixed point still fits the training data (docs/theory.md §7.5).

    Root of ``f(alpha) = log(eps) - log(train_loss - floor)``: the excess training loss
    ``E[l_y(p) - min_z l_y(z)]`` at the fixed point (small ``lam``) crosses ``eps`` from below (an
    excess below ``1e-12 eps``, or a negative one from rounding, counts as ``1e-12 eps``).
    The floor ``E min_z l_y(z)`` (the antisymmetric-part constant for the square loss, the row
    entropies of ``y`` for the cross-entropy) is averaged over the SE's own output sample
    (same ``n_mc`` and ``seed``).  Parameters as :func:`recovery_threshold` (``eps > 0``);
    ``predictions`` is always True here.
    """
    T, bracket, eps, xtol, max_expand = _check_common(T, bracket, eps, xtol, max_expand, eps_below_one=False)
    _check_flag(warm_start, "warm_start")
    progress = check_callback(progress, "progress")
    se_kwargs = dict(se_kwargs)
    lam = _erm_setup(T, teacher, channel, loss, reg, lam, bracket, se_kwargs, True)
    law = as_spectral_law(teacher, se_kwargs.get("spectrum", "exact"))
    beta = se_kwargs.get("beta")
    output = make_loss(loss, getattr(channel, "beta", 1.0) if beta is None else beta)
    sample = OutputSample(bracket[0], T, law.Q, check_channel(channel), n_mc=se_kwargs.get("n_mc", DEFAULT_N_MC),
                          seed=se_kwargs.get("seed", 0), method=se_kwargs.get("output_rule", "auto"))
    try:
        floor = output.se_loss_floor(sample)
    except NotImplementedError as exc:
        raise NotImplementedError(f"the interpolation threshold needs the floor min_z l_y(z) of loss={loss!r} "
                                  f"(its min_value), which it does not provide: {exc}") from exc

    log_eps, tiny = math.log(eps), 1e-12 * eps

    def value_of(r):
        if r.train_loss is None:
            return math.nan
        return log_eps - math.log(max(r.train_loss - floor, tiny))

    search = _Search(_erm_evaluator(T, teacher, channel, loss, reg, lam, se_kwargs, bool(warm_start), value_of),
                     f"log(eps) - log(max(excess train loss, 1e-12 eps)) (eps={eps:g}, floor={floor:.6g})",
                     lambda v: f"excess train loss = {eps * math.exp(-v):.3g}", progress)
    return search.run(bracket, xtol, max_expand)


# --------------------------------------------------------------------------------------------
# Bayes-optimal threshold
# --------------------------------------------------------------------------------------------


def bayes_threshold(T, teacher, channel, *, eps=1e-8, bracket=(0.01, 1.0), xtol=1e-4, max_expand=3,
                    verify=False, verify_margin=0.05, verify_max_iter=20000, progress=None) -> ThresholdResult:
    """Bayes-optimal recovery threshold: the alpha at which ``mse = eps Q*`` is a fixed point of the
    Bayes-optimal SE (docs/theory.md §7.4); for ``eps -> 0`` the perfect-recovery threshold.

    The BO-SE is a monotone one-dimensional map ``mse_{t+1} = M_alpha(mse_t)`` (decreasing in
    alpha), and from the uninformative start ``mse_0 = Q*`` it converges to its largest fixed
    point.  The criterion is one SE step from ``mse_0 = eps Q*`` (``q0 = (1 - eps) Q*``):
    ``f(alpha) = log(M_alpha(eps Q*) / (eps Q*))``, positive when the mse would grow back (a fixed
    point above ``eps Q*``), negative when it keeps shrinking.  One step per evaluation, so the
    root can be located to a small ``xtol`` without the critical slowing down of full runs near
    the threshold.  For noiseless softmax and a Wishart(``rho <= 1``) teacher
    ``f -> log(alpha_c / alpha)`` as ``eps -> 0``, with ``alpha_c`` the counting bound
    :func:`perfect_recovery_threshold`.  For a noisy linear channel the root is where the
    Bayes-optimal mse reaches ``eps Q*``.

    The criterion assumes the SE has no second fixed point above ``eps Q*`` (no first-order
    transition).  ``verify=True`` checks this with full SE runs from ``q0 = 0`` at
    ``alpha (1 +- verify_margin)`` (at most ``verify_max_iter`` steps each): above, the mse must
    fall below ``eps Q*``; below, it must converge above it.  ``result.verified`` reports the
    outcome (the runs are appended to the evaluations, their criterion value being
    ``log(mse/Q*) - log(eps)``).

    Parameters: ``T``, ``teacher`` (a :class:`SpectralLaw` or a :class:`Teacher`), ``channel`` as
    for :func:`~amp_attention.se.bayes_state_evolution`; ``0 < eps < 1``; ``bracket``, ``xtol``,
    ``max_expand``, ``progress`` as for :func:`recovery_threshold`; ``0 < verify_margin < 1``.
    """
    T, bracket, eps, xtol, max_expand = _check_common(T, bracket, eps, xtol, max_expand)
    _check_flag(verify, "verify")
    progress = check_callback(progress, "progress")
    verify_margin = check_positive(verify_margin, "verify_margin")
    if verify_margin >= 1:
        raise ValueError(f"verify_margin must be in (0, 1), got {verify_margin!r}")
    if isinstance(verify_max_iter, bool) or not isinstance(verify_max_iter, numbers.Integral) or verify_max_iter < 1:
        raise ValueError(f"verify_max_iter must be an integer >= 1, got {verify_max_iter!r}")
    law = as_spectral_law(teacher, "exact", name="teacher")
    Q = law.Q
    q0 = (1.0 - eps) * Q
    # the probe: the Bayes SE's own checks of T, teacher and channel (its errors propagate)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            bayes_state_evolution(bracket[0], T, law, channel, max_iter=1, tol=0.0, q0=q0, mse_floor=0.0)
        except (ArithmeticError, np.linalg.LinAlgError):
            pass

    def evaluate(alpha):
        try:
            r = _quiet(bayes_state_evolution, alpha, T, law, channel, max_iter=1, tol=0.0, damping=0.0,
                       q0=q0, mse_floor=0.0)
        except _SE_ERRORS as exc:
            return math.nan, False, f"{type(exc).__name__}: {exc}"
        if getattr(r, "diverged", False) or r.n_iter < 1 or not math.isfinite(r.mse):
            return math.nan, False, r.message
        value = math.log(max(r.mse, _LOG_FLOOR * Q) / (eps * Q))
        return value, True, f"one step from mse = eps Q*: mse -> {r.mse / Q:.6g} Q*"

    search = _Search(evaluate, f"log(M(eps Q*)/(eps Q*)) (eps={eps:g})",
                     lambda v: f"growth factor {math.exp(v):.6g}", progress)
    res = search.run(bracket, xtol, max_expand)
    if not (verify and res.found):
        return res

    def full_run(alpha):
        try:
            r = _quiet(bayes_state_evolution, alpha, T, law, channel, max_iter=int(verify_max_iter),
                       tol=1e-10, mse_floor=eps)
        except _SE_ERRORS as exc:
            return None, math.nan, f"{type(exc).__name__}: {exc}"
        value = math.log(max(r.mse / Q, _LOG_FLOOR)) - math.log(eps)
        return r, value, r.message

    checks = []
    for sign in (+1, -1):
        alpha = res.alpha * (1 + sign * verify_margin)
        r, value, message = full_run(alpha)
        search.add(alpha, value, bool(r is not None and r.converged), f"verification run from q0 = 0: {message}")
        if r is None or not math.isfinite(value):
            checks.append((False, f"the verification run at alpha={alpha:.6g} failed ({message})"))
        elif sign > 0:
            ok = r.mse <= eps * Q
            checks.append((ok, f"from q0 = 0 at alpha={alpha:.6g} the mse {'reaches' if ok else 'stays at'} "
                               f"{r.mse / Q:.3g} Q* ({message})"))
        else:
            ok = r.converged and r.mse > eps * Q
            checks.append((ok, f"at alpha={alpha:.6g} it {'converges' if r.converged else 'stops'} at "
                               f"{r.mse / Q:.3g} Q* ({message})"))
    verified = all(ok for ok, _ in checks)
    message = res.message + ("; verified: " if verified else "; NOT verified: ") + "; ".join(t for _, t in checks)
    return search.result(res.alpha, True, message, res.bracket, res.searched, res.expansions, xtol, verified=verified)


def perfect_recovery_threshold(rho: float, T: int) -> float:
    """``alpha = (rho - rho^2/2)/(K - 1)`` (noiseless softmax, Wishart(rho <= 1); docs/theory.md §7, §8.5).

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
