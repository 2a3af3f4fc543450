"""Benchmark of the matrix-free sensing operator (docs/theory.md §3 and §10).

Times ``preactivations(X, S)`` + ``backproject(X, G)`` (one forward and one adjoint, as in one
AMP iteration) and reports, measured round-robin in the same run:

- ratio (a) = t_ours / t_gemm, the floor being the two bare GEMMs of the same shapes,
  ``X.reshape(nT, d) @ S`` and ``X.reshape(nT, d).T @ B`` with ``B`` of shape (nT, d)
  (target <= 1.3);
- ratio (b) = t_naive / t_ours, the naive operator of ``naive.py`` that materialises the
  ``(n, T, T, d, d)`` sensing tensor (target >= 50).  The tensor is built once, outside the timing
  (as an iterative solver would), so t_naive is forward + adjoint applications only; the build
  time is reported separately and in ``(+build)``.  Where the tensor does not fit (``--mem-cap-gb``, default 6) the
  naive time is measured on a sub-sample and scaled linearly in n (marked ``~``), or skipped
  with ``--naive fit``.

A stricter floor (forward GEMM into a preallocated output: no page faults on a fresh n T d
array) is reported as ``(strict)``.  It also times the pieces (validation, both GEMMs, the Numba kernels ``_pair_contract`` and
``_mix_tokens``, the remaining NumPy glue) so one can see where the time goes, and the
peak resident memory of one forward + adjoint.

A third table compares the two adjoint paths (``_backproject`` picks one by shape): the GEMM path
``X.T @ (G X)`` and the syrk path (per-sample Jacobi ``_sym_eig``, row packing
``_pack_eig_rows``, ``P^T P - N^T N`` by ``dsyrk``), with those pieces, and the factored forward
``_preactivations_factored`` at rank r = d/2 (S = F diag(+-1) F^T) against the dense forward.

    python benchmarks/operator.py --quick
    python benchmarks/operator.py                      # d = 100 150 200 300, T = 2 3, alpha = 0.5
    python benchmarks/operator.py --d 100 200 --T 2 --alpha 1.0
    python benchmarks/operator.py --threads 1 --clock cpu   # robust on a shared, loaded machine
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (first: applies --threads before numpy starts)
import naive  # noqa: E402
import numpy as np  # noqa: E402

import amp_attention as aa  # noqa: E402
from amp_attention import _operator_kernels as kern  # noqa: E402
from amp_attention import operator as op  # noqa: E402
from amp_attention._validation import check_symmetric, check_tokens  # noqa: E402

TARGET_A = 1.3
TARGET_B = 50.0


def make_inputs(n, T, d, rng):
    X = rng.standard_normal((n, T, d))
    W = rng.standard_normal((d, d))
    S = (W + W.T) / np.sqrt(2 * d)
    G = rng.standard_normal((n, T, T))
    G = 0.5 * (G + G.transpose(0, 2, 1))  # symmetric, as in AMP (whitened_to_G)
    Bf = rng.standard_normal((n * T, d))
    return X, S, G, Bf


def make_factor(S, r):
    """Rank-r factor of S by largest |eigenvalue|: S_r = F diag(sigma) F^T, sigma = +-1."""
    lam, U = np.linalg.eigh(S)
    idx = np.argsort(-np.abs(lam))[:r]
    return U[:, idx] * np.sqrt(np.abs(lam[idx])), np.sign(lam[idx])


def bench_config(d, T, alpha, repeats, cap_bytes, naive_mode, rng, args):
    n = int(round(alpha * d * d))
    X, S, G, Bf = make_inputs(n, T, d, rng)
    X2 = X.reshape(n * T, d)
    Y = (X2 @ S).reshape(n, T, d)
    B = kern.mix_tokens(G, X)
    Yout = np.empty((n * T, d))
    opt = args.naive_einsum == "opt"
    # syrk-path intermediates (for timing its pieces on their own)
    lam, V = kern.sym_eig(G)
    pos_start, neg_start, n_pos, n_neg = kern.eig_row_offsets(lam)
    Wrows = np.empty((n * T, d))
    kern.pack_eig_rows(X, lam, V, pos_start, neg_start, Wrows)
    r_half = max(1, d // 2)
    F, sigma = make_factor(S, r_half)
    sop = op.SensingOperator(X)  # one reused work buffer, as in GAMP

    def ours():
        aa.preactivations(X, S)
        aa.backproject(X, G)

    def core():
        op.SensingOperator(X, check=False).preactivations(S, check=False)
        op.SensingOperator(X, check=False).backproject(G, check=False)

    def gemm():
        X2 @ S
        X2.T @ Bf

    def gemm_out():  # stricter floor: forward GEMM into a preallocated output (no page faults)
        np.matmul(X2, S, out=Yout)
        X2.T @ Bf

    def validate():
        check_tokens(X)
        check_symmetric(S, "S", d=d)
        check_tokens(X)
        sop.check_G(G)

    fns = {
        "ours": ours,
        "gemm": gemm,
        "gemm_out": gemm_out,
        "core": core,
        "fwd": lambda: aa.preactivations(X, S),
        "adj": lambda: aa.backproject(X, G),
        "core_fwd": lambda: op.SensingOperator(X, check=False).preactivations(S, check=False),
        "core_adj": lambda: op.SensingOperator(X, check=False).backproject(G, check=False),
        "validate": validate,
        "gemm_fwd": lambda: X2 @ S,
        "pair_contract": lambda: kern.pair_contract(X, Y),
        "mix_tokens": lambda: kern.mix_tokens(G, X),
        "gemm_adj": lambda: X2.T @ B.reshape(n * T, d),
        "adj_gemm_path": lambda: sop.backproject(G, method="gemm", check=False),
        "adj_syrk_path": lambda: sop.backproject(G, method="syrk", check=False),
        "sym_eig": lambda: kern.sym_eig(G),
        "pack_rows": lambda: kern.pack_eig_rows(X, lam, V, pos_start, neg_start, Wrows),
        "syrk": lambda: kern.syrk_difference(Wrows[:n_pos], Wrows[n * T - n_neg:]),
        "fwd_dense_work": lambda: sop.preactivations(S, check=False),
        "fwd_factored_half": lambda: sop.preactivations_factored(F, sigma, check=False),
    }
    t = C.time_interleaved(fns, repeats, clock=args.clock)
    med = {k: v["median"] for k, v in t.items()}
    row = dict(d=d, T=T, n=n, alpha=alpha)
    row.update({f"t_{k}": v for k, v in med.items()})
    row["t_best_ours"] = t["ours"]["best"]
    row["t_best_gemm"] = t["gemm"]["best"]
    row["ratio_a"] = med["ours"] / med["gemm"]
    row["ratio_a_core"] = med["core"] / med["gemm"]
    row["ratio_a_best"] = t["ours"]["best"] / t["gemm"]["best"]
    row["ratio_a_strict"] = med["ours"] / med["gemm_out"]
    # rest ("glue") = core function minus its GEMM and Numba kernel timed on whole arrays
    row["t_fwd_glue"] = med["core_fwd"] - med["gemm_fwd"] - med["pair_contract"]
    row["adj_method"] = sop.adjoint_method
    if row["adj_method"] == "syrk":
        row["t_adj_glue"] = med["core_adj"] - med["sym_eig"] - med["pack_rows"] - med["syrk"]
    else:
        row["t_adj_glue"] = med["core_adj"] - med["gemm_adj"] - med["mix_tokens"]
    row["adj_syrk_over_gemm"] = med["adj_syrk_path"] / med["adj_gemm_path"]
    row["r_half"] = r_half
    row["fwd_factored_over_dense"] = med["fwd_factored_half"] / med["fwd_dense_work"]
    row["peak_mem"] = C.peak_rss(lambda: (aa.preactivations(X, S), aa.backproject(X, G)))
    row["x_bytes"] = X.nbytes

    # naive materialised-einsum baseline
    row["naive_bytes"] = naive.naive_bytes(n, T, d)
    row["naive_fits"] = naive.fits(n, T, d, cap_bytes)
    row["naive_extrapolated"] = False
    if naive_mode != "off" and (row["naive_fits"] or naive_mode == "extrapolate"):
        n_sub = n if row["naive_fits"] else min(n, naive.max_samples(T, d, min(cap_bytes, 2 * 1024**3)))
        if n_sub >= 1:
            Xs, Gs = X[:n_sub], G[:n_sub]
            Z = naive.build_sensing(Xs)  # first build doubles as warm-up of the page allocator
            del Z
            tb = C.timeit(lambda: naive.build_sensing(Xs), repeats=1, warmup=0, clock=args.clock)
            Z = naive.build_sensing(Xs)
            tn = C.timeit(lambda: (naive.forward(Z, S, opt), naive.adjoint(Z, Gs, opt)), repeats=max(1, repeats // 2 + 1), clock=args.clock)
            Hn, Mn = naive.forward(Z, S), naive.adjoint(Z, Gs)
            del Z
            Ho, Mo = aa.preactivations(Xs, S), aa.backproject(Xs, Gs)
            row["naive_relerr"] = max(
                np.max(np.abs(Hn - Ho)) / np.max(np.abs(Ho)), np.max(np.abs(Mn - Mo)) / np.max(np.abs(Mo))
            )
            scale = n / n_sub
            row["naive_n"] = n_sub
            row["naive_extrapolated"] = n_sub < n
            row["t_naive"] = tn["median"] * scale
            row["t_naive_build"] = tb["median"] * scale
            row["ratio_b"] = row["t_naive"] / med["ours"]
            row["ratio_b_with_build"] = (row["t_naive"] + row["t_naive_build"]) / med["ours"]
    return row


MAIN_COLUMNS = [
    ("d", "d", "d"),
    ("T", "T", "d"),
    ("n", "n", "d"),
    ("t_ours", "t_ours[s]", ".4f"),
    ("t_gemm", "t_gemm[s]", ".4f"),
    ("ratio_a", "ratio_a", ".2f"),
    ("ratio_a_core", "(core)", ".2f"),
    ("ratio_a_strict", "(strict)", ".2f"),
    ("t_naive", "t_naive[s]", None),
    ("ratio_b", "ratio_b", None),
    ("t_naive_build", "build[s]", None),
    ("ratio_b_with_build", "(+build)", None),
    ("peak_mem", "peak_mem", C.fmt_bytes),
    ("naive_bytes", "naive_mem", C.fmt_bytes),
]

PIECE_COLUMNS = [
    ("d", "d", "d"),
    ("T", "T", "d"),
    ("t_validate", "validate", ".4f"),
    ("t_gemm_out", "floor_strict", ".4f"),
    ("t_gemm_fwd", "gemm_fwd", ".4f"),
    ("t_pair_contract", "pair_contract", ".4f"),
    ("t_fwd_glue", "fwd_rest", ".4f"),
    ("adj_method", "adj_path", "s"),
    ("t_gemm_adj", "gemm_adj", ".4f"),
    ("t_mix_tokens", "mix_tokens", ".4f"),
    ("t_sym_eig", "sym_eig", ".4f"),
    ("t_pack_rows", "pack_rows", ".4f"),
    ("t_syrk", "syrk", ".4f"),
    ("t_adj_glue", "adj_rest", ".4f"),
    ("t_core", "core_total", ".4f"),
    ("t_ours", "public_total", ".4f"),
]


PATH_COLUMNS = [
    ("d", "d", "d"),
    ("T", "T", "d"),
    ("t_adj_gemm_path", "adj_gemm", ".4f"),
    ("t_adj_syrk_path", "adj_syrk", ".4f"),
    ("adj_syrk_over_gemm", "syrk/gemm", ".2f"),
    ("adj_method", "auto", "s"),
    ("r_half", "r", "d"),
    ("t_fwd_dense_work", "fwd_dense", ".4f"),
    ("t_fwd_factored_half", "fwd_factored", ".4f"),
    ("fwd_factored_over_dense", "fact/dense", ".2f"),
]


def _approx(fmt):
    def f(v, row):
        if v is None:
            return None
        return ("~" if row.get("naive_extrapolated") else "") + format(v, fmt)

    return f


def main(argv=None):
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=None)
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--mem-cap-gb", type=float, default=6.0, help="largest naive sensing tensor to build")
    p.add_argument(
        "--naive", choices=["fit", "extrapolate", "off"], default="extrapolate",
        help="naive baseline: only where it fits / also sub-sampled and scaled in n / not at all",
    )
    p.add_argument(
        "--naive-einsum", choices=["opt", "plain"], default="opt",
        help="einsum(optimize=True) dispatches to BLAS (strongest baseline); plain = np.einsum default",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ds = args.d or ([50, 100] if args.quick else [100, 150, 200, 300])
    Ts = args.T or ([2, 3])
    repeats = args.repeats or (3 if args.quick else 5)
    rng = np.random.default_rng(args.seed)
    cap = int(args.mem_cap_gb * 1024**3)

    rows = []
    for d in ds:
        for T in Ts:
            row = bench_config(d, T, args.alpha, repeats, cap, args.naive, rng, args)
            rows.append(row)
            print(
                f"  d={d} T={T} n={row['n']}: ours {row['t_ours']:.4f}s gemm {row['t_gemm']:.4f}s "
                f"ratio_a {row['ratio_a']:.2f}" + (f" ratio_b {row['ratio_b']:.0f}" if "ratio_b" in row else ""),
                flush=True,
            )

    disp = []
    for r in rows:
        r2 = dict(r)
        for k, f in (("t_naive", ".3f"), ("ratio_b", ".0f"), ("t_naive_build", ".2f"), ("ratio_b_with_build", ".0f")):
            r2[k] = _approx(f)(r.get(k), r)
        disp.append(r2)
    cols = [(k, h, (lambda v: v) if f is None else f) for k, h, f in MAIN_COLUMNS]
    print(f"\nforward + adjoint, alpha = {args.alpha}, median of {repeats}, clock = {args.clock}, "
          f"threads = {C.environment()['numba_threads']}, naive einsum = {args.naive_einsum}\n"
          f"ratio_a = ours/gemm (target <= {TARGET_A}); (core) = without input validation; "
          "(strict) = floor with a preallocated forward output\n"
          f"ratio_b = naive/ours (target >= {TARGET_B:.0f}), sensing tensor prebuilt and reused; "
          "(+build) = including one build of the tensor\n"
          "~ = naive timed on a sub-sample and scaled linearly in n (the full tensor does not fit)")
    C.print_table(disp, cols)
    print("\nwhere the time goes (seconds, median).  Pieces are timed on whole arrays (fresh n T d outputs);"
          "\nrest = core function minus its pieces - negative when the package's own blocking/buffering"
          "\navoids costs (page faults on fresh arrays) that the whole-array pieces pay")
    C.print_table(rows, PIECE_COLUMNS)
    print("\nadjoint paths (with a work buffer; 'auto' = the one _backproject uses) and the factored"
          "\nforward at rank r = d/2 against the dense forward (seconds, median)")
    C.print_table(rows, PATH_COLUMNS)

    ok_a = all(r["ratio_a"] <= TARGET_A for r in rows)
    ok_b = all(r["ratio_b"] >= TARGET_B for r in rows if "ratio_b" in r)
    print(f"\ntarget (a) ratio <= {TARGET_A}: {'met' if ok_a else 'NOT met'};  "
          f"target (b) ratio >= {TARGET_B:.0f}: {'met' if ok_b else 'NOT met'}")
    path = C.write_json(
        "operator",
        {
            "quick": args.quick, "alpha": args.alpha, "repeats": repeats, "naive_mode": args.naive,
            "naive_einsum": args.naive_einsum, "clock": args.clock,
            "mem_cap_bytes": cap, "targets": {"ratio_a_max": TARGET_A, "ratio_b_min": TARGET_B},
            "met": {"a": ok_a, "b": ok_b}, "rows": rows,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
