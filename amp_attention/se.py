"""State evolution of ERM-GAMP: the scalar loop that mirrors ``amp.gamp`` (DESIGN.md section 7).

One SE step mirrors one AMP step, term by term::

    AMP (amp.gamp)                                   SE (state_evolution)
    1. omega = A(S^t) - V^t_mu g^{t-1}               (z*, omega) ~ N(0, [[Q*, m], [m, q]]) per component
    2. g, dg = g_out(y, omega, V^t_mu)               g, dg = g_out(y, omega, V^t)   (Gamma -> I)
    3. A_hat = (1/d^2) sum Tr(Gamma dg)              A_hat = alpha E Tr(dg),  q_hat = alpha E||g||^2,
                                                     m_hat = alpha E[g.(z* - (m/q) omega)] / (Q* - m^2/q)
    4. R = S^t + A*(g)/(d A_hat)                     R = a S* + sqrt(Delta) W,  a = m_hat/A_hat,
                                                     Delta = q_hat/(2 A_hat^2)
    5. S^{t+1} = eta(R)                              m = E Tr(S S*)/d,  q = E Tr(S^2)/d
    6. V^{t+1} = div eta / (d^2 A_hat)               V = E div eta / (d^2 A_hat)

from ``m = q = 0``, ``V = 1`` (AMP's ``S^0 = 0``, ``V^0 = 1``).

Output side: the same loss objects as AMP (:mod:`amp_attention.channels`).  Square loss in closed
form (``A_hat = m_hat = 2 alpha K/(1 + 2V)`` times channel constants, see :class:`OutputSide`);
cross-entropy by Monte Carlo with common random numbers (draws fixed once, so the map is
deterministic), with standard errors recorded.
Input side (:mod:`amp_attention.spectral`): ``'free'`` (d -> infinity, free probability, at the
teacher's limit law or its exact finite-d atoms) or ``'finite'`` (GOE draws at the exact spectrum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._validation import check_nonnegative, check_positive, check_rng, check_T
from .amp import make_denoiser, make_loss
from .channels import SquareLoss
from .denoisers import FrobeniusDenoiser, NuclearDenoiser
from .model import HardmaxChannel, LinearChannel, SoftmaxChannel, Teacher, row_softmax
from .spectral import LinearShrinkage, SoftThreshold, SpectralLaw, finite_input_side, free_input_side
from .whitening import n_pairs, unwhiten, whiten

__all__ = [
    "OutputSide", "InputSideMap", "SEResult", "state_evolution", "teacher_law", "output_map",
    "ThresholdResult", "recovery_threshold", "interpolation_threshold",
]


def teacher_law(teacher, spectrum: str = "exact", name: str = "teacher") -> SpectralLaw:
    """The teacher's spectral law for the SE input side.

    ``teacher``: a :class:`Teacher` or a :class:`SpectralLaw`.  ``spectrum='exact'`` uses the
    finite-d eigenvalues as atoms; ``'limit'`` uses the d -> infinity law where one is known
    (Wishart(rho)), else the atoms.  ``name`` is the argument named in the error message.
    """
    if isinstance(teacher, SpectralLaw):
        return teacher
    if not isinstance(teacher, Teacher):
        raise ValueError(f"{name} must be a Teacher (whose eigenvalues are used) or a SpectralLaw, "
                         f"got {type(teacher).__name__}")
    if spectrum not in ("exact", "limit"):
        raise ValueError(f"spectrum must be 'exact' or 'limit', got {spectrum!r}")
    if spectrum == "limit" and teacher.kind == "wishart":
        return SpectralLaw.wishart(teacher.params["rho"])
    return SpectralLaw.atoms(teacher.eigenvalues)


def output_map(channel):
    """Noiseless output map ``phi`` of a channel, used for test errors ``E||phi(h*) - phi(h_hat)||_F^2``."""
    if isinstance(channel, SoftmaxChannel):
        return lambda h: row_softmax(h, channel.beta)
    if isinstance(channel, HardmaxChannel):
        return HardmaxChannel()
    if isinstance(channel, LinearChannel):
        return lambda h: h
    raise ValueError(f"unknown channel {channel!r}")


# --------------------------------------------------------------------------------------------
# Output side (steps 1-3)
# --------------------------------------------------------------------------------------------


class OutputSide:
    """``(m, q, V) -> (A_hat, m_hat, q_hat)`` for one loss and channel (DESIGN.md section 7).

    Monte Carlo over ``n_mc`` draws of the K-dim Gaussians ``z* = sqrt(Q*) xi_1`` and
    ``omega = (m / sqrt(Q*)) xi_1 + sqrt(q - m^2/Q*) xi_2``; ``y = channel(unwhiten(z*))`` with the
    channel noise drawn once.  The draws are fixed at construction (common random numbers).

    Square loss: ``g = 2(z_y - omega)/(1 + 2V)`` is affine in omega, so only two channel constants
    enter, ``c1 = E||z_y||^2/K`` and ``c2 = E[z_y . z*]/K`` (exact for the linear channel:
    ``c1 = Q* + noise``, ``c2 = Q*``; Monte Carlo otherwise)::

        A_hat = 2 alpha K / (1 + 2V),  m_hat = 2 alpha K c2 / (Q* (1 + 2V)),
        q_hat = 4 alpha K (c1 - 2 (m/Q*) c2 + q) / (1 + 2V)^2

    which for the linear channel is DESIGN.md's closed form.
    """

    def __init__(self, alpha, T, Q, loss, channel, n_mc=100_000, seed=0):
        self.alpha = check_positive(alpha, "alpha")
        self.T = check_T(T)
        self.K = n_pairs(self.T)
        self.Q = check_positive(Q, "Q")
        self.loss = loss
        self.channel = channel
        rng = check_rng(seed)
        if isinstance(n_mc, bool) or not isinstance(n_mc, (int, np.integer)) or n_mc < 100:
            raise ValueError(f"n_mc must be an integer >= 100, got {n_mc!r}")
        self.n_mc = int(n_mc)
        self.xi1 = rng.standard_normal((self.n_mc, self.K))
        self.xi2 = rng.standard_normal((self.n_mc, self.K))
        self.z_star = math.sqrt(self.Q) * self.xi1
        self.y = channel(unwhiten(self.z_star, self.T), rng)
        self.closed_form = isinstance(loss, SquareLoss)
        if self.closed_form:
            if isinstance(channel, LinearChannel):
                self.c1, self.c2 = self.Q + channel.noise, self.Q
            else:
                zy = whiten(self.y)
                self.c1 = float(np.mean(np.sum(zy * zy, axis=1))) / self.K
                self.c2 = float(np.mean(np.sum(zy * self.z_star, axis=1))) / self.K
        self._p = None

    def omega(self, m, q):
        """The fixed-draw omega for order parameters (m, q)."""
        r2 = max(q - m * m / self.Q, 0.0)
        return (m / math.sqrt(self.Q)) * self.xi1 + math.sqrt(r2) * self.xi2

    def __call__(self, m, q, V):
        """Return ``(A_hat, m_hat, q_hat, stderr)`` with ``stderr`` a dict of Monte Carlo standard errors."""
        alpha, K, Q = self.alpha, self.K, self.Q
        if self.closed_form:
            A_hat = 2 * alpha * K / (1 + 2 * V)
            m_hat = 2 * alpha * K * self.c2 / (Q * (1 + 2 * V))
            q_hat = 4 * alpha * K * (self.c1 - 2 * (m / Q) * self.c2 + q) / (1 + 2 * V) ** 2
            return A_hat, m_hat, q_hat, {"A_hat": 0.0, "m_hat": 0.0, "q_hat": 0.0}
        omega = self.omega(m, q)
        g, dg, info = self.loss.g_out(self.y, omega, float(V), p0=self._p, jacobian="trace")
        self._p = info.get("p")
        tr = dg if dg.ndim == 1 else np.trace(dg, axis1=1, axis2=2)
        gg = np.sum(g * g, axis=1)
        if q > 0:
            resid = self.z_star - (m / q) * omega
            denom = Q - m * m / q
        else:
            resid, denom = self.z_star, Q
        gz = np.sum(g * resid, axis=1) / denom
        sq = math.sqrt(self.n_mc)
        A_hat, q_hat, m_hat = alpha * tr.mean(), alpha * gg.mean(), alpha * gz.mean()
        stderr = {"A_hat": alpha * tr.std() / sq, "m_hat": alpha * gz.std() / sq, "q_hat": alpha * gg.std() / sq}
        return float(A_hat), float(m_hat), float(q_hat), stderr

    def train_loss(self, m, q, V):
        """Predicted mean per-sample training loss ``E l_y(prox(omega; V))`` at the fixed point."""
        omega = self.omega(m, q)
        p, _ = self.loss.prox(self.y, omega, float(V))
        return float(np.mean(self.loss.value_z(self.y, p)))

    def test_error(self, m, q, phi):
        """``E ||phi(h*) - phi(h_hat)||_F^2`` with per-component covariance ``[[Q*, m], [m, q]]``."""
        z_hat = self.omega(m, q)
        diff = phi(unwhiten(self.z_star, self.T)) - phi(unwhiten(z_hat, self.T))
        return float(np.mean(np.sum(diff * diff, axis=(1, 2))))


# --------------------------------------------------------------------------------------------
# Input side (steps 4-6)
# --------------------------------------------------------------------------------------------


class InputSideMap:
    """``(a, Delta, A_hat) -> (m, q, V)`` for a denoiser (DESIGN.md section 7, input side).

    ``mode='free'``: free probability at ``law``; ``'finite'``: ``n_draws`` GOE draws at the
    teacher's exact eigenvalues (fixed seed: common random numbers).  Frobenius in free mode is
    the closed form ``c = A_hat/(A_hat + lam)``, ``m = c a Q*``, ``q = c^2 (a^2 Q* + Delta)``,
    ``V = c/(2 A_hat)``.
    """

    def __init__(self, denoiser, law: SpectralLaw, mode="free", eigenvalues=None, n_draws=4, seed=0):
        if mode not in ("free", "finite"):
            raise ValueError(f"input_side must be 'free' or 'finite', got {mode!r}")
        if isinstance(denoiser, NuclearDenoiser) and denoiser.width is not None:
            raise ValueError("the state evolution has no counterpart of width: use width=None")
        if mode == "finite" and eigenvalues is None:
            raise ValueError("input_side='finite' needs the teacher's exact eigenvalues (pass a Teacher)")
        self.denoiser, self.law, self.mode = denoiser, law, mode
        self.eigenvalues = None if eigenvalues is None else np.asarray(eigenvalues, dtype=float)
        self.n_draws, self.seed = n_draws, seed

    def scalar_map(self, A_hat):
        if isinstance(self.denoiser, NuclearDenoiser):
            return SoftThreshold(self.denoiser.lam / A_hat)
        return LinearShrinkage(A_hat / (A_hat + self.denoiser.lam))

    def __call__(self, a, Delta, A_hat):
        f = self.scalar_map(A_hat)
        if self.mode == "finite":
            return tuple(finite_input_side(self.eigenvalues, a, Delta, f, A_hat, n_draws=self.n_draws,
                                           rng=np.random.default_rng(self.seed)))
        if isinstance(self.denoiser, FrobeniusDenoiser):
            c, Q = f.c, self.law.Q
            return c * a * Q, c * c * (a * a * Q + Delta), c / (2 * A_hat)
        return tuple(free_input_side(self.law, a, Delta, f, A_hat))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

SE_HISTORY_KEYS = ("m", "q", "V", "mse", "A_hat", "m_hat", "q_hat", "a", "Delta",
                   "stderr_A_hat", "stderr_m_hat", "stderr_q_hat")


@dataclass(frozen=True, eq=False)
class SEResult:
    """State-evolution trajectory and fixed-point predictions.

    ``history[key][t]`` holds the order parameters after SE step t (mirroring AMP's iterate
    ``S^{t+1}``), the conjugates of step t and the Monte Carlo standard errors of the output side.
    ``m, q, V, mse`` are the last values; ``test_error`` and ``train_loss`` are predictions at the
    last iterate (None if not computed).
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
    train_loss: float | None = None
    a: float | None = None
    Delta: float | None = None
    A_hat: float | None = None
    params: dict = field(default_factory=dict)


