"""The ``amp-attention`` command (docs/theory.md §9).

Subcommands: ``run`` (sample an instance, run AMP next to its state evolution), ``se`` (the
d -> infinity state-evolution fixed point along a list of alpha), ``bench`` (per-iteration timings,
section 10), ``sweep`` (a grid of runs in parallel, cached, to a table; ``amp_attention.sweep``).
Every subcommand accepts ``--json`` and then prints exactly one JSON object on stdout; progress goes
to stderr (a tqdm bar; plain lines when stderr is not a terminal).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import numpy as np

from amp_attention import _cli_options as opt
from amp_attention._warmup import start_output_side, warm_up
from amp_attention.output_sample import DEFAULT_N_MC
from amp_attention.sweep import progress_bar


__all__ = ["main", "build_parser"]


# --------------------------------------------------------------------------------------------
# shared option groups
# --------------------------------------------------------------------------------------------


_positive_float, _nonneg_float, _damping, _positive_int = (opt.positive_float, opt.nonneg_float, opt.damping,
                                                         opt.positive_int)
_alpha_list = opt.comma_list(opt.positive_float, "finite numbers > 0")


def _add_model_options(p, alpha_type=_positive_float, alpha_default=0.3):
    g = p.add_argument_group("model")
    g.add_argument("--T", type=opt.tokens, default=2, help="tokens per sequence, 1..8")
    g.add_argument("--alpha", type=alpha_type, default=alpha_default,
                   help="sample complexity n / d^2" + (" (comma-separated list)" if alpha_type is _alpha_list else ""))
    g.add_argument("--teacher", choices=["wishart", "powerlaw", "lowrank"], default="wishart",
                   help="teacher S*")
    g.add_argument("--rho", type=_positive_float, default=0.5, help="Wishart rank ratio")
    g.add_argument("--gamma", type=_nonneg_float, default=1.0, help="power-law exponent")
    g.add_argument("--rank", type=_positive_int, default=1, help="low-rank teacher rank")
    g.add_argument("--channel", choices=["softmax", "hardmax", "linear"], default="softmax",
                   help="channel making y from the teacher's preactivations h*")
    g.add_argument("--beta", type=_positive_float, default=1.0,
                   help="softmax inverse temperature (also that of the softmax losses)")
    g.add_argument("--noise", type=_nonneg_float, default=0.0,
                   help="noise variance per whitened component, for every channel: added to h* before the "
                        "softmax/hardmax, or to y = h* for linear (off-diagonal variance noise, diagonal "
                        "2 noise; a paper's Delta with diagonal variance Delta is noise = Delta/2)")
    e = p.add_argument_group("estimator")
    e.add_argument("--estimator", choices=["erm", "bayes"], default="erm",
                   help="ERM-GAMP or Bayes-optimal GAMP-RIE")
    e.add_argument("--loss", choices=["cross_entropy", "square", "softmax_square"], default="cross_entropy",
                   help="ERM loss: cross-entropy at --beta, 1/2||y - h||^2, or sum_a ||y_a - softmax(beta h_a)||^2")
    e.add_argument("--reg", choices=["nuclear", "frobenius"], default="nuclear",
                   help="ERM penalty: lam d Tr S on S >= 0 (weight decay on S = W W^T) or lam d/2 ||S||_F^2")
    e.add_argument("--lam", type=_nonneg_float, default=0.05, help="ERM regularisation strength")
    e.add_argument("--damping", type=_damping, default="auto",
                   help="damping of the iteration: 'auto' (adaptive: undamped while it contracts) or a number in [0, 1)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _make_channel(args):
    import amp_attention as aa

    if args.channel == "softmax":
        return aa.SoftmaxChannel(args.beta, args.noise)
    if args.channel == "hardmax":
        return aa.HardmaxChannel(args.noise)
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


def _se_trajectory(args, T, teacher, channel, iters, damping):
    """The SE from the same initialisation as AMP, at the teacher's exact spectrum, replaying AMP's
    damping schedule ``damping`` (one value per iteration) so the two compare step by step."""
    import amp_attention as aa

    if args.estimator == "bayes":
        return aa.bayes_state_evolution(args.alpha, T, aa.SpectralLaw.atoms(teacher.eigenvalues), channel,
                                        max_iter=iters, tol=0.0, damping=damping)
    return aa.state_evolution(args.alpha, T, teacher, channel, args.loss, args.reg, args.lam, args.beta,
                              max_iter=iters, tol=0.0, damping=damping, seed=args.seed,
                              n_mc=args.n_mc, predictions=False, output_rule=args.output_rule)


def _last(history, key):
    """Last entry of an SE history array (None if absent, empty or not finite)."""
    a = history.get(key)
    return _finite_or_none(a[-1]) if a is not None and len(a) else None


def _se_fixed_point(r) -> dict:
    """The SE's last state and conjugates: ``V``, ``A_hat``, ``m_hat``, ``q_hat`` (``a``, ``Delta``),
    enough to compute the predicted spectrum of S_hat (docs/theory.md §7.2, §7.5)."""
    return {"V": _finite_or_none(r.V), "A_hat": _last(r.history, "A_hat"), "m_hat": _last(r.history, "m_hat"),
            "q_hat": _last(r.history, "q_hat"), "a": _last(r.history, "a"), "Delta": _last(r.history, "Delta")}


def _se_stderr(r) -> dict:
    """The ERM SE's error estimate of its fixed point (``SEResult.stderr``; None where there is none)."""
    err = getattr(r, "stderr", None) or {}
    return {f"stderr_{k}": _finite_or_none(err[k]) if k in err else None for k in ("m", "q", "V", "mse")}


