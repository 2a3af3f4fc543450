"""Fuzz campaign of issue 12 for the low-level public objects (model, whitening, spectral,
denoisers, factors, losses, Bayes outputs, output sample, variance).

Every call ends in one of the outcome classes of :mod:`fuzz` (a ``ValueError`` naming the
argument, a finite result, or a flagged non-convergence); crashes, silent NaN/inf and hangs fail.
Bad values (``BAD``: None, strings, NaN/inf, wrong signs, booleans, lists, complex numbers, ints
too large for a float) must give ``"error"``; valid but extreme values (``EXTREME``: 1e-300 ..
1e300) must give ``"finite"`` or an ``"error"`` naming one of the arguments.  Counts of the outcome
classes are collected in :data:`COUNTS` (printed at the end of the module with ``-s``).
Below the fuzz tests: one plain regression test per reproducer of the issue in this area.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amp_attention as aa
from amp_attention import spectral as sp
from amp_attention.bayes_outputs import BayesLinearOutput, BayesSoftmaxOutput, bayes_output
from amp_attention.losses import gram_g_out
from amp_attention.model import as_spectral_law, row_softmax
from amp_attention.output_sample import OutputSample
from amp_attention.variance import GramVariance, prepare_variance
from fuzz import examples, outcome

COUNTS: Counter = Counter()

NAN, INF = float("nan"), float("inf")
#: Values that no scalar argument accepts.
BAD = [None, "abc", NAN, INF, -INF, True, False, [1.0], complex(1, 1), 10**400, np.float64("nan"), object()]
#: Valid-looking numbers at the edges of float64 (some are also invalid for a given argument kind).
EXTREME = [1e-300, 1e-150, 1e-30, 1e-8, 0.5, 2.5, 1e8, 1e30, 1e150, 1e300, 1.7e308, 5e-324,
           0.0, -0.0, -1.0, -1e300, 3, 0, -2]


def valid(kind: str, v) -> bool:
    """Whether ``v`` is a valid value for an argument of ``kind``."""
    if isinstance(v, (bool, np.bool_)):
        return False
    if kind in ("pos", "nonneg", "real"):
        if not isinstance(v, (int, float, np.floating, np.integer)):
            return False
        try:
            f = float(v)
        except OverflowError:
            return False
        if not math.isfinite(f):
            return False
        return {"pos": f > 0, "nonneg": f >= 0, "real": True}[kind]
    if kind.startswith("int>="):
        return isinstance(v, (int, np.integer)) and v >= int(kind[5:])
    raise AssertionError(kind)


def check(call, names, must_fail: bool = False):
    """``outcome`` plus bookkeeping; ``must_fail``: the input is invalid, so it must be an error."""
    cls, _ = outcome(call, names=names, timeout=60.0)
    COUNTS[cls] += 1
    if must_fail:
        assert cls == "error", f"invalid input accepted silently (outcome {cls})"
    return cls


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(COUNTS.values())
    print(f"\n[test_fuzz_model] {total} fuzz calls, outcome classes: {dict(COUNTS)}")


# ---------------------------------------------------------------------------------------------
# Fixed small objects
# ---------------------------------------------------------------------------------------------

LAWS = {
    "wishart": sp.SpectralLaw.wishart(0.5),
    "atoms": sp.SpectralLaw.atoms([0.0, 1.0, 2.5]),
    "semicircle": sp.SpectralLaw.semicircle(1.0, 0.3),
}
TEACHER = aa.Teacher.wishart(4, 0.5, rng=0)
RNG_Y = np.random.default_rng(3)
H2 = RNG_Y.standard_normal((3, 2, 2))
H2 = 0.5 * (H2 + np.swapaxes(H2, 1, 2))
Y_SOFT = row_softmax(H2, 1.0)
Y_LIN = H2.copy()
Z2 = RNG_Y.standard_normal((3, 3))


def _sym(d, seed=1, scale=1.0):
    A = np.random.default_rng(seed).standard_normal((d, d))
    return scale * (A + A.T) / 2


# ---------------------------------------------------------------------------------------------
# Scalar arguments of every entry point: (label, thunk(value), kind, names)
# ---------------------------------------------------------------------------------------------

SCALAR_CASES = [
    ("Teacher.wishart d", lambda v: aa.Teacher.wishart(v, 0.5, rng=0), "int>=1", ("d",)),
    ("Teacher.wishart rho", lambda v: aa.Teacher.wishart(4, v, rng=0), "pos", ("rho",)),
    ("Teacher.powerlaw gamma", lambda v: aa.Teacher.powerlaw(4, v, rng=0), "nonneg", ("gamma",)),
    ("Teacher.powerlaw cutoff", lambda v: aa.Teacher.powerlaw(4, 1.0, rng=0, cutoff=v), "opt:int>=1", ("cutoff",)),
    ("Teacher.lowrank rank", lambda v: aa.Teacher.lowrank(4, v, rng=0), "int>=1", ("rank",)),
    ("Teacher.lowrank strength", lambda v: aa.Teacher.lowrank(4, 1, rng=0, strength=v), "pos", ("strength",)),
    ("Teacher rng", lambda v: aa.Teacher.wishart(4, 0.5, rng=v), "int>=0", ("rng",)),
    ("SoftmaxChannel beta", lambda v: aa.SoftmaxChannel(v)(H2), "pos", ("beta",)),
    ("SoftmaxChannel noise", lambda v: aa.SoftmaxChannel(1.0, v)(H2, rng=0), "nonneg", ("noise",)),
    ("HardmaxChannel noise", lambda v: aa.HardmaxChannel(v)(H2, rng=0), "nonneg", ("noise",)),
    ("LinearChannel noise", lambda v: aa.LinearChannel(v)(H2, rng=0), "nonneg", ("noise",)),
    ("channel rng", lambda v: aa.LinearChannel(0.0)(H2, rng=v), "int>=0", ("rng",)),
    ("row_softmax beta", lambda v: row_softmax(H2 * 100, v), "pos", ("beta",)),
    ("sample_tokens n", lambda v: aa.sample_tokens(v, 2, 3, rng=0), "int>=1", ("n",)),
    ("sample_tokens T", lambda v: aa.sample_tokens(2, v, 3, rng=0), "T", ("T",)),
    ("sample_tokens d", lambda v: aa.sample_tokens(2, 2, v, rng=0), "int>=1", ("d",)),
    ("sample_data n", lambda v: aa.sample_data(v, 2, TEACHER, aa.SoftmaxChannel(), rng=0), "int>=1", ("n",)),
    ("sample_data T", lambda v: aa.sample_data(3, v, TEACHER, aa.LinearChannel(), rng=0), "T", ("T",)),
    ("pair_indices T", lambda v: aa.pair_indices(v), "T", ("T",)),
    ("SpectralLaw.wishart rho", lambda v: sp.SpectralLaw.wishart(v), "pos", ("rho",)),
    ("SpectralLaw.semicircle variance", lambda v: sp.SpectralLaw.semicircle(v), "pos", ("variance",)),
    ("SpectralLaw.semicircle mean", lambda v: sp.SpectralLaw.semicircle(1.0, v), "real", ("mean",)),
    ("r_density a", lambda v: sp.r_density(LAWS["wishart"], v, 0.3).grid(), "nonneg", ("a", "Delta")),
    ("r_density Delta", lambda v: sp.r_density(LAWS["atoms"], 1.0, v).grid(), "pos", ("Delta", "a")),
    ("r_density n_nodes", lambda v: sp.r_density(LAWS["wishart"], 1.0, 0.3, n_nodes=v), "opt:int>=4", ("n_nodes",)),
    ("rie_mmse Delta wishart", lambda v: sp.rie_mmse(LAWS["wishart"], v), "pos", ("Delta",)),
    ("rie_mmse Delta atoms", lambda v: sp.rie_mmse(LAWS["atoms"], v), "pos", ("Delta",)),
    ("rie_mmse Delta semicircle", lambda v: sp.rie_mmse(LAWS["semicircle"], v), "pos", ("Delta",)),
    ("rie_denoiser a", lambda v: sp.rie_denoiser([0.5, 1.0], LAWS["atoms"], 0.3, a=v), "pos", ("a", "Delta")),
    ("free_input_side A_hat", lambda v: sp.free_input_side(LAWS["wishart"], 1.0, 0.3, sp.SoftThreshold(0.1), v),
     "pos", ("A_hat",)),
    ("free_input_side Delta", lambda v: sp.free_input_side(LAWS["atoms"], 1.0, v, sp.LinearShrinkage(0.5), 1.0),
     "pos", ("Delta", "a", "f")),
    ("sample_goe d", lambda v: sp.sample_goe(v, rng=0), "int>=1", ("d",)),
    ("SoftThreshold tau", lambda v: sp.SoftThreshold(v)(np.arange(3.0)), "real", ("tau",)),
    ("NuclearDenoiser lam", lambda v: aa.NuclearDenoiser(v)(_sym(4), 1.0), "nonneg", ("lam", "A_hat")),
    ("NuclearDenoiser width", lambda v: aa.NuclearDenoiser(0.1, v)(_sym(4), 1.0), "opt:int>=1", ("width",)),
    ("NuclearDenoiser A_hat", lambda v: aa.NuclearDenoiser(0.1)(_sym(4), v), "pos", ("A_hat", "lam")),
    ("FrobeniusDenoiser lam", lambda v: aa.FrobeniusDenoiser(v)(_sym(4), 1.0), "nonneg", ("lam",)),
    ("FrobeniusDenoiser A_hat", lambda v: aa.FrobeniusDenoiser(0.1)(_sym(4), v), "pos", ("A_hat",)),
    ("RIEDenoiser A_hat", lambda v: aa.RIEDenoiser(LAWS["wishart"])(_sym(4), v), "pos", ("A_hat", "Delta")),
    ("nuclear_prox threshold", lambda v: aa.nuclear_prox(_sym(4), v), "real", ("threshold",)),
    ("nuclear_prox width", lambda v: aa.nuclear_prox(_sym(4), 0.1, v), "opt:int>=1", ("width",)),
    ("se_overlaps Delta", lambda v: aa.NuclearDenoiser(0.1).se_overlaps(LAWS["wishart"], 1.0, v, 1.0),
     "pos", ("Delta", "a")),
    ("se_overlaps a", lambda v: aa.FrobeniusDenoiser(0.1).se_overlaps(LAWS["wishart"], v, 0.3, 1.0),
     "nonneg", ("a",)),
    ("se_overlaps_finite Delta", lambda v: aa.NuclearDenoiser(0.1).se_overlaps_finite(
        [1.0, 2.0, 0.5], 1.0, v, 1.0, n_draws=1, rng=0), "pos", ("Delta",)),
    ("se_overlaps_finite n_draws", lambda v: aa.FrobeniusDenoiser(0.1).se_overlaps_finite(
        [1.0, 2.0], 1.0, 0.3, 1.0, n_draws=v, rng=0), "int>=1", ("n_draws",)),
    ("RIEDenoiser se_overlaps Delta", lambda v: aa.RIEDenoiser(LAWS["atoms"]).se_overlaps(
        LAWS["atoms"], 1.0, v, 1.0), "pos", ("Delta",)),
    ("make_loss square beta", lambda v: aa.make_loss("square", v), "opt:pos", ("beta",)),
    ("make_loss cross_entropy beta", lambda v: aa.make_loss("cross_entropy", v), "pos", ("beta",)),
    ("CrossEntropyLoss beta value", lambda v: aa.CrossEntropyLoss(v).value(Y_SOFT, 100 * H2), "pos", ("beta",)),
    ("CrossEntropyLoss beta grad_h", lambda v: aa.CrossEntropyLoss(v).grad_h(Y_SOFT, H2), "pos", ("beta",)),
    ("CrossEntropyLoss beta g_out", lambda v: aa.CrossEntropyLoss(v).g_out(Y_SOFT, Z2, 1.0), "pos", ("beta",)),
    ("CrossEntropyLoss tol", lambda v: aa.CrossEntropyLoss(1.0, tol=v).prox(Y_SOFT, Z2, 1.0), "pos", ("tol",)),
    ("CrossEntropyLoss max_newton", lambda v: aa.CrossEntropyLoss(1.0, max_newton=v), "int>=1", ("max_newton",)),
    ("SoftmaxSquareLoss beta value", lambda v: aa.SoftmaxSquareLoss(v).value(Y_SOFT, 100 * H2), "pos", ("beta",)),
    ("SoftmaxSquareLoss beta hess_z", lambda v: aa.SoftmaxSquareLoss(v).hess_z(Y_SOFT, Z2), "pos", ("beta",)),
    ("SoftmaxSquareLoss beta g_out", lambda v: aa.SoftmaxSquareLoss(v, max_newton=20).g_out(Y_SOFT, Z2, 1.0),
     "pos", ("beta",)),
    ("SquareLoss V", lambda v: aa.SquareLoss().g_out(Y_LIN, Z2, v), "nonneg", ("V",)),
    ("CrossEntropyLoss V", lambda v: aa.CrossEntropyLoss().g_out(Y_SOFT, Z2, v), "nonneg", ("V",)),
    ("cross_entropy_prox V", lambda v: aa.losses.cross_entropy_prox(Y_SOFT, Z2, v, 1.0), "pos", ("V",)),
    ("BayesSoftmaxOutput beta", lambda v: BayesSoftmaxOutput(v).z_target(Y_SOFT), "pos", ("beta",)),
    ("BayesSoftmaxOutput V", lambda v: BayesSoftmaxOutput().g_out(Y_SOFT, Z2, v), "pos", ("V",)),
    ("BayesLinearOutput noise", lambda v: BayesLinearOutput(v).g_out(Y_LIN, Z2, 1.0), "nonneg", ("noise",)),
    ("BayesLinearOutput V", lambda v: BayesLinearOutput(0.1).g_out(Y_LIN, Z2, v), "pos", ("V",)),
    ("OutputSample alpha", lambda v: OutputSample(v, 2, 1.0, aa.LinearChannel(0.1), n_mc=128).test_error(0.5, 0.5),
     "pos", ("alpha",)),
    ("OutputSample Q", lambda v: OutputSample(1.0, 2, v, aa.SoftmaxChannel(), n_mc=128).test_error(0.0, 0.0),
     "pos", ("Q",)),
    ("OutputSample n_mc", lambda v: OutputSample(1.0, 2, 1.0, aa.LinearChannel(), n_mc=v), "int>=100", ("n_mc",)),
    ("OutputSample.test_error q", lambda v: OutputSample(1.0, 2, 1.0, aa.SoftmaxChannel(), n_mc=128).test_error(
        0.0, v), "nonneg", ("q",)),
    ("OutputSample.test_error m", lambda v: OutputSample(1.0, 2, 1.0, aa.SoftmaxChannel(), n_mc=128).test_error(
        v, 1.0), "real", ("m",)),
    ("prepare_variance V", lambda v: prepare_variance(v, 2, 3), "pos", ("V",)),
    ("GramVariance.scaled v", lambda v: GramVariance(np.eye(3)).scaled(v), "nonneg", ("v",)),
    ("gram_g_out v", lambda v: gram_g_out(aa.SquareLoss(), Y_LIN, Z2, v, GramVariance(np.eye(3))), "nonneg", ("v",)),
]


def _expect_valid(kind, v):
    if kind == "T":
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= 8
    if kind.startswith("opt:"):  # None (the default) or a value of the kind
        return v is None or _expect_valid(kind[4:], v)
    if kind == "int>=0":  # rng seeds: None is valid too
        return v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0)
    return valid(kind, v)


@settings(max_examples=examples(ci=40, thorough=250))
@given(case=st.sampled_from(SCALAR_CASES), value=st.sampled_from(BAD + EXTREME))
def test_fuzz_scalar_arguments(case, value):
    label, thunk, kind, names = case
    must_fail = not _expect_valid(kind, value)
    check(lambda: thunk(value), names, must_fail=must_fail)


# ---------------------------------------------------------------------------------------------
# Array arguments: ragged, empty, wrong shapes and dtypes, non-finite, non-symmetric, extreme
# ---------------------------------------------------------------------------------------------

BAD_ARRAYS = [
    None, "abc", [[1.0, 2.0], [3.0]], [], np.empty((0, 3)), np.array([1.0, NAN]), np.array([INF, 1.0]),
    np.array([True, False]), np.array([1 + 1j, 2.0]), np.array(["a", "b"]), 3.0, np.ones((2, 2, 2, 2)),
]


def _extreme_arrays(shape, symmetric=False):
    base = np.random.default_rng(7).standard_normal(shape)
    if symmetric:
        base = 0.5 * (base + np.swapaxes(base, -1, -2))
    return [s * base for s in (1e-300, 1e-150, 1.0, 1e150, 1e300)]


ARRAY_CASES = [
    # (label, thunk(array), names, bad list or None (= BAD_ARRAYS), extreme valid list)
    ("Teacher.custom eigenvalues", lambda a: aa.Teacher.custom(a, rng=0), ("eigenvalues",),
     None, _extreme_arrays((4,))),
    ("SpectralLaw.atoms eigenvalues", lambda a: sp.SpectralLaw.atoms(a), ("eigenvalues",), None, _extreme_arrays((3,))),
    ("SpectralLaw.atoms weights", lambda a: sp.SpectralLaw.atoms([1.0, 2.0], a), ("weights",),
     BAD_ARRAYS[1:] + [np.array([-1.0, 2.0]), np.zeros(2)], [np.array([1e300, 1e308])]),
    ("channel h", lambda a: aa.SoftmaxChannel(2.0)(a), ("h",), None, _extreme_arrays((2, 3, 3), True)),
    ("HardmaxChannel h", lambda a: aa.HardmaxChannel()(a), ("h",), None, _extreme_arrays((2, 3, 3), True)),
    ("row_softmax h", lambda a: row_softmax(a, 1e306), ("h",),
     [None, "abc", [[1.0], [2.0, 3.0]], np.array(["a"])], _extreme_arrays((2, 3, 3))),
    ("whiten H", lambda a: aa.whiten(a), ("H",), [None, "abc", [[1.0], [2.0, 3.0]], np.ones((2, 3, 4))],
     _extreme_arrays((2, 3, 3), True)),
    ("Dataset X", lambda a: aa.Dataset(a, Y_LIN, H2), ("X",), None, []),
    ("NuclearDenoiser R", lambda a: aa.NuclearDenoiser(0.1)(a, 1.0), ("R",),
     BAD_ARRAYS + [np.triu(np.ones((4, 4))), np.ones((3, 4))], _extreme_arrays((4, 4), True)),
    ("FrobeniusDenoiser R", lambda a: aa.FrobeniusDenoiser(0.1)(a, 2.0), ("R",),
     BAD_ARRAYS + [np.triu(np.ones((4, 4)))], _extreme_arrays((4, 4), True)),
    ("RIEDenoiser R", lambda a: aa.RIEDenoiser(LAWS["atoms"])(a, 1.0), ("R", "Delta", "a"),
     BAD_ARRAYS + [np.triu(np.ones((4, 4)))], _extreme_arrays((4, 4), True)),
    ("nuclear_prox R", lambda a: aa.nuclear_prox(a, 0.1), ("R",), BAD_ARRAYS + [np.triu(np.ones((3, 3)))],
     _extreme_arrays((3, 3), True)),
    ("penalty S", lambda a: aa.NuclearDenoiser(0.5).penalty(a), ("S",), BAD_ARRAYS + [np.triu(np.ones((3, 3)))],
     _extreme_arrays((3, 3), True)),
    ("spectral_divergence eigenvalues", lambda a: aa.spectral_divergence(a, np.ones(3), np.ones(3)),
     ("eigenvalues",), BAD_ARRAYS + [np.arange(5.0)], _extreme_arrays((3,))),
    ("spectral_divergence f", lambda a: aa.spectral_divergence(np.array([0.0, 1e-300, 1.0]), a, np.ones(3)),
     ("f",), BAD_ARRAYS + [np.arange(2.0)], _extreme_arrays((3,))),
    ("RDensity.stieltjes x", lambda a: sp.r_density(LAWS["wishart"], 1.0, 0.3).stieltjes(a), ("x",),
     [None, "abc", [[1.0], [2.0, 3.0]], np.array([NAN])], _extreme_arrays((3,))),
    ("rie_denoiser x", lambda a: sp.rie_denoiser(a, LAWS["semicircle"], 0.3), ("x",),
     [None, "abc", [[1.0], [2.0, 3.0]], np.array([INF])], _extreme_arrays((3,))),
    ("SquareLoss y", lambda a: aa.SquareLoss().value(a, a), ("y",), None, _extreme_arrays((2, 2, 2))),
    ("SquareLoss.value H", lambda a: aa.SquareLoss().value(Y_LIN, a), ("H",), None, _extreme_arrays((3, 2, 2))),
    ("SquareLoss.g_out omega", lambda a: aa.SquareLoss().g_out(Y_LIN, a, 0.5), ("omega",),
     None, _extreme_arrays((3, 3))),
    ("CrossEntropyLoss.value_z z", lambda a: aa.CrossEntropyLoss(3.0).value_z(Y_SOFT, a), ("z",),
     None, _extreme_arrays((3, 3))),
    ("CrossEntropyLoss.g_out omega", lambda a: aa.CrossEntropyLoss(1.0).g_out(Y_SOFT, a, 1.0), ("omega",),
     None, _extreme_arrays((3, 3))),
    ("CrossEntropyLoss.g_out V", lambda a: aa.CrossEntropyLoss(1.0).g_out(Y_SOFT, Z2, a), ("V",),
     [a for a in BAD_ARRAYS if not isinstance(a, float)] + [np.array([[1.0, 2.0, 0], [0, 1, 0], [0, 0, 1]]),
                                                             -np.eye(3)], _extreme_arrays((3, 3), True)[:1]
     + [1e-300 * np.eye(3), 1e300 * np.eye(3)]),
    ("SoftmaxSquareLoss.value_z z", lambda a: aa.SoftmaxSquareLoss(3.0).value_z(Y_SOFT, a), ("z",),
     None, _extreme_arrays((3, 3))),
    ("SoftmaxSquareLoss.g_out omega", lambda a: aa.SoftmaxSquareLoss(1.0, max_newton=20).g_out(Y_SOFT, a, 1.0),
     ("omega",), None, _extreme_arrays((3, 3))),
    ("BayesSoftmaxOutput y", lambda a: BayesSoftmaxOutput().g_out(a, Z2, 1.0), ("y",),
     None, [Y_SOFT, np.full((3, 2, 2), 0.5)]),
    ("BayesLinearOutput omega", lambda a: BayesLinearOutput(0.1).g_out(Y_LIN, a, 1.0), ("omega",),
     None, _extreme_arrays((3, 3))),
    ("GramVariance gamma", lambda a: GramVariance(a), ("gamma",), BAD_ARRAYS + [-np.eye(3)],
     [1e-300 * np.eye(3), 1e300 * np.eye(3)]),
]


@settings(max_examples=examples(ci=40, thorough=250))
@given(data=st.data())
def test_fuzz_array_arguments(data):
    label, thunk, names, bad, extreme = data.draw(st.sampled_from(ARRAY_CASES), label="case")
    bad = BAD_ARRAYS if bad is None else bad
    if extreme and data.draw(st.booleans(), label="extreme"):
        arr = data.draw(st.sampled_from(extreme), label="extreme array")
        check(lambda: thunk(arr), names)
    else:
        arr = data.draw(st.sampled_from(bad), label="bad array")
        check(lambda: thunk(arr), names, must_fail=True)


# ---------------------------------------------------------------------------------------------
# Object arguments (channel, law, teacher, denoiser f, density, loss name, reg, spectrum, ...)
# ---------------------------------------------------------------------------------------------

BAD_OBJECTS = [None, "abc", 3, 2.5, [1.0], object(), np.eye(2), aa.SquareLoss(), aa.SoftmaxChannel()]

OBJECT_CASES = [
    ("sample_data teacher", lambda o: aa.sample_data(3, 2, o, aa.LinearChannel(), rng=0), ("teacher",)),
    ("sample_data channel", lambda o: aa.sample_data(3, 2, TEACHER, o, rng=0), ("channel",)),
    ("check_channel", lambda o: aa.model.check_channel(o), ("channel",)),
    ("as_spectral_law teacher", lambda o: as_spectral_law(o), ("teacher",)),
    ("as_spectral_law spectrum", lambda o: as_spectral_law(TEACHER, o), ("spectrum",)),
    ("r_density law", lambda o: sp.r_density(o, 1.0, 0.3), ("law",)),
    ("rie_mmse law", lambda o: sp.rie_mmse(o, 0.3), ("law",)),
    ("rie_mmse density", lambda o: sp.rie_mmse(LAWS["wishart"], 0.3, density=o), ("density",)),
    ("free_input_side f", lambda o: sp.free_input_side(LAWS["wishart"], 1.0, 0.3, o, 1.0), ("f",)),
    ("free_input_side f output", lambda o: sp.free_input_side(LAWS["atoms"], 1.0, 0.3, lambda x: o, 1.0), ("f",)),
    ("shat_spectrum f", lambda o: sp.shat_spectrum(LAWS["wishart"], 1.0, 0.3, o), ("f",)),
    ("RIEDenoiser law", lambda o: aa.RIEDenoiser(o), ("law",)),
    ("se_overlaps law", lambda o: aa.NuclearDenoiser(0.1).se_overlaps(o, 1.0, 0.3, 1.0), ("law",)),
    ("rie_derivative density", lambda o: aa.denoisers.rie_derivative([1.0], o), ("density",)),
    ("make_denoiser reg", lambda o: aa.make_denoiser(o, 0.1), ("reg",)),
    ("make_loss name", lambda o: aa.make_loss(o), ("loss",)),
    ("bayes_output channel", lambda o: bayes_output(o), ("channel",)),
    ("OutputSample channel", lambda o: OutputSample(1.0, 2, 1.0, o, n_mc=128), ("channel",)),
    ("OutputSample method", lambda o: OutputSample(1.0, 2, 1.0, aa.LinearChannel(), n_mc=128, method=o), ("method",)),
    ("g_out jacobian", lambda o: aa.SquareLoss().g_out(Y_LIN, Z2, 1.0, jacobian=o), ("jacobian",)),
    ("Bayes g_out jacobian", lambda o: BayesLinearOutput().g_out(Y_LIN, Z2, 1.0, jacobian=o), ("jacobian",)),
    ("gram_g_out gram", lambda o: gram_g_out(aa.SquareLoss(), Y_LIN, Z2, 1.0, o), ("gram",)),
    ("SoftmaxSquareLoss prox_start", lambda o: aa.SoftmaxSquareLoss(prox_start=o), ("prox_start",)),
]
_VALID_OBJECTS = {  # (case label, index in BAD_OBJECTS) pairs that are valid inputs
    ("sample_data channel", 8), ("check_channel", 8), ("bayes_output channel", 8), ("OutputSample channel", 8),
    # a constant scalar map (3, 2.5 or [1.0], broadcast) is a valid denoiser
    ("free_input_side f output", 2), ("free_input_side f output", 3), ("free_input_side f output", 4),
    ("rie_mmse density", 0),  # density=None: computed
}


@settings(max_examples=examples(ci=30, thorough=200))
@given(case=st.sampled_from(OBJECT_CASES), index=st.integers(0, len(BAD_OBJECTS) - 1))
def test_fuzz_object_arguments(case, index):
    label, thunk, names = case
    obj = BAD_OBJECTS[index]
    check(lambda: thunk(obj), names, must_fail=(label, index) not in _VALID_OBJECTS)


# ---------------------------------------------------------------------------------------------
# Valid but extreme problems: spectra, softmax temperatures, densities
# ---------------------------------------------------------------------------------------------

POW = st.integers(-300, 300).map(lambda k: 10.0**k)


@settings(max_examples=examples(ci=25, thorough=150))
@given(scale=POW, law=st.sampled_from(["atoms", "wishart", "semicircle"]), delta=POW)
def test_fuzz_extreme_densities(scale, law, delta):
    def make():
        if law == "atoms":
            return sp.SpectralLaw.atoms(scale * np.array([0.0, 1.0, 2.5]))
        if law == "wishart":
            return sp.SpectralLaw.wishart(scale)
        return sp.SpectralLaw.semicircle(scale * scale if scale < 1e150 else 1e300, 0.5 * scale)

    if check(make, ("eigenvalues", "rho", "variance", "mean")) == "error":
        return
    L = make()
    cls = check(lambda: sp.rie_mmse(L, delta), ("Delta", "a"))
    if cls == "finite":
        mmse = sp.rie_mmse(L, delta)
        assert 0.0 <= mmse <= L.variance * (1 + 1e-6) + 1e-300
    check(lambda: sp.r_density(L, 1.0, delta).grid(), ("Delta", "a"))
    check(lambda: aa.RIEDenoiser(L).se_overlaps(L, 1.0, delta, 1.0 / (2 * delta) if delta > 1e-300 else 1.0),
          ("Delta", "a", "A_hat"))


@settings(max_examples=examples(ci=20, thorough=120))
@given(beta=POW, hscale=POW, T=st.integers(2, 4))
def test_fuzz_extreme_softmax(beta, hscale, T):
    rng = np.random.default_rng(T)
    h = rng.standard_normal((3, T, T)) * hscale
    h = 0.5 * (h + np.swapaxes(h, 1, 2))
    cls = check(lambda: row_softmax(h, beta), ("beta", "h"))
    assert cls == "finite"
    s = row_softmax(h, beta)
    np.testing.assert_allclose(s.sum(axis=-1), 1.0, rtol=1e-12)
    y = aa.SoftmaxChannel(beta)(h)
    assert np.all(np.isfinite(y))
    for loss in (aa.CrossEntropyLoss(beta), aa.SoftmaxSquareLoss(beta)):
        check(lambda: loss.value(y, h), ("beta", "y", "H"))
        check(lambda: loss.grad_h(y, h), ("beta", "y", "H"))
        check(lambda: loss.link(h), ("beta", "h"))


@settings(max_examples=examples(ci=15, thorough=80))
@given(scale=POW, d=st.integers(1, 6), kind=st.sampled_from(["custom", "lowrank"]))
def test_fuzz_extreme_teachers(scale, d, kind):
    if kind == "custom":
        eig = scale * np.linspace(-1.0, 2.0, d)
        cls = check(lambda: aa.Teacher.custom(eig, rng=0), ("eigenvalues",))
    else:
        cls = check(lambda: aa.Teacher.lowrank(d, 1, rng=0, strength=scale), ("strength",))
    if cls == "finite":
        t = aa.Teacher.custom(eig, rng=0) if kind == "custom" else aa.Teacher.lowrank(d, 1, rng=0, strength=scale)
        assert math.isfinite(t.Q) and math.isfinite(t.trace_mean)
        check(lambda: aa.sample_data(4, 2, t, aa.SoftmaxChannel(), rng=0), ("teacher", "h"))
        check(lambda: as_spectral_law(t), ("teacher",))


@settings(max_examples=examples(ci=10, thorough=60))
@given(n=st.sampled_from([10**6, 10**9, 10**12, 10**13, 10**18, 10**30]),
       d=st.sampled_from([1, 100, 10**5, 10**9]))
def test_fuzz_huge_sizes(n, d):
    """Sizes beyond the machine: a ValueError naming n and d before anything is allocated."""
    from amp_attention._validation import available_memory

    need = float(n) * 2 * d * 8
    avail = available_memory()
    if avail is None or need <= avail:  # would really allocate: not a fuzz case on this machine
        return
    check(lambda: aa.sample_tokens(n, 2, d, rng=0), ("n", "d"), must_fail=True)
    check(lambda: aa.sample_data(n, 2, aa.Teacher.wishart(min(d, 8), 0.5, rng=0), aa.LinearChannel(), rng=0)
          if d <= 8 else aa.sample_tokens(n, 2, d), ("n", "d"), must_fail=True)


# ---------------------------------------------------------------------------------------------
# Plain regression tests, one per reproducer of issue 12 in this area
# ---------------------------------------------------------------------------------------------


def test_make_loss_square_rejects_bad_beta():
    for beta in ("abc", NAN, -1, 0.0, True):
        with pytest.raises(ValueError, match="beta"):
            aa.make_loss("square", beta=beta)
    assert isinstance(aa.make_loss("square", beta=None), aa.SquareLoss)
    assert isinstance(aa.make_loss("square", beta=3.0), aa.SquareLoss)


def test_spectrum_bogus_with_a_spectral_law():
    with pytest.raises(ValueError, match="spectrum"):
        as_spectral_law(LAWS["wishart"], "bogus")


def test_ragged_lists_name_the_argument():
    with pytest.raises(ValueError, match="eigenvalues") as info:
        aa.Teacher.custom([[1.0, 2.0], [3.0]])
    assert "ragged" in str(info.value)
    with pytest.raises(ValueError, match="weights"):
        sp.SpectralLaw.atoms([1.0, 2.0], [[1.0], [1.0, 2.0]])


def test_denoisers_reject_non_symmetric_R():
    R = np.triu(np.ones((4, 4)))
    for den in (aa.NuclearDenoiser(0.1), aa.FrobeniusDenoiser(0.1), aa.RIEDenoiser(LAWS["wishart"])):
        with pytest.raises(ValueError, match="R must be symmetric"):
            den(R, 1.0)
    with pytest.raises(ValueError, match="R must be symmetric"):
        aa.nuclear_prox(R, 0.1)


def test_nuclear_denoiser_zero_A_hat():
    with pytest.raises(ValueError, match="A_hat"):
        aa.NuclearDenoiser(0.1)(np.eye(5), 0.0)


def test_nuclear_prox_bad_width_and_threshold():
    with pytest.raises(ValueError, match="width"):
        aa.nuclear_prox(np.eye(5), 0.1, 2.5)
    with pytest.raises(ValueError, match="threshold"):
        aa.nuclear_prox(np.eye(5), "abc")


def test_spectral_divergence_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        aa.spectral_divergence(np.arange(5.0), np.arange(2.0), np.arange(2.0))


def test_bayes_state_evolution_law_none_names_law():
    with pytest.raises(ValueError, match=r"^law must be") as info:
        aa.bayes_state_evolution(0.5, 2, None, aa.SoftmaxChannel())
    assert "teacher_spectrum" not in str(info.value)
    with pytest.raises(ValueError, match=r"^law must be"):
        aa.RIEDenoiser(None)
    with pytest.raises(ValueError, match=r"^prior must be"):
        sp.laws.check_law(None, "prior")


def test_rie_mmse_extreme_delta():
    law, atoms = LAWS["wishart"], sp.SpectralLaw.atoms([1.0, 2.0, 3.0])
    # Delta -> infinity: the prior variance; Delta -> 0 (atoms): Delta (1 - sum w^2)
    assert sp.rie_mmse(law, 1e300) == pytest.approx(law.variance, rel=1e-12)
    assert sp.rie_mmse(atoms, 1e300) == pytest.approx(atoms.variance, rel=1e-12)
    assert sp.rie_mmse(atoms, 1e-300) == pytest.approx(1e-300 * (1 - 3 / 9), rel=1e-12)
    # continuity across the switch to the asymptotic forms
    v = atoms.variance
    assert sp.rie_mmse(atoms, 0.99e7 * v) == pytest.approx(sp.rie_mmse(atoms, 1.01e7 * v), rel=1e-6)
    assert sp.rie_mmse(atoms, 1e-19) == pytest.approx(sp.rie_mmse(atoms, 1e-21) * 1e2, rel=1e-6)


def test_scaled_laws_give_scaled_densities():
    """Laws far from unit scale (1e100) are computed at unit scale: the same numbers, rescaled."""
    atoms = sp.SpectralLaw.atoms([1.0, 2.0, 3.0])
    big = sp.SpectralLaw.atoms([1e100, 2e100, 3e100])
    assert sp.rie_mmse(big, 0.3e200) == pytest.approx(1e200 * sp.rie_mmse(atoms, 0.3), rel=1e-10)
    law = sp.SpectralLaw.atoms([1e100, 1.0])
    assert 0 < sp.rie_mmse(law, 2.5e199) <= law.variance


def test_r_density_extreme_a_delta_is_a_clear_error():
    with pytest.raises(ValueError, match="Delta"):
        sp.r_density(LAWS["wishart"], 1e150, 1e-150)


def test_teacher_second_moment_overflow():
    with pytest.raises(ValueError, match="eigenvalues"):
        aa.Teacher.custom([1e200] * 5)
    with pytest.raises(ValueError, match="eigenvalues"):
        sp.SpectralLaw.atoms([1e200] * 5)
    t = aa.Teacher.custom([1e150] * 5, rng=0)
    assert math.isfinite(t.Q)


def test_softmax_stable_at_huge_beta():
    h = np.array([[[0.0, 200.0], [200.0, 0.0]]])
    np.testing.assert_array_equal(aa.SoftmaxChannel(1e306)(h), [[[0.0, 1.0], [1.0, 0.0]]])
    y = aa.sample_data(5, 2, TEACHER, aa.SoftmaxChannel(1.7e308), rng=0).y
    assert np.all(np.isfinite(y)) and np.all((y == 0) | (y == 1))
    yh = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    assert aa.CrossEntropyLoss(1e306).value(yh, h)[0] == 0.0
    assert aa.SoftmaxSquareLoss(1e306).value(yh, h)[0] == 0.0
    with pytest.raises(ValueError, match="beta"):  # the loss itself is ~2e308: beyond float64
        aa.CrossEntropyLoss(1e306).value(1.0 - yh, h)


def test_sample_data_huge_n_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"n=10000000000000.*d=4"):
        aa.sample_data(10**13, 2, TEACHER, aa.LinearChannel(), rng=0)
    with pytest.raises(MemoryError):
        aa.sample_tokens(10**13, 2, 100)
    with pytest.raises(ValueError, match="overflows"):
        aa.sample_tokens(10**18, 8, 10**5)
    with pytest.raises(ValueError, match="n must be an integer"):
        aa.sample_tokens(10**30, 2, 100)


def test_channel_rng_is_validated_without_noise():
    with pytest.raises(ValueError, match="rng"):
        aa.SoftmaxChannel()(H2, rng="abc")
    with pytest.raises(ValueError, match="rng"):
        aa.LinearChannel()(H2, rng=-1)
