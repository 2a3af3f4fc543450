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

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._validation import check_nonnegative, check_positive, check_rng, check_T
from .anderson import Anderson
from .bayes_outputs import bayes_output
from .denoisers import RIEDenoiser, make_denoiser
from .factors import OutputFactor, Overlaps
from .loop import Loop, check_damping
from .losses import make_loss
from .model import Teacher, as_spectral_law, check_channel
from .output_sample import METHODS as RULES
from .output_sample import DEFAULT_N_MC, OutputSample
from .whitening import n_pairs

__all__ = ["SEResult", "BayesSEResult", "state_evolution", "bayes_state_evolution", "iterate_se"]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

#: Overflow is detected (non-finite state / predictions -> flagged), not warned about.
_QUIET = np.errstate(over="ignore", invalid="ignore", divide="ignore")

SE_HISTORY_KEYS = ("m", "q", "V", "mse", "A_hat", "m_hat", "q_hat", "a", "Delta",
                   "stderr_A_hat", "stderr_m_hat", "stderr_q_hat", "time", "anderson", "preconditioned")
ACCELERATIONS = ("anderson", None)


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


class _Step(NamedTuple):
    """One step of :func:`iterate_se`: the state it started from, the map's raw value there, the
    plain damped step, and whether the next state was reached otherwise (an accelerated step)."""

    old: tuple
    raw: tuple
    plain: tuple
    off_path: bool


