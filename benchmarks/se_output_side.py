"""SE output side: reproducibility and cost of the integration rules (issue 11, item 3).

Cross-entropy + nuclear (lam = 0.01), Wishart(rho = 0.5) limit law, softmax(beta = 1) labels,
T = 2 and T = 3, alpha in {0.05, 0.5, 4}.  For each case the SE fixed point ``(m, q, V, test
error)`` is computed with

* plain Monte Carlo (``method='mc'``), ``n_mc = 1e5`` draws, 3 seeds, plain steps (the SE before
  issue 11: the cost reference);
* one-level scrambled-Sobol RQMC (``method='qmc'``), ``n_mc = 1e5`` (98304 points), 3 internal
  scrambling seeds ``qmc_seed``, plain steps;
* the default (``output_rule='auto'``: two-level QMC, ``n_mc/16`` nodes then ``n_mc``, with Anderson
  acceleration, preconditioned on the full level) at ``n_mc = 4e5`` with 4 internal seeds and at
  ``8e5`` (another accuracy setting; ``--budgets``, ``--qmc-seeds``);
* the default at ``n_mc = 4e5`` with the opt-in target ``precision=1e-4`` (``--precision``; the rule
  grows until the fixed point's error estimate is below it), with the same internal seeds;

and the per-step cost of each rule: wall time per SE step (``history['time']``) and, measured
separately at the fixed point, wall and CPU time of one warm-started output-side evaluation
(``se_conjugates``) -- the part that depends on the rule.  The target: fixed-point ``m, q, V`` and
test error reproducible to 1e-4 (absolute) across seeds and accuracy settings at no more cost than
1e5 Monte Carlo draws.

The SE is run through :func:`amp_attention.state_evolution` with its ``OutputSample`` replaced by
one of the chosen rule (monkeypatched here only).

Run: ``python benchmarks/se_output_side.py [--quick] [--threads N]``; prints tables and writes
``benchmarks/results/se_output_side.json`` (``--from-json PATH`` re-prints the tables of a saved run).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import numpy as np  # noqa: E402

import amp_attention as aa  # noqa: E402
import amp_attention.se as se_module  # noqa: E402
from amp_attention.output_sample import OutputSample  # noqa: E402

LAW = aa.SpectralLaw.wishart(0.5)
LAM = 0.01
CHANNEL = aa.SoftmaxChannel(1.0)
TARGET = 1e-4


def run_se(T, alpha, method, n_mc, seed=0, qmc_seed=0, precision=None):
    """SE fixed point with the given output rule; returns a dict of results.  ``method='auto'`` is
    the package default (two-level QMC with Anderson acceleration; ``precision``: its opt-in target
    for the fixed point's error estimate); the other rules run one level with plain steps
    (``acceleration=None``), as the SE did before both existed."""
    original = se_module.OutputSample

    def factory(*args, **kw):  # every sample the SE makes, with this run's internal QMC seed
        if method != "auto":
            kw["method"] = method
        return OutputSample(*args, **dict(kw, qmc_seed=qmc_seed))

    se_module.OutputSample = factory
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        r = aa.state_evolution(alpha, T, LAW, CHANNEL, "cross_entropy", "nuclear", LAM, n_mc=n_mc, seed=seed,
                               max_iter=3000, tol=1e-10, output_rule="auto" if method == "auto" else method,
                               acceleration="anderson" if method == "auto" else None, precision=precision)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        se_module.OutputSample = original
    return {"T": T, "alpha": alpha, "method": method if precision is None else f"auto p={precision:g}", "n_mc": n_mc,
            "n_mc_used": r.params["n_mc_used"], "seed": seed, "qmc_seed": qmc_seed,
            "m": r.m, "q": r.q, "V": r.V, "test_error": r.test_error, "n_iter": r.n_iter,
            "converged": bool(r.converged), "wall": wall, "cpu": cpu,
            "step_wall_median": float(np.median(r.history["time"])) if r.n_iter else float("nan")}


def step_cost(T, alpha, m, q, V, rules, repeats=5):
    """Wall and CPU time of one warm-started se_conjugates call at (m, q, V), per rule
    (interleaved round-robin, median over repeats)."""
    loss = aa.make_loss("cross_entropy", 1.0)
    samples = {}
    for name, (method, n_mc) in rules.items():
        s = OutputSample(alpha, T, LAW.Q, CHANNEL, n_mc=n_mc, seed=0, method=method)
        loss.se_conjugates(s, m, q, V)          # nodes, labels, compilation, warm start
        samples[name] = s
    walls = {k: [] for k in rules}
    cpus = {k: [] for k in rules}
    errs = {}
    for _ in range(repeats):
        for name, s in samples.items():
            c0, t0 = time.process_time(), time.perf_counter()
            c = loss.se_conjugates(s, m, q, V)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
            errs[name] = c.stderr
    nodes = {name: (s.view(loss).N if s.method != "mc" else s.n_mc) for name, s in samples.items()}
    return {name: {"wall": float(np.median(walls[name])), "cpu": float(np.median(cpus[name])),
                   "nodes": int(nodes[name]), "stderr": errs[name]} for name in rules}


def summarise(rows):
    """Per (T, alpha, rule): mean fixed point, spread (max - min) of m, q, V, test error over the
    runs, and the largest deviation of any run from the mean of the finest QMC runs."""
    out = []
    keys = ("m", "q", "V", "test_error")
    groups = {}
    for r in rows:
        groups.setdefault((r["T"], r["alpha"], r["method"], r["n_mc"]), []).append(r)
    finest = max(x["n_mc"] for x in rows if x["method"] == "auto")
    for (T, alpha, method, n_mc), rs in groups.items():
        ref = [r for r in rows if r["T"] == T and r["alpha"] == alpha and r["method"] == "auto" and r["n_mc"] == finest]
        refv = {k: float(np.mean([r[k] for r in ref])) for k in keys}
        row = {"T": T, "alpha": alpha, "rule": f"{method} n_mc={n_mc}", "runs": len(rs),
               "steps": float(np.mean([r["n_iter"] for r in rs])),
               "cpu": float(np.mean([r["cpu"] for r in rs])),
               "step_ms": 1e3 * float(np.median([r["step_wall_median"] for r in rs]))}
        for k in keys:
            row[k] = float(np.mean([r[k] for r in rs]))
            row["spread_" + k] = float(np.ptp([r[k] for r in rs]))
            row["dev_" + k] = float(max(abs(r[k] - refv[k]) for r in rs))
        row["spread_V_rel"] = row["spread_V"] / abs(row["V"])
        row["worst"] = max(max(row["spread_" + k], row["dev_" + k]) for k in keys)
        out.append(row)
    return out


def report(rows, costs):
    summary = summarise(rows)
    print()
    _common.print_table(summary, [("T", "T", "d"), ("alpha", "alpha", "g"), ("rule", "rule", "s"),
                                  ("runs", "runs", "d"), ("m", "m", ".6f"), ("q", "q", ".6f"), ("V", "V", ".5f"),
                                  ("test_error", "test err", ".4e"),
                                  ("spread_m", "spr m", ".1e"), ("spread_q", "spr q", ".1e"),
                                  ("spread_V", "spr V", ".1e"), ("spread_V_rel", "spr V/V", ".1e"),
                                  ("spread_test_error", "spr te", ".1e"),
                                  ("worst", "max spr/dev", ".1e"), ("steps", "steps", ".0f"),
                                  ("cpu", "cpu s/run", ".2f"),
                                  ("step_ms", "ms/step", ".0f")])
    print("spr = max - min over the runs of the row; max spr/dev = largest spread, or deviation from the "
          "mean of the finest default ('auto') runs, over m, q, V and the test error; cpu s/run = CPU time "
          "of a whole SE run (the cost to compare with 'mc n_mc=100000')")
    print()
    _common.print_table(costs, [("T", "T", "d"), ("alpha", "alpha", "g"), ("rule", "rule", "s"),
                                ("nodes", "nodes", "d"), ("wall", "wall s/eval", ".3f"), ("cpu", "cpu s/eval", ".3f")])
    print()
    for s in summary:
        if s["rule"].startswith(("qmc", "auto")):  # (also 'auto p=...', the precision target)
            bad = [k for k in ("m", "q", "V", "test_error") if max(s["spread_" + k], s["dev_" + k]) > TARGET]
            print(f"T={s['T']} alpha={s['alpha']:<5} {s['rule']:18s} target {TARGET:g}: "
                  f"{'met' if not bad else 'NOT met for ' + ', '.join(bad)} (worst {s['worst']:.1e})")
    return summary


def main(argv=None):
    parser = _common.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--from-json", default=None, help="re-print the tables of a saved run and exit")
    parser.add_argument("--budgets", default="400000,800000",
                        help="n_mc of the default rule: the first with --qmc-seeds internal seeds, the others "
                             "once (other accuracy settings; the last is the reference of the deviations)")
    parser.add_argument("--qmc-seeds", type=int, default=4, help="internal seeds of the first budget")
    parser.add_argument("--precision", type=float, default=1e-4,
                        help="also run the first budget with this precision target, --qmc-seeds times (0: skip)")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        report(saved["rows"], saved["costs"])
        return
    Ts = (2,) if args.quick else (2, 3)
    alphas = (0.5,) if args.quick else (0.05, 0.5, 4.0)
    n_seeds = 2 if args.quick else 3
    budgets = [int(float(b)) for b in args.budgets.split(",")]
    n_qmc_seeds = 2 if args.quick else args.qmc_seeds
    aa.state_evolution(0.5, 2, LAW, CHANNEL, "cross_entropy", "nuclear", LAM, max_iter=2, n_mc=1000)  # compile
    rows, costs = [], []
    for T in Ts:
        for alpha in alphas:
            configs = [("mc", 100_000, s, 0) for s in range(n_seeds)]
            configs += [("qmc", 100_000, 0, s) for s in range(n_seeds)]
            configs += [("auto", budgets[0], 0, s) for s in range(n_qmc_seeds)]
            configs += [("auto", b, 0, 0) for b in budgets[1:]]
            if args.precision > 0:
                configs += [("precision", budgets[0], 0, s) for s in range(n_qmc_seeds)]
            for method, n_mc, seed, qseed in configs:
                if method == "precision":
                    r = run_se(T, alpha, "auto", n_mc, seed=seed, qmc_seed=qseed, precision=args.precision)
                else:
                    r = run_se(T, alpha, method, n_mc, seed=seed, qmc_seed=qseed)
                rows.append(r)
                print(f"T={T} alpha={alpha:<5} {method:13s} n_mc={n_mc:<7d} seed={seed} qmc_seed={qseed} "
                      f"m={r['m']:.7f} q={r['q']:.7f} V={r['V']:.7f} te={r['test_error']:.4e} "
                      f"steps={r['n_iter']} conv={r['converged']} {r['wall']:.1f}s", flush=True)
            fp = [r for r in rows if r["T"] == T and r["alpha"] == alpha and r["method"] == "qmc"][0]
            rules = {"mc 1e5": ("mc", 100_000), "qmc 1e5": ("qmc", 100_000), "qmc 4e5": ("qmc", 400_000)}
            if T == 2:
                rules["gh 1e5"] = ("gauss_hermite", 100_000)
            c = step_cost(T, alpha, fp["m"], fp["q"], fp["V"], rules, repeats=args.repeats or 5)
            for name, v in c.items():
                costs.append({"T": T, "alpha": alpha, "rule": name, **v})
    summary = report(rows, costs)
    print(f"wrote {_common.write_json('se_output_side', {'rows': rows, 'summary': summary, 'costs': costs}, args.out)}")


if __name__ == "__main__":
    main()
