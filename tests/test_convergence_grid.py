"""The convergence grid of issue 11 item 6 (docs/theory.md §5 damping, §8.3), behind ``-m slow``.

The grid itself (points, seeds, the GAMP fit with default settings, the ``direct_erm`` references,
the flags) is written once, in ``benchmarks/convergence_grid.py``; this test imports it and asserts:

* nothing raised and nothing failed silently: an unconverged point has ``converged_ = False``, a
  message and a finite ``S_`` / ``V_``;
* at least 99% of the points converge (tol 1e-8, ``max_iter`` 2000, adaptive damping);
* every converged point with a convex loss equals a converged ``direct_erm`` minimiser (L-BFGS, or
  FISTA when L-BFGS did not converge or disagrees) to 1e-5 relative Frobenius norm;
* every converged softmax-square point (non-convex, included when the loss exists) is stationary:
  relative KKT residual <= 1e-6.

Cost and the default subset.  The full grid has 2560 points (1920 convex: d {60, 100} x T {2, 3} x
alpha (5) x lam (4) x reg (2) x teacher (4) x 3 convex (loss, channel) pairs, plus 640 softmax-square
points).  Measured on 2 shared, loaded cores with one thread: 0.1-1 s per point at d = 60,
alpha = 0.1; 6-27 s per point at d = 100, T = 3, alpha = 1 (mostly L-BFGS, up to 25 s for
cross-entropy + nuclear at lam = 1e-4); 3-9 s for slowly converging, heavily damped points at
alpha = 0.05 (1000-2000 GAMP iterations, plus the FISTA tie-breaker when flagged).  A random sample
of 6 points averaged ~4.5 s per point, so the full grid takes about 3 h (estimate 2-5 h) on one
thread, roughly half with ``AA_CONVERGENCE_GRID_JOBS=2`` on two idle cores.  By default the test
therefore runs a deterministic random subset of 256 points (10%, spanning every axis; ~20 min).

Environment:

* ``AA_CONVERGENCE_GRID``: ``full`` for the whole grid, or a number of points (default 256);
* ``AA_CONVERGENCE_GRID_JOBS``: worker processes (default 1);
* ``AA_CONVERGENCE_GRID_OUT``: a JSON path to keep the per-point results (default: not kept).

The same run from the command line: ``python benchmarks/convergence_grid.py --threads 1
--max-points 256`` (or no ``--max-points`` for the full grid).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import convergence_grid as cg  # noqa: E402

DEFAULT_POINTS = 256


def _selection():
    raw = os.environ.get("AA_CONVERGENCE_GRID", str(DEFAULT_POINTS)).strip().lower()
    return None if raw == "full" else int(raw)


@pytest.mark.slow
def test_convergence_grid():
    points = cg.make_grid()  # the grid, softmax-square included if the loss exists
    n_convex = 2 * 2 * 5 * 4 * 2 * 4 * len(cg.ALL_PAIRS)
    assert sum(p.loss in cg.CONVEX_LOSSES for p in points) == n_convex
    assert len(points) == n_convex + (n_convex // len(cg.ALL_PAIRS) if cg.softmax_square_available() else 0)
    points = cg.subsample(points, _selection(), seed=0)
    jobs = int(os.environ.get("AA_CONVERGENCE_GRID_JOBS", "1"))

    rows = cg.run_grid(points, jobs=jobs)

    report = io.StringIO()
    summary = cg.print_summary(rows, file=report)
    out = os.environ.get("AA_CONVERGENCE_GRID_OUT")
    if out:
        cg._common.write_json("convergence_grid", {"summary": summary, "rows": rows}, Path(out))
    report = report.getvalue()

    assert len(rows) == len(points)
    errors = [(cg._label(r), r["error"]) for r in rows if r.get("error")]
    assert not errors, f"points raised:\n{errors}\n{report}"
    silent = [cg._label(r) for r in rows if cg._silent(r)]
    assert not silent, f"unflagged failures (no message or non-finite S/V):\n{silent}\n{report}"
    for r in rows:
        if not r["converged"]:
            assert r["message"] and r["flagged"], cg._label(r)
        assert r["S_finite"] and r["V_finite"], cg._label(r)

    assert summary["converged_fraction"] >= 0.99, report
    mismatched = [(cg._label(r), r["reason"]) for r in rows if r["convex"] and r["converged"] and not r["match"]]
    assert not mismatched, f"converged but not the direct_erm minimiser to {cg.MATCH_TOL:g}:\n{mismatched}\n{report}"
    nonstationary = [(cg._label(r), r["kkt_amp"]) for r in rows
                     if not r["convex"] and r["converged"] and not r["stationary"]]
    assert not nonstationary, f"converged softmax-square points that are not stationary:\n{nonstationary}\n{report}"
