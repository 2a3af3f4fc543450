"""Small helpers shared by the benchmark scripts (docs/theory.md §10).

Scripts run as ``python benchmarks/<name>.py``; this module is imported as ``_common`` (the
script's folder is ``sys.path[0]``).  Helpers:

- :func:`make_parser`: argparse with ``--quick``, ``--out``, ``--repeats`` and ``--threads``
  (the latter is applied from ``sys.argv`` at import time, so import this module before numpy);
- :func:`timeit`: one warm-up call (triggers Numba compilation / BLAS thread start-up), then
  ``repeats`` timed calls with ``time.perf_counter`` (or ``time.process_time``, ``--clock cpu``);
  returns best and median;
  :func:`time_interleaved` does the same for several callables, round-robin;
- :func:`peak_rss`: peak resident-memory increase during one call (kernel high-water mark, so
  Numba allocations, which ``tracemalloc`` cannot see, are counted too); falls back to
  ``tracemalloc`` where ``/proc`` is unavailable;
- :func:`print_table`, :func:`write_json` (default ``benchmarks/results/<name>.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path


def _apply_thread_flag(argv) -> None:
    """``--threads N`` must act before NumPy / Numba start their thread pools, so it is read from
    ``sys.argv`` when this module is imported (import it before numpy)."""
    for i, a in enumerate(argv):
        v = a.split("=", 1)[1] if a.startswith("--threads=") else (argv[i + 1] if a == "--threads" and i + 1 < len(argv) else None)
        if v is not None:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
                os.environ[var] = v


_apply_thread_flag(sys.argv[1:])

import numpy as np  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small configuration (seconds, not minutes)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path (default benchmarks/results/<name>.json)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads (default: all cores)")
    p.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (user+sys of this process; use with "
        "--threads 1 on a shared, loaded machine - it does not count time spent waiting for a core)",
    )
    return p


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timeit(fn, repeats: int = 5, warmup: int = 1, clock: str = "wall") -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones (seconds)."""
    timer = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = timer()
        fn()
        times.append(timer() - t0)
    return {"best": min(times), "median": statistics.median(times), "times": times}


def time_interleaved(fns: dict, repeats: int = 5, warmup: int = 1, clock: str = "wall") -> dict:
    """Like :func:`timeit` for several callables, timed round-robin so that ratios between them
    are measured under the same machine conditions.  Returns ``{name: {best, median, times}}``."""
    timer = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t0 = timer()
            fn()
            times[k].append(timer() - t0)
    return {k: {"best": min(v), "median": statistics.median(v), "times": v} for k, v in times.items()}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc
        pass


def peak_rss(fn) -> int:
    """Peak increase of resident memory (bytes) during one call ``fn()``, return value included.

    Linux: free heap memory is returned to the OS (``malloc_trim``), the kernel's high-water mark
    is reset (``/proc/self/clear_refs``), and ``VmHWM - VmRSS(before)`` is read after the call.
    This counts every allocation (NumPy, BLAS, Numba's NRT).  Elsewhere: ``tracemalloc`` peak
    (NumPy allocations only).  Call it outside timed regions.
    """
    gc.collect()
    try:
        _malloc_trim()
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn()
        peak = _status_bytes("VmHWM") - base
        del out
        return max(0, peak)
    except (OSError, KeyError):  # pragma: no cover - non-Linux fallback
        tracemalloc.start()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del out
        return peak


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (``getrusage``; kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(b) < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], file=sys.stdout) -> None:
    """``columns`` = [(key, header, format)]; missing / None values print as ``-``."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, f in columns:
            v = r.get(key)
            line.append("-" if v is None else (f(v) if callable(f) else format(v, f)))
        cells.append(line)
    widths = [max(len(c[j]) for c in cells) for j in range(len(columns))]
    for i, c in enumerate(cells):
        print("  ".join(s.rjust(w) for s, w in zip(c, widths)), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)
    file.flush()


def environment() -> dict:
    import numba

    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        from threadpoolctl import threadpool_info

        env["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()]
    except ImportError:
        pass
    return env


def write_json(name: str, payload: dict, out: Path | None = None) -> Path:
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
