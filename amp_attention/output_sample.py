"""The Gaussian output sample of the state evolution (docs/theory.md §7.1).

The SE output side averages functions of ``(z*, omega, y)`` where, per whitened component,
``(z*, omega) ~ N(0, [[Q*, m], [m, q]])`` and ``y`` is made from ``z*`` by the channel.
:class:`OutputSample` fixes the integration nodes once, so the SE map is deterministic; output
factors (:meth:`amp_attention.factors.OutputFactor.se_conjugates`) read ``y``, ``z_star``,
``omega(m, q)`` and the node ``weights`` from it, and average with :meth:`OutputSample.mean`.

Integration rules (``method=``)
-------------------------------
* ``'mc'``: plain Monte Carlo, ``n_mc`` iid draws from the generator ``seed`` -- the historical
  rule, bit for bit (``xi1``, then ``xi2``, then the channel noise drawn by the channel itself).
  Error estimate: the standard error ``std / sqrt(n)``.
* ``'qmc'`` (what ``'auto'`` selects): randomised quasi-Monte Carlo.  ``R`` independent
  scramblings (Owen scrambling, scipy.stats.qmc.Sobol) of a Sobol point set of ``2^k`` points,
  ``N = R 2^k <= n_mc`` with ``8 <= R <= 15``, mapped to normals by the inverse CDF.  The
  scramblings are seeded by the *internal* seed ``qmc_seed`` (default 0), never by ``seed``, so
  results do not depend on the user's seed.  Error estimate: the standard error of the mean of
  the ``R`` replicate estimates.
* ``'gauss_hermite'``: a tensor Gauss-Hermite rule with ``n`` nodes per Gaussian dimension plus an
  embedded coarser rule with ``n - 2`` nodes (weight 0 in the estimate; ``n^D + (n-2)^D <= n_mc``).
  Error estimate: ``|fine - coarse|`` (conservative).  Practical for ``T = 2`` only.

Which Gaussian dimensions are integrated
----------------------------------------
* **Channel noise** (``LinearChannel(noise)``, and any channel with a ``noise`` attribute whose
  labels are ``y = phi(h* + sqrt(noise) xi)``, ``whiten(xi)`` iid standard): ``y`` depends on
  ``z*`` only through the channel input ``zeta = z* + sqrt(noise) xi`` (per component
  ``N(0, Q* + noise)``, covariance ``m`` with ``omega``).  Output-factor averages use ``z*`` only
  linearly (``E[g . z*]``), so it is replaced by its conditional mean ``E[z* | zeta, omega]``,
  which is exact: the noise adds no dimension (Rao-Blackwellisation).
* **Flat direction** ``u`` (:func:`amp_attention.whitening.flat_direction`): for softmax and
  hardmax labels ``y`` is invariant to ``z* -> z* + c u``; an output factor that is
  *flat-invariant* (with scalar ``V``: ``g(omega + c u) = g(omega)``, ``Tr dg`` likewise, and
  ``g . u = 0``; cross-entropy, the Bayes softmax output) then sees only the ``u``-free parts of
  ``z*`` and ``omega``, ``2(K - 1)`` Gaussian dimensions instead of ``2K``: the nodes are put in
  the complement of ``u`` (:meth:`OutputSample.view`).  Declared by a factor attribute
  ``flat_invariant = True`` (a trait of :class:`~amp_attention.factors.OutputFactor`).  Square loss, linear channel
  and unknown factors keep all ``2K`` dimensions.

The public arrays ``xi1, xi2, z_star (N, K)``, ``y (N, T, T)`` and ``weights (N,)`` are the
*full* rule (every Gaussian dimension, noise included), valid for any integrand; the factors use
the reduced views.
"""

from __future__ import annotations

import inspect
import math
import numbers

import numpy as np
from scipy.special import ndtri
from scipy.stats import qmc

from ._validation import check_memory, check_nonnegative, check_positive, check_real, check_rng, check_T
from .model import HardmaxChannel, LinearChannel, SoftmaxChannel, check_channel
from .whitening import flat_direction, n_pairs, unwhiten, whiten

