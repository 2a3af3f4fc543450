"""Generate the golden data of ``tests/test_golden.py``: ``tests/golden/golden.npz``.

Golden data are the outputs of the package's public entry points (ERM and Bayes state
evolution, ERM- and Bayes-GAMP through the estimators) on small fixed-seed problems, recorded
from a reference commit.  ``tests/test_golden.py`` re-runs every case defined here (``CASES``)
on the installed package and compares with the recorded arrays, so that a refactor that is not
meant to change numerics can prove it did not.

Usage (from the repository root, on the reference commit)::

    python tests/golden/make_golden.py            # (re)write tests/golden/golden.npz
    python tests/golden/make_golden.py --compare  # max |diff| per case against the stored file

Regenerating is only legitimate when a change is *meant* to alter numerics; say so in the commit.

Conventions: only the public API (``import amp_attention as aa``) is used; every random draw
comes from ``np.random.default_rng(<fixed int>)`` or an explicit ``seed=``; ``damping`` is always
passed explicitly as a float (``0.0`` unless stated), as are ``tol``, ``max_iter``, ``beta``,
the Monte Carlo sizes and the SE's ``acceleration=None`` (plain steps), so that changes of defaults
do not move the golden trajectories.  Keys in
the ``.npz`` are ``<case>/<quantity>``, e.g. ``se/square/nuclear/softmax/m``; ``meta/*`` keys
describe where the data came from and are not compared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import amp_attention as aa

GOLDEN_PATH = Path(__file__).with_name("golden.npz")

# ------------------------------------------------------------------------------------------------
# Shared settings
# ------------------------------------------------------------------------------------------------

RHO = 0.5                      # Wishart teacher / law
LAM = 0.05                     # ERM regularisation strength
BETA = 1.0                     # softmax / cross-entropy inverse temperature
SE_KW = dict(n_mc=4000, n_draws=2, max_iter=8, tol=0.0, damping=0.0, seed=7, predictions=True,
             output_rule="mc",  # the golden data pin the plain Monte Carlo rule of the reference commit
             acceleration=None)  # and its plain damped SE steps (Anderson mixing came later)
SE_HISTORY = ("m", "q", "V", "mse", "A_hat", "m_hat", "q_hat")
BAYES_SE_HISTORY = ("m", "q", "V", "mse", "A_hat")
AMP_D = 40
AMP_HISTORY = ("m", "q", "mse", "V", "A_hat", "objective", "train_loss", "step")
BAYES_AMP_HISTORY = ("m", "q", "mse", "V", "A_hat", "step")


def make_channel(name: str):
    if name == "softmax":
        return aa.SoftmaxChannel(BETA)
    if name == "hardmax":
        return aa.HardmaxChannel()
    if name == "linear":
        return aa.LinearChannel(0.1)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------
# Case runners: each returns {quantity: ndarray}
# ------------------------------------------------------------------------------------------------


def _se_record(res) -> dict:
    out = {k: np.asarray(res.history[k], dtype=float) for k in SE_HISTORY}
    out["test_error"] = np.asarray(res.test_error, dtype=float)
    out["train_loss"] = np.asarray(res.train_loss, dtype=float)
    return out


def se_free(loss, reg, channel, T=2, alpha=0.4):
    """ERM SE, Wishart(RHO) limit law, free input side."""
    def run():
        law = aa.SpectralLaw.wishart(RHO)
        res = aa.state_evolution(alpha, T, law, make_channel(channel), loss, reg, LAM, BETA,
                                 spectrum="limit", input_side="free", **SE_KW)
        return _se_record(res)
    return run


def se_finite(loss, reg, channel, d=30, alpha=0.4):
    """ERM SE, finite input side (GOE draws) at the exact spectrum of a Wishart teacher."""
    def run():
        teacher = aa.Teacher.wishart(d, RHO, rng=np.random.default_rng(11))
        res = aa.state_evolution(alpha, 2, teacher, make_channel(channel), loss, reg, LAM, BETA,
                                 spectrum="exact", input_side="finite", **SE_KW)
        out = _se_record(res)
        out["teacher_eigenvalues"] = teacher.eigenvalues.copy()
        return out
    return run


def se_exact(loss, reg, channel, kind, d=40, alpha=0.4):
    """ERM SE, free input side at a finite-d teacher's exact eigenvalues (atoms)."""
    def run():
        rng = np.random.default_rng(13)
        if kind == "powerlaw":
            teacher = aa.Teacher.powerlaw(d, 1.0, rng=rng)
        elif kind == "lowrank":
            teacher = aa.Teacher.lowrank(d, 4, rng=rng)
        else:
            teacher = aa.Teacher.wishart(d, RHO, rng=rng)
        res = aa.state_evolution(alpha, 2, teacher, make_channel(channel), loss, reg, LAM, BETA,
                                 spectrum="exact", input_side="free", **SE_KW)
        out = _se_record(res)
        out["teacher_eigenvalues"] = teacher.eigenvalues.copy()
        return out
    return run


def bayes_se(channel, T=2, alpha=0.3):
    def run():
        res = aa.bayes_state_evolution(alpha, T, aa.SpectralLaw.wishart(RHO), make_channel(channel),
                                       max_iter=5, tol=0.0, damping=0.0, acceleration=None)
        return {k: np.asarray(res.history[k], dtype=float) for k in BAYES_SE_HISTORY}
    return run


def _amp_data(channel, seed, d=AMP_D, T=2):
    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, RHO, rng=rng)
    n = d * d // 2                                   # alpha = n / d^2 = 0.5
    data = aa.sample_data(n, T, teacher, make_channel(channel), rng)
    return teacher, data


