"""The factor contracts (docs/theory.md §5, §7): closed-form overrides against the generic paths.

Each factor with a closed form (Frobenius shrinkage, the square loss, the Bayes outputs) is
checked against the generic path of its contract (:class:`amp_attention.factors.InputFactor` /
:class:`~amp_attention.factors.OutputFactor`), which knows nothing of the closed form.
"""

from __future__ import annotations

import numpy as np
import pytest

import amp_attention as aa
from amp_attention.bayes_outputs import BayesLinearOutput, BayesSoftmaxOutput
from amp_attention.denoisers import FrobeniusDenoiser, NuclearDenoiser, RIEDenoiser
from amp_attention.factors import InputFactor, OutputFactor
from amp_attention.output_sample import OutputSample
from amp_attention.spectral import SpectralLaw
from amp_attention.whitening import n_pairs


def _sym(d, rng):
    A = rng.standard_normal((d, d))
    return (A + A.T) / np.sqrt(2 * d)


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_frobenius_closed_forms_equal_the_generic_spectral_path(lam):
    rng = np.random.default_rng(1)
    d, A_hat = 30, 1.7
    R = _sym(d, rng) + np.diag(np.linspace(-1, 2, d))
    den = FrobeniusDenoiser(lam)
    S, div, _ = den.factored(R, A_hat)
    S_g, div_g, _ = InputFactor.factored(den, R, A_hat)  # eigh, f, divergence kernel
    np.testing.assert_allclose(S, S_g, atol=1e-12)
    assert div == pytest.approx(div_g, rel=1e-12)
    for law in (SpectralLaw.wishart(0.5), SpectralLaw.atoms(np.linspace(0.1, 2, 50))):
        closed = den.se_overlaps(law, 0.8, 0.3, A_hat)
        generic = InputFactor.se_overlaps(den, law, 0.8, 0.3, A_hat)  # free probability quadrature
        np.testing.assert_allclose(closed, generic, rtol=1e-9, atol=1e-12)


def test_nuclear_matrix_denoiser_is_its_scalar_map_on_the_spectrum():
    rng = np.random.default_rng(2)
    d, A_hat, lam = 25, 1.3, 0.4
    R = _sym(d, rng) + 0.5 * np.eye(d)
    S, div, F = NuclearDenoiser(lam).factored(R, A_hat)
    L, U = np.linalg.eigh(R)
    f = np.maximum(L - lam / A_hat, 0.0)
    np.testing.assert_allclose(S, (U * f) @ U.T, atol=1e-12)
    np.testing.assert_allclose(F @ F.T, S, atol=1e-12)
    assert F.shape[1] == int(np.sum(f > 0))
    # divergence: written out pair by pair (independent of the kernel)
    fp = (L > lam / A_hat).astype(float)
    ref = fp.sum() + sum((f[i] - f[j]) / (L[i] - L[j]) for i in range(d) for j in range(i + 1, d))
    assert div == pytest.approx(ref, rel=1e-12)


def test_rie_closed_form_overlaps_equal_the_generic_free_path():
    """On the Nishimori line (a = 1, Delta = 1/(2 A_hat)): q = Q* - mmse = m, V = mmse, where the
    generic path integrates the RIE's scalar map against rho_R."""
    law = SpectralLaw.wishart(0.5)
    den = RIEDenoiser(law)
    for A_hat in (0.7, 2.0, 6.0):
        Delta = 1.0 / (2.0 * A_hat)
        closed = den.se_overlaps(law, 1.0, Delta, A_hat)
        generic = InputFactor.se_overlaps(den, law, 1.0, Delta, A_hat)
        np.testing.assert_allclose(closed, generic, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("output", [BayesLinearOutput(0.2), BayesSoftmaxOutput(1.0)])
def test_bayes_closed_form_conjugates_equal_the_generic_monte_carlo_path(output):
    """Nishimori line m = q, V = Q* - q: the generic averages of g_out give the closed form."""
    law_Q, alpha, T = 1.5, 0.4, 2
    sample = OutputSample(alpha, T, law_Q, output.channel(), n_mc=200_000, seed=3, method="mc")
    K = n_pairs(T)
    for q in (0.0, 0.6, 1.2):
        closed = output.se_conjugates(sample, q, q, law_Q - q)
        generic = OutputFactor.se_conjugates(output, sample, q, q, law_Q - q)
        k_eff = K - 1 if isinstance(output, BayesSoftmaxOutput) else K
        noise = getattr(output, "noise", 0.0)
        assert closed.A_hat == pytest.approx(alpha * k_eff / (law_Q - q + noise), rel=1e-14)
        assert generic.A_hat == pytest.approx(closed.A_hat, rel=1e-12)  # Tr dg is constant
        for key in ("m_hat", "q_hat"):
            err = generic.stderr[key]
            assert abs(getattr(generic, key) - getattr(closed, key)) <= 5 * err + 1e-12, key


def test_output_sample_draws_are_lazy_and_fixed():
    sample = OutputSample(0.3, 2, 1.5, aa.SoftmaxChannel(1.0), n_mc=1000, seed=0, method="mc")
    assert sample._draws is None
    y1 = sample.y
    assert sample.y is y1 and y1.shape == (1000, 2, 2)
    again = OutputSample(0.3, 2, 1.5, aa.SoftmaxChannel(1.0), n_mc=1000, seed=0, method="mc")
    np.testing.assert_array_equal(again.y, y1)
