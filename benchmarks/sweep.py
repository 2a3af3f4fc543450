"""Sweep executors: a 32-point cross-entropy SE sweep (4 chains of 8 alpha), serial vs ``--jobs 2`` vs a Dask
``LocalCluster(2)``.

Run: ``python benchmarks/sweep.py [--quick] [--jobs 2]``; prints a table and writes
``benchmarks/results/sweep.json``.  Wall times include starting the worker processes (and their
first-call Numba compilation, which the serial run pays in a warm-up outside the timing, since an
interactive session pays it once); ``start-up`` is the cluster start alone.  "warm" rows reuse a
pool / cluster whose workers have already run (and compiled) a few points.  Every parallel
frame is checked equal to the serial one (bit for bit, except wall time).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import pandas as pd  # noqa: E402

from amp_attention.sweep import sweep  # noqa: E402


def main(argv=None):
    p = _common.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    args = p.parse_args(argv)
    n_mc = 20_000 if args.quick else 100_000
    grid = {"alpha": [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8], "lam": [0.01, 0.03, 0.1, 0.3],
            "T": [2], "loss": ["cross_entropy"], "channel": ["softmax"], "n_mc": [n_mc], "max_iter": [300]}
    sweep("se", {**grid, "alpha": [0.1], "lam": [0.1], "max_iter": [3]}, progress=False)  # compile

    rows, frames = [], {}

    def run(name, executor, startup=0.0, **kw):
        t0 = time.perf_counter()
        df = sweep("se", grid, executor=executor, progress=False, **kw)
        wall = time.perf_counter() - t0
        frames[name] = df
        rows.append({"executor": name, "points": len(df), "startup_s": startup, "wall_s": wall + startup,
                     "compute_s": float(df["wall_time"].sum())})
        print(f"  {name}: {wall + startup:.2f} s", file=sys.stderr, flush=True)

    warm = {**grid, "alpha": [0.1], "lam": [0.1, 0.2, 0.3, 0.4], "max_iter": [3]}  # one chain per worker+
    run("serial", None)
    run(f"processes({args.jobs}), cold", args.jobs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        sweep("se", warm, executor=pool, progress=False)  # start the workers, compile
        run(f"processes({args.jobs}), warm", pool)
    from dask.distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with LocalCluster(n_workers=args.jobs, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(args.jobs)
        startup = time.perf_counter() - t0
        run(f"dask LocalCluster({args.jobs}), cold", client, startup=startup)
        run(f"dask LocalCluster({args.jobs}), warm", client)
    serial = rows[0]["wall_s"]
    for r in rows:
        r["speedup"] = serial / r["wall_s"]
    ref = frames["serial"].drop(columns=["wall_time"])
    for name, df in frames.items():
        pd.testing.assert_frame_equal(ref, df.drop(columns=["wall_time"]), check_exact=True)
    _common.print_table(rows, [("executor", "executor", "s"), ("points", "points", "d"),
                               ("startup_s", "start-up s", ".2f"), ("wall_s", "wall s", ".2f"),
                               ("compute_s", "sum of point times s", ".2f"), ("speedup", "speed-up", ".2f")])
    print("all frames equal the serial one bit for bit (wall time excluded)")
    path = _common.write_json("sweep", {"grid": grid, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