@_QUIET
def _se_map(output, overlaps, sample, state, t):
    """One evaluation of the SE map at ``state = (m, q, V)`` (steps 1-6 of the module docstring):
    ``((A_hat, m_hat, q_hat, stderr, a, Delta), (m, q, V) new)``, or a message (str) saying why the
    map is not defined there (an exception of a factor, a non-finite or out-of-domain value)."""
    try:
        A_hat, m_hat, q_hat, err = output.se_conjugates(sample, *state)               # steps 1-3
        if not (np.isfinite(A_hat) and A_hat > 0 and np.isfinite(q_hat) and np.isfinite(m_hat)):
            return f"step {t}: output side not finite (A_hat={A_hat}, m_hat={m_hat}, q_hat={q_hat})"
        a, Delta = m_hat / A_hat, _half_ratio_sq(q_hat, A_hat)                         # step 4
        if not Delta > 0:
            return f"step {t}: Delta = {Delta} <= 0 (the output side carries no information)"
        raw = tuple(float(v) for v in overlaps(a, Delta, A_hat))                       # steps 5-6
        if not all(np.isfinite(v) for v in raw) or raw[1] < 0 or raw[2] < 0:
            return f"step {t}: order parameters out of domain (m, q, V) = {raw}"
    except (ValueError, ArithmeticError, RuntimeError, np.linalg.LinAlgError) as exc:
        return f"step {t}: {type(exc).__name__}: {exc}"  # (numerical trouble of a factor)
    return (A_hat, m_hat, q_hat, err, a, Delta), raw


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
    """
    Q = sample.Q
    state = _check_init(init, Q)
    loop = Loop(SE_HISTORY_KEYS, max_iter=max_iter, tol=tol, damping=damping, callback=callback, unit="step")
    accel = Anderson(preconditioner=preconditioner) if _check_acceleration(acceleration, damping) else None
    last = (None, None, None)
    prev = None  # the last _Step: where a retry restarts from

    def evaluate(m, q, V, t):
        """One SE map evaluation; returns (conjugates, raw new state) or an error message."""
        return _se_map(output, overlaps, sample, (m, q, V), t)

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
                                           accept=lambda x: _in_domain(*x, Q))
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
    return state, last, loop.outcome(what)


def _half_ratio_sq(q_hat, A_hat):
    """``q_hat / (2 A_hat^2)`` for ``A_hat > 0``, also where ``A_hat^2`` over- or underflows
    (alpha near the ends of the float range)."""
    A2 = A_hat * A_hat
    if A2 == 0.0 or not np.isfinite(A2):
        return (q_hat / A_hat) / (2.0 * A_hat)
    return q_hat / (2 * A2)


def _erm_change(old, new):
    """``max(|dm|, |dq|, |dV|) / max(1, |m|, |q|, |V|)`` (relative to the new state)."""
    return max(abs(n - o) for n, o in zip(new, old)) / max(1.0, *(abs(v) for v in new))


def _channel_beta(channel, beta):
    if beta is not None:
        return check_positive(beta, "beta")
    return getattr(channel, "beta", 1.0)


def _check_init(init, Q):
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
    if not _in_domain(m, q, V, Q):
        raise ValueError(f"init must satisfy q >= 0, V > 0, m^2 <= q Q*, got {(m, q, V)}")
    return m, q, V


def _in_domain(m, q, V, Q):
    """The domain of the SE map: ``q >= 0``, ``V > 0``, ``m^2 <= q Q*`` (Cauchy-Schwarz)."""
    return bool(q >= 0 and V > 0 and m * m <= q * Q * (1 + 1e-9))


def _check_acceleration(acceleration, damping):
    """The acceleration in effect: ``acceleration`` ('anderson' or None), or None under a damping
    schedule (a sequence, replayed step by step)."""
    if not (acceleration is None or (isinstance(acceleration, str) and acceleration in ACCELERATIONS)):
        raise ValueError(f"acceleration must be 'anderson' or None, got {acceleration!r}")
    return None if isinstance(check_damping(damping), tuple) else acceleration


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


#: Two-level output rule of ``output_rule='auto'`` (docs/theory.md §7.1): the SE first iterates on
#: a coarse rule of ``n_mc // COARSE_FACTOR`` nodes until its change is below ``COARSE_TOL`` (the
#: coarse rule's own accuracy), then continues from there on the full rule of ``n_mc`` nodes.
COARSE_FACTOR = 16
COARSE_TOL = 1e-5
COARSE_MIN_NODES = 4096
#: The coarse-level Jacobian that preconditions the full level (:func:`_coarse_preconditioner`):
#: relative one-sided difference steps ``JACOBIAN_STEP``; not used when ``I - J`` has a condition
#: number above ``JACOBIAN_MAX_COND`` in the probe coordinates.
JACOBIAN_STEP = 1e-4
JACOBIAN_MAX_COND = 1e8


def _coarse_budget(output, sample, output_rule, damping, callback):
    """The node budget of the coarse level of ``output_rule='auto'``, or None when the two-level
    rule does not apply: a rule other than ``'auto'``, a factor with closed-form conjugates (no
    nodes to save), a damping schedule (the run replays another step by step), a callback (it sees
    one trajectory), or fewer than ``COARSE_MIN_NODES`` coarse nodes."""
    if output_rule != "auto" or callback is not None or isinstance(check_damping(damping), tuple):
        return None
    if type(output).se_conjugates is not OutputFactor.se_conjugates:
        return None
    n_coarse = sample.n_mc // COARSE_FACTOR
    return n_coarse if n_coarse >= COARSE_MIN_NODES else None


def _coarse_preconditioner(output, overlaps, coarse, state):
    """``M = (I - J)^{-1}`` with ``J`` the Jacobian of the SE map on the ``coarse`` rule at
    ``state = (m, q, V)``, or None if the map fails there or ``I - J`` is ill-conditioned
    (docs/theory.md §7.3).

    ``J`` is found from forward differences along ``m`` at fixed ``s = q - m^2/Q*``, along ``q``
    and along ``V``, with steps ``JACOBIAN_STEP`` times ``max(|m|, 1e-3)``, ``max(s, 1e-6 q)`` (1 if
    ``q = 0``) and ``V``.  The step in ``q`` is relative to ``s`` because the map depends on
    ``sqrt(s)`` (the part of ``omega`` independent of ``z*``), whose derivative grows as
    ``s -> 0`` (near perfect recovery).  Every probe stays in the domain ``s >= 0``, ``V > 0``.
    The condition number is judged in the probe coordinates (scaled by the steps)."""
    base = _se_map(output, overlaps, coarse, state, 0)
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
        res = _se_map(output, overlaps, coarse, tuple(probe), 0) if _in_domain(*probe, Q) else "out"
        if isinstance(res, str):
            return None
        JD[:, i] = (np.array(res[1]) - g0) / h[i]
    A = np.eye(3) - JD @ np.linalg.inv(D)
    P = D * h  # (in these coordinates the steep sqrt(s) dependence is not mistaken for bad conditioning)
    if not np.all(np.isfinite(A)) or np.linalg.cond(np.linalg.solve(P, A @ P)) > JACOBIAN_MAX_COND:
        return None
    return np.linalg.inv(A)


def _fixed_point_stderr(output, overlaps, sample, M):
    """Standard error of the fixed point ``(m, q, V, mse)`` due to the quadrature, or None.

    With ``c_r`` the conjugates ``(A_hat, m_hat, q_hat)`` of the last step on scrambling ``r`` of
    the rule (``R`` of them, mean ``c``) and ``G(c)`` the input side, the fixed point of scrambling
    ``r`` alone is ``x* + M (G(c_r) - G(c))`` to first order (``M = (I - J)^{-1}``); the standard
    error of the full rule's fixed point is the spread of these shifts over ``r`` divided by
    ``sqrt(R)`` (``mse = Q* - 2m + q`` shifts by ``-2 dm + dq``)."""
    view = sample.view(output)
    vals = getattr(view, "last_values", None)
    if M is None or vals is None or view.rule.kind != "replicates":
        return None
    alpha = sample.alpha

    def G(c):
        A_hat, m_hat, q_hat = c
        return np.array(overlaps(m_hat / A_hat, _half_ratio_sq(q_hat, A_hat), A_hat), dtype=np.float64)

    try:
        reps = alpha * view.rule.replicate_means(vals)
        g0 = G(alpha * view.mean(vals))
        shifts = np.array([M @ (G(c) - g0) for c in reps])
    except (ValueError, ArithmeticError, RuntimeError, np.linalg.LinAlgError):
        return None
    shifts = np.column_stack([shifts, -2.0 * shifts[:, 0] + shifts[:, 1]])
    se = shifts.std(axis=0, ddof=1) / np.sqrt(len(reps))
    if not np.all(np.isfinite(se)):
        return None
    return dict(zip(("m", "q", "V", "mse"), (float(v) for v in se)))


def _iterate_two_level(coarse, fine, *, init, max_iter, tol, **kw):
    """:func:`iterate_se` on the ``coarse`` sample to ``max(tol, COARSE_TOL)``, then on ``fine``
    from the coarse state with the remaining steps (``coarse`` None: ``fine`` only); with
    acceleration, the fine level's steps are preconditioned by the coarse map's Jacobian at the
    coarse fixed point (:func:`_coarse_preconditioner`), so that it needs few steps of the costly
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
    if first["converged"] and _check_acceleration(kw.get("acceleration"), kw["damping"]) is not None:
        M = _coarse_preconditioner(kw["output"], kw["overlaps"], coarse, state)
    state, last, second = iterate_se(sample=fine, init=state, max_iter=max_iter - n1, tol=tol,
                                     preconditioner=M, **kw)
    history = {k: np.concatenate([first["history"][k], v]) for k, v in second["history"].items()}
    outcome = dict(second, n_iter=n1 + second["n_iter"], history=history,
                   message=f"{second['message']} (after {n1} steps on the coarse rule)")
    return state, last, outcome, n1, M


