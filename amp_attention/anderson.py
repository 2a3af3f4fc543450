"""Anderson mixing (type II) for a low-dimensional fixed-point iteration ``x = G(x)``.

The state evolution is such an iteration on ``x = (m, q, V)`` (docs/theory.md §7.3).  A plain
damped step with step size ``theta = 1 - delta`` is ``x_{k+1} = x_k + theta f_k``, with the
residual ``f_k = G(x_k) - x_k``.  Anderson mixing keeps the last ``memory`` differences
``dx_j = x_{j+1} - x_j`` and ``df_j = f_{j+1} - f_j`` (the columns of ``dX``, ``dF``), fits the
current residual by them in least squares,

    gamma = argmin_gamma || W (f_k - dF gamma) ||,     W = diag(1 / max(1, |x_k|)),

and proposes

    x_{k+1} = x_k + theta f_k - (dX + theta dF) gamma.

``W`` puts every component on a relative scale (``m``, ``q``, ``V`` can differ by orders of
magnitude), so that the least squares is well posed.  With one difference and one component this
is the secant method; on a linear map ``G(x) = A x + b`` of dimension ``n`` it reaches the fixed
point after at most ``n + 1`` differences (GMRES in disguise).

**The fixed points are unchanged.**  The step uses only the pairs ``(x_j, G(x_j))``, and
``x_{k+1}`` is an affine combination of them (weights summing to one).  At a fixed point
``x_k = G(x_k)`` the residual ``f_k`` vanishes, the step is plain and stays there; and a limit of
the accelerated iteration has a vanishing residual, ``G(x) = x``.  Acceleration changes only the
path (and, where ``G`` has several fixed points, possibly which one a given start reaches, as any
change of step does), never the equations that define a fixed point.

**Preconditioning.**  Given a matrix ``M`` that approximates ``(I - G'(x))^{-1}`` (e.g. the inverse
of ``I - J`` with ``J`` the Jacobian of a nearby map: the coarse level of the SE's two-level rule,
docs/theory.md §7.3), ``theta I`` above is replaced by ``M``:

    x_{k+1} = x_k + M f_k - (dX + M dF) gamma,

and with no difference in memory the proposal is the chord step ``x_k + M f_k`` (Newton's step
with a fixed Jacobian).  The fixed points are again unchanged (``f_k = 0`` gives no step).  A
preconditioned step that the first safeguard below undoes drops ``M`` for good (the mixing goes on
with ``theta I``): where ``M`` is poor (a map too rough for its Jacobian), retrying it would only
add undone steps.

Safeguards.  A new residual ``||W f||`` (``W`` of the new iterate) is compared with the previous
iterate's, measured both in the same weights and relative to its own scale, the smaller of the two
(in the SE near the interpolation peak, either alone let accelerated steps pass that only moved
the iterate back along the plain path).  Each safeguard gives the plain damped step
(:meth:`Anderson.propose` returns ``None``) or, for the first, undoes the accelerated step:

* an accelerated iterate whose residual is not below that of the iterate it was computed from (or
  is not finite) is dropped, and the plain step from that iterate is proposed instead
  (``retreated`` is set), the memory cleared but for it; after ``j`` such retreats in a row the
  next ``2^(j-1)`` steps (at most ``MAX_WAIT``) are plain;
* acceleration is tried only where the plain iteration contracts: after a plain step that did not
  increase the residual.  Where the plain iteration climbs over a hump of the residual, minimising
  the residual would walk back along its path;
* a residual that grows by more than ``growth`` across a plain step clears the memory (the secant
  information is stale); a non-finite one clears it too;
* an ill-conditioned least squares (smallest over largest singular value of ``W dF`` not above
  ``rcond``) drops the oldest differences until it is well conditioned; none left: plain step.  A
  state of dimension ``n`` never uses more than ``n`` differences;
* a candidate that is not finite, or that the caller's ``accept`` rejects (e.g. out of the
  domain of the map), clears the memory but for the newest pair and gives the plain step;
* the caller clears the memory (:meth:`Anderson.reset`) when its own loop backtracks.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["Anderson", "MAX_WAIT"]

MAX_WAIT = 16  # the longest run of plain steps imposed after repeated retreats


def _previous(w, xs, fs):
    """The previous iterate's residual, the smaller of ``||W f_prev||`` (``W`` of the new iterate)
    and its own relative ``||W_prev f_prev||``; NaN without a previous iterate."""
    if not xs:
        return math.nan
    return float(min(np.linalg.norm(w * fs[-1]), np.linalg.norm(fs[-1] / np.maximum(1.0, np.abs(xs[-1])))))


class Anderson:
    """Anderson mixing of a fixed-point iteration on a small float vector.

    Parameters
    ----------
    memory : number of differences kept (integer >= 1; default 5, capped in effect by the dimension).
    rcond : drop the oldest differences while ``s_min / s_max`` of the scaled ``dF`` is not above
        this (``0 < rcond < 1``).
    growth : the factor of residual growth across a plain step that clears the memory (``> 1``).
    preconditioner : optional ``(n, n)`` matrix ``M ~ (I - G'(x))^{-1}`` (see the module
        docstring); proposals then start with the chord step ``x + M f``, even with no difference in
        memory, until a preconditioned step is undone (the attribute is then None).  Default None:
        the plain scheme with ``theta I``.

    Usage, with ``theta`` the current step size of the plain iteration::

        acc = Anderson()
        while ...:
            gx = G(x)
            candidate, used = acc.propose(x, gx, theta, accept=in_domain)
            x = x + theta * (gx - x) if candidate is None else candidate
    """

    def __init__(self, memory=5, *, rcond=1e-6, growth=2.0, preconditioner=None):
        if isinstance(memory, bool) or not isinstance(memory, numbers.Integral) or memory < 1:
            raise ValueError(f"memory must be an integer >= 1, got {memory!r}")
        if isinstance(rcond, bool) or not isinstance(rcond, numbers.Real) or not 0 < rcond < 1:
            raise ValueError(f"rcond must be a number in (0, 1), got {rcond!r}")
        if isinstance(growth, bool) or not isinstance(growth, numbers.Real) or not 1 < growth < math.inf:
            raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
        self.memory = int(memory)
        self.rcond = float(rcond)
        self.growth = float(growth)
        if preconditioner is not None:
            preconditioner = np.array(preconditioner, dtype=np.float64)
            if preconditioner.ndim != 2 or preconditioner.shape[0] != preconditioner.shape[1] \
                    or not np.all(np.isfinite(preconditioner)):
                raise ValueError(f"preconditioner must be a finite square matrix, got {preconditioner!r}")
        self.preconditioner = preconditioner
        self.retreated = False  # whether the last proposal undid an accelerated step
        self.reset()

    def reset(self) -> None:
        """Forget every pair and every failure (the next step is plain)."""
        self._x: list[np.ndarray] = []  # the last iterates x_j (at most memory + 1) ...
        self._f: list[np.ndarray] = []  # ... and their residuals f_j = G(x_j) - x_j
        self._accelerated = False       # whether the newest iterate came from an accelerated step
        self._contracting = True        # whether the last plain step did not increase the residual
        self._failures = 0              # retreats in a row
        self._wait = 0                  # plain steps still to take after a retreat

    def propose(self, x, gx, theta=1.0, accept=None):
        """Record the pair ``(x, G(x))`` and propose the next iterate.

        Returns ``(candidate, used)``: the accelerated iterate (a float64 array) and the number of
        differences it used; ``(None, 0)`` when the caller should take its plain damped step
        ``x + theta (G(x) - x)`` (too little memory, or a safeguard of the module docstring); or,
        when ``x`` came from an accelerated step that did not lower the residual, the plain step
        from the iterate before it and ``0`` (``self.retreated`` is then True).
        ``accept(candidate) -> bool`` (optional) rejects candidates outside the map's domain.
        """
        x = np.array(x, dtype=np.float64).ravel()
        f = np.array(gx, dtype=np.float64).ravel() - x
        if self._x and self._x[-1].shape != x.shape:
            raise ValueError(f"x must keep its shape {self._x[-1].shape}, got {x.shape}")
        if self.preconditioner is not None and self.preconditioner.shape[0] != x.size:
            raise ValueError(f"the preconditioner is {self.preconditioner.shape}, the state has {x.size} components")
        with np.errstate(all="ignore"):
            w = 1.0 / np.maximum(1.0, np.abs(x))
            norm = float(np.linalg.norm(w * f))
            before = _previous(w, self._x, self._f)
        finite = bool(np.all(np.isfinite(x))) and math.isfinite(norm)
        self.retreated = False
        if self._accelerated and not (finite and norm < before):
            del self._x[:-1], self._f[:-1]   # the accelerated step did not help: undo it
            self._accelerated, self.retreated = False, True  # (the step it proposes is plain)
            self._failures += 1
            self._wait = min(2 ** (self._failures - 1), MAX_WAIT)
            self.preconditioner = None       # (a preconditioner that failed once is not trusted again)
            return self._x[0] + theta * self._f[0], 0
        if not finite:
            self.reset()
            return None, 0
        if self._accelerated:
            self._failures = 0
        else:
            self._contracting = not norm > before
            if norm > self.growth * before:  # growth across a plain step: the memory is stale
                self._x, self._f = [], []
        self._x.append(x)
        self._f.append(f)
        self._accelerated = False
        del self._x[:-(self.memory + 1)], self._f[:-(self.memory + 1)]
        if self._wait > 0:
            self._wait -= 1
            return None, 0
        if norm == 0.0 or not self._contracting:  # at a fixed point, or the plain step is needed
            return None, 0
        M = self.preconditioner
        while len(self._x) > 1:
            dX = np.diff(np.array(self._x), axis=0).T  # (n, k): columns x_{j+1} - x_j, oldest first
            dF = np.diff(np.array(self._f), axis=0).T
            sv = np.linalg.svd(w[:, None] * dF, compute_uv=False)
            if dF.shape[1] <= x.size and sv[-1] > self.rcond * sv[0]:
                break
            del self._x[0], self._f[0]  # ill-conditioned: drop the oldest difference
        if len(self._x) <= 1 and M is None:
            return None, 0
        with np.errstate(all="ignore"):
            step = theta * f if M is None else M @ f
            if len(self._x) <= 1:                      # the chord step
                candidate, used = x + step, 0
            else:
                gamma = np.linalg.lstsq(w[:, None] * dF, w * f, rcond=None)[0]
                candidate = x + step - (dX + (theta * dF if M is None else M @ dF)) @ gamma
                used = int(dF.shape[1])
        if not np.all(np.isfinite(candidate)) or (accept is not None and not accept(candidate)):
            del self._x[:-1], self._f[:-1]
            return None, 0
        self._accelerated = True
        return candidate, used