def _channel_beta(channel, beta):
    if beta is not None:
        return beta
    return channel.beta if isinstance(channel, SoftmaxChannel) else 1.0


def state_evolution(alpha, T, teacher, channel, loss="cross_entropy", reg="nuclear", lam=0.05,
                    beta=None, *, spectrum="exact", input_side="free", n_mc=100_000, n_draws=4,
                    max_iter=200, tol=1e-8, damping=0.0, seed=0, predictions=True,
                    callback=None, init=None) -> SEResult:
    """Run the ERM state evolution from ``m = q = 0, V = 1`` (DESIGN.md section 7).

    Parameters
    ----------
    alpha : n / d^2.    T : tokens per sequence (1..8).
    teacher : :class:`Teacher` (``spectrum='exact'``: its finite-d eigenvalues; ``'limit'``: its
        d -> infinity law if known) or a :class:`SpectralLaw`.
    channel : SoftmaxChannel / HardmaxChannel / LinearChannel (makes y from z*).
    loss, reg, lam, beta : the ERM of section 4 (beta defaults to the softmax channel's).
    input_side : ``'free'`` or ``'finite'`` (needs a Teacher).
    n_mc : Monte Carlo draws of the output side (cross-entropy, non-linear channels).
    tol : stop when ``max(|dm|, |dq|, |dV|) < tol * max(1, |m|, |q|, |V|)``; ``tol = 0`` runs max_iter.
    damping : ``m, q, V <- (1 - damping) new + damping old``.
    callback : optional ``callback(t, history)``; returning True stops.
    init : optional starting ``(m, q, V)`` (default ``(0, 0, 1)``, AMP's ``S^0 = 0, V^0 = 1``); a
        neighbouring fixed point speeds up curves in alpha.
    """
    alpha = check_positive(alpha, "alpha")
    T = check_T(T)
    beta = _channel_beta(channel, beta)
    loss_obj = make_loss(loss, beta)
    if loss == "cross_entropy" and T == 1:
        raise ValueError("loss='cross_entropy' needs T >= 2: with T = 1 the softmax target is y = 1")
    denoiser = make_denoiser(reg, lam)
    check_nonnegative(tol, "tol")
    damping = check_nonnegative(damping, "damping")
    if damping >= 1:
        raise ValueError(f"damping must be in [0, 1), got {damping!r}")
    law = teacher_law(teacher, spectrum)
    eig = teacher.eigenvalues if isinstance(teacher, Teacher) else None
    Q = law.Q
    out = OutputSide(alpha, T, Q, loss_obj, channel, n_mc=n_mc, seed=seed)
    inp = InputSideMap(denoiser, law, input_side, eigenvalues=eig, n_draws=n_draws, seed=seed)

    m, q, V = (0.0, 0.0, 1.0) if init is None else (float(v) for v in init)
    if not (q >= 0 and V > 0 and m * m <= q * Q * (1 + 1e-9)):
        raise ValueError(f"init must satisfy q >= 0, V > 0, m^2 <= q Q*, got {(m, q, V)}")
    hist = {k: [] for k in SE_HISTORY_KEYS}
    converged, message, n_iter = False, f"reached max_iter={max_iter}", 0
    A_hat = a = Delta = None
    for t in range(max_iter):
        A_hat, m_hat, q_hat, err = out(m, q, V)                         # steps 1-3
        if not (np.isfinite(A_hat) and A_hat > 0 and np.isfinite(q_hat) and np.isfinite(m_hat)):
            message = f"step {t}: output side not finite (A_hat={A_hat}, m_hat={m_hat}, q_hat={q_hat})"
            break
        a, Delta = m_hat / A_hat, q_hat / (2 * A_hat**2)                 # step 4
        if Delta <= 0:
            message = f"step {t}: Delta = {Delta} <= 0 (the output side carries no information)"
            break
        m_new, q_new, V_new = inp(a, Delta, A_hat)                      # steps 5-6
        if damping:
            m_new = (1 - damping) * m_new + damping * m
            q_new = (1 - damping) * q_new + damping * q
            V_new = (1 - damping) * V_new + damping * V
        if not all(np.isfinite(v) for v in (m_new, q_new, V_new)):
            message = f"step {t}: non-finite order parameters; kept the last finite ones"
            break
        change = max(abs(m_new - m), abs(q_new - q), abs(V_new - V))
        scale = max(1.0, abs(m_new), abs(q_new), abs(V_new))
        m, q, V = float(m_new), float(q_new), float(V_new)
        n_iter = t + 1
        for k, v in (("m", m), ("q", q), ("V", V), ("mse", Q - 2 * m + q), ("A_hat", A_hat),
                     ("m_hat", m_hat), ("q_hat", q_hat), ("a", a), ("Delta", Delta),
                     ("stderr_A_hat", err["A_hat"]), ("stderr_m_hat", err["m_hat"]),
                     ("stderr_q_hat", err["q_hat"])):
            hist[k].append(v)
        if callback is not None and callback(t, hist):
            message = f"stopped by callback at step {t}"
            break
        if tol > 0 and change < tol * scale:
            converged, message = True, f"converged after {n_iter} steps"
            break
    history = {k: np.asarray(v, dtype=float) for k, v in hist.items()}
    test_error = train_loss = None
    if predictions and n_iter:
        test_error = out.test_error(m, q, output_map(channel))
        train_loss = out.train_loss(m, q, V)
    params = {"alpha": alpha, "T": T, "loss": loss, "reg": reg, "lam": lam, "beta": beta,
              "spectrum": spectrum, "input_side": input_side, "n_mc": n_mc, "law": repr(law)}
    return SEResult(m=m, q=q, V=V, mse=Q - 2 * m + q, Q=Q, n_iter=n_iter, converged=converged,
                    message=message, history=history, test_error=test_error, train_loss=train_loss,
                    a=a, Delta=Delta, A_hat=A_hat, params=params)


