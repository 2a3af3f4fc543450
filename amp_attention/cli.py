"""The ``amp-attention`` command (docs/theory.md §9).

Subcommands: ``run`` (sample an instance, run AMP next to its state evolution), ``se`` (the
d -> infinity state-evolution fixed point along a list of alpha), ``bench`` (per-iteration timings,
section 10).  Every subcommand accepts ``--json`` and then prints exactly one JSON object on stdout;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np


__all__ = ["main", "build_parser"]


# --------------------------------------------------------------------------------------------
# shared option groups
# --------------------------------------------------------------------------------------------


def _positive_float(s):
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def _nonneg_float(s):
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return v


def _alpha_list(s):
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"alphas must be finite and > 0, got {s!r}")
    return vals


def _add_model_options(p, alpha_type=_positive_float, alpha_default=0.3):
    g = p.add_argument_group("model")
    g.add_argument("--T", type=int, default=2, help="tokens per sequence, 1..8 (default 2)")
    g.add_argument("--alpha", type=alpha_type, default=alpha_default, help="n / d^2")
    g.add_argument("--teacher", choices=["wishart", "powerlaw", "lowrank"], default="wishart")
    g.add_argument("--rho", type=_positive_float, default=0.5, help="Wishart rank ratio")
    g.add_argument("--gamma", type=_nonneg_float, default=1.0, help="power-law exponent")
    g.add_argument("--rank", type=_positive_int, default=1, help="low-rank teacher rank")
    g.add_argument("--channel", choices=["softmax", "hardmax", "linear"], default="softmax")
    g.add_argument("--beta", type=_positive_float, default=1.0, help="softmax inverse temperature (also the loss')")
    g.add_argument("--noise", type=_nonneg_float, default=0.0, help="linear channel noise variance")
    e = p.add_argument_group("estimator")
    e.add_argument("--estimator", choices=["erm", "bayes"], default="erm")
    e.add_argument("--loss", choices=["cross_entropy", "square"], default="cross_entropy")
    e.add_argument("--reg", choices=["nuclear", "frobenius"], default="nuclear")
    e.add_argument("--lam", type=_nonneg_float, default=0.05)
    e.add_argument("--damping", type=_nonneg_float, default=0.0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _make_channel(args):
    import amp_attention as aa

    if args.channel == "softmax":
        return aa.SoftmaxChannel(args.beta)
    if args.channel == "hardmax":
        return aa.HardmaxChannel()
    return aa.LinearChannel(args.noise)


def _make_teacher(args, d, rng):
    import amp_attention as aa

    if args.teacher == "wishart":
        return aa.Teacher.wishart(d, args.rho, rng)
    if args.teacher == "powerlaw":
        return aa.Teacher.powerlaw(d, args.gamma, rng)
    return aa.Teacher.lowrank(d, args.rank, rng)


def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _list(a):
    return [_finite_or_none(v) for v in np.asarray(a, dtype=float)]


def _eprint(*a, **k):
    print(*a, file=sys.stderr, **k)
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _se_trajectory(args, T, teacher, channel, iters):
    """The SE from the same initialisation as AMP, at the teacher's exact spectrum."""
    import amp_attention as aa

    if args.estimator == "bayes":
        r = aa.bayes_state_evolution(args.alpha, T, aa.SpectralLaw.atoms(teacher.eigenvalues), channel,
                                     max_iter=iters, tol=0.0, damping=args.damping)
        return r.history
    r = aa.state_evolution(args.alpha, T, teacher, channel, args.loss, args.reg, args.lam, args.beta,
                           max_iter=iters, tol=0.0, damping=args.damping, seed=args.seed,
                           n_mc=args.n_mc, predictions=False)
    return r.history


