"""The scaffold shared by every iterative loop of the package: GAMP and the state evolutions.

A loop body computes the next state from the current one; the scaffold owns everything around it
(docs/theory.md §5, §7):

* argument checks (``max_iter``, ``tol``, ``damping``, ``callback``), with errors naming them;
* damping (:meth:`Loop.update`): ``new <- (1 - delta_t) new + delta_t old``, which never moves a
  fixed point.  ``damping`` is a float (fixed ``delta``), ``'auto'`` (adaptive, below) or a
  sequence (a schedule replayed step by step, e.g. another run's ``history['damping']``: the SE
  replays GAMP's schedule so that the two stay comparable iteration by iteration);
* the per-iteration history (a dict of lists, returned as float arrays), which always includes
  ``damping`` (the ``delta_t`` used at iteration t);
* the stop rule: converged when the loop's change measure falls below ``tol`` (``tol = 0`` runs
  exactly ``max_iter`` iterations), stopped by the user's callback (returning True), or
  ``max_iter`` reached, which emits a :class:`sklearn.exceptions.ConvergenceWarning` when
  ``tol > 0``;
* the divergence flag: a loop that meets a non-finite or out-of-domain quantity calls
  :meth:`Loop.diverge` and keeps its last finite state.  :meth:`Loop.finite` checks named
  intermediate quantities (before they reach a factor, e.g. ``eigh``), and :meth:`Loop.record`
  refuses a non-finite history entry: the loop is flagged (``diverged=True``, a message naming the
  iteration and the quantities) and the entry is not recorded.  Entries listed in ``nan_ok`` are
  NaN by design (e.g. ``mse`` without a teacher) and are exempt;

Adaptive damping (``damping='auto'``), in the manner of adaptive-damping GAMP: the loop runs
undamped (``delta = 0``, step size ``theta = 1 - delta = 1``) while the iteration contracts, and
watches the raw updates ``u_t = new_t - old_t`` (before mixing), each state component divided by
its own scale ``max(|new|, |old|)`` (so a large scalar such as GAMP's ``V`` does not drown the
matrix ``S``), through ``cos = cos(u_t, u_{t-1})`` and ``ratio = |u_t| / |u_{t-1}|``.  A step is
*bad* when the updates reverse without shrinking (``cos < -0.2`` and ``ratio > 0.9``: the map
overshoots, as in a period-2 cycle) or grow while turning (``ratio > 1.05`` and ``cos < 0.5``).
The step size is halved (down to ``theta_min = 1/64``) when at least 3 of the last 6 steps were
bad (then the window restarts), and grows back by 10% per iteration, up to its ceiling (1 unless
:meth:`Loop.damp_harder` lowered it), while at most one of them was (not the current one) and the
update shrinks.  The vote over a window makes the rule insensitive
to isolated jumps of the map (e.g. the rank of a nuclear-norm prox changing by one), which a
step-by-step rule mistook for oscillation, driving the step size to its floor.  A contracting iteration therefore stays
undamped even when its first updates overshoot, and growth along a steady direction (an iteration
leaving a plateau) is left alone: damping cannot cure a monotone instability and would only slow
the escape.  A step size stuck at ``theta_min`` for 25 iterations (chatter across a discontinuity
of the map, e.g. a non-convex prox switching branch) restarts at the ceiling.  For a linearised map with
eigenvalue ``lambda`` the damped factor is ``1 + theta (lambda - 1)``: any ``lambda < 1`` contracts
for a small enough ``theta``, so cycles (``lambda = -1``) and overshooting divergences
(``lambda < -1``) are cured, and the fixed point is unchanged.  A loop can also ask for a smaller
step after a failed evaluation (:meth:`Loop.backtrack`), or when it sees a cycle the vote cannot
(:meth:`Loop.damp_harder`: the SE, whose map is deterministic, does so when a state repeats).

Usage::

    loop = Loop(KEYS, max_iter=..., tol=..., damping=..., callback=..., unit="iteration")
    for t in loop:
        ...                                   # compute new from old
        new = loop.update(new, old)           # a tuple of arrays/floats, mixed component-wise
        if not finite:
            loop.diverge(f"iteration {t}: ..."); break
        if not loop.record(key=value, ...):      # False: a non-finite entry, flagged
            break
        if loop.finished(change, callback_args=(t, ...)):
            break
    outcome = loop.outcome()                  # n_iter, converged, diverged, message, history
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ._validation import check_nonnegative

__all__ = ["Loop", "ConvergenceWarning", "check_max_iter", "check_damping", "check_callback", "warn_user"]

THETA_MIN = 1.0 / 64.0
RESTART_AFTER = 25  # iterations at THETA_MIN before an undamped restart
VOTE_WINDOW = 6     # the adaptive rule votes over the last VOTE_WINDOW steps ...
VOTE_BAD = 3        # ... and halves the step size when at least VOTE_BAD of them were bad


def _user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` called from a function of this module that points at
    the first frame outside this package and outside NumPy's ``errstate`` / contextlib wrappers."""
    import inspect

    package = os.path.dirname(os.path.abspath(__file__))
    level = 1
    frame = inspect.currentframe().f_back  # the function calling warnings.warn
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(package) or name.endswith(("_ufunc_config.py", "contextlib.py"))):
            return level
        frame = frame.f_back
        level += 1
    return 2