# --------------------------------------------------------------------------------------------
# Thresholds by bracketing in alpha
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdResult:
    """A threshold in alpha located by bisection: ``alpha`` lies in ``bracket`` (width <= xtol)."""

    alpha: float
    bracket: tuple
    evaluations: tuple  # (alpha, value) pairs, in evaluation order


def _loss_floor(out: OutputSide) -> float:
    """``E min_z l_y(z)``: 0 for the square loss on symmetric targets, the row entropies for CE."""
    if isinstance(out.loss, SquareLoss):
        return float(np.mean(out.loss.value_z(out.y, whiten(out.y))))
    y = out.y
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0).sum(axis=(1, 2))
    return float(np.mean(ent))


def _bisect(pred, lo, hi, xtol, max_expand=6):
    """Smallest alpha in [lo, hi] with pred(alpha) True, assuming pred is monotone False -> True."""
    evals = []

    def p(a):
        v, flag = pred(a)
        evals.append((a, v))
        return flag

    if p(lo):
        raise ValueError(f"the threshold is below the bracket: the condition already holds at alpha={lo}")
    k = 0
    while not p(hi):
        k += 1
        if k > max_expand:
            raise ValueError(f"no threshold found up to alpha={hi}")
        lo, hi = hi, 2 * hi
    while hi - lo > xtol:
        mid = 0.5 * (lo + hi)
        if p(mid):
            hi = mid
        else:
            lo = mid
    return ThresholdResult(alpha=0.5 * (lo + hi), bracket=(lo, hi), evaluations=tuple(evals))


