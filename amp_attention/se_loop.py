"""The state-evolution loop: the SE map (one step, docs/theory.md §7) and its iteration.

:func:`se_map` is one evaluation of the map ``(m, q, V) -> (m, q, V)`` through the two factors
(steps 1-6 of :mod:`amp_attention.se`); :func:`iterate_se` iterates it with the adaptive damping
of :class:`~amp_attention.loop.Loop` and, by default, safeguarded Anderson mixing
(:mod:`amp_attention.anderson`).  The public SE functions (:func:`amp_attention.se.state_evolution`,
:func:`amp_attention.se.bayes_state_evolution`) and the accuracy levels of the output rule
(:mod:`amp_attention.se_levels`) call these.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from .anderson import Anderson
from .loop import Loop, check_damping
from .output_sample import has_smooth_g_out

__all__ = ["iterate_se", "se_map", "input_side_map", "replicate_shifts", "erm_change", "check_init", "in_domain",
           "check_acceleration", "half_ratio_sq", "SE_HISTORY_KEYS", "ACCELERATIONS", "QUIET",
           "RESOLUTION_WINDOW", "RESOLUTION_FRACTION", "CYCLE_MEMORY", "CYCLE_RTOL",
           "CYCLE_MIN_CHANGE"]

#: Overflow is detected (non-finite state / predictions -> flagged), not warned about.
QUIET = np.errstate(over="ignore", invalid="ignore", divide="ignore")

SE_HISTORY_KEYS = ("m", "q", "V", "mse", "A_hat", "m_hat", "q_hat", "a", "Delta",
                   "stderr_A_hat", "stderr_m_hat", "stderr_q_hat", "time", "anderson", "preconditioned")
ACCELERATIONS = ("anderson", "none", None)  # ('none': the spelling of the CLI and the sweep, = None)

#: The resolution stop of a map with jumps (docs/theory.md §7.3): for an output factor whose ``g``
#: is not Lipschitz (``smooth_g_out = False``), the loop also stops, converged, when its change has
#: set no new low for ``RESOLUTION_WINDOW`` steps and stayed below ``RESOLUTION_FRACTION`` times the
#: integration error of one step of the map.
RESOLUTION_WINDOW = 8
RESOLUTION_FRACTION = 0.25
#: A state within ``CYCLE_RTOL`` (relative) of one of the last ``CYCLE_MEMORY`` states: the
#: deterministic map cycles; with adaptive damping the step size is halved (:meth:`Loop.damp_harder`).
CYCLE_MEMORY = 32
CYCLE_RTOL = 1e-12
CYCLE_MIN_CHANGE = 1e-6  # (a cycle moves: a state met again while the steps are this large)


class _Step(NamedTuple):
    """One step of :func:`iterate_se`: the state it started from, the map's raw value there, the
    plain damped step, and whether the next state was reached otherwise (an accelerated step)."""

    old: tuple
    raw: tuple
    plain: tuple
    off_path: bool


@QUIET
def se_map(output, overlaps, sample, state, t):
    """One evaluation of the SE map at ``state = (m, q, V)`` (steps 1-6 of :mod:`amp_attention.se`):
    ``((A_hat, m_hat, q_hat, stderr, a, Delta), (m, q, V) new)``, or a message (str) saying why the
    map is not defined there (an exception of a factor, a non-finite or out-of-domain value)."""
    try:
        A_hat, m_hat, q_hat, err = output.se_conjugates(sample, *state)               # steps 1-3
        if not (np.isfinite(A_hat) and A_hat > 0 and np.isfinite(q_hat) and np.isfinite(m_hat)):
            return f"step {t}: output side not finite (A_hat={A_hat}, m_hat={m_hat}, q_hat={q_hat})"
        a, Delta = m_hat / A_hat, half_ratio_sq(q_hat, A_hat)                         # step 4
        if not Delta > 0:
            return f"step {t}: Delta = {Delta} <= 0 (the output side carries no information)"
        raw = input_side_map(overlaps, (A_hat, m_hat, q_hat))                           # steps 5-6
        if not all(np.isfinite(v) for v in raw) or raw[1] < 0 or raw[2] < 0:
            return f"step {t}: order parameters out of domain (m, q, V) = {raw}"
    except (ValueError, ArithmeticError, RuntimeError, np.linalg.LinAlgError) as exc:
        return f"step {t}: {type(exc).__name__}: {exc}"  # (numerical trouble of a factor)
    return (A_hat, m_hat, q_hat, err, a, Delta), raw


def input_side_map(overlaps, conjugates):
    """Steps 4-6 of the SE map: ``(m, q, V)`` from the conjugates ``(A_hat, m_hat, q_hat)`` through
    ``R = a S* + sqrt(Delta) W`` with ``a = m_hat / A_hat``, ``Delta = q_hat / (2 A_hat^2)``."""
    A_hat, m_hat, q_hat = conjugates
    return tuple(float(v) for v in overlaps(m_hat / A_hat, half_ratio_sq(q_hat, A_hat), A_hat))


def replicate_shifts(output, overlaps, sample):
    """``(R, 3)``: ``G(c_r) - G(c)`` for the ``R`` independent replicates of the rule, with ``c_r`` the
    conjugates of the last evaluation computed on replicate ``r`` alone, ``c`` their mean over the
    whole rule and ``G`` the input side (:func:`input_side_map`); None without replicates (plain
    Monte Carlo, tensor rules, no evaluation yet) or where ``G`` fails.  Their spread over ``r``,
    divided by ``sqrt(R)``, is the integration error of one step of the map."""
    view = sample.view(output)
    vals = getattr(view, "last_values", None)
    if vals is None or view.rule.kind != "replicates":
        return None
    alpha = sample.alpha
    try:
        g0 = np.array(input_side_map(overlaps, alpha * view.mean(vals)))
        shifts = np.array([np.array(input_side_map(overlaps, c)) - g0
                           for c in alpha * view.rule.replicate_means(vals)])
    except (ValueError, ArithmeticError, RuntimeError, np.linalg.LinAlgError):
        return None
    return shifts if np.all(np.isfinite(shifts)) else None


def _resolution_reached(output, overlaps, sample, state, changes, change):
    """``(largest recent change, step error)`` when the resolution stop applies, else None: the
    change has set no new low for ``RESOLUTION_WINDOW`` steps and stayed below
    ``RESOLUTION_FRACTION`` times the integration error of one step of the map at ``state``
    (measured like the change, by ``change(state, state + error)``)."""
    W = RESOLUTION_WINDOW
    if len(changes) <= W or min(changes[-W:]) <= min(changes[:-W]):
        return None
    shifts = replicate_shifts(output, overlaps, sample)
    if shifts is None:
        return None
    error = shifts.std(axis=0, ddof=1) / np.sqrt(len(shifts))
    step_error = change(state, tuple(s + e for s, e in zip(state, error)))
    recent = max(changes[-W:])
    return (recent, step_error) if recent <= RESOLUTION_FRACTION * step_error else None


def _repeats(state, seen, change) -> bool:
    """``state`` within ``CYCLE_RTOL`` of one of the states ``seen``, measured by the loop's
    ``change`` (relative to ``max(1, |m|, |q|, |V|)`` for the ERM SE, to the mse for the Bayes SE,
    whose geometric decay towards perfect recovery is then no repeat)."""
    return any(change(s, state) <= CYCLE_RTOL for s in seen)


def iterate_se(output, denoiser, sample, overlaps, *, init, max_iter, tol, damping, callback,
               change, mse_floor=None, what="the state evolution", acceleration="anderson",
               preconditioner=None):
    """Run the SE loop; returns ``(state, last conjugates, loop outcome)``.

    ``overlaps(a, Delta, A_hat) -> (m, q, V)`` is the input side (free or finite, from
    ``denoiser``); ``change(old, new)`` the convergence measure compared with ``tol``;
    ``mse_floor``: stop with perfect recovery when ``mse <= mse_floor Q*`` (Bayes).

    ``acceleration='anderson'`` proposes each step by Anderson mixing of the ``(m, q, V)``
    iteration (:mod:`amp_attention.anderson`) combined with the current step size, and takes the
    plain damped step whenever a safeguard says so (e.g. too little memory, an ill-conditioned or
    out-of-domain proposal: ``q >= 0``, ``V > 0``, ``m^2 <= q Q*`` are required); ``None`` takes
    plain damped steps only.  A ``damping`` schedule always takes plain steps: it replays another
    run step by step.  ``history['anderson'][t]`` is the number of differences step t used (0: plain
    step; -1: the accelerated state of step t - 1 did not lower the residual and was undone: step t
    is the plain step from the state before it).  The adaptive damping learns only from states
    linked by a plain step.  The stop rule compares with ``tol`` the larger of the plain step's
    change and the step taken, so both modes stop on the same residual.  ``preconditioner``
    (with ``acceleration='anderson'`` only): a ``3 x 3`` matrix ``M ~ (I - J)^{-1}``, ``J`` the
    map's Jacobian in ``(m, q, V)``; the mixing then starts from the chord step ``x + M (G(x) - x)``
    (:class:`~amp_attention.anderson.Anderson`), and ``history['preconditioned'][t]`` is 1 for
    the steps proposed so (0 otherwise).

    The loop never raises for a valid problem: an evaluation that fails (an exception from a
    factor, a non-finite or out-of-domain conjugate) at an accelerated state is retried at the
    plain step (the memory cleared), then from the previous state with a smaller step when
    ``damping='auto'`` (:meth:`Loop.backtrack`), and otherwise stops the loop with
    ``diverged=True`` and a message naming the step and the reason.

    **Resolution stop.** For an output factor whose ``g`` is not Lipschitz in ``omega``
    (``smooth_g_out = False``, e.g. the non-convex softmax-square loss, whose prox switches branch on
    single nodes), the map of a finite rule has jumps of about ``1 / N``: it may have no fixed point
    at all, and the iteration then circles around one jump at a change that ``tol`` never sees.  On a
    rule with replicates, the loop therefore also stops, converged, when its change has set no new
    low for ``RESOLUTION_WINDOW`` steps and stayed below ``RESOLUTION_FRACTION`` times the
    integration error of one step of the map (:func:`replicate_shifts`, measured by ``change``); the
    message says so (docs/theory.md §7.3).  ``tol = 0`` (run all ``max_iter`` steps) turns it off.

    **Cycles.** The map is deterministic, so a state that repeats one of the last ``CYCLE_MEMORY``
    but its predecessor (to ``CYCLE_RTOL``), at a change above ``CYCLE_MIN_CHANGE``, is a cycle, which goes on for ever unless the step changes.  A long one (a
    runaway of ``q`` and ``V`` by 10x per step, then a collapse to ``S = 0``, as for the
    softmax-square loss at ``alpha = 0.02``, ``lam = 1e-5``) escapes the adaptive damping's vote,
    which compares consecutive updates only; with ``damping='auto'`` the step size is then halved
    (:meth:`~amp_attention.loop.Loop.damp_harder`) and the Anderson memory cleared.
    """
    Q = sample.Q
    state = check_init(init, Q)
    loop = Loop(SE_HISTORY_KEYS, max_iter=max_iter, tol=tol, damping=damping, callback=callback, unit="step")
    accel = Anderson(preconditioner=preconditioner) if check_acceleration(acceleration, damping) else None
    last = (None, None, None)
    prev = None  # the last _Step: where a retry restarts from
    seen = []  # recent states (a repeat is a cycle of the deterministic map)
    # (the resolution stop: for a non-Lipschitz g, and not when all max_iter steps were asked for, tol = 0)
    changes = [] if not has_smooth_g_out(output) and loop.tol > 0 else None

    def evaluate(m, q, V, t):
        """One SE map evaluation; returns (conjugates, raw new state) or an error message."""
        return se_map(output, overlaps, sample, (m, q, V), t)

    for t in loop:
        t0 = time.perf_counter()
        res = evaluate(*state, t)
        recorded = state  # the last state in the history
        if isinstance(res, str) and accel is not None and prev is not None and prev.off_path \
                and state != prev.plain:
            accel.reset()                # an accelerated state failed: take the plain step instead
            state, prev = prev.plain, prev._replace(off_path=False)
            res = evaluate(*state, t)
        while isinstance(res, str) and prev is not None and loop.backtrack():
            if accel is not None:
                accel.reset()
            old, raw_old = prev.old, prev.raw  # retry the last update with a quarter of the step
            state = tuple((1 - loop.current_damping()) * r + loop.current_damping() * o
                          for r, o in zip(raw_old, old))
            res = evaluate(*state, t)
        if isinstance(res, str):
            loop.diverge(res + "; kept the last recorded state")
            state = recorded
            break
        (A_hat, m_hat, q_hat, err, a, Delta), raw = res
        # the adaptive damping learns only from consecutive states linked by a plain damped step
        new = tuple(float(v) for v in loop.update(raw, state, adapt=not (prev and prev.off_path)))
        if not all(np.isfinite(v) for v in new):
            loop.diverge(f"step {t}: non-finite order parameters; kept the last finite ones")
            break
        delta, step, used, chord = change(state, new), _Step(state, raw, new, False), 0, 0
        if accel is not None:
            proposal, used = accel.propose(state, raw, 1.0 - loop.last_damping,
                                           accept=lambda x: in_domain(*x, Q))
            if accel.retreated:  # undo the last accelerated step: the plain step from the state before it
                step, used = _Step(prev.old, prev.raw, tuple(float(v) for v in proposal), True), -1
            elif proposal is not None:
                step, chord = _Step(state, raw, new, True), int(accel.preconditioner is not None)
            if proposal is not None:
                new = tuple(float(v) for v in proposal)
                delta = max(delta, change(state, new))
        prev = step
        state = new
        m, q, V = state
        mse = Q - 2 * m + q
        if not loop.record(m=m, q=q, V=V, mse=mse, A_hat=A_hat, m_hat=m_hat, q_hat=q_hat, a=a, Delta=Delta,
                           stderr_A_hat=err["A_hat"], stderr_m_hat=err["m_hat"], stderr_q_hat=err["q_hat"],
                           time=time.perf_counter() - t0, anderson=used, preconditioned=chord):
            state = recorded
            break
        last = (A_hat, a, Delta)
        if mse_floor is not None and mse <= mse_floor * Q:
            loop.converge(f"perfect recovery: mse = {mse:.3g} <= {mse_floor:g} Q* after {loop.n_iter} steps")
            break
        if loop.finished(delta, callback_args=(t, loop.history)):
            break
        if delta > CYCLE_MIN_CHANGE and _repeats(state, seen[:-1], change) and loop.damp_harder():
            seen.clear()  # a cycle: damp harder, and forget the cycle's states
            if accel is not None:
                accel.reset()
        seen = (seen + [state])[-CYCLE_MEMORY:]
        if changes is not None:
            changes.append(delta)
            reached = _resolution_reached(output, overlaps, sample, state, changes, change)
            if reached is not None:
                loop.converge(f"converged to the resolution of the integration rule: the change ({reached[0]:.2e}) "
                              f"set no new low for {RESOLUTION_WINDOW} steps, below {RESOLUTION_FRACTION:g} x the "
                              f"integration error {reached[1]:.2e} of one step of the map, whose jumps (a "
                              f"non-Lipschitz g) keep it above tol {loop.tol:g}; after {loop.n_iter} steps")
                break
    return state, last, loop.outcome(what)


def half_ratio_sq(q_hat, A_hat):
    """``q_hat / (2 A_hat^2)`` for ``A_hat > 0``, also where ``A_hat^2`` over- or underflows
    (alpha near the ends of the float range)."""
    A2 = A_hat * A_hat
    if A2 == 0.0 or not np.isfinite(A2):
        return (q_hat / A_hat) / (2.0 * A_hat)
    return q_hat / (2 * A2)


def erm_change(old, new):
    """``max(|dm|, |dq|, |dV|) / max(1, |m|, |q|, |V|)`` (relative to the new state)."""
    return max(abs(n - o) for n, o in zip(new, old)) / max(1.0, *(abs(v) for v in new))


def check_init(init, Q):
    """``init``: None -> ``(0, 0, 1)``; else three finite numbers ``(m, q, V)`` (a sequence, or a
    mapping / object with ``m``, ``q``, ``V``) with ``q >= 0``, ``V > 0``, ``m^2 <= q Q*``."""
    if init is None:
        return 0.0, 0.0, 1.0
    if isinstance(init, dict):
        vals = [init.get(k) for k in ("m", "q", "V")]
    elif all(hasattr(init, k) for k in ("m", "q", "V")):
        vals = [getattr(init, k) for k in ("m", "q", "V")]
    elif isinstance(init, (list, tuple, np.ndarray)) and np.ndim(init) == 1 and len(init) == 3:
        vals = list(init)
    else:
        raise ValueError(f"init must be None or three numbers (m, q, V) (a sequence or a mapping with keys "
                         f"'m', 'q', 'V'), got {init!r}")
    for k, v in zip(("m", "q", "V"), vals):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not np.isfinite(v):
            raise ValueError(f"init must hold three finite numbers (m, q, V), got {k} = {v!r}")
    m, q, V = (float(v) for v in vals)
    if not in_domain(m, q, V, Q):
        raise ValueError(f"init must satisfy q >= 0, V > 0, m^2 <= q Q*, got {(m, q, V)}")
    return m, q, V


def in_domain(m, q, V, Q):
    """The domain of the SE map: ``q >= 0``, ``V > 0``, ``m^2 <= q Q*`` (Cauchy-Schwarz)."""
    return bool(q >= 0 and V > 0 and m * m <= q * Q * (1 + 1e-9))


def check_acceleration(acceleration, damping):
    """The acceleration in effect: ``acceleration`` ('anderson', or None alias 'none'), or None under
    a damping schedule (a sequence, replayed step by step)."""
    if not (acceleration is None or (isinstance(acceleration, str) and acceleration in ACCELERATIONS)):
        raise ValueError(f"acceleration must be 'anderson' or None ('none'), got {acceleration!r}")
    return None if acceleration == "none" or isinstance(check_damping(damping), tuple) else acceleration
