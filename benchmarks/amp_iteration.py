"""One ERM-AMP iteration as ratios measured in the same run (DESIGN.md section 10).

(a) over the floor: two GEMMs ``(nT x d)(d x d)``, ``(d x nT)(nT x d)`` + one ``eigh(d)``;
(b) over the same iteration written with the materialised ``(n, T, T, d, d)`` sensing tensor
    (benchmarks/naive.py), at the largest d where it fits in memory;
(c) wall time to convergence vs ``direct_erm`` (L-BFGS on W, and FISTA on S) reaching the same
    objective.

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
from amp_attention.amp import gamp, make_denoiser, make_loss  # noqa: E402
from amp_attention.benchmarking import amp_iteration_ratios  # noqa: E402
from amp_attention.operator import sample_gram  # noqa: E402
from amp_attention.whitening import pair_indices  # noqa: E402


def naive_iteration_time(d, T, alpha, repeats, seed=0):
    """One GAMP iteration with the materialised sensing tensor (forward, adjoint by einsum), the
    same output and input side as the package; vs the package's iteration in the same run."""
    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    n = int(round(alpha * d * d))
    data = aa.sample_data(n, T, teacher, aa.SoftmaxChannel(1.0), rng)
    loss, den = make_loss("cross_entropy", 1.0), make_denoiser("nuclear", 0.05)
    ia, ib, c = pair_indices(T)
    Z = naive.build_sensing(data.X)
    Gamma = sample_gram(data.X)
    state = {"S": np.zeros((d, d)), "V": 1.0, "g": np.zeros((n, ia.size))}

    def one():
        S, V, g_prev = state["S"], state["V"], state["g"]
        Vmu = V * Gamma
        z = naive.forward(Z, S)[:, ia, ib] / c
        omega = z - np.einsum("nkl,nl->nk", Vmu, g_prev)
        g, dg, _ = loss.g_out(data.y, omega, Vmu)
        A_hat = float(np.einsum("nkl,nkl->", Gamma, dg)) / d**2
        G = np.zeros((n, T, T))
        G[:, ia, ib] = g / np.where(ia == ib, np.sqrt(2.0), 2.0)
        G[:, ib, ia] += np.where(ia == ib, 0.0, 1.0) * g / 2.0
        R = S + naive.adjoint(Z, G) / (d * A_hat)
        S_new, div = den(R, A_hat)
        state.update(S=S_new, V=div / (d**2 * A_hat), g=g)

    t_naive = _common.timeit(one, repeats)["median"]
    res = gamp(data.X, data.y, loss, den, max_iter=3 + repeats, tol=0)
    t_ours = float(np.median(res.history["time"][3:]))
    return {"d": d, "T": T, "n": n, "t_naive": t_naive, "t_ours": t_ours, "speedup": t_naive / t_ours,
            "naive_bytes": naive.naive_bytes(n, T, d)}


def convergence_vs_direct(d, T, alpha, lam=0.05, seed=0):
    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    data = aa.sample_data(int(round(alpha * d * d)), T, teacher, aa.SoftmaxChannel(1.0), rng)
    t0 = time.perf_counter()
    est = aa.ERMAttention(lam=lam, tol=1e-9, max_iter=2000).fit(data.X, data.y)
    t_amp = time.perf_counter() - t0
    obj_amp = aa.erm_objective(data.X, data.y, est.S_, "cross_entropy", "nuclear", lam)
    rows = []
    for method in ("lbfgs", "prox"):
        t0 = time.perf_counter()
        ref = aa.direct_erm(data.X, data.y, loss="cross_entropy", reg="nuclear", lam=lam, method=method)
        t_ref = time.perf_counter() - t0
        rows.append({"d": d, "T": T, "method": method, "t_amp": t_amp, "amp_iters": est.n_iter_,
                     "t_direct": t_ref, "direct_iters": ref.n_iter, "ratio": t_amp / t_ref,
                     "rel_obj_gap": (ref.objective - obj_amp) / abs(obj_amp),
                     "rel_S_gap": float(np.linalg.norm(est.S_ - ref.S) / np.linalg.norm(ref.S))})
    return rows


def main(argv=None):
    args = _common.make_parser(__doc__.split("\n\n")[0]).parse_args(argv)
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
    # (b) over the materialised-einsum iteration, largest d that fits
    d_b = 40 if args.quick else max(d for d in range(40, 141, 10) if naive.fits(int(0.5 * d * d), 3, d))
    rows_b = [naive_iteration_time(d_b, 3, 0.5, reps)]
    print("\n(b) over the materialised-einsum iteration (T = 3, alpha = 0.5)")
    _common.print_table(rows_b, [("d", "d", "d"), ("n", "n", "d"), ("t_ours", "ours s", ".4f"),
                                 ("t_naive", "naive s", ".3f"), ("speedup", "speedup", ".0f"),
                                 ("naive_bytes", "naive mem", _common.fmt_bytes)])
    # (c) wall time to convergence vs direct_erm
    rows_c = convergence_vs_direct(40 if args.quick else 100, 2, 0.5)
    print("\n(c) time to convergence: AMP vs direct_erm (cross-entropy + nuclear, T = 2, alpha = 0.5)")
    _common.print_table(rows_c, [("d", "d", "d"), ("method", "direct", "s"), ("t_amp", "AMP s", ".2f"),
                                 ("amp_iters", "AMP it", "d"), ("t_direct", "direct s", ".2f"),
                                 ("direct_iters", "direct it", "d"), ("ratio", "AMP/direct", ".3f"),
                                 ("rel_obj_gap", "obj gap", ".1e"), ("rel_S_gap", "S gap", ".1e")])
    path = _common.write_json("amp_iteration", {"floor": rows_a, "naive": rows_b, "direct": rows_c}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
