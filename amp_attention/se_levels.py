"""Accuracy of the SE's output integration (docs/theory.md §7.1, §7.3).

* The two-level rule of ``output_rule='auto'`` (:func:`iterate_two_level`): the SE first runs on a
  coarse rule of ``n_mc // COARSE_FACTOR`` nodes, then continues on the full rule from there.
* The coarse map's Jacobian (:func:`coarse_preconditioner`), which preconditions the full level's
  steps so that it needs few of them.
* The error estimate of the fixed point (:func:`fixed_point_stderr`, ``SEResult.stderr``).
* The opt-in precision target (:func:`refine_to_precision`, ``state_evolution(precision=...)``):
  the full rule grows until that estimate is below the target.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._validation import InsufficientMemoryError, check_positive
from .factors import OutputFactor
from .loop import ConvergenceWarning, check_damping
from .se_loop import check_acceleration, in_domain, iterate_se, replicate_shifts, se_map

__all__ = ["iterate_two_level", "integrates_numerically", "coarse_budget", "coarse_preconditioner", "fixed_point_stderr",
           "check_precision", "refine_to_precision", "COARSE_FACTOR", "COARSE_TOL", "COARSE_MIN_NODES",
           "JACOBIAN_STEP", "JACOBIAN_MAX_COND", "PRECISION_MAX_GROWTH", "PRECISION_MARGIN"]


#: Two-level output rule of ``output_rule='auto'`` (docs/theory.md §7.1): the SE first iterates on
#: a coarse rule of ``n_mc // COARSE_FACTOR`` nodes until its change is below ``COARSE_TOL`` (the
#: coarse rule's own accuracy), then continues from there on the full rule of ``n_mc`` nodes.
COARSE_FACTOR = 16
COARSE_TOL = 1e-5
COARSE_MIN_NODES = 4096
#: The coarse-level Jacobian that preconditions the full level (:func:`coarse_preconditioner`):
#: relative one-sided difference steps ``JACOBIAN_STEP``; not used when ``I - J`` has a condition
#: number above ``JACOBIAN_MAX_COND`` in the probe coordinates.
JACOBIAN_STEP = 1e-4
JACOBIAN_MAX_COND = 1e8


def integrates_numerically(output) -> bool:
    """The output factor averages over the sample's nodes (the generic
    :meth:`~amp_attention.factors.OutputFactor.se_conjugates`), not in closed form."""
    return type(output).se_conjugates is OutputFactor.se_conjugates


def coarse_budget(output, sample, output_rule, damping, callback):
    """The node budget of the coarse level of ``output_rule='auto'``, or None when the two-level
    rule does not apply: a rule other than ``'auto'``, a factor with closed-form conjugates (no
    nodes to save), a damping schedule (the run replays another step by step), a callback (it sees
    one trajectory), or fewer than ``COARSE_MIN_NODES`` coarse nodes."""
    if output_rule != "auto" or callback is not None or isinstance(check_damping(damping), tuple):
        return None
    if not integrates_numerically(output):
        return None
    n_coarse = sample.n_mc // COARSE_FACTOR
    return n_coarse if n_coarse >= COARSE_MIN_NODES else None


def coarse_preconditioner(output, overlaps, coarse, state):
    """``M = (I - J)^{-1}`` with ``J`` the Jacobian of the SE map on the ``coarse`` rule at
    ``state = (m, q, V)``, or None if the map fails there or ``I - J`` is ill-conditioned
    (docs/theory.md §7.3).

    ``J`` is found from forward differences along ``m`` at fixed ``s = q - m^2/Q*``, along ``q``
    and along ``V``, with steps ``JACOBIAN_STEP`` times ``max(|m|, 1e-3)``, ``max(s, 1e-6 q)`` (1 if
    ``q = 0``) and ``V``.  The step in ``q`` is relative to ``s`` because the map depends on
    ``sqrt(s)`` (the part of ``omega`` independent of ``z*``), whose derivative grows as
    ``s -> 0`` (near perfect recovery).  Every probe stays in the domain ``s >= 0``, ``V > 0``.
    The condition number is judged in the probe coordinates (scaled by the steps)."""
    base = se_map(output, overlaps, coarse, state, 0)
    if isinstance(base, str):
        return None
    Q = coarse.Q
    m, q, V = (float(v) for v in state)
    s = q - m * m / Q
    g0 = np.array(base[1])
    h = JACOBIAN_STEP * np.array([max(abs(m), 1e-3), max(s, 1e-6 * q) if q > 0 else 1.0, V])
    D = np.array([[1.0, 0.0, 0.0], [2.0 * m / Q + h[0] / Q, 1.0, 0.0], [0.0, 0.0, 1.0]])  # probe directions
    JD = np.empty((3, 3))
    for i in range(3):
        probe = (m, q, V) + h[i] * D[:, i]
        res = se_map(output, overlaps, coarse, tuple(probe), 0) if in_domain(*probe, Q) else "out"
        if isinstance(res, str):
            return None
        JD[:, i] = (np.array(res[1]) - g0) / h[i]
    A = np.eye(3) - JD @ np.linalg.inv(D)
    P = D * h  # (in these coordinates the steep sqrt(s) dependence is not mistaken for bad conditioning)
    if not np.all(np.isfinite(A)) or np.linalg.cond(np.linalg.solve(P, A @ P)) > JACOBIAN_MAX_COND:
        return None
    return np.linalg.inv(A)


def fixed_point_stderr(output, overlaps, sample, M):
    """Standard error of the fixed point ``(m, q, V, mse)`` due to the quadrature, or None.

    With ``c_r`` the conjugates ``(A_hat, m_hat, q_hat)`` of the last step on scrambling ``r`` of
    the rule (``R`` of them, mean ``c``) and ``G(c)`` the input side, the fixed point of scrambling
    ``r`` alone is ``x* + M (G(c_r) - G(c))`` to first order (``M = (I - J)^{-1}``); the standard
    error of the full rule's fixed point is the spread of these shifts over ``r`` divided by
    ``sqrt(R)`` (``mse = Q* - 2m + q`` shifts by ``-2 dm + dq``)."""
    if M is None:
        return None
    shifts = replicate_shifts(output, overlaps, sample)
    if shifts is None:
        return None
    shifts = shifts @ M.T
    shifts = np.column_stack([shifts, -2.0 * shifts[:, 0] + shifts[:, 1]])
    se = shifts.std(axis=0, ddof=1) / np.sqrt(len(shifts))
    if not np.all(np.isfinite(se)):
        return None
    return dict(zip(("m", "q", "V", "mse"), (float(v) for v in se)))


def _joined(first, second):
    """``(n_iter, history)`` of two consecutive runs of :func:`iterate_se` (histories concatenated)."""
    history = {k: np.concatenate([first["history"][k], v]) for k, v in second["history"].items()}
    return first["n_iter"] + second["n_iter"], history


def iterate_two_level(coarse, fine, *, init, max_iter, tol, **kw):
    """:func:`iterate_se` on the ``coarse`` sample to ``max(tol, COARSE_TOL)``, then on ``fine``
    from the coarse state with the remaining steps (``coarse`` None: ``fine`` only); with
    acceleration, the fine level's steps are preconditioned by the coarse map's Jacobian at the
    coarse fixed point (:func:`coarse_preconditioner`), so that it needs few steps of the costly
    rule.  Returns ``(state, last conjugates, outcome, coarse steps, M)`` (``M`` the preconditioner
    or None); the outcome joins both levels (histories concatenated, the fine level's flags and
    message)."""
    if coarse is None:
        return (*iterate_se(sample=fine, init=init, max_iter=max_iter, tol=tol, **kw), 0, None)
    state, last, first = iterate_se(sample=coarse, init=init, max_iter=max_iter,
                                    tol=max(tol, COARSE_TOL), **kw)
    n1 = first["n_iter"]
    if first["diverged"]:  # (the coarse rule's own trouble must not decide): one level from init
        return (*iterate_se(sample=fine, init=init, max_iter=max_iter, tol=tol, **kw), 0, None)
    if n1 >= max_iter or n1 == 0:
        return state, last, first, n1, None
    M = None
    if first["converged"] and check_acceleration(kw.get("acceleration"), kw["damping"]) is not None:
        M = coarse_preconditioner(kw["output"], kw["overlaps"], coarse, state)
    state, last, second = iterate_se(sample=fine, init=state, max_iter=max_iter - n1, tol=tol,
                                     preconditioner=M, **kw)
    n_iter, history = _joined(first, second)
    outcome = dict(second, n_iter=n_iter, history=history,
                   message=f"{second['message']} (after {n1} steps on the coarse rule)")
    return state, last, outcome, n1, M


#: ``precision=``: the full rule grows at most to ``PRECISION_MAX_GROWTH`` times ``n_mc`` nodes.
PRECISION_MAX_GROWTH = 16
PRECISION_MARGIN = 1.25


def check_precision(precision, output, sample, output_rule, acceleration, input_side, damping, callback):
    """``precision``: None or a finite number > 0, with the settings that give ``stderr`` (for an
    output factor that integrates numerically: with closed forms there is nothing to refine)."""
    if precision is None:
        return None
    precision = check_positive(precision, "precision")
    if not math.isfinite(precision):
        raise ValueError(f"precision must be a finite number > 0 or None, got {precision!r}")
    needs = {"output_rule": (output_rule, "auto"), "acceleration": (acceleration, "anderson"),
             "input_side": (input_side, "free")}
    for name, (value, want) in needs.items():
        if value != want:
            raise ValueError(f"precision needs {name}={want!r} (the fixed point's error estimate), got {value!r}")
    if callback is not None or isinstance(check_damping(damping), tuple):
        raise ValueError("precision needs no callback and no damping schedule (the two-level rule's error estimate)")
    if integrates_numerically(output) and coarse_budget(output, sample, output_rule, damping, callback) is None:
        raise ValueError(f"precision needs n_mc >= {COARSE_FACTOR * COARSE_MIN_NODES} (the two-level rule, "
                         f"whose coarse Jacobian gives the error estimate), got n_mc = {sample.n_mc}")
    return precision


def refine_to_precision(precision, sample, fixed, outcome, M, stderr, *, max_iter, tol, **kw):
    """Grow the full rule until every ``stderr`` is at most ``precision`` (docs/theory.md §7.3).

    Each round multiplies the node budget by ``PRECISION_MARGIN * max(stderr) / precision`` (the
    QMC error falls about as ``1 / N``; the margin covers the error of the estimate), to at most
    ``PRECISION_MAX_GROWTH`` times the first budget, and continues from the fixed point on the
    larger rule (:meth:`~amp_attention.output_sample.OutputSample.resized`: same internal seed)
    with the full level's preconditioned steps (``M``).  A round that does not converge is dropped
    (the last converged fixed point stays).  Returns ``(fixed, outcome, sample, stderr, budgets,
    reason)``: ``budgets`` the node budgets of the full rules used, ``reason`` None when the
    target is met, else why not."""
    budgets = [sample.n_mc]
    limit = PRECISION_MAX_GROWTH * sample.n_mc
    reason = None
    while stderr is None or max(stderr.values()) > precision:
        if stderr is None:
            reason = "no error estimate of the fixed point"
            break
        n_new = min(math.ceil(PRECISION_MARGIN * max(stderr.values()) / precision * sample.n_mc), limit)
        if n_new <= sample.n_mc:
            reason = f"the node budget limit {limit} ({PRECISION_MAX_GROWTH} n_mc)"
            break
        if outcome["n_iter"] >= max_iter:
            reason = f"max_iter = {max_iter} steps used"
            break
        try:
            bigger = sample.resized(n_new)
        except InsufficientMemoryError as exc:
            reason = str(exc)
            break
        with warnings.catch_warnings():  # (a round that stops short is reported by the caller's warning)
            warnings.simplefilter("ignore", ConvergenceWarning)
            state, last, more = iterate_se(sample=bigger, init=fixed[0], max_iter=max_iter - outcome["n_iter"],
                                           tol=tol, preconditioner=M, **kw)
        if not more["converged"]:
            reason = f"the SE on {n_new} nodes stopped without converging ({more['message']})"
            break
        n_iter, history = _joined(outcome, more)
        outcome = dict(outcome, n_iter=n_iter, history=history)
        sample, fixed = bigger, (state, last)
        stderr = fixed_point_stderr(kw["output"], kw["overlaps"], sample, M)
        budgets.append(n_new)
    return fixed, outcome, sample, stderr, budgets, reason
