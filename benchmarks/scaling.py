"""One ERM-AMP iteration at scale: speed over the floor by import order and dtype, peak memory over
the token array, and the first run after install (docs/theory.md §10).

Every row runs in a fresh Python process (so that the import order, the thread pools and the peak
resident memory are those of a user's script), cross-entropy + nuclear, ``lam = 0.05``:

- ``t_iter``: median time of one ``ERMAttention`` iteration (iterations 2..k, kernels compiled by a
  warm-up on a tiny problem first);
- ``t_floor``: two float64 GEMMs ``(nT x d)(d x d)``, ``(d x nT)(nT x d)`` + one ``eigh(d)`` with
  the default (all-core) BLAS threads, measured in the same process; ``ratio = t_iter / t_floor``;
- ``peak / X``: peak resident memory of ``sample_data`` + ``ERMAttention.fit`` above the
  process's resident memory before the data were drawn, over the bytes of X (in the row's dtype);
- ``order``: ``numpy first`` (``import numpy`` then ``import amp_attention``, what users do) or
  ``package first``;
- the ``first run`` row: ``amp-attention run`` with an empty Numba cache (wall time of the whole
  command, and the compile time it reports).

Run: ``python benchmarks/scaling.py [--quick] [--big] [--readme]``.  ``--big`` adds d = 500
(float64) and d = 1000, T = 2, alpha = 0.5 in float32 (n = 500,000; X = 4 GB; ~minutes per
iteration on 2 cores).  ``--readme`` rewrites the table between the ``benchmark:scaling`` markers
of README.md.  Writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CHILD = r"""
import json, resource, sys, time
order, d, T, alpha, dtype, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
if order == "numpy first":
    import numpy as np
    import amp_attention as aa
else:
    import amp_attention as aa
    import numpy as np
import warnings
warnings.simplefilter("ignore")
from amp_attention.benchmarking import floor_time


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024


rng = np.random.default_rng(0)
tiny = aa.sample_data(64, T, aa.Teacher.wishart(8, 0.5, rng), aa.SoftmaxChannel(1.0), rng)
est = aa.ERMAttention(lam=0.05, max_iter=2, tol=0.0, dtype=dtype)
est.fit(tiny.X, tiny.y)
op = aa.SensingOperator(tiny.X.astype(dtype))
op.backproject(tiny.y, method="syrk"); op.backproject(tiny.y, method="gemm")
n = int(round(alpha * d * d))
fl = floor_time(n, T, d, repeats=3) if n * T * d * 8 * 3 < 6e9 else {"t_floor": float("nan")}
import gc, ctypes
gc.collect()
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
data = aa.sample_data(n, T, aa.Teacher.wishart(d, 0.5, rng), aa.SoftmaxChannel(1.0), rng, dtype=dtype)
t_data = time.perf_counter() - t0
est = aa.ERMAttention(lam=0.05, max_iter=iters, tol=0.0, dtype=dtype).fit(data.X, data.y)
peak = status("VmHWM") - base
t_iter = float(np.median(est.history_["time"][1:])) if iters > 1 else float(est.history_["time"][0])
print(json.dumps({"order": order, "d": d, "T": T, "alpha": alpha, "n": n, "dtype": dtype, "t_iter": t_iter,
                  "t_floor": fl["t_floor"], "ratio": t_iter / fl["t_floor"], "X_bytes": data.X.nbytes,
                  "peak_bytes": peak, "peak_over_X": peak / data.X.nbytes, "t_data": t_data}))
"""


def run_row(order, d, T, alpha, dtype, iters):
    out = subprocess.run([sys.executable, "-c", CHILD, order, str(d), str(T), str(alpha), dtype, str(iters)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {order}, d={d}, T={T}, {dtype}: {row['t_iter']:.3f} s/iter, ratio {row['ratio']:.2f}, "
          f"peak {row['peak_over_X']:.2f} x X", file=sys.stderr, flush=True)
    return row


def first_run():
    """``amp-attention run`` (defaults) with an empty Numba cache: wall time and reported compile time."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "amp_attention.cli", "run"], capture_output=True, text=True,
                             env=env)
        wall = time.perf_counter() - t0
    m = re.search(r"in ([0-9.]+) s \(not in the s/iter", out.stderr)
    it = re.findall(r"iteration \d+: .* ([0-9.]+) s$", out.stderr, flags=re.M)
    return {"wall_s": wall, "compile_s": float(m.group(1)) if m else float("nan"),
            "iterations": len(it), "t_iter_s": float(it[1]) if len(it) > 1 else float("nan"),
            "returncode": out.returncode}


def markdown(rows, fr):
    lines = ["| d | T | alpha | n | dtype | import order | s / iteration | floor s | iteration / floor | peak RSS / X |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{r['t_floor']:.3f}" if r["t_floor"] == r["t_floor"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] == r["ratio"] else "-"
        lines.append(f"| {r['d']} | {r['T']} | {r['alpha']:g} | {r['n']:,} | {r['dtype']} | {r['order']} | "
                     f"{r['t_iter']:.3f} | {floor} | {ratio} | {r['peak_over_X']:.2f} ({_common.fmt_bytes(r['peak_bytes'])}) |")
    if fr:
        lines.append("")
        lines.append(f"First `amp-attention run` with an empty Numba cache: {fr['wall_s']:.1f} s in all, of which "
                     f"{fr['compile_s']:.1f} s compiling kernels; then {fr['t_iter_s']:.3f} s per iteration.")
    return "\n".join(lines)


def main(argv=None):
    p = _common.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--big", action="store_true", help="add d = 500 (float64) and d = 1000 (float32, T = 2)")
    p.add_argument("--readme", action="store_true", help="rewrite the README's scaling table")
    p.add_argument("--no-first-run", action="store_true", help="skip the cold-cache first-run row")
    args = p.parse_args(argv)
    iters = 3 if args.quick else 4
    grid = [("numpy first", 200, 3, 0.5, "float64"), ("package first", 200, 3, 0.5, "float64"),
            ("numpy first", 200, 3, 0.5, "float32"), ("numpy first", 300, 3, 0.5, "float64"),
            ("numpy first", 300, 3, 0.5, "float32")]
    if args.quick:
        grid = [("numpy first", 100, 3, 0.5, "float64"), ("package first", 100, 3, 0.5, "float64"),
                ("numpy first", 100, 3, 0.5, "float32")]
    if args.big:
        grid += [("numpy first", 500, 3, 0.5, "float64"), ("numpy first", 1000, 2, 0.5, "float32")]
    rows = [run_row(*g, iters if g[1] < 1000 else 2) for g in grid]
    fr = None if args.no_first_run else first_run()
    table = markdown(rows, fr)
    print(table)
    path = _common.write_json("scaling", {"rows": rows, "first_run": fr}, args.out)
    print(f"\nwrote {path}")
    if args.readme:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        text = readme.read_text()
        new = re.sub(r"(<!-- benchmark:scaling -->\n).*?(\n<!-- /benchmark:scaling -->)",
                     lambda m: m.group(1) + table + m.group(2), text, flags=re.S)
        readme.write_text(new)
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