def warn_user(message: str, category=ConvergenceWarning) -> None:
    """:func:`warnings.warn` attributed to the first caller outside this package (the user's line)."""
    warnings.warn(message, category, stacklevel=_user_stacklevel())


def check_max_iter(max_iter, name: str = "max_iter") -> int:
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {max_iter!r}")
    return int(max_iter)


def _check_damping_value(value, name):
    d = check_nonnegative(value, name)
    if d >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return d


def check_damping(damping, name: str = "damping"):
    """``'auto'``, a float in [0, 1), or a non-empty sequence of such floats (a schedule)."""
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"{name} must be 'auto', a number in [0, 1) or a sequence of them, got {damping!r}")
        return "auto"
    if isinstance(damping, (list, tuple, np.ndarray)):
        vals = [_check_damping_value(float(v) if isinstance(v, np.floating) else v, name)
                for v in np.asarray(damping, dtype=object).ravel()]
        if not vals:
            raise ValueError(f"{name} must not be an empty sequence")
        return tuple(vals)
    return _check_damping_value(damping, name)


def check_callback(callback, name: str = "callback"):
    if callback is not None and not callable(callback):
        raise ValueError(f"{name} must be None or a callable, got {type(callback).__name__}")
    return callback


def _relative_update(new, old):
    """The raw update ``new - old`` of a state tuple, flattened, each component divided by its
    scale ``max(|new|, |old|)`` (a component that is 0 in both contributes 0)."""
    parts = []
    for n, o in zip(new, old):
        n = np.ravel(np.asarray(n, dtype=np.float64))
        o = np.ravel(np.asarray(o, dtype=np.float64))
        scale = max(float(np.linalg.norm(n)), float(np.linalg.norm(o)))
        parts.append((n - o) / scale if scale > 0 else np.zeros_like(n))
    return np.concatenate(parts)