@_QUIET
def state_evolution(alpha, T, teacher, channel, loss="cross_entropy", reg="nuclear", lam=0.05,
                    beta=None, *, spectrum="exact", input_side="free", n_mc=DEFAULT_N_MC, n_draws=4,
                    max_iter=200, tol=1e-8, damping="auto", seed=0, predictions=True,
                    callback=None, init=None, output_rule="auto", prox_start="global",
                    acceleration="anderson") -> SEResult:
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
        damping, safeguarded, docs/theory.md §7.3; it never moves a fixed point) or ``None`` (plain
        damped steps, the behaviour before acceleration existed).  With a ``damping`` schedule the
        steps are always plain (the schedule replays another run step by step).
        ``history['anderson']`` records per step the number of differences used (0: plain step,
        -1: an accelerated step undone, see :func:`iterate_se`).
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
    acceleration = _check_acceleration(acceleration, damping)
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
    m, q, V = _check_init(init, Q)
    n_coarse = _coarse_budget(output, sample, output_rule, damping, callback)
    coarse = None if n_coarse is None else OutputSample(alpha, T, Q, channel, n_mc=n_coarse, method="qmc")
    (m, q, V), (A_hat, a, Delta), outcome, coarse_steps, M = _iterate_two_level(
        coarse, sample, output=output, denoiser=denoiser, overlaps=overlaps, init=(m, q, V),
        max_iter=max_iter, tol=tol, damping=damping, callback=callback, change=_erm_change,
        what="the ERM state evolution", acceleration=acceleration)
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
              "coarse_n_mc": n_coarse, "coarse_steps": coarse_steps, "coarse_jacobian": M is not None}
    stderr = (_fixed_point_stderr(output, overlaps, sample, M)  # (R + 1 input-side calls: cheap if free)
              if outcome["converged"] and input_side == "free" else None)
    return SEResult(m=m, q=q, V=V, mse=Q - 2 * m + q, Q=Q, test_error=test_error,
                    test_error_noisy=test_error_noisy, train_loss=train_loss,
                    train_objective=train_objective, a=a, Delta=Delta, A_hat=A_hat, params=params,
                    stderr=stderr, **outcome)


def _bayes_change(old, new):
    """``|mse_new - mse_old| / mse_new`` on the Nishimori line (``mse = V``): relative, so a
    geometric decay to 0 above a perfect-recovery threshold runs on until ``mse_floor``."""
    return abs(new[2] - old[2]) / new[2] if new[2] > 0 else 0.0


@_QUIET
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
    acceleration = _check_acceleration(acceleration, damping)
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
