"""The scaffold shared by every iterative loop of the package: GAMP and the state evolutions.

A loop body computes the next state from the current one; the scaffold owns everything around it
(docs/theory.md §5, §7):

* argument checks (``max_iter``, ``tol``, ``damping``, ``callback``), with errors naming them;
* damping: ``new <- (1 - damping) new + damping old`` (:meth:`Loop.mix`), which never moves a
  fixed point;
* the per-iteration history (a dict of lists, returned as float arrays);
* the stop rule: converged when the loop's change measure falls below ``tol`` (``tol = 0`` runs
  exactly ``max_iter`` iterations), stopped by the user's callback (returning True), or
  ``max_iter`` reached;
* the divergence flag: a loop that meets a non-finite or out-of-domain quantity calls
  :meth:`Loop.diverge` and keeps its last finite state.

Usage::

    loop = Loop(KEYS, max_iter=..., tol=..., damping=..., callback=..., unit="iteration")
    for t in loop:
        ...                                   # compute new from old
        new = loop.mix(new, old)
        if not finite:
            loop.diverge(f"iteration {t}: ..."); break
        loop.record(key=value, ...)
        if loop.finished(change, callback_args=(t, ...)):
            break
    outcome = loop.outcome()                  # n_iter, converged, diverged, message, history
"""

from __future__ import annotations

import numbers

import numpy as np

from ._validation import check_nonnegative

__all__ = ["Loop", "check_max_iter", "check_damping", "check_callback"]


def check_max_iter(max_iter, name: str = "max_iter") -> int:
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {max_iter!r}")
    return int(max_iter)


def check_damping(damping, name: str = "damping") -> float:
    d = check_nonnegative(damping, name)
    if d >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {damping!r}")
    return d


def check_callback(callback, name: str = "callback"):
    if callback is not None and not callable(callback):
        raise ValueError(f"{name} must be None or a callable, got {type(callback).__name__}")
    return callback


class Loop:
    """Iteration scaffold: history, damping, stop rule, callback and divergence flag.

    Parameters
    ----------
    keys : names of the per-iteration history entries (each :meth:`record` must give all of them).
    max_iter : integer >= 1.   tol : >= 0 (0: run exactly ``max_iter`` iterations).
    damping : in [0, 1).   callback : None or a callable; its return value True stops the loop.
    unit : the word used in messages ("iteration" for GAMP, "step" for the SE).
    """

    def __init__(self, keys, *, max_iter, tol, damping=0.0, callback=None, unit="iteration"):
        self.max_iter = check_max_iter(max_iter)
        self.tol = check_nonnegative(tol, "tol")
        self.damping = check_damping(damping)
        self.callback = check_callback(callback)
        self.unit = unit
        self.history = {k: [] for k in keys}
        self.n_iter = 0
        self.converged = False
        self.diverged = False
        self.message = f"reached max_iter={self.max_iter}"
        self._t = -1
        self._stopped = False

    def __iter__(self):
        for t in range(self.max_iter):
            if self._stopped:
                return
            self._t = t
            yield t

    def mix(self, new, old):
        """Damped update ``(1 - damping) new + damping old`` (identity when ``damping = 0``)."""
        if self.damping == 0.0:
            return new
        return (1.0 - self.damping) * new + self.damping * old

    def diverge(self, message: str) -> None:
        """Flag divergence (the caller keeps its last finite state and breaks)."""
        self.diverged = True
        self.message = message
        self._stopped = True

    def stop(self, message: str) -> None:
        """Stop without convergence or divergence (e.g. a domain limit the caller reports)."""
        self.message = message
        self._stopped = True

    def record(self, **values) -> None:
        """Append one iteration's values and count the iteration."""
        for k, v in values.items():
            self.history[k].append(v)
        self.n_iter = self._t + 1

    def finished(self, change: float, callback_args=()) -> bool:
        """Apply the callback and the stop rule after :meth:`record`; True means break."""
        if self.callback is not None and self.callback(*callback_args):
            self.message = f"stopped by callback at {self.unit} {self._t}"
            self._stopped = True
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

    def outcome(self) -> dict:
        """``n_iter, converged, diverged, message, history`` (history as float arrays)."""
        history = {k: np.asarray(v, dtype=float) for k, v in self.history.items()}
        return {"n_iter": self.n_iter, "converged": self.converged, "diverged": self.diverged,
                "message": self.message, "history": history}