class Loop:
    """Iteration scaffold: history, damping, stop rule, callback and divergence flag.

    Parameters
    ----------
    keys : names of the per-iteration history entries (each :meth:`record` must give all of them;
        ``damping`` is added by the loop).
    max_iter : integer >= 1.   tol : >= 0 (0: run exactly ``max_iter`` iterations).
    damping : ``'auto'``, a float in [0, 1) or a sequence of them (see the module docstring).
    callback : None or a callable; its return value True stops the loop.
    unit : the word used in messages ("iteration" for GAMP, "step" for the SE).
    nan_ok : history keys whose entries may be NaN by design (placeholders); not inf.
    """

    def __init__(self, keys, *, max_iter, tol, damping=0.0, callback=None, unit="iteration", nan_ok=()):
        self.max_iter = check_max_iter(max_iter)
        self.tol = check_nonnegative(tol, "tol")
        self.damping = check_damping(damping)
        self.callback = check_callback(callback)
        self.unit = unit
        self.nan_ok = frozenset(nan_ok)
        self.history = {k: [] for k in keys}
        self.history["damping"] = []
        self.n_iter = 0
        self.converged = False
        self.diverged = False
        self.message = f"reached max_iter={self.max_iter}"
        self._t = -1
        self._stopped = False
        self._by_callback = False
        self.theta = 1.0 if self.damping == "auto" else None  # adaptive step size
        self.theta_max = 1.0  # its ceiling (lowered by damp_harder)
        self._prev_update = None
        self._bad = []  # the adaptive rule's recent votes (True: a bad step)
        self._at_floor = 0
        self.last_damping = 0.0

    def __iter__(self):
        for t in range(self.max_iter):
            if self._stopped:
                return
            self._t = t
            yield t

    def current_damping(self) -> float:
        """``delta_t`` for the current iteration."""
        if self.damping == "auto":
            return 1.0 - self.theta
        if isinstance(self.damping, tuple):
            return self.damping[min(self._t, len(self.damping) - 1)] if self._t >= 0 else self.damping[0]
        return self.damping

    def _adapt(self, update: np.ndarray, adapt: bool = True) -> None:
        prev = self._prev_update
        self._prev_update = update
        if prev is None or not adapt:
            return
        nu, npv = float(np.linalg.norm(update)), float(np.linalg.norm(prev))
        if not (math.isfinite(nu) and math.isfinite(npv)) or npv == 0.0 or nu == 0.0:
            return
        cos, ratio = float(np.dot(update, prev)) / (nu * npv), nu / npv
        oscillating = cos < -0.2 and ratio > 0.9   # updates reverse without shrinking (a cycle)
        growing = ratio > 1.05 and cos < 0.5       # updates grow while turning
        bad = oscillating or growing
        self._bad = (self._bad + [bad])[-VOTE_WINDOW:]
        if len(self._bad) == VOTE_WINDOW and sum(self._bad) >= VOTE_BAD:
            self.theta = max(THETA_MIN, 0.5 * self.theta)
            self._bad = []
        elif not bad and sum(self._bad) <= 1 and ratio < 1.0:
            self.theta = min(self.theta_max, 1.1 * self.theta)
        # a step size stuck at its floor (chatter across a discontinuity of the map, where no
        # damping helps) restarts at its ceiling (undamped unless damp_harder lowered it)
        self._at_floor = self._at_floor + 1 if self.theta == THETA_MIN else 0
        if self._at_floor >= RESTART_AFTER:
            self.theta, self._at_floor = self.theta_max, 0

    def update(self, new, old, adapt=True):
        """Damped update of a state tuple ``(1 - delta_t) new + delta_t old``, component-wise.

        With ``damping='auto'`` the raw update ``new - old`` first adapts ``delta_t``, from its
        comparison with the previous raw update; ``adapt=False`` only records it (the caller did not
        reach ``old`` by a damped step, e.g. an accelerated one, so the two say nothing about the
        damped map).  Returns a tuple of the mixed components (the same types as given).
        """
        new, old = tuple(new), tuple(old)
        if self.damping == "auto":
            with np.errstate(all="ignore"):
                self._adapt(_relative_update(new, old), adapt)
        d = self.current_damping()
        self.last_damping = d
        if d == 0.0:
            return new
        return tuple((1.0 - d) * n + d * o for n, o in zip(new, old))

    def mix(self, new, old):
        """Damped update of one component (fixed or scheduled damping)."""
        return self.update((new,), (old,))[0]

    def backtrack(self) -> bool:
        """After a failed evaluation, ask for a smaller step from the previous state (``'auto'``
        only): quarter the step size; False when it cannot shrink further."""
        if self.damping != "auto" or self.theta <= THETA_MIN:
            return False
        self.theta = max(THETA_MIN, 0.25 * self.theta)
        self._prev_update = None
        self._bad = []
        return True

    def damp_harder(self) -> bool:
        """Halve the ceiling of the adaptive step size for the rest of the run, and the step size
        with it (``'auto'`` only; the votes restart), e.g. when the caller sees its deterministic
        map back at a state it visited: a cycle longer than the vote's window, such as a runaway
        followed by a collapse, during which the step size grows back after each halving.  False
        when it cannot shrink further."""
        if self.damping != "auto" or self.theta_max <= THETA_MIN:
            return False
        self.theta_max = max(THETA_MIN, 0.5 * self.theta_max)
        self.theta = min(self.theta, self.theta_max)
        self._prev_update = None
        self._bad = []
        return True

    def diverge(self, message: str) -> None:
        """Flag divergence (the caller keeps its last finite state and breaks)."""
        self.diverged = True
        self.message = message
        self._stopped = True

    def finite(self, **values) -> bool:
        """True when every named value (scalar or array) is finite; else flag divergence with a
        message naming the current iteration and the non-finite quantities, and return False."""
        with np.errstate(all="ignore"):
            bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
        if bad:
            self.diverge(f"{self.unit} {max(self._t, 0)}: non-finite {', '.join(bad)} "
                         f"(overflow or invalid arithmetic); kept the last finite state")
        return not bad

    def record(self, **values) -> bool:
        """Append one iteration's values and count the iteration.

        Returns False, records nothing and flags divergence (:meth:`finite`) when a value is not
        finite, except NaN in the keys of ``nan_ok``."""
        if not self.finite(**{k: v for k, v in values.items()
                              if not (k in self.nan_ok and np.isnan(v))}):
            return False
        for k, v in values.items():
            self.history[k].append(v)
        self.history["damping"].append(self.last_damping)
        self.n_iter = self._t + 1
        return True

    def finished(self, change: float, callback_args=()) -> bool:
        """Apply the callback and the stop rule after :meth:`record`; True means break."""
        if self.callback is not None and self.callback(*callback_args):
            self.message = f"stopped by callback at {self.unit} {self._t}"
            self._stopped = self._by_callback = True
            return True
        if self.tol > 0 and change < self.tol:
            self.converged = True
            self.message = f"converged: change {change:.2e} < tol {self.tol:g} after {self.n_iter} {self.unit}s"
            self._stopped = True
            return True
        return False

    def converge(self, message: str) -> None:
        """Declare convergence by a loop-specific criterion (e.g. perfect recovery)."""
        self.converged = True
        self.message = message
        self._stopped = True

    def outcome(self, what: str = "the loop") -> dict:
        """``n_iter, converged, diverged, message, history`` (history as float arrays).

        Warns (:class:`ConvergenceWarning`) when ``tol > 0`` and the loop ran out of iterations,
        attributed to the first caller outside this package (the user's line).
        """
        if (self.tol > 0 and not (self.converged or self.diverged or self._by_callback)
                and self.n_iter >= self.max_iter):
            warn_user(f"{what} did not converge: {self.message} (tol={self.tol:g}); increase max_iter "
                      "or loosen tol")
        history = {k: np.asarray(v, dtype=float) for k, v in self.history.items()}
        return {"n_iter": self.n_iter, "converged": self.converged, "diverged": self.diverged,
                "message": self.message, "history": history}