__all__ = ["OutputSample", "GaussianRule", "OutputView", "METHODS", "DEFAULT_N_MC",
           "is_flat_invariant", "has_smooth_g_out"]

METHODS = ("auto", "mc", "qmc", "gauss_hermite")

#: The default node budget of the SE output side (docs/theory.md §7.1): with the two-level rule of
#: ``output_rule='auto'`` (a coarse level, then few preconditioned steps on this rule) it costs
#: about what 1e5 plain Monte Carlo draws cost with plain steps.
DEFAULT_N_MC = 400_000

# --------------------------------------------------------------------------------------------
# Factor traits used by the output side
# --------------------------------------------------------------------------------------------


def is_flat_invariant(factor) -> bool:
    """The factor's trait ``flat_invariant`` (docs/theory.md §2, "Flat direction")."""
    return bool(getattr(factor, "flat_invariant", False))


def has_smooth_g_out(factor) -> bool:
    """The factor's trait ``smooth_g_out`` (Stein's lemma applies to ``g``)."""
    return bool(getattr(factor, "smooth_g_out", False))


def _labels_flat_invariant(channel) -> bool:
    """Softmax and hardmax labels (noisy or not) are invariant to ``h* -> h* + c 11^T``."""
    return isinstance(channel, (SoftmaxChannel, HardmaxChannel))


def _channel_noise(channel) -> float:
    return float(getattr(channel, "noise", 0.0) or 0.0)


def _complement_basis(T: int) -> np.ndarray:
    """``B (K-1, K)``: orthonormal rows spanning the complement of the flat direction ``u``."""
    u = flat_direction(T)
    K = u.size
    Qm, _ = np.linalg.qr(np.column_stack([u, np.eye(K)[:, : K - 1]]))
    return np.ascontiguousarray(Qm[:, 1:].T)


# --------------------------------------------------------------------------------------------
# Rules: standard-normal nodes, weights, error estimates
# --------------------------------------------------------------------------------------------


class GaussianRule:
    """Nodes of a rule for ``E f(xi)``, ``xi`` standard normal, in ``n_blocks`` blocks of shape
    ``(N, K)``, with weights ``(N,)`` summing to 1 and an error estimate.

    ``kind``: ``'mc'`` (iid draws; plain means, standard error ``std/sqrt(N)``),
    ``'replicates'`` (``groups (R, N/R)`` index arrays of independent replicates; error = standard
    error of the replicate means) or ``'embedded'`` (``coarse (N,)`` weights of an embedded lower
    rule; error = ``|fine - coarse|``).
    """

    def __init__(self, blocks, weights, kind, groups=None, coarse=None, description=""):
        self.blocks = tuple(blocks)
        self.N = self.blocks[0].shape[0]
        self.weights = weights
        self.kind = kind
        self.groups = groups
        self.coarse = coarse
        self.description = description

    def mean(self, values):
        """Weighted mean over the nodes (axis 0 of ``values``)."""
        values = np.asarray(values, dtype=np.float64)
        if self.kind == "mc":
            return values.mean(axis=0)
        return np.tensordot(self.weights, values, axes=(0, 0))

    def error(self, values):
        """Error estimate of :meth:`mean` (same shape as the mean)."""
        values = np.asarray(values, dtype=np.float64)
        if self.kind == "mc":
            return values.std(axis=0) / math.sqrt(self.N)
        if self.kind == "replicates":
            reps = np.stack([values[idx].mean(axis=0) for idx in self.groups])
            return reps.std(axis=0, ddof=1) / math.sqrt(len(self.groups))
        fine = np.tensordot(self.weights, values, axes=(0, 0))
        coarse = np.tensordot(self.coarse, values, axes=(0, 0))
        return np.abs(fine - coarse)

    def replicate_means(self, values):
        """The independent replicate estimates (``'replicates'`` rules), shape (R, ...)."""
        if self.kind != "replicates":
            raise ValueError(f"a {self.kind!r} rule has no replicates")
        values = np.asarray(values, dtype=np.float64)
        return np.stack([values[idx].mean(axis=0) for idx in self.groups])


