"""One ERM-AMP iteration as ratios measured in the same run (docs/theory.md §10).

(a) over the floor: two GEMMs ``(nT x d)(d x d)``, ``(d x nT)(nT x d)`` + one ``eigh(d)``;
(b) over the same iteration written with the materialised sensing tensor (benchmarks/naive.py), at
    the largest d where it fits under ``--naive-gb``: layout (n, T, T, d, d) with einsum's BLAS
    dispatch (the strongest baseline) and the (n, d, d, T, T) layout of docs/theory.md with plain einsum;
(c) wall time until GAMP and ``direct_erm`` (L-BFGS on W, and FISTA on S) first reach the same
    objective ``f* (1 + eps)``, f* the best of their final objectives.

Run: ``python benchmarks/amp_iteration.py [--quick] [--threads N]``; prints tables and writes
``benchmarks/results/amp_iteration.json``.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (applies --threads before numpy starts)
import naive  # noqa: E402
import numpy as np  # noqa: E402

import amp_attention as aa  # noqa: E402
from amp_attention.amp import gamp  # noqa: E402
from amp_attention.denoisers import make_denoiser  # noqa: E402
from amp_attention.losses import make_loss  # noqa: E402
from amp_attention.losses import gram_g_out  # noqa: E402
from amp_attention.benchmarking import amp_iteration_ratios  # noqa: E402
from amp_attention.operator import sample_gram  # noqa: E402
from amp_attention.variance import GramVariance  # noqa: E402
from amp_attention.whitening import pair_indices  # noqa: E402


def naive_iteration_time(d, T, alpha, repeats, layout="nabij", optimize=True, seed=0):
    """One GAMP iteration with the materialised sensing tensor (forward and adjoint by einsum in
    the given layout, see benchmarks/naive.py), the same output and input side as the package;
    against the package's iteration in the same run."""
    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    n = int(round(alpha * d * d))
    data = aa.sample_data(n, T, teacher, aa.SoftmaxChannel(1.0), rng)
    loss, den = make_loss("cross_entropy", 1.0), make_denoiser("nuclear", 0.05)
    ia, ib, c = pair_indices(T)
    gram = GramVariance(sample_gram(data.X))
    state = {"S": np.zeros((d, d)), "V": 1.0, "g": np.zeros((n, ia.size)), "p": None}
    Z = naive.build_sensing(data.X, layout)

    def one():
        S, V, g_prev = state["S"], state["V"], state["g"]
        z = naive.forward(Z, S, optimize, layout)[:, ia, ib] / c
        omega = z - V * np.einsum("nkl,nl->nk", gram.gamma, g_prev)
        g, a_mu, info = gram_g_out(loss, data.y, omega, V, gram, p0=state["p"])
        A_hat = float(np.sum(a_mu)) / d**2
        G = np.zeros((n, T, T))
        G[:, ia, ib] = g / np.where(ia == ib, np.sqrt(2.0), 2.0)
        G[:, ib, ia] += np.where(ia == ib, 0.0, 1.0) * g / 2.0
        R = S + naive.adjoint(Z, G, optimize, layout) / (d * A_hat)
        S_new, div = den(R, A_hat)
        state.update(S=S_new, V=div / (d**2 * A_hat), g=g, p=info["p"])

    t_naive = _common.timeit(one, repeats)["median"]
    Z = None
    res = gamp(data.X, data.y, loss, den, max_iter=3 + repeats, tol=0)
    t_ours = float(np.median(res.history["time"][3:]))
    return {"d": d, "T": T, "n": n, "layout": layout, "einsum": "optimize" if optimize else "plain",
            "t_naive": t_naive, "t_ours": t_ours, "speedup": t_naive / t_ours,
            "naive_bytes": naive.naive_bytes(n, T, d)}


def _time_to(times, objectives, target):
    hit = np.nonzero(np.asarray(objectives) <= target)[0]
    return float(np.asarray(times)[hit[0]]) if hit.size else np.inf


