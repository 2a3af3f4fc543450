"""The ``amp-attention`` command (DESIGN.md section 9).

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


def _phi(channel):
    """Noiseless output map used for the test error ``E||phi(h*) - phi(h_hat)||_F^2``."""
    import amp_attention as aa
    from amp_attention.model import row_softmax

    if isinstance(channel, aa.SoftmaxChannel):
        return lambda h: row_softmax(h, channel.beta)
    if isinstance(channel, aa.HardmaxChannel):
        return aa.HardmaxChannel()
    return lambda h: h


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
    if args.estimator != "erm":
        raise SystemExit("amp-attention run: --estimator bayes is not available yet")
    est = aa.ERMAttention(loss=args.loss, reg=args.reg, lam=args.lam, beta=args.beta,
                          max_iter=args.iters, tol=args.tol, damping=args.damping)

    if not args.json:
        print(f"ERM-AMP  d={d} T={T} alpha={args.alpha} (n={n})  teacher={teacher!r}")
        print(f"         channel={args.channel} loss={args.loss} reg={args.reg} lam={args.lam}")
        print(f"{'iter':>5} {'mse':>11} {'m':>10} {'q':>10} {'V':>10} {'train_loss':>12} {'step':>10} {'s/iter':>8}")

    def progress(t, S, h):
        if not args.json:
            print(f"{t + 1:5d} {h['mse'][-1]:11.6f} {h['m'][-1]:10.6f} {h['q'][-1]:10.6f} {h['V'][-1]:10.4g} "
                  f"{h['train_loss'][-1]:12.6f} {h['step'][-1]:10.3e} {h['time'][-1]:8.3f}", flush=True)
        return False

    est.fit(data.X, data.y, S_star=teacher.S, callback=progress)
    hist = est.history_
    test = aa.sample_data(max(2000, 2 * d), T, teacher, channel, np.random.default_rng([args.seed, 1]))
    phi = _phi(channel)
    h_hat = est.decision_function(test.X)
    test_error = float(np.mean(np.sum((phi(test.h) - phi(h_hat)) ** 2, axis=(1, 2))))
    time_per_iter = float(np.mean(hist["time"])) if est.n_iter_ else float("nan")
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
            "n_iter": int(est.n_iter_),
            "message": est.result_.message,
        },
        "final": {
            "mse": _finite_or_none(hist["mse"][-1]) if est.n_iter_ else None,
            "test_error": _finite_or_none(test_error),
            "train_loss": _finite_or_none(hist["train_loss"][-1]) if est.n_iter_ else None,
        },
    }
    if not args.json:
        print(f"\n{est.result_.message}")
        print(f"final mse = {out['final']['mse']}, test error (fresh samples) = {test_error:.6f}, "
              f"time per iteration = {time_per_iter:.3f} s")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amp-attention", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="sample an instance and run AMP next to its state evolution")
    p.add_argument("--d", type=_positive_int, default=100, help="token dimension (default 100)")
    _add_model_options(p)
    p.add_argument("--iters", type=_positive_int, default=50, help="maximum AMP iterations")
    p.add_argument("--tol", type=_nonneg_float, default=1e-8, help="AMP tolerance (0: run all iterations)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run"] + list(argv or []))
    try:
        out = args.func(args)
    except ValueError as exc:
        parser.exit(2, f"amp-attention {args.command}: error: {exc}\n")
    if args.json:
        print(json.dumps(out, allow_nan=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