def _optional(r, name):
    """``r.name`` as a finite float or None: quantities an SE result or history may not provide."""
    v = getattr(r, name, None)
    return None if v is None else _finite_or_none(v)


def cmd_run(args) -> dict:
    import amp_attention as aa

    rng = np.random.default_rng(args.seed)
    d, T = args.d, args.T
    n_test = max(2000, 2 * d)
    opt.check_sampled_run(f"run at d={d}, T={T}, alpha={args.alpha:g}", args.alpha, T, d, n_test, args.teacher,
                          args.rho)
    n = max(1, int(round(args.alpha * d * d)))
    teacher = _make_teacher(args, d, rng)
    channel = _make_channel(args)
    if args.estimator == "erm":
        est = aa.ERMAttention(loss=args.loss, reg=args.reg, lam=args.lam, beta=args.beta, variance=args.variance,
                              max_iter=args.iters, tol=args.tol, damping=args.damping)
        title = f"ERM-AMP  loss={args.loss} reg={args.reg} lam={args.lam}"
    else:
        est = aa.BayesAttention(channel, teacher, variance=args.variance, max_iter=args.iters, tol=args.tol,
                                damping=args.damping)
        title = "Bayes-optimal GAMP-RIE"
    t0 = time.perf_counter()
    child = start_output_side(est, T)  # compiles the output side meanwhile (see _warmup)
    data = aa.sample_data(n, T, teacher, channel, rng)
    params = {k: v for k, v in vars(args).items() if k not in ("func", "json", "command")}
    params["n"] = n

    if not args.json:
        print(f"{title}\n  d={d} T={T} alpha={args.alpha} (n={n})  {teacher!r}  channel={args.channel}")
        print("  AMP first (one line per iteration on stderr), then its state evolution: same "
              "initialisation, same damping schedule, teacher's exact spectrum", flush=True)

    def progress(t, S, h):
        if not args.json:
            _eprint(f"  iteration {t + 1}: mse {h['mse'][-1]:.5f}  step {h['step'][-1]:.2e}  "
                    f"damping {h['damping'][-1]:.3g}  {h['time'][-1]:.3f} s")
        return False

    warm_up(est, T, d, channel, child)
    if not args.json:
        _eprint(f"  data sampled, kernels compiled or loaded from Numba's cache in {time.perf_counter() - t0:.1f} s "
                "(not in the s/iter below)")
    try:
        with opt.indented_progress():
            est.fit(data.X, data.y, S_star=teacher.S, callback=progress)
    except ValueError as exc:
        raise opt.small_d_error(exc, d, T, args.variance)
    hist = est.history_
    k = est.n_iter_
    se_res = _se_trajectory(args, T, teacher, channel, max(k, 1), tuple(hist["damping"]) or 0.0)
    se_hist = se_res.history
    se_mse = se_hist["mse"]
    if not args.json:
        print(f"{'iter':>5} {'mse AMP':>10} {'mse SE':>10} {'m AMP':>9} {'m SE':>9} {'q AMP':>9} {'q SE':>9} "
              f"{'V':>9} {'train_loss':>11} {'step':>9} {'damping':>8} {'s/iter':>7}")
        for t in range(k):
            se_ok = t < len(se_mse)
            print(f"{t + 1:5d} {hist['mse'][t]:10.5f} {se_mse[t] if se_ok else float('nan'):10.5f} "
                  f"{hist['m'][t]:9.5f} {se_hist['m'][t] if se_ok else float('nan'):9.5f} {hist['q'][t]:9.5f} "
                  f"{se_hist['q'][t] if se_ok else float('nan'):9.5f} {hist['V'][t]:9.4g} "
                  f"{hist['train_loss'][t]:11.5f} {hist['step'][t]:9.2e} {hist['damping'][t]:8.3g} "
                  f"{hist['time'][t]:7.3f}")
    test = aa.sample_data(n_test, T, teacher, channel, np.random.default_rng([args.seed, 1]))
    phi = channel.phi
    h_hat = est.decision_function(test.X)
    test_error = float(np.mean(np.sum((phi(test.h) - phi(h_hat)) ** 2, axis=(1, 2))))
    test_error_noisy = float(np.mean(np.sum((test.y - phi(h_hat)) ** 2, axis=(1, 2))))
    train_objective = hist.get("train_objective")
    time_per_iter = float(np.mean(hist["time"])) if k else float("nan")
    out = {
        "params": params,
        "amp": {
            "mse": _list(hist["mse"]),
            "m": _list(hist["m"]),
            "q": _list(hist["q"]),
            "V": _list(hist["V"]),
            "A_hat": _list(hist["A_hat"]),
            "train_loss": _list(hist["train_loss"]),
            "train_objective": None if train_objective is None else _list(train_objective),
            "time_per_iter_s": _finite_or_none(time_per_iter),
            "converged": bool(est.converged_),
            "diverged": bool(est.diverged_),
            "n_iter": int(k),
            "message": est.result_.message,
        },
        "se": {"mse": _list(se_hist["mse"][:k]), "m": _list(se_hist["m"][:k]), "q": _list(se_hist["q"][:k]),
               "V": _list(se_hist["V"][:k]), "A_hat": _list(se_hist["A_hat"][:k]),
               "m_hat": _list(se_hist["m_hat"][:k]), "q_hat": _list(se_hist["q_hat"][:k]),
               "fixed_point": {**_se_fixed_point(se_res), "n_iter": int(se_res.n_iter)}},
        "final": {
            "mse": _finite_or_none(hist["mse"][-1]) if k else None,
            "se_mse": _finite_or_none(se_mse[k - 1]) if 0 < k <= len(se_mse) else None,
            "test_error": _finite_or_none(test_error),
            "test_error_noisy": _finite_or_none(test_error_noisy),
            "train_loss": _finite_or_none(hist["train_loss"][-1]) if k else None,
            "train_objective": (_finite_or_none(train_objective[-1])
                                if k and train_objective is not None and len(train_objective) else None),
        },
    }
    if not args.json:
        print(f"\n{est.result_.message}")
        print(f"final mse = {out['final']['mse']} (SE: {out['final']['se_mse']}), "
              f"test error on {test.n} fresh samples = {test_error:.5f} "
              f"(against their noisy labels: {test_error_noisy:.5f}), time per iteration = {time_per_iter:.3f} s")
    return out


