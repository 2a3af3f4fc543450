"""Direct empirical risk minimisation: the baseline minimiser of docs/theory.md §4.

This module is written independently of the AMP code (it does not use ``channels``,
``denoisers`` or ``amp``): the per-sample losses and their gradients w.r.t. the preactivations
are implemented here, and only the sensing operator (section 3) is shared.  It is the reference
the AMP fixed point is checked against (section 8.3).

Problem (shapes: tokens ``X (n, T, d)``, targets ``y (n, T, T)``, ``S (d, d)`` symmetric)::

    S_hat = argmin_S  sum_mu loss(y_mu, h(S; X_mu)) + reg(S),
    h_ab(S; X_mu) = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)                       (section 1)

Losses (sums over all ``T x T`` entries; ``y`` may be non-symmetric):

- ``'square'``: ``1/2 ||y - h||_F^2``, gradient ``h - y``;
- ``'cross_entropy'``: ``sum_a [ -beta sum_b y_ab h_ab + logsumexp_b(beta h_ab) ]``, gradient
  ``beta (softmax_b(beta h_a) - y_a)``; evaluated with the log-sum-exp shift, stable for any beta.
  The targets must be row-stochastic (``y >= 0``, rows summing to 1); then the loss is flat along
  ``h -> h + c 11^T`` and equals ``-sum_ab y_ab log softmax_b(beta h_a)_b``.
- ``'softmax_square'``: ``sum_a ||y_a - softmax(beta h_a)||^2`` (no 1/2; the ERM loss of
  arXiv 2509.24914), gradient ``2 beta p_ac (r_ac - sum_b p_ab r_ab)`` with
  ``p_a = softmax(beta h_a)``, ``r = p - y``; the softmax is evaluated as
  ``softmax(beta (h_a - max h_a))``, stable for any beta.  Needs ``T >= 2``; ``y`` may be any
  finite array.  Bounded and flat along ``h -> h + c 11^T`` but **not convex** (next paragraph).

Regularisers (with ``d`` the token dimension):

- ``'nuclear'``: ``lam d Tr(S)`` on the PSD cone (``+inf`` outside).  Equal to weight decay
  ``lam d ||W||_F^2`` on a factorisation ``S = W W^T`` (exact if the width ``m >= rank(S_hat)``);
- ``'frobenius'``: ``(lam d / 2) ||S||_F^2``, S trained entry-wise.

Solvers (``method``):

- ``'lbfgs'`` (default).  Nuclear: L-BFGS-B on the factor ``W (d, m)`` (``m = width`` or ``d``),
  objective ``sum loss(WW^T) + lam d ||W||_F^2``, gradient ``2 grad_S W + 2 lam d W``, started from
  a small seeded random ``W`` or from ``S0``.  Frobenius: L-BFGS-B on the ``N = d(d+1)/2``
  coordinates of S in an orthonormal basis of Sym_d (diagonal entries and ``sqrt(2) S_ij``, i < j),
  so the gradient is the S-gradient expressed in the same basis and the conditioning is that of S.
  Runs are restarted (fresh L-BFGS memory) until the KKT residual stops improving.
- ``'prox'``: accelerated proximal gradient (FISTA with backtracking and adaptive restart) on S
  directly.  Nuclear prox: ``U max(L - step lam d, 0) U^T`` (PSD soft threshold; with ``width=m``
  only the m largest eigenvalues are kept, a heuristic projection); Frobenius prox:
  ``R / (1 + step lam d)``.  An independent check of the L-BFGS solver.

Optimality (``kkt_residual``): with ``G = grad_S sum loss`` the natural residual is
``||S - Pi_PSD(S - G - lam d I)||_F`` (nuclear: zero iff ``S >= 0``, ``G + lam d I >= 0`` and
``S (G + lam d I) = 0``) and ``||G + lam d S||_F`` (frobenius).  ``tol`` is relative to the scale
``||G(0)||_F + lam d sqrt(d)`` (nuclear) or ``||G(0)||_F`` (frobenius) of the gradient at ``S = 0``.

Non-convex loss (``'softmax_square'``): the solvers only find stationary points, so
:func:`direct_erm` runs from several starts (``S0`` if given, then ``n_starts`` seeded random points,
default 4: :func:`_random_start`) and returns the lowest objective; every start's objective and
relative KKT residual are reported (``ERMResult.start_objectives``, ``start_residuals``).

Uniqueness (convex losses): for ``lam > 0`` the Frobenius problem is strongly convex, and the
nuclear problem is convex with a unique minimiser in the generic case (always unique in ``h`` for the square loss).
``lam = 0`` is allowed (unregularised / PSD-constrained fit) but is only well-posed with enough data
(``n (K - [cross_entropy]) >= d(d+1)/2``); with one-hot targets and cross-entropy it may diverge.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from ._validation import check_nonnegative, check_positive, check_rng, check_symmetric, check_targets, check_tokens
from .operator import SensingOperator

__all__ = ["ERMResult", "direct_erm", "erm_objective", "erm_gradient", "kkt_residual"]

LOSSES = ("square", "cross_entropy", "softmax_square")
NONCONVEX_LOSSES = ("softmax_square",)
#: Default number of random starts for a non-convex loss (in addition to ``S0`` if given).
NONCONVEX_STARTS = 4
#: Scales of the random starts ``j >= 1`` (cycled): ``Tr(S)/d`` (nuclear) or
#: ``(Tr(S^2)/d)^(1/2)`` (frobenius) of the random start.
RANDOM_START_SCALES = (1.0, 0.3, 2.0, 0.1)
REGS = ("nuclear", "frobenius")
METHODS = ("lbfgs", "prox")

#: L-BFGS-B's line search needs measurable decreases of the objective, whose rounding error is
#: ~1e-16 relative: it stalls at a relative KKT residual of ~1e-9..1e-8 (S accurate to ~1e-8
#: relative Frobenius).  Its ``converged`` flag therefore uses ``max(tol, LBFGS_FLOOR)``.
LBFGS_FLOOR = 1e-7
#: Overflow is detected (non-finite objective / residual -> flagged or ValueError), not warned about.
_QUIET = np.errstate(over="ignore", invalid="ignore", divide="ignore")


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ERMResult:
    """Result of :func:`direct_erm` (docs/theory.md §4).

    Attributes
    ----------
    S : (d, d) float64, symmetric (PSD for the nuclear regulariser): the minimiser.
    objective : float, ``sum_mu loss + reg`` at ``S`` (as computed by :func:`erm_objective`).
    n_iter : int, total solver iterations (over all L-BFGS restarts).
    converged : bool.  ``'lbfgs'``: ``grad_norm <= max(tol, LBFGS_FLOOR) * grad_scale``;
        ``'prox'``: the last gradient mapping ``||S_new - Y|| / step`` is ``<= tol * grad_scale``.
    history : (n_iter,) float64, objective after each iteration.
    times : (n_iter,) float64, wall-clock seconds since the call started at each history entry
        (for time-to-objective comparisons, e.g. with GAMP in ``benchmarks/amp_iteration.py``).
    grad_norm : float, the natural (projected / KKT) residual at ``S``, see :func:`kkt_residual`.
    grad_scale : float, the scale ``tol`` is relative to (gradient size at ``S = 0``).
    method : str, ``'lbfgs'`` or ``'prox'``.
    message : str, solver message.
    width : int or None, the rank budget used (None: d).
    start_objectives : (n_starts,) float64, the final objective of every start, in the order of
        ``start_labels`` (``'S0'`` for the given start, ``'random0'``, ``'random1'``, ...).
    start_residuals : (n_starts,) float64, each start's relative KKT residual
        (``grad_norm / grad_scale`` at its end point).
    best_start : int, index of the returned start (lowest objective; the earliest among ties).
    diverged : bool, a non-finite objective, iterate or residual was met (overflow, e.g. data
        scaled near the float64 range): ``converged`` is then False and ``message`` says at which
        iteration; ``S`` is the start point if the solver's own point is not finite.
        ``S``, ``objective``, ``n_iter``, ``history``, ``times``, ``converged`` and ``message``
        describe that start; ``times`` are measured from the start of the call.
    """

    S: np.ndarray
    objective: float
    n_iter: int
    converged: bool
    history: np.ndarray
    grad_norm: float
    grad_scale: float = 1.0
    method: str = "lbfgs"
    message: str = ""
    width: int | None = None
    times: np.ndarray | None = None
    start_objectives: np.ndarray | None = None
    start_residuals: np.ndarray | None = None
    start_labels: tuple = ()
    best_start: int = 0
    diverged: bool = False

    @property
    def relative_residual(self) -> float:
        """``grad_norm / grad_scale``."""
        return self.grad_norm / self.grad_scale


# --------------------------------------------------------------------------------------------
# Losses in h (written independently of amp_attention.channels)
# --------------------------------------------------------------------------------------------


def _loss_and_grad_h(y: np.ndarray, H: np.ndarray, loss: str, beta: float, grad: bool = True):
    """``(sum_mu loss(y_mu, H_mu), dloss/dH (n, T, T))`` for all samples at once."""
    if loss == "square":
        R = H - y
        val = 0.5 * float(np.sum(R * R))
        return val, (R if grad else None)
    if loss == "softmax_square":
        # l = sum_ab (p_ab - y_ab)^2, p_a = softmax(beta h_a) (shift by the row max of h first);
        # dl/dh_ac = sum_b 2 r_ab beta p_ab (delta_bc - p_ac) = 2 beta p_ac (r_ac - sum_b p_ab r_ab)
        with np.errstate(over="ignore"):
            s = beta * (H - H.max(axis=-1, keepdims=True))
        e = np.exp(s)
        P = e / e.sum(axis=-1, keepdims=True)
        R = P - y
        val = float(np.sum(R * R))
        if not grad:
            return val, None
        # (multiplied in this order so that saturated rows, where P (R - <P, R>) is exactly 0, stay 0
        # even when 2 beta overflows)
        return val, 2.0 * (beta * (P * (R - np.sum(P * R, axis=-1, keepdims=True))))
    # cross-entropy: -sum_b y_ab log p_ab + (1 - r_a) lse_a with p = softmax(beta h_a),
    # r_a = sum_b y_ab; identical to the docs/theory.md formula, with less cancellation for large beta.
    s = beta * H
    m = s.max(axis=-1, keepdims=True)
    sm = s - m
    e = np.exp(sm)
    Z = e.sum(axis=-1, keepdims=True)
    logZ = np.log(Z)
    logp = sm - logZ
    r = y.sum(axis=-1)
    lse = (m + logZ)[..., 0]
    val = -float(np.sum(y * logp)) + float(np.sum((1.0 - r) * lse))
    if not grad:
        return val, None
    return val, beta * (e / Z - y)


def _reg_value(S: np.ndarray, reg: str, lam: float, d: int) -> float:
    if reg == "nuclear":
        return lam * d * float(np.trace(S))
    return 0.5 * lam * d * float(np.sum(S * S))


class _Problem:
    """Validated data plus the smooth part ``L(S) = sum_mu loss`` and its S-gradient."""

    def __init__(self, X, y, loss, reg, lam, beta):
        self.X, self.y = X, y
        self.op = SensingOperator(X, check=False)  # X validated by the callers (_validate)
        self.loss, self.reg, self.lam, self.beta = loss, reg, lam, beta
        self.n, self.T, self.d = X.shape
        self.n_evals = 0

    def loss_value(self, S) -> float:
        return _loss_and_grad_h(self.y, self.op.preactivations(S, check=False), self.loss, self.beta, grad=False)[0]

    def loss_grad(self, S):
        """``(L(S), grad_S L (d, d) symmetric)``; ``d/dt L(S + tE) = Tr(E grad)`` for symmetric E."""
        self.n_evals += 1
        val, Gh = _loss_and_grad_h(self.y, self.op.preactivations(S, check=False), self.loss, self.beta)
        return val, self.op.backproject(np.ascontiguousarray(Gh), check=False)

    def objective(self, S) -> float:
        return self.loss_value(S) + _reg_value(S, self.reg, self.lam, self.d)

    def residual(self, S, G=None) -> float:
        """Natural KKT residual (module docstring); ``G`` the loss gradient at S if known."""
        if G is None:
            G = self.loss_grad(S)[1]
        if self.reg == "frobenius":
            return float(np.linalg.norm(G + self.lam * self.d * S))
        P = S - G
        P[np.diag_indices(self.d)] -= self.lam * self.d
        if not np.all(np.isfinite(P)):
            return math.inf  # overflow: no eigh of a non-finite matrix (the run is flagged diverged)
        L, U = np.linalg.eigh(0.5 * (P + P.T))
        proj = (U * np.maximum(L, 0.0)) @ U.T
        return float(np.linalg.norm(S - proj))

    def scale(self) -> float:
        G0 = self.loss_grad(np.zeros((self.d, self.d)))[1]
        s = float(np.linalg.norm(G0))
        if self.reg == "nuclear":
            s += self.lam * self.d * np.sqrt(self.d)
        return max(s, 1e-300)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _validate(X, y, loss, reg, lam, beta):
    X = check_tokens(X)
    n, T, d = X.shape
    loss = _check_choice(loss, "loss", LOSSES)
    reg = _check_choice(reg, "reg", REGS)
    lam = check_nonnegative(lam, "lam")
    beta = check_positive(beta, "beta")
    if loss in ("softmax_square", "cross_entropy") and T == 1:
        raise ValueError(f"loss={loss!r} needs T >= 2 tokens: the softmax over one token is constant "
                         f"({'y = 1' if loss == 'cross_entropy' else '= 1'}) and the loss does not depend on S")
    y = check_targets(y, n, T, stochastic=loss == "cross_entropy", what=f" for loss={loss!r}")
    return X, y, loss, reg, lam, beta


def _check_int(value, name, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= (hi or value):
        raise ValueError(f"{name} must be an integer {f'{lo}..{hi}' if hi is not None else f'>= {lo}'}, got {value!r}")
    return int(value)


def _finite(value, what):
    """``value`` if finite, else a ValueError: the inputs overflow float64 (not a minimiser's property)."""
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{what} is not finite: X, y, S or lam overflow float64 at this scale; rescale them")
    return value


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


@_QUIET
def erm_objective(X, y, S, loss="cross_entropy", reg="nuclear", lam=0.01, beta=1.0) -> float:
    """``sum_mu loss(y_mu, h(S; X_mu)) + reg(S)`` (docs/theory.md §4).

    Parameters
    ----------
    X : (n, T, d) tokens.   y : (n, T, T) targets.   S : (d, d) symmetric.
    loss : ``'square'``, ``'cross_entropy'`` or ``'softmax_square'``.
    reg : ``'nuclear'`` or ``'frobenius'``.
    lam : float >= 0.   beta : float > 0 (inverse temperature of the softmax losses).

    For ``reg='nuclear'`` the value is ``+inf`` if S is not PSD (smallest eigenvalue below
    ``-1e-10`` times the largest absolute one).
    """
    X, y, loss, reg, lam, beta = _validate(X, y, loss, reg, lam, beta)
    S = check_symmetric(S, "S", d=X.shape[2])
    if reg == "nuclear":
        ev = np.linalg.eigvalsh(S)
        if ev[0] < -1e-10 * max(np.abs(ev).max(), 1e-300):
            return float("inf")
    return _finite(_Problem(X, y, loss, reg, lam, beta).objective(S), "the objective")


@_QUIET
def erm_gradient(X, y, S, loss="cross_entropy", reg="nuclear", lam=0.01, beta=1.0) -> np.ndarray:
    """Gradient of :func:`erm_objective` w.r.t. symmetric S, shape ``(d, d)``.

    ``grad_S L + lam d I`` (nuclear, the gradient of ``lam d Tr S`` ignoring the PSD constraint) or
    ``grad_S L + lam d S`` (frobenius), with ``d/dt F(S + tE) = Tr(E grad)`` for symmetric E.
    """
    X, y, loss, reg, lam, beta = _validate(X, y, loss, reg, lam, beta)
    d = X.shape[2]
    S = check_symmetric(S, "S", d=d)
    G = _Problem(X, y, loss, reg, lam, beta).loss_grad(S)[1]
    if reg == "nuclear":
        G[np.diag_indices(d)] += lam * d
    else:
        G += lam * d * S
    return _finite(G, "the gradient")


@_QUIET
def kkt_residual(X, y, S, loss="cross_entropy", reg="nuclear", lam=0.01, beta=1.0) -> float:
    """Natural optimality residual at S (zero iff S is the minimiser), Frobenius norm.

    Nuclear: ``||S - Pi_PSD(S - grad_S L - lam d I)||_F``; frobenius: ``||grad_S L + lam d S||_F``.
    One loss gradient and (nuclear) one ``eigh(d)``.
    """
    X, y, loss, reg, lam, beta = _validate(X, y, loss, reg, lam, beta)
    S = check_symmetric(S, "S", d=X.shape[2])
    return _finite(_Problem(X, y, loss, reg, lam, beta).residual(S), "the KKT residual")


# --------------------------------------------------------------------------------------------
# Orthonormal coordinates of Sym_d (frobenius L-BFGS)
# --------------------------------------------------------------------------------------------


def _sym_coords(d):
    iu, ju = np.triu_indices(d)
    w = np.where(iu == ju, 1.0, np.sqrt(2.0))
    return iu, ju, w


def _vec_to_sym(v, d, coords):
    iu, ju, w = coords
    S = np.zeros((d, d))
    S[iu, ju] = v / w
    S[ju, iu] = v / w
    return S


def _sym_to_vec(S, coords):
    """Coordinates ``<E_k, S>``: ``S_ii`` and ``sqrt(2) S_ij``; also maps a gradient to its coordinates."""
    iu, ju, w = coords
    return S[iu, ju] * w


# --------------------------------------------------------------------------------------------
# Smooth objectives for L-BFGS
# --------------------------------------------------------------------------------------------


def _factorised_fun(problem: _Problem, m: int, record: dict):
    """``w (d*m,) -> (f, grad)`` for ``f(W) = L(W W^T) + lam d ||W||_F^2``."""
    d, lam = problem.d, problem.lam

    def fun(w):
        W = w.reshape(d, m)
        S = W @ W.T
        L, G = problem.loss_grad(S)
        f = L + lam * d * float(np.sum(W * W))
        g = 2.0 * (G @ W) + (2.0 * lam * d) * W
        record["f"], record["G"], record["S"] = f, G, S
        return f, g.ravel()

    return fun


def _frobenius_fun(problem: _Problem, coords, record: dict):
    """``v (N,) -> (f, grad)`` for ``f = L(S(v)) + (lam d / 2) ||v||^2`` (orthonormal coordinates)."""
    d, lam = problem.d, problem.lam

    def fun(v):
        S = _vec_to_sym(v, d, coords)
        L, G = problem.loss_grad(S)
        f = L + 0.5 * lam * d * float(v @ v)
        g = _sym_to_vec(G, coords) + lam * d * v
        record["f"], record["G"], record["S"] = f, G, S
        return f, g

    return fun


def _run_lbfgs(fun, x0, problem, scale, tol, max_iter, record, times, t_start):
    """L-BFGS-B with restarts (fresh memory) while the KKT residual keeps improving.
    Appends to ``times`` the seconds since ``t_start`` at each history entry."""
    history: list[float] = []
    n_iter = 0
    x = x0
    best = None
    message = ""

    def callback(xk):
        # L-BFGS-B calls back after accepting xk, whose value was the last one evaluated
        # (portable to scipy < 1.11, which has no ``intermediate_result``)
        history.append(float(record["f"]))
        times.append(time.perf_counter() - t_start)

    # L-BFGS-B's pgtol is an absolute sup-norm bound on the gradient in the optimised variables.
    for _restart in range(20):
        remaining = max_iter - n_iter
        if remaining <= 0:
            break
        f0, g0 = fun(x)
        if not (np.isfinite(f0) and np.all(np.isfinite(g0)) and np.isfinite(scale)):
            message = f"the objective or its gradient is not finite at iteration {n_iter}"
            best = best or (x, math.inf)
            break
        gscale = max(float(np.max(np.abs(g0))), 1e-300)
        res = minimize(
            fun,
            x,
            jac=True,
            method="L-BFGS-B",
            callback=callback,
            options={
                "maxiter": remaining,
                "maxfun": 4 * remaining + 50,
                "ftol": 1e-16,
                "gtol": tol * min(gscale, scale) * 1e-2,
                "maxcor": 30,
                "maxls": 60,
            },
        )
        n_iter += int(res.nit)
        x = res.x
        fun(x)  # refresh record at x
        r = problem.residual(record["S"], record["G"])
        message = str(res.message)
        if best is not None and r >= 0.5 * best[1]:
            if r < best[1]:
                best = (x, r)
            break
        best = (x, r) if best is None or r < best[1] else best
        if r <= tol * scale:
            break
        if res.nit == 0:
            break
    x, r = best
    fun(x)
    return x, r, n_iter, np.asarray(history, dtype=np.float64), message


# --------------------------------------------------------------------------------------------
# FISTA on S
# --------------------------------------------------------------------------------------------


def _prox(R, step, problem: _Problem, width):
    d, lam = problem.d, problem.lam
    if problem.reg == "frobenius":
        return R / (1.0 + step * lam * d)
    L, U = np.linalg.eigh(0.5 * (R + R.T))
    Lt = np.maximum(L - step * lam * d, 0.0)
    if width is not None and width < d:
        Lt[: d - width] = 0.0  # eigh is ascending: keep the `width` largest
    keep = Lt > 0.0
    Uk = U[:, keep]
    S = (Uk * Lt[keep]) @ Uk.T
    return 0.5 * (S + S.T)


def _run_fista(problem: _Problem, S0, width, scale, tol, max_iter, times, t_start):
    d = problem.d
    reg_value = lambda S: _reg_value(S, problem.reg, problem.lam, d)  # noqa: E731
    S = _prox(S0, 0.0, problem, width) if problem.reg == "nuclear" else S0.copy()
    # initial step from a secant estimate of the Lipschitz constant of grad L
    L_S, G_S = problem.loss_grad(S)
    E = G_S / max(np.linalg.norm(G_S), 1e-300) * 1e-3 * max(1.0, np.linalg.norm(S))
    if not np.any(E):
        E = np.eye(d) * 1e-3
    G_E = problem.loss_grad(S + E)[1]
    lip = np.linalg.norm(G_E - G_S) / np.linalg.norm(E)
    step = 1.0 / max(lip, 1e-12)

    Y, L_Y, G_Y = S, L_S, G_S
    t = 1.0
    history = []
    converged = False
    message = "maximum number of iterations reached"
    k = 0
    grow = True
    for k in range(1, max_iter + 1):
        if grow:
            step /= 0.9  # mild increase; backtracking brings it back
        if not (np.isfinite(L_Y) and np.all(np.isfinite(Y - step * G_Y)) and np.isfinite(scale)):
            k -= 1  # no eigh of a non-finite matrix; the run is flagged diverged
            message = f"the objective or its gradient is not finite at iteration {k}"
            break
        while True:
            S_new = _prox(Y - step * G_Y, step, problem, width)
            D = S_new - Y
            L_new = problem.loss_value(S_new)
            quad = float(np.sum(D * D)) / (2.0 * step)
            q = L_Y + float(np.sum(G_Y * D)) + quad
            if L_new <= q + 1e-13 * abs(L_Y) or step < 1e-20:
                break
            step *= 0.5
        # The sufficient-decrease test is only informative while the quadratic term is well above
        # the rounding of L; below that it passes for any step, so the step must stop growing
        # (otherwise it grows geometrically and the iterates oscillate at a ~1e-7 floor).
        grow = quad > 1e-10 * abs(L_Y)
        F_new = L_new + reg_value(S_new)
        gmap = float(np.linalg.norm(D)) / step
        dS = S_new - S
        # adaptive restart, gradient-direction test (robust to rounding in F near the optimum)
        if float(np.sum((Y - S_new) * dS)) > 0.0:
            t_next = 1.0
            Y = S_new
        else:
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            Y = S_new + ((t - 1.0) / t_next) * dS
        t = t_next
        S = S_new
        history.append(F_new)
        times.append(time.perf_counter() - t_start)
        if gmap <= tol * scale:
            converged = True
            message = "gradient mapping below tol"
            break
        L_Y, G_Y = problem.loss_grad(Y)
    return S, k, np.asarray(history, dtype=np.float64), converged, message


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@_QUIET
def direct_erm(
    X,
    y,
    loss: str = "cross_entropy",
    reg: str = "nuclear",
    lam: float = 0.01,
    beta: float = 1.0,
    width: int | None = None,
    S0=None,
    method: str = "lbfgs",
    tol: float = 1e-10,
    max_iter: int | None = None,
    random_state=None,
    n_starts: int | None = None,
) -> ERMResult:
    """Minimise ``sum_mu loss(y_mu, h(S; X_mu)) + reg(S)`` directly (docs/theory.md §4).

    Parameters
    ----------
    X : (n, T, d) tokens.   y : (n, T, T) targets (row-stochastic for cross-entropy).
    loss : ``'square'`` (``1/2||y - h||_F^2``), ``'cross_entropy'`` (needs T >= 2) or
        ``'softmax_square'`` (``sum_a ||y_a - softmax(beta h_a)||^2``, needs T >= 2, non-convex:
        multi-start, see ``n_starts``).
    reg : ``'nuclear'`` (``lam d Tr S``, S PSD) or ``'frobenius'`` (``lam d/2 ||S||_F^2``).
    lam : float >= 0.   beta : float > 0, the inverse temperature of the softmax losses.
    width : int in 1..d or None (nuclear only): rank budget ``m`` of ``S = W W^T`` (default d,
        exact).  With ``method='prox'`` only the m largest eigenvalues are kept after each prox.
    S0 : (d, d) symmetric initial point or None.  ``'lbfgs'`` nuclear: ``W0`` = top-m square-root
        factor of its PSD part plus a tiny seeded perturbation (zero columns of W are stationary);
        None: small seeded random ``W0`` (``Tr(S0)/d ~ 1e-2``).  Otherwise None means ``S = 0``.
    method : ``'lbfgs'`` (factorised W for nuclear, S in orthonormal coordinates for frobenius)
        or ``'prox'`` (FISTA with backtracking and restart on S).
    tol : float > 0, target for the natural KKT residual relative to the gradient scale at S = 0
        (module docstring).  The default 1e-10 gives S to ~1e-8 relative Frobenius or better.
    max_iter : int >= 1 or None (default 20000 for 'lbfgs', 50000 for 'prox'), per start.
    random_state : None, int or numpy Generator (seeds the random starts and perturbations).
    n_starts : int >= 0 or None, the number of seeded random starts, run after ``S0`` (if given);
        the start with the lowest objective is returned.  Default: convex losses a single run
        (one random start if ``S0`` is None, else none); ``'softmax_square'``: 4.  Random start 0
        is the default start above; starts ``j >= 1`` are larger random points (:func:`_random_start`).

    Returns
    -------
    ERMResult with ``S``, ``objective``, ``n_iter``, ``converged``, ``history``, ``grad_norm`` of
    the best start, and every start's ``start_objectives`` / ``start_residuals``.
    """
    t_start = time.perf_counter()
    X, y, loss, reg, lam, beta = _validate(X, y, loss, reg, lam, beta)
    n, T, d = X.shape
    method = _check_choice(method, "method", METHODS)
    tol = check_positive(tol, "tol")
    if max_iter is None:
        max_iter = 20000 if method == "lbfgs" else 50000
    max_iter = _check_int(max_iter, "max_iter", 1)
    if width is not None:
        if reg != "nuclear":
            raise ValueError("width is only meaningful with reg='nuclear' (S = W W^T)")
        width = _check_int(width, "width", 1, d)
    if S0 is not None:
        S0 = check_symmetric(S0, "S0", d=d)
        S0 = 0.5 * (S0 + S0.T)
    if n_starts is None:
        n_starts = NONCONVEX_STARTS if loss in NONCONVEX_LOSSES else (1 if S0 is None else 0)
    n_starts = _check_int(n_starts, "n_starts", 0)
    if n_starts == 0 and S0 is None:
        raise ValueError("n_starts must be >= 1 when no S0 is given (there would be no start)")
    rng = check_rng(random_state, "random_state")

    problem = _Problem(X, y, loss, reg, lam, beta)
    scale = problem.scale()
    m = d if width is None else width

    starts = ([("S0", S0, None)] if S0 is not None else []) + [
        (f"random{j}",) + _random_start(j, d, m, reg, method, rng) for j in range(n_starts)
    ]
    runs = []
    for label, S_init, W_init in starts:
        times: list[float] = []
        run = _solve(problem, method, S_init, W_init, width, m, scale, tol, max_iter, rng, times, t_start)
        runs.append(run + (np.asarray(times, dtype=np.float64),))
    objectives = np.array([run[1] for run in runs])
    best = int(np.argmin(np.where(np.isnan(objectives), np.inf, objectives)))  # earliest among exact ties
    S, objective, r, n_iter, history, converged, message, times = runs[best]
    diverged = not all(np.all(np.isfinite(v)) for v in (S, objective, r, scale, history))
    if diverged:
        where = int(np.argmin(np.isfinite(history))) + 1 if not np.all(np.isfinite(history)) else n_iter
        message = (f"diverged: at iteration {where} the objective (or its gradient / KKT residual) is not "
                   f"finite (objective {objective:g}): overflow at this scale of X, y or lam ({message})")
    return ERMResult(S=S, objective=objective, n_iter=int(n_iter), converged=bool(converged) and not diverged,
                     history=history, grad_norm=float(r), grad_scale=float(scale), method=method, message=message,
                     width=width, times=times, start_objectives=objectives,
                     start_residuals=np.array([run[2] for run in runs]) / scale,
                     start_labels=tuple(label for label, _, _ in starts), best_start=best, diverged=diverged)


def _random_start(j, d, m, reg, method, rng):
    """Random start ``j`` as ``(S_init, W_init)`` (one of them None); see the module docstring.

    ``j = 0`` reproduces the single-run default (nuclear L-BFGS: ``W`` with entries of variance
    ``1e-2/d``; otherwise ``S = 0``, no draw).  ``j >= 1``: nuclear ``W`` (d, m) with entries of
    variance ``t/m`` (``Tr(S)/d ~ t``), frobenius a symmetric Gaussian ``S`` with
    ``Tr(S^2)/d ~ t^2``, ``t = RANDOM_START_SCALES[(j - 1) % 4]``.
    """
    if j == 0:
        if reg == "nuclear" and method == "lbfgs":
            return None, rng.standard_normal((d, m)) * np.sqrt(1e-2 / d)
        return np.zeros((d, d)), None
    t = RANDOM_START_SCALES[(j - 1) % len(RANDOM_START_SCALES)]
    if reg == "nuclear":
        W = rng.standard_normal((d, m)) * np.sqrt(t / m)
        if method == "lbfgs":
            return None, W
        S = W @ W.T
        return 0.5 * (S + S.T), None
    G = rng.standard_normal((d, d))
    return (G + G.T) * (t / np.sqrt(2.0 * d)), None


def _solve(problem, method, S_init, W_init, width, m, scale, tol, max_iter, rng, times, t_start):
    """One solver run from ``S_init`` (or, nuclear L-BFGS only, the factor ``W_init``).

    Returns ``(S, objective, residual, n_iter, history, converged, message)``."""
    d, reg = problem.d, problem.reg
    if method == "prox":
        S, n_iter, history, converged, message = _run_fista(problem, S_init, width, scale, tol, max_iter,
                                                            times, t_start)
        r = problem.residual(S)
    else:
        record: dict = {}
        if reg == "nuclear":
            if W_init is None:
                L, U = np.linalg.eigh(S_init)
                Lm, Um = L[::-1][:m], U[:, ::-1][:, :m]
                W_init = Um * np.sqrt(np.maximum(Lm, 0.0))
                W_init = W_init + rng.standard_normal((d, m)) * 1e-4 * max(
                    np.sqrt(np.mean(W_init * W_init)), 1e-2 / np.sqrt(d))
            fun = _factorised_fun(problem, m, record)
            x0 = W_init.ravel()
        else:
            coords = _sym_coords(d)
            fun = _frobenius_fun(problem, coords, record)
            x0 = _sym_to_vec(S_init, coords)
        x, r, n_iter, history, message = _run_lbfgs(fun, x0, problem, scale, tol, max_iter, record, times, t_start)
        S = record["S"]
        converged = bool(r <= max(tol, LBFGS_FLOOR) * scale)
    S = 0.5 * (S + S.T)
    if not np.all(np.isfinite(S)):  # keep the (finite) start point
        S = S_init if S_init is not None else W_init @ W_init.T
    return S, problem.objective(S), float(r), int(n_iter), history, bool(converged), message