def cmd_run(args) -> dict:
    import amp_attention as aa

    rng = np.random.default_rng(args.seed)
    d, T = args.d, args.T
    n = max(1, int(round(args.alpha * d * d)))
    teacher = _make_teacher(args, d, rng)
    channel = _make_channel(args)
    data = aa.sample_data(n, T, teacher, channel, rng)
    params = {k: v for k, v in vars(args).items() if k not in ("func", "json", "command")}
    params["n"] = n
    if args.estimator == "erm":
        est = aa.ERMAttention(loss=args.loss, reg=args.reg, lam=args.lam, beta=args.beta,
                              max_iter=args.iters, tol=args.tol, damping=args.damping)
        title = f"ERM-AMP  loss={args.loss} reg={args.reg} lam={args.lam}"
    else:
        est = aa.BayesAttention(channel, teacher, max_iter=args.iters, tol=args.tol, damping=args.damping)
        title = "Bayes-optimal GAMP-RIE"

    if not args.json:
        print(f"{title}\n  d={d} T={T} alpha={args.alpha} (n={n})  {teacher!r}  channel={args.channel}")
        print("  state evolution: same initialisation, teacher's exact spectrum", flush=True)
    se_hist = _se_trajectory(args, T, teacher, channel, args.iters)
    se_mse = se_hist["mse"]
    if not args.json:
        print(f"{'iter':>5} {'mse AMP':>10} {'mse SE':>10} {'m AMP':>9} {'m SE':>9} {'q AMP':>9} {'q SE':>9} "
              f"{'V':>9} {'train_loss':>11} {'step':>9} {'s/iter':>7}")

    def progress(t, S, h):
        if not args.json:
            se_t = se_mse[t] if t < len(se_mse) else float("nan")
            print(f"{t + 1:5d} {h['mse'][-1]:10.5f} {se_t:10.5f} {h['m'][-1]:9.5f} "
                  f"{se_hist['m'][t] if t < len(se_mse) else float('nan'):9.5f} {h['q'][-1]:9.5f} "
                  f"{se_hist['q'][t] if t < len(se_mse) else float('nan'):9.5f} {h['V'][-1]:9.4g} "
                  f"{h['train_loss'][-1]:11.5f} {h['step'][-1]:9.2e} {h['time'][-1]:7.3f}", flush=True)
        return False

    est.fit(data.X, data.y, S_star=teacher.S, callback=progress)
    hist = est.history_
    k = est.n_iter_
    test = aa.sample_data(max(2000, 2 * d), T, teacher, channel, np.random.default_rng([args.seed, 1]))
    phi = channel.phi
    h_hat = est.decision_function(test.X)
    test_error = float(np.mean(np.sum((phi(test.h) - phi(h_hat)) ** 2, axis=(1, 2))))
    time_per_iter = float(np.mean(hist["time"])) if k else float("nan")
    out = {
        "params": params,
        "amp": {
            "mse": _list(hist["mse"]),
            "m": _list(hist["m"]),
            "q": _list(hist["q"]),
            "V": _list(hist["V"]),
            "train_loss": _list(hist["train_loss"]),
            "time_per_iter_s": _finite_or_none(time_per_iter),
            "converged": bool(est.converged_),
            "diverged": bool(est.diverged_),
            "n_iter": int(k),
            "message": est.result_.message,
        },
        "se": {"mse": _list(se_hist["mse"][:k]), "m": _list(se_hist["m"][:k]), "q": _list(se_hist["q"][:k])},
        "final": {
            "mse": _finite_or_none(hist["mse"][-1]) if k else None,
            "se_mse": _finite_or_none(se_mse[k - 1]) if 0 < k <= len(se_mse) else None,
            "test_error": _finite_or_none(test_error),
            "train_loss": _finite_or_none(hist["train_loss"][-1]) if k else None,
        },
    }
    if not args.json:
        print(f"\n{est.result_.message}")
        print(f"final mse = {out['final']['mse']} (SE: {out['final']['se_mse']}), "
              f"test error on {test.n} fresh samples = {test_error:.5f}, time per iteration = {time_per_iter:.3f} s")
    return out


# --------------------------------------------------------------------------------------------
# se
# --------------------------------------------------------------------------------------------


def _progress_bar(i, total, label, width=30):
    done = int(width * i / total)
    _eprint(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label}", end="")
    if i == total:
        _eprint("")


