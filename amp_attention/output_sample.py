"""The Gaussian output sample of the state evolution (docs/theory.md §7.1).

The SE output side averages functions of ``(z*, omega, y)`` where, per whitened component,
``(z*, omega) ~ N(0, [[Q*, m], [m, q]])`` and ``y`` is made from ``z*`` by the channel.
:class:`OutputSample` fixes the draws once (common random numbers), so the SE map is deterministic
for a given seed; output factors (:meth:`amp_attention.factors.OutputFactor.se_conjugates`) read
``y``, ``z_star``, ``omega(m, q)`` from it.
"""

from __future__ import annotations

import math

import numpy as np

from ._validation import check_positive, check_rng, check_T
from .model import LinearChannel, check_channel
from .whitening import n_pairs, unwhiten, whiten

__all__ = ["OutputSample"]




class OutputSample:
    """Gaussian draws of the SE output side for one ``(alpha, T, Q*, channel)``.

    ``n_mc`` draws of the K-dim Gaussians ``z* = sqrt(Q*) xi_1`` and
    ``omega(m, q) = (m / sqrt(Q*)) xi_1 + sqrt(q - m^2/Q*) xi_2``; ``y = channel(unwhiten(z*))``
    with the channel noise drawn once.  The draws are made on first use (a factor with closed-form
    conjugates never pays for them) and then fixed.  ``warm_start`` keeps the last prox point
    (the next step's Newton start).
    """

    def __init__(self, alpha, T, Q, channel, n_mc=100_000, seed=0):
        self.alpha = check_positive(alpha, "alpha")
        self.T = check_T(T)
        self.K = n_pairs(self.T)
        self.Q = check_positive(Q, "Q")
        self.channel = check_channel(channel)
        if isinstance(n_mc, bool) or not isinstance(n_mc, (int, np.integer)) or n_mc < 100:
            raise ValueError(f"n_mc must be an integer >= 100, got {n_mc!r}")
        self.n_mc = int(n_mc)
        self._rng = check_rng(seed)
        self._draws = None
        self._square_moments = None
        self.warm_start = None

    def _draw(self):
        if self._draws is None:
            rng = self._rng
            xi1 = rng.standard_normal((self.n_mc, self.K))
            xi2 = rng.standard_normal((self.n_mc, self.K))
            z_star = math.sqrt(self.Q) * xi1
            y = self.channel(unwhiten(z_star, self.T), rng)
            self._draws = (xi1, xi2, z_star, y)
        return self._draws

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

    def omega(self, m, q):
        """The fixed-draw omega for order parameters (m, q), shape (n_mc, K)."""
        r2 = max(q - m * m / self.Q, 0.0)
        return (m / math.sqrt(self.Q)) * self.xi1 + math.sqrt(r2) * self.xi2

    def square_moments(self):
        """``(c1, c2) = (E||z_y||^2/K, E[z_y . z*]/K)`` with ``z_y = whiten(y)``: exact for the linear
        channel (``Q* + noise``, ``Q*``), Monte Carlo otherwise (docs/theory.md §7, square loss)."""
        if self._square_moments is None:
            if isinstance(self.channel, LinearChannel):
                self._square_moments = (self.Q + self.channel.noise, self.Q)
            else:
                zy = whiten(self.y)
                self._square_moments = (float(np.mean(np.sum(zy * zy, axis=1))) / self.K,
                                        float(np.mean(np.sum(zy * self.z_star, axis=1))) / self.K)
        return self._square_moments

    def test_error(self, m, q) -> float:
        """``E ||phi(h*) - phi(h_hat)||_F^2`` with per-component covariance ``[[Q*, m], [m, q]]``
        (``phi`` the channel's noiseless map)."""
        z_hat = self.omega(m, q)
        phi = self.channel.phi
        diff = phi(unwhiten(self.z_star, self.T)) - phi(unwhiten(z_hat, self.T))
        return float(np.mean(np.sum(diff * diff, axis=(1, 2))))