def _sobol_layout(budget: int, n_replicates=None):
    """``(R, k)`` with ``R 2^k <= budget``: ``2^k`` the largest power of two ``<= budget / 8``
    and ``R = floor(budget / 2^k)`` (between 8 and 15), or ``R = n_replicates`` if given."""
    if n_replicates is None:
        k = int(math.floor(math.log2(budget / 8)))
        return int(budget // 2**k), k
    k = int(math.floor(math.log2(budget / n_replicates)))
    if k < 0:
        raise ValueError(f"n_mc = {budget} is smaller than n_replicates = {n_replicates}")
    return int(n_replicates), k


_SOBOL_RNG_KW = "rng" if "rng" in inspect.signature(qmc.Sobol.__init__).parameters else "seed"


def _sobol_normals(dim: int, R: int, k: int, qmc_seed: int) -> np.ndarray:
    """``R`` scrambled Sobol sets of ``2^k`` points in ``dim`` dimensions, mapped to N(0, 1)
    (shape ``(R 2^k, dim)``); replicate ``r`` is scrambled with ``default_rng([qmc_seed, r])``, so a
    larger ``k`` extends each replicate's point set (nested)."""
    out = np.empty((R * 2**k, dim))
    tiny = 2.0**-60
    for r in range(R):
        gen = np.random.default_rng([int(qmc_seed), r])
        u = qmc.Sobol(dim, scramble=True, **{_SOBOL_RNG_KW: gen}).random_base2(k)
        out[r * 2**k:(r + 1) * 2**k] = ndtri(np.clip(u, tiny, 1.0 - tiny))
    return out


def _qmc_rule(n_blocks, block_dim, basis, budget, qmc_seed, n_replicates=None) -> GaussianRule:
    R, k = _sobol_layout(budget, n_replicates)
    X = _sobol_normals(n_blocks * block_dim, R, k, qmc_seed)
    blocks = [_embed(X[:, j * block_dim:(j + 1) * block_dim], basis) for j in range(n_blocks)]
    N = R * 2**k
    groups = [np.arange(r * 2**k, (r + 1) * 2**k) for r in range(R)]
    return GaussianRule(blocks, np.full(N, 1.0 / N), "replicates", groups=groups,
                        description=f"scrambled Sobol, {R} x 2^{k} points in {n_blocks * block_dim} dims")


def _tensor_gh(n: int, dim: int):
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    wgrids = np.meshgrid(*([w] * dim), indexing="ij")
    X = np.stack([g.ravel() for g in grids], axis=1)
    W = np.prod(np.stack([g.ravel() for g in wgrids], axis=1), axis=1)
    return X, W


def _gh_order(budget: int, dim: int) -> int:
    n = 1
    while (n + 1) ** dim + max(n - 1, 1) ** dim <= budget:
        n += 1
    if n < 4:
        raise ValueError(f"method='gauss_hermite' in {dim} Gaussian dimensions needs n_mc >= "
                         f"{4 ** dim + 2 ** dim} (4 nodes per dimension); got n_mc = {budget}. Use method='qmc'.")
    return n


def _gh_rule(n_blocks, block_dim, basis, budget) -> GaussianRule:
    dim = n_blocks * block_dim
    n = _gh_order(budget, dim)
    Xf, Wf = _tensor_gh(n, dim)
    Xc, Wc = _tensor_gh(n - 2, dim)
    X = np.concatenate([Xf, Xc])
    weights = np.concatenate([Wf, np.zeros(Wc.size)])
    coarse = np.concatenate([np.zeros(Wf.size), Wc])
    blocks = [_embed(X[:, j * block_dim:(j + 1) * block_dim], basis) for j in range(n_blocks)]
    return GaussianRule(blocks, weights, "embedded", coarse=coarse,
                        description=f"tensor Gauss-Hermite {n}^{dim} (+ embedded {n - 2}^{dim})")


def _embed(eta, basis):
    """Coordinates in the complement of ``u`` -> whitened vectors (``basis`` None: identity)."""
    return np.ascontiguousarray(eta) if basis is None else eta @ basis


# --------------------------------------------------------------------------------------------
# Views: a rule plus the physics of (zeta, omega, y)
# --------------------------------------------------------------------------------------------


class OutputView:
    """The SE output side on one rule, for integrands that use ``z*`` only linearly.

    Per whitened component, ``zeta = sqrt(Qz) xi1`` is the channel input (``z*`` plus the channel
    noise: ``Qz = Q* + noise``), ``y = phi(unwhiten(zeta))`` the labels,
    ``omega = (m / sqrt(Qz)) xi1 + sqrt(q - m^2/Qz) xi2`` (``Cov(zeta, omega) = m``), and
    :meth:`z_star_mean` the conditional mean ``E[z* | zeta, omega]`` (``= zeta`` without noise).
    ``reduced``: the nodes lie in the complement of the flat direction.  ``warm_start`` keeps the
    last prox point on these nodes; ``last_values`` the per-node integrands ``(N, 3)`` of
    ``A_hat``, ``m_hat``, ``q_hat`` (before the factor ``alpha``) of the last generic
    :meth:`~amp_attention.factors.OutputFactor.se_conjugates` on them.
    """

    def __init__(self, sample, rule: GaussianRule, Qz: float, reduced: bool, labels: bool = True):
        self.sample = sample
        self.rule = rule
        self.alpha, self.T, self.K, self.Q = sample.alpha, sample.T, sample.K, sample.Q
        self.Qz = float(Qz)
        self.reduced = reduced
        self.method = sample.method
        self.xi1, self.xi2 = rule.blocks[0], rule.blocks[1]
        self.weights = rule.weights
        self.N = rule.N
        self._labels = labels
        self._y = None
        self.warm_start = None
        self.last_values = None

    @property
    def zeta(self):
        return math.sqrt(self.Qz) * self.xi1

    @property
    def y(self):
        """Labels ``phi(unwhiten(zeta))`` (the channel's map applied to its noisy input)."""
        if self._y is None:
            self._y = self.sample.channel.phi(unwhiten(self.zeta, self.T))
        return self._y

    def omega(self, m, q):
        r2 = max(q - m * m / self.Qz, 0.0)
        return (m / math.sqrt(self.Qz)) * self.xi1 + math.sqrt(r2) * self.xi2

    def z_star_mean(self, m, q, omega=None):
        """``E[z* | zeta, omega]`` per node (shape (N, K)); ``= zeta`` when ``Qz == Q*``."""
        zeta = self.zeta
        s = self.Qz - self.Q
        if s == 0.0:
            return zeta
        if omega is None:
            omega = self.omega(m, q)
        det = self.Qz * q - m * m
        if det <= 0.0:                       # omega is a multiple of zeta: condition on zeta alone
            return (self.Q / self.Qz) * zeta
        a = (self.Q * q - m * m) / det
        b = m * s / det
        return a * zeta + b * omega

    def mean(self, values):
        return self.rule.mean(values)

    def error(self, values):
        return self.rule.error(values)


def _check_mq(m, q):
    """Order parameters ``m`` (finite real) and ``q >= 0`` (finite), as floats."""
    return check_real(m, "m"), check_nonnegative(q, "q")


def _check_estimate(est: float, m: float, q: float) -> None:
    if not math.isfinite(est):
        raise ValueError(f"the test error overflows float64 at m = {m!r}, q = {q!r} (they must satisfy "
                         "m^2 <= q Q* with finite omega)")


class OutputSample:
    """Integration nodes of the SE output side for one ``(alpha, T, Q*, channel)``.

    Parameters
    ----------
    alpha, T, Q, channel : the problem (``Q = Q*``).
    n_mc : budget of nodes per rule (integer >= 100).  ``'mc'``: exactly ``n_mc`` draws;
        ``'qmc'``: ``R 2^k <= n_mc`` points (``8 <= R <= 15``); ``'gauss_hermite'``:
        ``n^D + (n-2)^D <= n_mc``.
    seed : generator or seed of the ``'mc'`` draws (ignored by the other rules).
    method : ``'auto'`` (= ``'qmc'``, seed-independent), ``'mc'``, ``'qmc'`` or ``'gauss_hermite'``.
    qmc_seed : the fixed internal seed of the Sobol scramblings (vary it only to check accuracy).
    n_replicates : number ``R`` of scramblings (default: from ``n_mc``, between 8 and 15).

    Attributes ``alpha, T, K, Q, channel, n_mc, method, warm_start``; arrays of the full rule
    ``xi1, xi2, z_star (N, K)``, ``y (N, T, T)``, ``weights (N,)``; ``omega(m, q)``;
    ``mean(values)`` / ``error(values)`` (weighted mean over the nodes and its error estimate);
    ``square_moments()``, ``test_error(m, q)``, ``test_error_noisy(m, q)``.  Output factors should
    average through :meth:`view` (``view(factor)``), which drops exact-zero dimensions.

    ``z* = sqrt(Q*) xi1``, ``omega(m, q) = (m / sqrt(Q*)) xi1 + sqrt(q - m^2/Q*) xi2``,
    ``y = channel(unwhiten(z*))`` (``'mc'``: the channel draws its noise from the generator, after
    ``xi1`` and ``xi2``; other rules: the noise is a third Gaussian block of the rule).  Nodes are
    made on first use (a factor with closed-form conjugates never pays for them) and then fixed.
    """

    def __init__(self, alpha, T, Q, channel, n_mc=DEFAULT_N_MC, seed=0, method="auto", *,
                 qmc_seed=0, n_replicates=None):
        self.alpha = check_positive(alpha, "alpha")
        self.T = check_T(T)
        self.K = n_pairs(self.T)
        self.Q = check_positive(Q, "Q")
        self.channel = check_channel(channel)
        if isinstance(n_mc, bool) or not isinstance(n_mc, (int, np.integer)) or not 100 <= n_mc <= 2**62:
            raise ValueError(f"n_mc must be an integer in 100..2^62, got {n_mc!r}")
        self.n_mc = int(n_mc)
        # nodes xi1, xi2, z* (N, K) and y (N, T, T), plus the factors' per-node work arrays
        check_memory(float(self.n_mc) * (8 * self.K + 4 * self.T * self.T) * 8,
                     f"the SE output sample (n_mc={self.n_mc}, T={self.T})", "use a smaller n_mc")
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = "qmc" if method == "auto" else method
        if isinstance(qmc_seed, bool) or not isinstance(qmc_seed, numbers.Integral) or qmc_seed < 0:
            raise ValueError(f"qmc_seed must be an integer >= 0, got {qmc_seed!r}")
        self.qmc_seed = int(qmc_seed)
        if n_replicates is not None and (isinstance(n_replicates, bool)
                                         or not isinstance(n_replicates, numbers.Integral)
                                         or not 2 <= n_replicates <= self.n_mc // 2):
            raise ValueError(f"n_replicates must be an integer in 2..n_mc/2, got {n_replicates!r}")
        self.n_replicates = None if n_replicates is None else int(n_replicates)
        self.noise = check_nonnegative(_channel_noise(self.channel), "channel noise")
        self._rng = check_rng(seed) if self.method == "mc" else None
        self._draws = None
        self._rules = {}
        self._views = {}
        self._square_moments = None
        self._last_test = None  # ((m, q, noisy), rule, values, estimate) of the last test error
        self._warm_start = None

    def resized(self, n_mc: int) -> "OutputSample":
        """The same problem and rule settings (method, internal seed, replicates) with another
        node budget ``n_mc`` (its nodes made afresh on first use)."""
        return OutputSample(self.alpha, self.T, self.Q, self.channel, n_mc=n_mc, method=self.method,
                            qmc_seed=self.qmc_seed, n_replicates=self.n_replicates)

    # ---------------------------------------------------------------- rules
    def _rule(self, n_blocks: int, reduced: bool) -> GaussianRule:
        key = (n_blocks, reduced)
        if key not in self._rules:
            basis = _complement_basis(self.T) if reduced else None
            block_dim = self.K - 1 if reduced else self.K
            if self.method == "qmc":
                rule = _qmc_rule(n_blocks, block_dim, basis, self.n_mc, self.qmc_seed, self.n_replicates)
            elif self.method == "gauss_hermite":
                rule = _gh_rule(n_blocks, block_dim, basis, self.n_mc)
            else:  # pragma: no cover - 'mc' never builds a rule here
                raise AssertionError(self.method)
            self._rules[key] = rule
        return self._rules[key]

    def _draw(self):
        """The full rule: ``(xi1, xi2, z_star, y)`` (``'mc'``: the historical draw sequence)."""
        if self._draws is None:
            if self.method == "mc":
                rng = self._rng
                xi1 = rng.standard_normal((self.n_mc, self.K))
                xi2 = rng.standard_normal((self.n_mc, self.K))
                z_star = math.sqrt(self.Q) * xi1
                y = self.channel(unwhiten(z_star, self.T), rng)
                rule = GaussianRule((xi1, xi2), np.full(self.n_mc, 1.0 / self.n_mc), "mc",
                                    description=f"Monte Carlo, {self.n_mc} draws")
            else:
                rule = self._rule(3 if self.noise > 0 else 2, False)
                xi1, xi2 = rule.blocks[0], rule.blocks[1]
                z_star = math.sqrt(self.Q) * xi1
                pre = z_star if self.noise == 0 else z_star + math.sqrt(self.noise) * rule.blocks[2]
                y = self.channel.phi(unwhiten(pre, self.T))
            self._full_rule = rule
            self._draws = (xi1, xi2, z_star, y)
        return self._draws

    def view(self, factor=None, *, Qz=None, reduced=None) -> OutputView:
        """The rule on which output-factor averages are taken (:class:`OutputView`).

        ``factor`` given: nodes in the complement of the flat direction if the labels and the
        factor are flat-invariant (:func:`is_flat_invariant`), channel input ``Qz = Q* + noise``.
        ``'mc'``: always the historical draws (``z_star_mean`` is then ``z*`` itself).
        """
        if self.method == "mc":
            if "mc" not in self._views:
                xi1, xi2, z_star, y = self._draw()
                v = OutputView(self, self._full_rule, self.Q, False)
                v._y = y
                self._views["mc"] = v
            return self._views["mc"]
        if Qz is None:
            Qz = self.Q + self.noise
        Qz = check_positive(Qz, "Qz")
        if reduced is None:
            reduced = factor is not None and _labels_flat_invariant(self.channel) and is_flat_invariant(factor)
        key = (float(Qz), bool(reduced))
        if key not in self._views:
            self._views[key] = OutputView(self, self._rule(2, bool(reduced)), Qz, bool(reduced))
        return self._views[key]

    # ---------------------------------------------------------------- public arrays (full rule)
    @property
    def xi1(self):
        return self._draw()[0]

    @property
    def xi2(self):
        return self._draw()[1]

    @property
    def z_star(self):
        return self._draw()[2]

    @property
    def y(self):
        return self._draw()[3]

    @property
    def weights(self):
        """Node weights of the full rule, shape (N,), summing to 1."""
        self._draw()
        return self._full_rule.weights

    @property
    def rule(self) -> GaussianRule:
        """The full rule (nodes of ``xi1``, ``xi2``, ``y``)."""
        self._draw()
        return self._full_rule

    @property
    def warm_start(self):
        """The last prox point stored by an output factor (on the nodes of its view)."""
        return self._warm_start

    @warm_start.setter
    def warm_start(self, value):
        self._warm_start = value

    def omega(self, m, q):
        """``omega`` on the full rule for order parameters (m, q), shape (N, K)."""
        m, q = _check_mq(m, q)
        r2 = max(q - m * m / self.Q, 0.0)
        return (m / math.sqrt(self.Q)) * self.xi1 + math.sqrt(r2) * self.xi2

    def mean(self, values):
        """Weighted mean over the nodes of the full rule (axis 0 of ``values``)."""
        self._draw()
        return self._full_rule.mean(values)

    def error(self, values):
        """Error estimate of :meth:`mean` (standard error for 'mc' and 'qmc')."""
        self._draw()
        return self._full_rule.error(values)

    # ---------------------------------------------------------------- predictions
    def square_moments(self):
        """``(c1, c2) = (E||z_y||^2/K, E[z_y . z*]/K)`` with ``z_y = whiten(y)``: exact for the linear
        channel (``Q* + noise``, ``Q*``), by the rule otherwise (docs/theory.md §7, square loss)."""
        if self._square_moments is None:
            if isinstance(self.channel, LinearChannel):
                self._square_moments = (self.Q + self.channel.noise, self.Q)
            elif self.method == "mc":
                zy = whiten(self.y)
                self._square_moments = (float(np.mean(np.sum(zy * zy, axis=1))) / self.K,
                                        float(np.mean(np.sum(zy * self.z_star, axis=1))) / self.K)
            else:
                # y depends on the u-free part of zeta only; E[z* | zeta] = (Q*/Qz) zeta
                v = self.view(reduced=_labels_flat_invariant(self.channel))
                zy = whiten(v.y)
                zs = (self.Q / v.Qz) * v.zeta
                vals = np.stack([np.sum(zy * zy, axis=1), np.sum(zy * zs, axis=1)], axis=1)
                c1, c2 = v.mean(vals) / self.K
                self._square_moments = (float(c1), float(c2))
        return self._square_moments

    def _test_values(self, m, q, noisy: bool):
        phi = self.channel.phi
        if self.method == "mc":
            z_hat = self.omega(m, q)
            target = self.y if noisy or self.noise == 0 else phi(unwhiten(self.z_star, self.T))
            diff = target - phi(unwhiten(z_hat, self.T))
            return self._full_rule, np.sum(diff * diff, axis=(1, 2))
        v = self.view(Qz=self.Q + self.noise if noisy else self.Q,
                      reduced=_labels_flat_invariant(self.channel))
        target = v.y if noisy or self.noise == 0 else phi(unwhiten(v.zeta, self.T))  # (labels = phi(z*))
        diff = target - phi(unwhiten(v.omega(m, q), self.T))
        return v.rule, np.sum(diff * diff, axis=(1, 2))

    def _test_error(self, m, q, noisy: bool, return_error: bool):
        m, q = _check_mq(m, q)
        noisy = noisy and self.noise > 0  # (noiseless channel: the labels are phi(z*), one error)
        key = (m, q, noisy)
        if self._last_test is None or self._last_test[0] != key:  # (the SE asks for both errors)
            with np.errstate(over="ignore", invalid="ignore"):
                rule, vals = self._test_values(m, q, noisy=noisy)
                self._last_test = (key, rule, vals, float(rule.mean(vals)))
        _, rule, vals, est = self._last_test
        _check_estimate(est, m, q)
        return (est, float(rule.error(vals))) if return_error else est

    def test_error(self, m, q, return_error: bool = False):
        """``E ||phi(h*) - phi(h_hat)||_F^2`` with per-component covariance ``[[Q*, m], [m, q]]``
        (``phi`` the channel's noiseless map; docs/theory.md §7.5).  ``return_error=True``: also
        the rule's error estimate."""
        return self._test_error(m, q, False, return_error)

    def test_error_noisy(self, m, q, return_error: bool = False):
        """``E ||y - phi(h_hat)||_F^2`` with ``y`` the (noisy) labels of the sample: the error against
        the observed targets of a new sample (equals :meth:`test_error` for a noiseless channel)."""
        return self._test_error(m, q, True, return_error)

    def __repr__(self):
        return (f"OutputSample(alpha={self.alpha!r}, T={self.T}, Q={self.Q!r}, channel={self.channel!r}, "
                f"n_mc={self.n_mc}, method={self.method!r})")