def convergence_vs_direct(d, T, alpha, lam=0.05, seed=0, eps=(1e-6, 1e-8, 1e-10)):
    """Wall time until each solver first reaches ``f* + eps |f*|`` (f* = best final objective of
    the three runs): GAMP (from the call, setup included) vs ``direct_erm`` (L-BFGS on W; FISTA).
    All three first run once on a small instance, so that no timing includes loading the
    compiled Numba kernels."""
    warm = aa.sample_data(300, T, aa.Teacher.wishart(d, 0.5, 1), aa.SoftmaxChannel(1.0), 1)
    gamp(warm.X, warm.y, make_loss("cross_entropy", 1.0), make_denoiser("nuclear", lam), max_iter=3, tol=0)
    for m in ("lbfgs", "prox"):
        aa.direct_erm(warm.X, warm.y, loss="cross_entropy", reg="nuclear", lam=lam, method=m, max_iter=3)
    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    data = aa.sample_data(int(round(alpha * d * d)), T, teacher, aa.SoftmaxChannel(1.0), rng)
    stamps = []
    t0 = time.perf_counter()
    res = gamp(data.X, data.y, make_loss("cross_entropy", 1.0), make_denoiser("nuclear", lam), tol=1e-10,
               max_iter=2000, callback=lambda t, S, h: stamps.append(time.perf_counter() - t0) and False)
    t_amp_total = time.perf_counter() - t0
    amp_obj = res.history["objective"]
    refs = {m: aa.direct_erm(data.X, data.y, loss="cross_entropy", reg="nuclear", lam=lam, method=m)
            for m in ("lbfgs", "prox")}
    f_star = min([amp_obj[-1]] + [r.objective for r in refs.values()])
    rows = []
    for method, ref in refs.items():
        for e in eps:
            target = f_star + e * abs(f_star)
            t_amp = _time_to(stamps, amp_obj, target)
            t_ref = _time_to(ref.times, ref.history, target)
            rows.append({"d": d, "T": T, "method": method, "eps": e, "t_amp": t_amp,
                         "amp_iters": int(np.argmax(amp_obj <= target)) + 1 if np.isfinite(t_amp) else -1,
                         "t_direct": t_ref,
                         "direct_iters": int(np.argmax(ref.history <= target)) + 1 if np.isfinite(t_ref) else -1,
                         "ratio": t_amp / t_ref, "t_amp_total": t_amp_total, "t_direct_total": float(ref.times[-1]),
                         "rel_S_gap": float(np.linalg.norm(res.S - ref.S) / np.linalg.norm(ref.S))})
    return rows


def main(argv=None):
    parser = _common.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--naive-gb", type=float, default=6.0,
                        help="memory cap (GB) for the materialised sensing tensor in (b)")
    args = parser.parse_args(argv)
    reps = args.repeats or (3 if args.quick else 5)
    # (a) ratio over the floor, scaling in d, T and alpha
    grid = [(100, 3, 0.5)] if args.quick else [(200, 3, 0.5), (100, 3, 0.5), (300, 3, 0.5), (200, 2, 0.5),
                                              (200, 3, 0.25), (200, 3, 1.0)]
    rows_a = []
    for d, T, alpha in grid:
        r = amp_iteration_ratios(d, T, alpha, repeats=reps)
        r["peak_rss"] = _common.peak_rss(lambda: amp_iteration_ratios(d, T, alpha, repeats=1))
        rows_a.append(r)
    print("(a) one ERM-AMP iteration (cross-entropy + nuclear) over the floor (2 GEMMs + eigh)")
    _common.print_table(rows_a, [("d", "d", "d"), ("T", "T", "d"), ("alpha", "alpha", "g"), ("n", "n", "d"),
                                 ("t_iter", "t_iter s", ".4f"), ("t_floor", "floor s", ".4f"),
                                 ("ratio_floor", "ratio", ".2f"), ("t_g_out", "g_out s", ".4f"),
                                 ("peak_rss", "peak mem", _common.fmt_bytes)])
    # (b) over the materialised-einsum iteration, largest d that fits, both tensor layouts
    cap = args.naive_gb * 1024**3
    d_b = 40 if args.quick else max(d for d in range(40, 201, 5) if naive.fits(int(round(0.5 * d * d)), 3, d, cap))
    rows_b = [naive_iteration_time(d_b, 3, 0.5, reps, "nabij", True),
              naive_iteration_time(d_b, 3, 0.5, reps, "nijab", False)]
    print("\n(b) over the materialised-einsum iteration (T = 3, alpha = 0.5)")
    _common.print_table(rows_b, [("d", "d", "d"), ("n", "n", "d"), ("layout", "layout", "s"), ("einsum", "einsum", "s"),
                                 ("t_ours", "ours s", ".4f"), ("t_naive", "naive s", ".3f"),
                                 ("speedup", "speedup", ".0f"), ("naive_bytes", "naive mem", _common.fmt_bytes)])
    # (c) wall time to the same objective vs direct_erm
    rows_c = convergence_vs_direct(40 if args.quick else 100, 2, 0.5)
    print("\n(c) time to reach f* + eps|f*|: AMP vs direct_erm (cross-entropy + nuclear, T = 2, alpha = 0.5)")
    _common.print_table(rows_c, [("d", "d", "d"), ("method", "direct", "s"), ("eps", "eps", ".0e"),
                                 ("t_amp", "AMP s", ".3f"), ("amp_iters", "AMP it", "d"), ("t_direct", "direct s", ".3f"),
                                 ("direct_iters", "direct it", "d"), ("ratio", "AMP/direct", ".3f"),
                                 ("t_amp_total", "AMP total s", ".3f"), ("t_direct_total", "direct total s", ".3f"),
                                 ("rel_S_gap", "S gap", ".1e")])
    path = _common.write_json("amp_iteration", {"floor": rows_a, "naive": rows_b, "direct": rows_c}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