def amp_erm(loss, reg, channel, variance="sample", damping=0.0, seed=21):
    def run():
        teacher, data = _amp_data(channel, seed)
        est = aa.ERMAttention(loss=loss, reg=reg, lam=LAM, beta=BETA, variance=variance,
                              max_iter=6, tol=0.0, damping=float(damping))
        est.fit(data.X, data.y, S_star=teacher.S)
        out = {k: np.asarray(est.history_[k], dtype=float) for k in AMP_HISTORY}
        out["S"] = np.asarray(est.S_, dtype=float)
        return out
    return run


def amp_bayes(channel, seed=31):
    def run():
        teacher, data = _amp_data(channel, seed)
        est = aa.BayesAttention(make_channel(channel), aa.SpectralLaw.wishart(RHO), variance="sample",
                                max_iter=4, tol=0.0, damping=0.0)
        est.fit(data.X, data.y, S_star=teacher.S)
        out = {k: np.asarray(est.history_[k], dtype=float) for k in BAYES_AMP_HISTORY}
        out["S"] = np.asarray(est.S_, dtype=float)
        return out
    return run


# ------------------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------------------

CASES: dict = {}
for _loss in ("square", "cross_entropy"):
    for _reg in ("nuclear", "frobenius"):
        for _ch in ("softmax", "hardmax", "linear"):
            CASES[f"se/{_loss}/{_reg}/{_ch}"] = se_free(_loss, _reg, _ch)
CASES["se_T3/cross_entropy/nuclear/softmax"] = se_free("cross_entropy", "nuclear", "softmax", T=3)
CASES["se_T3/square/frobenius/linear"] = se_free("square", "frobenius", "linear", T=3)
CASES["se_finite/cross_entropy/nuclear/softmax"] = se_finite("cross_entropy", "nuclear", "softmax")
CASES["se_finite/square/frobenius/linear"] = se_finite("square", "frobenius", "linear")
CASES["se_exact_powerlaw/cross_entropy/nuclear/softmax"] = se_exact("cross_entropy", "nuclear", "softmax", "powerlaw")
CASES["se_exact_lowrank/square/nuclear/hardmax"] = se_exact("square", "nuclear", "hardmax", "lowrank")
CASES["se_exact_wishart/cross_entropy/frobenius/softmax"] = se_exact("cross_entropy", "frobenius", "softmax", "wishart")
CASES["bayes_se/softmax"] = bayes_se("softmax")
CASES["bayes_se/linear"] = bayes_se("linear")
for _loss, _reg, _ch in (("cross_entropy", "nuclear", "softmax"), ("cross_entropy", "frobenius", "softmax"),
                         ("square", "nuclear", "softmax"), ("square", "frobenius", "softmax"),
                         ("square", "nuclear", "linear"), ("square", "frobenius", "linear")):
    CASES[f"amp/{_loss}/{_reg}/{_ch}"] = amp_erm(_loss, _reg, _ch)
CASES["amp_scalar_damped/cross_entropy/nuclear/softmax"] = amp_erm(
    "cross_entropy", "nuclear", "softmax", variance="scalar", damping=0.5)
CASES["amp_bayes/softmax"] = amp_bayes("softmax")
CASES["amp_bayes/linear"] = amp_bayes("linear")


def run_case(name: str) -> dict:
    """Run one case; returns ``{quantity: array}`` (keys without the case prefix)."""
    return CASES[name]()


def load_golden(path=GOLDEN_PATH) -> dict:
    """``{case: {quantity: array}}`` from the stored file (``meta/*`` left out)."""
    out: dict = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            if key.startswith("meta/"):
                continue
            case, _, qty = key.rpartition("/")
            out.setdefault(case, {})[qty] = z[key]
    return out


def _meta() -> dict:
    src = Path(aa.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes in amp_attention/)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import numba
    import scipy
    return {"meta/commit": commit, "meta/package_path": str(src),
            "meta/versions": f"numpy {np.__version__}, scipy {scipy.__version__}, numba {numba.__version__}, "
                             f"python {sys.version.split()[0]}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=GOLDEN_PATH, help="output .npz (default: %(default)s)")
    ap.add_argument("--compare", action="store_true",
                    help="do not write: print the max |diff| per case against --out")
    args = ap.parse_args(argv)
    print(f"amp_attention from {aa.__file__}", file=sys.stderr)
    repo = Path(__file__).resolve().parents[2]
    if Path(aa.__file__).resolve().parents[1] != repo:
        print(f"note: this is not the package of {repo}; make sure it is the reference commit "
              "(set PYTHONPATH to its checkout)", file=sys.stderr)
    golden = load_golden(args.out) if args.compare else None
    arrays, worst = {}, 0.0
    for name in CASES:
        t0 = time.perf_counter()
        got = run_case(name)
        dt = time.perf_counter() - t0
        if golden is None:
            for qty, v in got.items():
                arrays[f"{name}/{qty}"] = v
            print(f"{name:55s} {dt:6.2f} s", file=sys.stderr)
        else:
            want = golden.get(name, {})
            diffs = [float(np.max(np.abs(got[k] - want[k]), initial=0.0))
                     if k in want and np.shape(got[k]) == np.shape(want[k]) else np.inf
                     for k in sorted(set(got) | set(want)) if k in got]
            d = max(diffs) if want and set(got) == set(want) else np.inf
            worst = max(worst, d)
            print(f"{name:55s} {dt:6.2f} s   max|diff| = {d:.3g}", file=sys.stderr)
    if golden is None:
        arrays.update({k: np.asarray(v) for k, v in _meta().items()})
        np.savez_compressed(args.out, **arrays)
        print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(CASES)} cases)", file=sys.stderr)
    else:
        print(f"overall max|diff| = {worst:.3g}", file=sys.stderr)


if __name__ == "__main__":
    main()
