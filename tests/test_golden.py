"""Golden-data regression test: the public entry points reproduce recorded outputs.

What the golden data are: ``tests/golden/golden.npz`` holds the outputs of the package's public
API on small fixed-seed problems, recorded from a reference commit (``meta/commit`` inside the
file): ERM state-evolution trajectories for every loss x regulariser x channel (free input side
at the Wishart limit law, T = 2 and T = 3; finite input side; exact finite-d teacher spectra),
Bayes state evolution, and ERM-/Bayes-GAMP trajectories and final ``S_`` from ``ERMAttention`` /
``BayesAttention`` at d = 40.  The cases themselves (which calls, which seeds) are defined once,
in ``tests/golden/make_golden.py`` (``CASES``); this test re-runs each of them on the package
being tested and compares every recorded array with ``rtol=1e-12, atol=1e-13`` (a refactor may
reorder floating-point arithmetic, so bit-for-bit equality is not required).

How to regenerate: on the reference commit, from the repository root, run
``python tests/golden/make_golden.py`` (``--compare`` prints the max |diff| per case without
writing).  Regenerating is only legitimate when a change is *intended* to alter numerics (new
algorithm, changed default that the cases pin, bug fix); then regenerate in that same commit and
say so, with the reason, in the commit message.  Never regenerate to make a refactor pass.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SCRIPT = Path(__file__).with_name("golden") / "make_golden.py"
_spec = importlib.util.spec_from_file_location("_amp_attention_make_golden", _SCRIPT)
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

RTOL, ATOL = 1e-12, 1e-13


@pytest.fixture(scope="module")
def golden():
    return make_golden.load_golden()


def test_golden_file_matches_case_list(golden):
    """Every case defined in make_golden.py is recorded, and nothing else is."""
    assert set(golden) == set(make_golden.CASES), (
        "tests/golden/golden.npz and make_golden.CASES disagree: "
        f"missing {sorted(set(make_golden.CASES) - set(golden))}, "
        f"extra {sorted(set(golden) - set(make_golden.CASES))}"
    )


@pytest.mark.parametrize("case", list(make_golden.CASES))
def test_golden(case, golden):
    want = golden[case]
    got = make_golden.run_case(case)
    assert set(got) == set(want), f"{case}: quantities {sorted(got)} != recorded {sorted(want)}"
    for qty in sorted(want):
        g, w = np.asarray(got[qty], dtype=float), want[qty]
        assert g.shape == w.shape, f"{case}/{qty}: shape {g.shape} != recorded {w.shape}"
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"golden mismatch: {case}/{qty}")