# --------------------------------------------------------------------------------------------
# se
# --------------------------------------------------------------------------------------------


def cmd_se(args) -> dict:
    import amp_attention as aa

    T = args.T
    channel = _make_channel(args)
    opt.check_se(f"the state evolution at T={T}, n_mc={args.n_mc}", T, args.n_mc)
    if args.teacher == "wishart":
        law = aa.SpectralLaw.wishart(args.rho)
        teacher = law
    else:  # no closed d -> infinity law: the exact spectrum at --d
        opt.check_teacher(f"the teacher's exact spectrum at d={args.d}", args.d, args.teacher, args.rho)
        teacher = _make_teacher(args, args.d, np.random.default_rng(args.seed))
        law = aa.SpectralLaw.atoms(teacher.eigenvalues)
    erm = args.estimator == "erm"
    opt.check_precision_estimator(args)
    keys = (["mse", "m", "q", "test_error", "test_error_noisy"] + (["train_loss", "train_objective"] if erm else [])
            + ["V", "A_hat", "m_hat", "q_hat", "a", "Delta", "stderr_m", "stderr_q", "stderr_V", "stderr_mse",
               "converged", "n_iter"])
    res = {k: [] for k in keys}
    init = None
    alphas = args.alpha
    t0 = time.perf_counter()
    with opt.indented_progress():  # the bar keeps the (indenting) stream it was created with
        bar = progress_bar(total=len(alphas), desc="se", disable=args.json, unit="alpha")
    for i, alpha in enumerate(alphas):
        bar.set_postfix_str(f"alpha={alpha:g}", refresh=False)
        if args.estimator == "erm":
            r = aa.state_evolution(alpha, T, teacher, channel, args.loss, args.reg, args.lam, args.beta,
                                   max_iter=args.iters, tol=args.tol, damping=args.damping, seed=args.seed,
                                   n_mc=args.n_mc, init=init, output_rule=args.output_rule,
                                   prox_start=args.prox_start, acceleration=args.acceleration,
                                   precision=args.precision)
            init = (r.m, r.q, r.V) if r.converged else None
        else:
            r = aa.bayes_state_evolution(alpha, T, law, channel, max_iter=max(args.iters, 1000),
                                         tol=args.tol, damping=args.damping, predictions=True, n_mc=args.n_mc,
                                         seed=args.seed, output_rule=args.output_rule,
                                         acceleration=args.acceleration)
        for k in ("mse", "m", "q"):
            res[k].append(_finite_or_none(getattr(r, k)))
        # quantities an SE result may not provide (None), e.g. train_* for the Bayes-optimal SE
        for k in ("test_error", "test_error_noisy") + (("train_loss", "train_objective") if erm else ()):
            res[k].append(_optional(r, k))
        for k, v in {**_se_fixed_point(r), **_se_stderr(r)}.items():
            res[k].append(v)
        res["converged"].append(bool(r.converged))
        res["n_iter"].append(int(r.n_iter))
        bar.update(1)
    bar.set_postfix_str(f"done in {time.perf_counter() - t0:.1f} s", refresh=False)
    bar.close()
    if not args.json:
        what = (f"ERM loss={args.loss} reg={args.reg} lam={args.lam}" if args.estimator == "erm"
                else "Bayes-optimal")
        print(f"state evolution (d -> infinity), {what}, T={T}, teacher={law!r}, channel={args.channel}")
        cols = (["mse", "m", "q", "test_error", "test_error_noisy"] + (["train_loss", "train_objective"] if erm else [])
                + ["V", "stderr_V"])
        cols = [c for c in cols if any(v is not None for v in res[c])]  # columns the SE provides
        print(f"{'alpha':>8} " + " ".join(f"{c:>{max(len(c), 9)}}" for c in cols) + f" {'converged':>9}")
        for i, alpha in enumerate(alphas):
            row = " ".join(f"{_fmt(res[c][i], c.startswith('stderr')):>{max(len(c), 9)}}" for c in cols)
            print(f"{alpha:8.4g} {row} {str(res['converged'][i]):>9}")
    params = {k: v for k, v in vars(args).items() if k not in ("func", "json", "command", "alpha")}
    return {"alpha": list(alphas), **res, "params": params}