def recovery_threshold(T, teacher, channel, loss="square", reg="nuclear", lam=1e-5, *,
                       bracket=(0.02, 1.0), eps=1e-3, xtol=2e-3, **se_kwargs) -> ThresholdResult:
    """Smallest alpha whose SE fixed point has ``mse / Q* < eps`` at small ``lam`` (noiseless data).

    Bisection assumes the SE mse decreases through ``eps`` once (lam -> 0+ is approximated by the
    given small ``lam``).  ``se_kwargs`` go to :func:`state_evolution`.
    """
    se_kwargs.setdefault("max_iter", 2000)
    se_kwargs.setdefault("tol", 1e-10)
    se_kwargs.setdefault("predictions", False)

    def pred(alpha):
        r = state_evolution(alpha, T, teacher, channel, loss, reg, lam, **se_kwargs)
        v = r.mse / r.Q
        return v, v < eps

    return _bisect(pred, bracket[0], bracket[1], xtol)


def interpolation_threshold(T, teacher, channel, loss="square", reg="frobenius", lam=1e-5, *,
                            bracket=(0.02, 1.0), eps=1e-3, xtol=2e-3, **se_kwargs) -> ThresholdResult:
    """Largest alpha whose SE fixed point still fits the training data: excess train loss
    ``E[l_y(p) - min_z l_y(z)] < eps`` at small ``lam`` (above it the excess is > 0)."""
    se_kwargs.setdefault("max_iter", 2000)
    se_kwargs.setdefault("tol", 1e-10)
    law = teacher_law(teacher, se_kwargs.get("spectrum", "exact"))
    floor = {}

    def pred(alpha):
        r = state_evolution(alpha, T, teacher, channel, loss, reg, lam, **se_kwargs)
        if "v" not in floor:
            out = OutputSide(alpha, T, law.Q, make_loss(loss, _channel_beta(channel, se_kwargs.get("beta"))),
                             channel, n_mc=se_kwargs.get("n_mc", 100_000), seed=se_kwargs.get("seed", 0))
            floor["v"] = _loss_floor(out)
        v = r.train_loss - floor["v"]
        return v, v >= eps

    return _bisect(pred, bracket[0], bracket[1], xtol)