def cmd_se(args) -> dict:
    import amp_attention as aa

    T = args.T
    channel = _make_channel(args)
    if args.teacher == "wishart":
        law = aa.SpectralLaw.wishart(args.rho)
        teacher = law
    else:  # no closed d -> infinity law: the exact spectrum at --d
        teacher = _make_teacher(args, args.d, np.random.default_rng(args.seed))
        law = aa.SpectralLaw.atoms(teacher.eigenvalues)
    keys = ["mse", "m", "q", "test_error", "converged", "n_iter"] + (["train_loss"] if args.estimator == "erm" else [])
    res = {k: [] for k in keys}
    init = None
    alphas = args.alpha
    t0 = time.perf_counter()
    for i, alpha in enumerate(alphas):
        if not args.json:
            _progress_bar(i, len(alphas), f"alpha={alpha:g}")
        if args.estimator == "erm":
            r = aa.state_evolution(alpha, T, teacher, channel, args.loss, args.reg, args.lam, args.beta,
                                   max_iter=args.iters, tol=args.tol, damping=args.damping, seed=args.seed,
                                   n_mc=args.n_mc, init=init)
            init = (r.m, r.q, r.V) if r.converged else None
            test_error, extra = r.test_error, {"train_loss": r.train_loss}
        else:
            r = aa.bayes_state_evolution(alpha, T, law, channel, max_iter=max(args.iters, 1000),
                                         tol=args.tol, damping=args.damping, predictions=True,
                                         n_mc=args.n_mc, seed=args.seed)
            test_error, extra = r.test_error, {}
        for k, v in (("mse", r.mse), ("m", r.m), ("q", r.q), ("test_error", test_error)):
            res[k].append(_finite_or_none(v))
        res["converged"].append(bool(r.converged))
        res["n_iter"].append(int(r.n_iter))
        for k, v in extra.items():
            res[k].append(_finite_or_none(v))
    if not args.json:
        _progress_bar(len(alphas), len(alphas), f"done in {time.perf_counter() - t0:.1f} s")
        what = (f"ERM loss={args.loss} reg={args.reg} lam={args.lam}" if args.estimator == "erm"
                else "Bayes-optimal")
        print(f"state evolution (d -> infinity), {what}, T={T}, teacher={law!r}, channel={args.channel}")
        head = f"{'alpha':>8} {'mse':>10} {'m':>9} {'q':>9} {'test_error':>11}"
        head += f" {'train_loss':>11}" if args.estimator == "erm" else ""
        print(head + f" {'converged':>9}")
        for i, alpha in enumerate(alphas):
            row = f"{alpha:8.4g} {_fmt(res['mse'][i]):>10} {_fmt(res['m'][i]):>9} {_fmt(res['q'][i]):>9} " \
                  f"{_fmt(res['test_error'][i]):>11}"
            row += f" {_fmt(res['train_loss'][i]):>11}" if args.estimator == "erm" else ""
            print(row + f" {str(res['converged'][i]):>9}")
    params = {k: v for k, v in vars(args).items() if k not in ("func", "json", "command", "alpha")}
    return {"alpha": list(alphas), **res, "params": params}


def _fmt(v):
    return "nan" if v is None else f"{v:.5f}"


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def cmd_bench(args) -> dict:
    from amp_attention.benchmarking import amp_iteration_ratios

    rows = []
    for d in args.d:
        r = amp_iteration_ratios(d, args.T, args.alpha, loss=args.loss, reg=args.reg, repeats=args.repeats,
                                 seed=args.seed)
        rows.append(r)
        if not args.json:
            if len(rows) == 1:
                print(f"{'d':>5} {'T':>2} {'n':>7} {'t_iter s':>9} {'t_floor s':>9} {'ratio':>6} "
                      f"{'gemm s':>8} {'eigh s':>8} {'g_out s':>8}")
            print(f"{d:5d} {args.T:2d} {r['n']:7d} {r['t_iter']:9.4f} {r['t_floor']:9.4f} {r['ratio_floor']:6.2f} "
                  f"{r['t_gemms']:8.4f} {r['t_eigh']:8.4f} {r['t_g_out']:8.4f}", flush=True)
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amp-attention", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="sample an instance and run AMP next to its state evolution")
    p.add_argument("--d", type=_positive_int, default=100, help="token dimension (default 100)")
    _add_model_options(p)
    p.add_argument("--iters", type=_positive_int, default=50, help="maximum AMP iterations")
    p.add_argument("--tol", type=_nonneg_float, default=1e-8, help="AMP tolerance (0: run all iterations)")
    p.add_argument("--n-mc", dest="n_mc", type=_positive_int, default=100_000, help="SE Monte Carlo draws")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("se", help="state-evolution fixed points (d -> infinity) along a list of alpha")
    _add_model_options(p, alpha_type=_alpha_list, alpha_default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--d", type=_positive_int, default=200,
                   help="dimension of the exact spectrum for teachers without a closed limit law")
    p.add_argument("--iters", type=_positive_int, default=500, help="maximum SE steps per alpha")
    p.add_argument("--tol", type=_nonneg_float, default=1e-8)
    p.add_argument("--n-mc", dest="n_mc", type=_positive_int, default=100_000, help="Monte Carlo draws")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_se)

    p = sub.add_parser("bench", help="per-iteration AMP time over the floor (two GEMMs + one eigh)")
    p.add_argument("--d", type=lambda s: [int(x) for x in s.split(",")], default=[100, 200])
    p.add_argument("--T", type=int, default=3)
    p.add_argument("--alpha", type=_positive_float, default=0.5)
    p.add_argument("--loss", choices=["cross_entropy", "square"], default="cross_entropy")
    p.add_argument("--reg", choices=["nuclear", "frobenius"], default="nuclear")
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "se", "bench", "-h", "--help"):
        argv = ["run"] + argv
    args = parser.parse_args(argv)
    try:
        out = args.func(args)
    except (ValueError, NotImplementedError) as exc:
        parser.exit(2, f"amp-attention {args.command}: error: {exc}\n")
    if args.json:
        print(json.dumps(out, allow_nan=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