def _fmt(v, small=False):
    return "nan" if v is None else f"{v:.2e}" if small else f"{v:.5f}"


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def cmd_bench(args) -> dict:
    from amp_attention.benchmarking import amp_iteration_ratios

    for d in args.d:  # the run, plus the floor's three (n T, d) arrays
        opt.check_sampled_run(f"bench at d={d}, T={args.T}, alpha={args.alpha:g}", args.alpha, args.T, d, 0,
                              "wishart", 0.5, token_arrays=4.25)
    rows = []
    for d in args.d:
        try:
            r = amp_iteration_ratios(d, args.T, args.alpha, loss=args.loss, reg=args.reg, repeats=args.repeats,
                                     seed=args.seed)
        except ValueError as exc:
            raise opt.small_d_error(exc, d, args.T, "sample")
        rows.append(r)
        if not args.json:
            if len(rows) == 1:
                print(f"{'d':>5} {'T':>2} {'n':>7} {'t_iter s':>9} {'t_floor s':>9} {'ratio':>6} "
                      f"{'gemm s':>8} {'eigh s':>8} {'g_out s':>8}")
            print(f"{d:5d} {args.T:2d} {r['n']:7d} {r['t_iter']:9.4f} {r['t_floor']:9.4f} {r['ratio_floor']:6.2f} "
                  f"{r['t_gemms']:8.4f} {r['t_eigh']:8.4f} {r['t_g_out']:8.4f}", flush=True)
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------


def cmd_sweep(args) -> dict:
    from amp_attention.sweep import sweep, write_sweep

    out = str(args.out)
    opt.check_out(out)
    grid = {name: getattr(args, name) for _, name, *_ in opt.SWEEP_OPTIONS if getattr(args, name) is not None}
    if args.scheduler is not None and args.jobs is not None and args.scheduler != "local":
        raise ValueError("give either --jobs or --scheduler ADDRESS, not both")
    n_rows = opt.check_sweep_memory(args, grid)
    jobs = None if args.jobs is None else min(args.jobs, n_rows)  # no more workers than rows
    executor = args.scheduler if args.scheduler is not None else jobs
    t0 = time.perf_counter()
    try:
        with opt.indented_progress():
            df = sweep(args.kind, grid, seeds=args.seeds, executor=executor, cache=args.cache, progress=True,
                       jobs=jobs)
    except ValueError as exc:  # explain the sampled kinds' Gram matrices at too small a d
        if args.kind not in ("amp", "bayes_amp"):
            raise
        d, T = min(grid.get("d", [100])), max(grid.get("T", [2]))
        raise opt.small_d_error(exc, d, T, "sample" if "sample" in grid.get("variance", ["sample"]) else "")
    write_sweep(df, out)
    wall = time.perf_counter() - t0
    n_cached = int(df["cached"].sum())
    if not args.json:
        print(f"sweep {args.kind}: {len(df)} rows ({n_cached} from the cache, "
              f"{int(df['converged'].sum())} converged) in {wall:.1f} s -> {out}")
    return {"out": out, "kind": args.kind, "rows": int(len(df)), "cached": n_cached,
            "converged": int(df["converged"].sum()), "wall_time_s": wall, "grid": grid}


