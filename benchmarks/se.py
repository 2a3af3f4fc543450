"""State-evolution speed (issue targets: square-loss fixed point < 1 s, cross-entropy < 30 s,
a 30-point alpha curve < 2 min on 2 cores).

Run: ``python benchmarks/se.py [--quick] [--threads N]``; prints a table and writes
``benchmarks/results/se.json``.  The curve warm-starts each alpha from the previous fixed point
(``state_evolution(init=...)``), as ``amp-attention se`` does.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import numpy as np  # noqa: E402

import amp_attention as aa  # noqa: E402


def fixed_point(loss, channel, T=2, alpha=0.3, reg="nuclear", lam=0.05, n_mc=100_000):
    law = aa.SpectralLaw.wishart(0.5)
    aa.state_evolution(alpha, T, law, channel, loss, reg, lam, max_iter=2, n_mc=1000)  # compile
    t0 = time.perf_counter()
    r = aa.state_evolution(alpha, T, law, channel, loss, reg, lam, max_iter=1000, tol=1e-8, n_mc=n_mc)
    return {"what": f"fixed point {loss}+{reg} T={T} alpha={alpha}", "seconds": time.perf_counter() - t0,
            "steps": r.n_iter, "converged": r.converged, "mse": r.mse}


def curve(loss, channel, n_points, T=2, reg="nuclear", lam=0.05, n_mc=100_000):
    law = aa.SpectralLaw.wishart(0.5)
    alphas = np.linspace(0.05, 1.0, n_points)
    t0 = time.perf_counter()
    init, steps, conv = None, 0, 0
    for a in alphas:
        r = aa.state_evolution(float(a), T, law, channel, loss, reg, lam, max_iter=1000, tol=1e-8, n_mc=n_mc,
                               init=init)
        init = (r.m, r.q, r.V) if r.converged else None
        steps += r.n_iter
        conv += r.converged
    return {"what": f"{n_points}-point alpha curve {loss}+{reg} T={T}", "seconds": time.perf_counter() - t0,
            "steps": steps, "converged": f"{conv}/{n_points}", "mse": r.mse}


def main(argv=None):
    args = _common.make_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    n_points = 5 if args.quick else 30
    rows = [
        fixed_point("square", aa.LinearChannel(0.1)),
        fixed_point("cross_entropy", aa.SoftmaxChannel(1.0)),
        fixed_point("cross_entropy", aa.SoftmaxChannel(1.0), T=3),
        curve("square", aa.LinearChannel(0.1), n_points),
        curve("cross_entropy", aa.SoftmaxChannel(1.0), n_points),
    ]
    _common.print_table(rows, [("what", "what", "s"), ("seconds", "seconds", ".2f"), ("steps", "SE steps", "d"),
                               ("converged", "converged", str), ("mse", "final mse", ".4f")])
    print(f"wrote {_common.write_json('se', {'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