# --------------------------------------------------------------------------------------------
# spectrum, thresholds
# --------------------------------------------------------------------------------------------


def _pushforward_summary(pf, outlier_mass):
    """Intervals of the continuous part of the predicted spectrum (split where the density vanishes on
    both sides of a gap), their masses; the heaviest is bulk, light ones (< outlier_mass) outliers."""
    y, rho = np.asarray(pf.y, float), np.asarray(pf.density, float)
    cuts = [i + 1 for i in range(len(y) - 1) if rho[i] <= 0 and rho[i + 1] <= 0 and y[i + 1] > y[i]]
    pieces = []
    for lo, hi in zip([0] + cuts, cuts + [len(y)]):
        yy, dd = y[lo:hi], rho[lo:hi]
        mass = float(np.trapezoid(dd, yy)) if len(yy) > 1 else 0.0
        if mass > 0:
            pieces.append({"lo": float(yy[0]), "hi": float(yy[-1]), "mass": mass,
                           "position": float(np.trapezoid(dd * yy, yy) / mass)})
    heaviest = max((p["mass"] for p in pieces), default=0.0)
    bulk = [p for p in pieces if p["mass"] == heaviest or p["mass"] >= outlier_mass]
    outliers = [p for p in pieces if p not in bulk]
    return bulk, outliers


def _predicted_cdf(pf):
    """``F(y)`` of the predicted law (atom at 0) and its left limit ``F(y-)``."""
    y, rho = np.asarray(pf.y, float), np.asarray(pf.density, float)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (rho[1:] + rho[:-1]) * np.diff(y))])

    def cdf(v, left=False):
        atom = pf.atom_mass * ((v > 0) if left else (v >= 0))
        return atom + np.interp(v, y, cum, left=0.0, right=cum[-1])

    return cdf


def cmd_spectrum(args) -> dict:
    import amp_attention as aa
    from amp_attention.spectral import shat_spectrum

    channel = _make_channel(args)
    opt.check_precision_estimator(args)
    opt.check_se(f"the state evolution at T={args.T}, n_mc={args.n_mc}", args.T, args.n_mc)
    if args.d is not None:
        opt.check_sampled_run(f"AMP at d={args.d}, T={args.T}, alpha={args.alpha:g}", args.alpha, args.T, args.d, 0,
                              args.teacher, args.rho)
    elif args.teacher != "wishart":
        opt.check_teacher("the teacher's exact spectrum at d=200", 200, args.teacher, args.rho)
    if args.teacher == "wishart":
        law = aa.SpectralLaw.wishart(args.rho)
    else:
        law = aa.SpectralLaw.atoms(_make_teacher(args, args.d or 200, np.random.default_rng(args.seed)).eigenvalues)
    if args.estimator == "erm":
        r = aa.state_evolution(args.alpha, args.T, law, channel, args.loss, args.reg, args.lam, args.beta,
                               max_iter=args.iters, tol=args.tol, damping=args.damping, n_mc=args.n_mc,
                               seed=args.seed, output_rule=args.output_rule, acceleration=args.acceleration,
                               precision=args.precision)
        f = aa.make_denoiser(args.reg, args.lam).scalar_map(r.A_hat)
    else:
        r = aa.bayes_state_evolution(args.alpha, args.T, law, channel, max_iter=max(args.iters, 1000),
                                     damping=args.damping, n_mc=args.n_mc, seed=args.seed,
                                     output_rule=args.output_rule, acceleration=args.acceleration)
        f = aa.RIEDenoiser(law).scalar_map(r.A_hat)
    pf = shat_spectrum(law, r.a, r.Delta, f)
    bulk, outliers = _pushforward_summary(pf, args.outlier_mass)
    out = {"se": {"mse": _finite_or_none(r.mse), "converged": bool(r.converged), "message": r.message,
                  **_se_fixed_point(r), **_se_stderr(r)},
           "predicted": {"zero_atom_mass": float(pf.atom_mass), "rank_fraction": 1.0 - float(pf.atom_mass),
                         "bulk": bulk, "outliers": outliers}}
    if args.d is not None:
        rng = np.random.default_rng(args.seed)
        teacher = _make_teacher(args, args.d, rng)
        data = aa.sample_data(max(1, int(round(args.alpha * args.d ** 2))), args.T, teacher, channel, rng)
        est = (aa.ERMAttention(loss=args.loss, reg=args.reg, lam=args.lam, beta=args.beta, variance=args.variance,
                               max_iter=args.iters, tol=args.tol, damping=args.damping) if args.estimator == "erm"
               else aa.BayesAttention(channel, teacher, variance=args.variance, max_iter=args.iters, tol=args.tol,
                                      damping=args.damping))
        try:
            est.fit(data.X, data.y)
        except ValueError as exc:
            raise opt.small_d_error(exc, args.d, args.T, args.variance)
        eig = np.sort(np.linalg.eigvalsh(est.S_))
        eig = np.where(np.abs(eig) <= 1e-12 * max(1.0, np.abs(eig).max()), 0.0, eig)
        cdf = _predicted_cdf(pf)
        u, counts = np.unique(eig, return_counts=True)  # ties (the zeros): compare both one-sided limits
        right = np.cumsum(counts) / len(eig)
        ks = max(np.max(np.abs(right - cdf(u))), np.max(np.abs(right - counts / len(eig) - cdf(u, left=True))))
        out["empirical"] = {"d": args.d, "eigenvalues": _list(eig), "zero_fraction": float(np.mean(eig == 0)),
                            "ks_distance": float(ks), "amp_converged": bool(est.converged_)}
    if not args.json:
        print(f"predicted spectrum of S_hat (alpha={args.alpha}, SE mse {r.mse:.5f}, {r.message})")
        print(f"  atom at 0: mass {pf.atom_mass:.5f}   rank / d: {1 - pf.atom_mass:.5f}")
        for kind, rows in (("bulk", bulk), ("outlier", outliers)):
            for b in rows:
                print(f"  {kind:8s} [{b['lo']:.5f}, {b['hi']:.5f}]  mass {b['mass']:.5f}  mean {b['position']:.5f}")
        if "empirical" in out:
            e = out["empirical"]
            print(f"  AMP at d={args.d}: zero fraction {e['zero_fraction']:.5f}, "
                  f"Kolmogorov-Smirnov distance {e['ks_distance']:.4f}")
    return out


def cmd_thresholds(args) -> dict:
    import amp_attention as aa

    channel = _make_channel(args)
    opt.check_se(f"the state evolution at T={args.T}, n_mc={args.n_mc}", args.T, args.n_mc)
    if args.teacher == "wishart":
        law = aa.SpectralLaw.wishart(args.rho)
    else:
        opt.check_teacher(f"the teacher's exact spectrum at d={args.d}", args.d, args.teacher, args.rho)
        law = aa.SpectralLaw.atoms(_make_teacher(args, args.d, np.random.default_rng(args.seed)).eigenvalues)
    se_kw = {"n_mc": args.n_mc, "seed": args.seed, "acceleration": args.acceleration}
    bracket = (args.lo, args.hi)
    runs = {"recovery": lambda p: aa.recovery_threshold(args.T, law, channel, args.loss, "nuclear", args.lam,
                                                        bracket=bracket, progress=p, **se_kw),
            "interpolation": lambda p: aa.interpolation_threshold(args.T, law, channel, args.loss, "frobenius",
                                                                  args.lam, bracket=bracket, progress=p, **se_kw),
            "bayes": lambda p: aa.bayes_threshold(args.T, law, channel, bracket=bracket, progress=p)}
    unknown = [w for w in args.which if w not in runs]
    if unknown:
        raise ValueError(f"--which: unknown threshold(s) {', '.join(unknown)}; expected recovery, interpolation, bayes")
    out = {}
    for name in args.which:
        bar, progress = opt.search_progress(name, args.json)
        try:
            with bar:
                t = runs[name](progress)
            out[name] = {"alpha": _optional(t, "alpha"), "found": bool(t.found), "message": t.message,
                         "bracket": _list(t.bracket), "evaluations": len(t.evaluations)}
        except NotImplementedError as exc:  # e.g. the Bayes SE of the hardmax channel
            out[name] = {"alpha": None, "found": False, "message": f"not available: {exc}"}
    if args.teacher == "wishart" and args.channel == "softmax" and args.noise == 0:
        out["counting_bound"] = aa.perfect_recovery_threshold(args.rho, args.T)
    if not args.json:
        for name, v in out.items():
            print(f"{name:>14}: " + (f"{v:.5f}" if isinstance(v, float) else
                                     f"{'-' if v['alpha'] is None else format(v['alpha'], '.5f')}  ({v['message']})"))
    return out


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows every option's default (also for the subcommands,
    through ``add_subparsers(parser_class=_Parser)``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """One line on stderr (``PROG: error: MESSAGE (see PROG --help)``) and exit status 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from amp_attention import __version__

    parser = _Parser(prog="amp-attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("run", help="sample an instance and run AMP next to its state evolution")
    p.add_argument("--d", type=_positive_int, default=100, help="token dimension")
    _add_model_options(p)
    p.add_argument("--iters", type=_positive_int, default=50, help="maximum AMP iterations")
    p.add_argument("--tol", type=_nonneg_float, default=1e-8, help="AMP tolerance (0: run all iterations)")
    p.add_argument("--n-mc", dest="n_mc", type=opt.n_mc, default=100_000,
                   help="node budget of the SE output side (the SE replays AMP's damping step by step, "
                        "one level; its finite-d comparison needs less than the fixed points of 'se')")
    p.add_argument("--output-rule", dest="output_rule", choices=["auto", "qmc", "mc", "gauss_hermite"],
                   default="auto", help="SE output-side rule: 'auto' = quasi-Monte Carlo, seed-independent")
    p.add_argument("--variance", choices=["sample", "scalar"], default="sample",
                   help="AMP variances: per-sample Gram matrices (needs d(d+1)/2 >= T(T+1)/2) or scalar")
    p.add_argument("--seed", type=opt.seed, default=0, help="seed of the instance and of the SE draws")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("se", help="state-evolution fixed points (d -> infinity) along a list of alpha")
    _add_model_options(p, alpha_type=_alpha_list, alpha_default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--d", type=_positive_int, default=200,
                   help="dimension of the exact spectrum for teachers without a closed limit law")
    p.add_argument("--iters", type=_positive_int, default=500, help="maximum SE steps per alpha")
    p.add_argument("--tol", type=_nonneg_float, default=1e-8, help="SE tolerance on the change of (m, q, V)")
    p.add_argument("--n-mc", dest="n_mc", type=opt.n_mc, default=DEFAULT_N_MC,
                   help="node budget of the output side's Gaussian averages")
    p.add_argument("--output-rule", dest="output_rule", choices=["auto", "qmc", "mc", "gauss_hermite"],
                   default="auto", help="output-side rule: 'auto' = quasi-Monte Carlo, seed-independent")
    p.add_argument("--prox-start", dest="prox_start", choices=["global", "teacher"], default="global",
                   help="softmax_square only: the SE's prox is the global minimiser or the one reached from z*")
    p.add_argument("--seed", type=opt.seed, default=0, help="seed of the Monte Carlo draws")
    opt.add_precision(p)
    opt.add_acceleration(p)
    p.set_defaults(func=cmd_se)

    p = sub.add_parser("bench", help="per-iteration AMP time over the floor (two GEMMs + one eigh)")
    p.add_argument("--d", type=opt.comma_list(_positive_int, "integers >= 1"), default=[100, 200],
                   help="token dimensions (comma-separated)")
    p.add_argument("--T", type=opt.tokens, default=3, help="tokens per sequence")
    p.add_argument("--alpha", type=_positive_float, default=0.5, help="sample complexity n / d^2")
    p.add_argument("--loss", choices=["cross_entropy", "square"], default="cross_entropy", help="ERM loss")
    p.add_argument("--reg", choices=["nuclear", "frobenius"], default="nuclear", help="ERM penalty")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed repetitions")
    p.add_argument("--seed", type=opt.seed, default=0, help="seed of the instance")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="a grid of SE / AMP / ERM runs, in parallel (processes or Dask), cached, "
                                     "to a CSV, Parquet or JSON table")
    p.add_argument("--kind", choices=["se", "bayes_se", "amp", "erm", "bayes_amp"], default="se",
                   help="what runs at each point")
    for flag, name, conv, what, text in opt.SWEEP_OPTIONS:
        p.add_argument(flag, dest=name, type=opt.grid_values(conv, what), default=None,
                       help=text + " (comma list or start:stop:num; default: amp_attention.sweep.PARAMETERS)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="seeds per point")
    p.add_argument("--jobs", type=_positive_int, default=None, help="local worker processes (default: serial)")
    p.add_argument("--scheduler", default=None,
                    help="Dask scheduler address, or 'local' for a LocalCluster (of --jobs workers, default 2)")
    p.add_argument("--cache", default=None, help="directory of per-point results; a re-run computes only the missing")
    p.add_argument("--out", required=True, help="output table: FILE.csv, FILE.parquet or FILE.json")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("spectrum", help="predicted spectrum of S_hat at the SE fixed point (and AMP's, with --d)")
    _add_model_options(p)
    p.add_argument("--d", type=_positive_int, default=None,
                   help="if given: also run AMP at this d and compare its eigenvalues (Kolmogorov-Smirnov); "
                        "the exact-spectrum dimension for non-Wishart teachers (else 200)")
    p.add_argument("--iters", type=_positive_int, default=500, help="maximum SE / AMP iterations")
    p.add_argument("--tol", type=_nonneg_float, default=1e-8, help="SE / AMP tolerance")
    p.add_argument("--n-mc", dest="n_mc", type=opt.n_mc, default=DEFAULT_N_MC, help="SE output-side node budget")
    p.add_argument("--output-rule", dest="output_rule", choices=["auto", "qmc", "mc", "gauss_hermite"],
                   default="auto", help="SE output-side rule")
    p.add_argument("--outlier-mass", dest="outlier_mass", type=_positive_float, default=0.05,
                   help="support intervals lighter than this (other than the heaviest) are outliers")
    p.add_argument("--variance", choices=["sample", "scalar"], default="sample", help="AMP variances (with --d)")
    p.add_argument("--seed", type=opt.seed, default=0, help="seed of the SE draws and of the AMP instance")
    opt.add_precision(p)
    opt.add_acceleration(p)
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("thresholds", help="recovery, interpolation and Bayes-optimal thresholds in alpha")
    _add_model_options(p)
    p.set_defaults(loss="square", lam=1e-5)
    p.add_argument("--which", type=opt.comma_list(opt.choice("recovery", "interpolation", "bayes"),
                                                  "names among recovery, interpolation, bayes"),
                   default=["recovery", "interpolation", "bayes"],
                   help="comma list of: recovery (nuclear ERM), interpolation (Frobenius ERM), bayes")
    p.add_argument("--lo", type=_positive_float, default=0.02, help="lower end of the initial alpha bracket")
    p.add_argument("--hi", type=_positive_float, default=1.0, help="upper end of the initial alpha bracket")
    p.add_argument("--d", type=_positive_int, default=200, help="exact-spectrum dimension for non-Wishart teachers")
    p.add_argument("--n-mc", dest="n_mc", type=opt.n_mc, default=DEFAULT_N_MC, help="SE output-side node budget")
    p.add_argument("--seed", type=opt.seed, default=0, help="seed of the SE draws")
    opt.add_acceleration(p)
    p.set_defaults(func=cmd_thresholds)
    return parser


def main(argv=None) -> int:
    """Run the command; every failure is one line ``amp-attention CMD: error: ...`` on stderr.

    Exit status: 0 on success; 2 for bad arguments (``ValueError``, ``NotImplementedError``, and
    estimated memory needs above what is available: :class:`~amp_attention._validation.InsufficientMemoryError`);
    1 for other failures (memory actually exhausted, numerical overflow, output files that cannot
    be written, and any other exception, reported as a bug); 130 when interrupted (Ctrl-C).
    Warnings are printed on one line each (``amp-attention CMD: warning: Category: message``).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "se", "bench", "sweep", "spectrum", "thresholds", "-h", "--help",
                                   "--version"):
        argv = ["run"] + argv
    prog = f"{parser.prog} {argv[0]}" if not argv[0].startswith("-") else parser.prog

    def fail(status, text):
        parser.exit(status, f"{prog}: error: {text}\n")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = opt.one_line_warning(prog)
            args, extra = parser.parse_known_args(argv)
            if extra:
                fail(2, f"unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
            out = args.func(args)
            text = json.dumps(out, allow_nan=False) if args.json else None
        if text is not None:
            print(text, flush=True)
    except KeyboardInterrupt:
        fail(130, "interrupted")
    except (ValueError, NotImplementedError) as exc:  # InsufficientMemoryError included
        fail(2, opt.one_line(exc))
    except MemoryError as exc:
        fail(1, f"out of memory ({opt.one_line(exc)}); lower --d, --alpha or --n-mc")
    except (OverflowError, FloatingPointError) as exc:
        fail(1, f"numerical overflow ({type(exc).__name__}: {opt.one_line(exc)}); an input is too large")
    except OSError as exc:
        fail(1, f"{type(exc).__name__}: {opt.one_line(exc)}")
    except Exception as exc:  # anything else is a bug
        fail(1, f"internal error {type(exc).__name__}: {opt.one_line(exc)}; this is a bug, please report it "
                f"with the command line")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
