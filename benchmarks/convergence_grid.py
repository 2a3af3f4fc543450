"""Convergence grid of ERM-GAMP with default settings against ``direct_erm`` (issue 11 item 6;
docs/theory.md §5 damping, §8.3).

Grid (defaults): d in {60, 100}, T in {2, 3}, alpha in {0.05, 0.1, 0.25, 0.5, 1} (n = alpha d^2),
lam in {1e-4, 1e-3, 1e-2, 1e-1}, regularisers {nuclear, frobenius}, teachers Wishart
rho in {0.2, 0.5, 1} and power law gamma = 1, and the (loss, channel) pairs

* ``cross_entropy`` on clean ``SoftmaxChannel(1.0)`` targets (the natural pair),
* ``square`` on ``LinearChannel(0.1)`` targets (the natural pair),
* ``square`` on clean softmax targets,
* ``softmax_square`` on clean softmax targets, only if ``aa.make_loss('softmax_square')`` works.

Why these pairs and not "all loss x channel": cross-entropy needs row-stochastic targets
(``direct_erm`` and the loss reject linear-channel targets), so cross-entropy on the linear channel
is not a valid problem.  Square loss on softmax targets is a valid, strongly convex (Frobenius) /
convex (nuclear) ERM problem, and convergence is a property of the solver on whatever data it is
given: docs/theory.md §8.4 restricts the *SE accuracy* bound to the natural pairs, not convergence.
So every valid convex pair is run (``--pairs natural`` drops square-on-softmax).  The softmax-square
loss is non-convex: its points report convergence and stationarity (relative KKT residual) only,
no ``direct_erm`` (which would need its multi-start and would not define a unique minimiser).

Per point (seed derived from the point, see :func:`data_seed`; the teacher depends on (d, teacher),
the data on (d, T, alpha, teacher, channel), so all losses / regularisers / lam share one data set):
``ERMAttention(loss, reg, lam, beta=1, max_iter=--max-iter, tol=1e-8)`` with the default (adaptive)
damping, timed around ``fit``; for convex losses ``direct_erm(..., method='lbfgs')`` (default tol
1e-10, S to ~1e-8), timed.  If L-BFGS did not converge or disagrees with GAMP beyond ``--match-tol``,
FISTA (``method='prox'``, which reaches exact zeros of the nuclear prox) is run as a second,
untimed reference, and the point matches if GAMP is within ``--match-tol`` of a converged reference.
Recorded: converged, diverged, n_iter, message, warnings, max damping, relative Frobenius distance
``||S_amp - S_ref||_F / ||S_ref||_F``, relative objective gap, relative KKT residuals (docs/theory.md
§4; relative to the gradient scale at S = 0, as ``direct_erm``'s ``tol``), wall times (GAMP: timer
around fit and the sum of ``history_['time']``; L-BFGS: timer), their ratio.

A point is *flagged* if GAMP did not converge (it must then say so: ``converged_ = False`` and a
message, finite ``S_``), if a convex point disagrees with every converged reference, if a
softmax-square point is not stationary to ``--stationarity-tol``, or if anything raised.

Run: ``python benchmarks/convergence_grid.py [--quick] [--threads 1] [--jobs N] [--max-points N]
[--d 60,100 --T 2,3 --alpha ... --lam ...]``; prints a summary, the flagged points, and writes
``benchmarks/results/convergence_grid.json`` (rewritten every ``--checkpoint`` points).
``--quick``: d = 60, T = 2, alpha = 0.1, lam = 0.01, Wishart rho = 0.5 (the issue's reproducer),
every (loss, reg, channel) combination.  The slow test ``tests/test_convergence_grid.py`` imports
:func:`make_grid`, :func:`run_grid` and :func:`summarize` from here.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (applies --threads before numpy starts)
import numpy as np  # noqa: E402

import amp_attention as aa  # noqa: E402

GRID = {
    "d": (60, 100),
    "T": (2, 3),
    "alpha": (0.05, 0.1, 0.25, 0.5, 1.0),
    "lam": (1e-4, 1e-3, 1e-2, 1e-1),
    "reg": ("nuclear", "frobenius"),
    "teacher": ("wishart:0.2", "wishart:0.5", "wishart:1", "powerlaw:1"),
}
QUICK = {"d": (60,), "T": (2,), "alpha": (0.1,), "lam": (1e-2,), "reg": ("nuclear", "frobenius"),
         "teacher": ("wishart:0.5",)}
#: (loss, channel) pairs; see the module docstring for the choice.
NATURAL_PAIRS = (("cross_entropy", "softmax"), ("square", "linear"))
ALL_PAIRS = NATURAL_PAIRS + (("square", "softmax"),)
NONCONVEX_PAIRS = (("softmax_square", "softmax"),)
CONVEX_LOSSES = ("square", "cross_entropy")

MAX_ITER = 2000
TOL = 1e-8
MATCH_TOL = 1e-5
STATIONARITY_TOL = 1e-6
LINEAR_NOISE = 0.1
BETA = 1.0


@dataclass(frozen=True)
class Point:
    d: int
    T: int
    alpha: float
    lam: float
    loss: str
    reg: str
    teacher: str  # "wishart:<rho>" or "powerlaw:<gamma>"
    channel: str  # "softmax" (clean, beta = 1) or "linear" (noise LINEAR_NOISE)

    @property
    def n(self) -> int:
        return int(round(self.alpha * self.d * self.d))

    @property
    def data_key(self) -> tuple:
        return (self.d, self.T, self.alpha, self.teacher, self.channel)

    def label(self) -> str:
        return (f"d={self.d} T={self.T} alpha={self.alpha:g} lam={self.lam:g} {self.loss}+{self.reg} "
                f"{self.teacher} {self.channel}")


def softmax_square_available() -> bool:
    """True if the softmax-square loss is present in this build (it is being added concurrently)."""
    try:
        aa.make_loss("softmax_square")
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False
    return True


def make_grid(d=GRID["d"], T=GRID["T"], alpha=GRID["alpha"], lam=GRID["lam"], reg=GRID["reg"],
              teacher=GRID["teacher"], pairs="all", nonconvex="auto") -> list[Point]:
    """The grid as a list of points, ordered so that points sharing a data set are contiguous.

    ``pairs``: ``'all'`` (every valid convex (loss, channel) pair) or ``'natural'``, or an explicit
    tuple of ``(loss, channel)``.  ``nonconvex``: ``'auto'`` (add softmax-square on softmax targets
    if available), True or False.
    """
    if isinstance(pairs, str):
        pairs = {"all": ALL_PAIRS, "natural": NATURAL_PAIRS}[pairs]
    pairs = tuple(pairs)
    if nonconvex == "auto":
        nonconvex = softmax_square_available()
    if nonconvex:
        pairs = pairs + tuple(p for p in NONCONVEX_PAIRS if p not in pairs)
    channels = tuple(dict.fromkeys(c for _, c in pairs))
    pts = []
    for d_ in d:
        for T_ in T:
            for a in alpha:
                for te in teacher:
                    for ch in channels:
                        for loss, ch2 in pairs:
                            if ch2 != ch:
                                continue
                            for r in reg:
                                for lm in lam:
                                    pts.append(Point(int(d_), int(T_), float(a), float(lm), loss, r, te, ch))
    return pts


def subsample(points: list[Point], k: int | None, seed: int = 0) -> list[Point]:
    """A deterministic random subset of ``k`` points, kept in grid order (covers every axis)."""
    if k is None or k >= len(points):
        return list(points)
    idx = np.sort(np.random.default_rng(seed).choice(len(points), size=k, replace=False))
    return [points[i] for i in idx]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _seed(*parts, base: int = 0) -> np.random.SeedSequence:
    """A seed from the printable parts (crc32 of their repr: stable across runs and platforms)."""
    return np.random.SeedSequence([int(base), zlib.crc32(repr(tuple(parts)).encode())])


def data_seed(p: Point, base: int = 0) -> int:
    """The integer seed of ``p``'s data set (reported per point; reproduces the data)."""
    return int(_seed("data", *p.data_key, base=base).generate_state(1)[0])


def make_teacher(d: int, spec: str, base: int = 0) -> aa.Teacher:
    kind, _, param = spec.partition(":")
    rng = np.random.default_rng(_seed("teacher", d, spec, base=base))
    if kind == "wishart":
        return aa.Teacher.wishart(d, float(param or 0.5), rng)
    if kind == "powerlaw":
        return aa.Teacher.powerlaw(d, float(param or 1.0), rng)
    raise ValueError(f"teacher must be 'wishart:<rho>' or 'powerlaw:<gamma>', got {spec!r}")


def make_channel(name: str, linear_noise: float = LINEAR_NOISE):
    if name == "softmax":
        return aa.SoftmaxChannel(BETA)
    if name == "linear":
        return aa.LinearChannel(linear_noise)
    raise ValueError(f"channel must be 'softmax' or 'linear', got {name!r}")


_DATA_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def get_data(p: Point, base: int = 0, linear_noise: float = LINEAR_NOISE):
    """``(teacher, dataset)`` of ``p`` (the last two data sets are cached)."""
    key = p.data_key + (base, linear_noise)
    if key not in _DATA_CACHE:
        teacher = make_teacher(p.d, p.teacher, base)
        rng = np.random.default_rng(data_seed(p, base))
        data = aa.sample_data(p.n, p.T, teacher, make_channel(p.channel, linear_noise), rng)
        _DATA_CACHE[key] = (teacher, data)
        while len(_DATA_CACHE) > 2:
            _DATA_CACHE.popitem(last=False)
    return _DATA_CACHE[key]


# --------------------------------------------------------------------------------------------
# One point
# --------------------------------------------------------------------------------------------


def _rel_dist(S, R) -> float:
    diff = float(np.linalg.norm(S - R))
    if diff == 0.0:
        return 0.0
    ref = float(np.linalg.norm(R))
    return diff / ref if ref > 0 else float("inf")


def _grad_scale(X, y, loss, reg, lam) -> float:
    """The scale of ``direct_erm``'s ``tol``: ``||grad_S L(0)||_F`` (+ ``lam d sqrt d``, nuclear)."""
    d = X.shape[2]
    s = float(np.linalg.norm(aa.erm_gradient(X, y, np.zeros((d, d)), loss, "frobenius", lam, BETA)))
    if reg == "nuclear":
        s += lam * d * np.sqrt(d)
    return max(s, 1e-300)


def _finite(x) -> bool:
    return bool(np.all(np.isfinite(x)))


_WARMED = False


def warm_up() -> None:
    """Compile the Numba kernels of every loss / regulariser once (outside the timings)."""
    global _WARMED
    if _WARMED:
        return
    rng = np.random.default_rng(0)
    teacher = aa.Teacher.wishart(12, 0.5, rng)
    losses = CONVEX_LOSSES + (("softmax_square",) if softmax_square_available() else ())
    for T in (2, 3):
        data = aa.sample_data(60, T, teacher, aa.SoftmaxChannel(BETA), rng)
        for loss in losses:
            for reg in ("nuclear", "frobenius"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    aa.ERMAttention(loss, reg, 0.1, beta=BETA, max_iter=5, tol=0.0).fit(data.X, data.y)
                    if loss in CONVEX_LOSSES:
                        aa.direct_erm(data.X, data.y, loss, reg, 0.1, beta=BETA, max_iter=5, random_state=0)
                        aa.direct_erm(data.X, data.y, loss, reg, 0.1, beta=BETA, method="prox", max_iter=5)
    _WARMED = True


def run_point(p: Point, max_iter: int = MAX_ITER, tol: float = TOL, match_tol: float = MATCH_TOL,
              stationarity_tol: float = STATIONARITY_TOL, base_seed: int = 0,
              linear_noise: float = LINEAR_NOISE, clock: str = "wall") -> dict:
    """Fit GAMP (and, for convex losses, the direct references) at one point; one row of results.

    Never raises: an exception is recorded in ``row['error']`` (and flags the point).  Warnings
    are recorded, not raised: ``row['warnings']`` those of the GAMP fit (e.g. scikit-learn's
    ``ConvergenceWarning``), ``row['other_warnings']`` the rest (references, bookkeeping).
    """
    row = asdict(p)
    row.update(n=p.n, seed=data_seed(p, base_seed), convex=p.loss in CONVEX_LOSSES, error=None, warnings=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _fit_point(p, row, _common.CLOCKS[clock], max_iter, tol, match_tol, stationarity_tol, base_seed,
                       linear_noise, caught)
        except Exception as exc:  # noqa: BLE001 - a crash is a result of the grid, reported as such
            row.update(error=f"{type(exc).__name__}: {exc}", converged=False)
    msgs = [f"{w.category.__name__}: {w.message}" for w in caught]
    row["other_warnings"] = sorted(set(msgs) - set(row["warnings"]))
    row["flagged"], row["reason"] = _flag(row)
    return row


def _fit_point(p, row, timer, max_iter, tol, match_tol, stationarity_tol, base_seed, linear_noise, caught):
    """The body of :func:`run_point`; fills ``row`` in place."""
    teacher, data = get_data(p, base_seed, linear_noise)
    X, y = data.X, data.y
    n_before = len(caught)
    est = aa.ERMAttention(p.loss, p.reg, p.lam, beta=BETA, max_iter=max_iter, tol=tol)
    t0 = timer()
    est.fit(X, y)
    t_amp = timer() - t0
    row["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught[n_before:]]
    damp = np.asarray(est.history_.get("damping", []), dtype=float)
    S = est.S_
    scale = _grad_scale(X, y, p.loss, p.reg, p.lam)
    row.update(
        converged=bool(est.converged_), diverged=bool(est.diverged_), n_iter=int(est.n_iter_),
        message=str(est.message_), max_damping=float(damp.max()) if damp.size else 0.0,
        damped_iters=int(np.count_nonzero(damp)), t_amp=t_amp,
        t_amp_iter=float(np.sum(est.history_.get("time", []))),
        S_finite=_finite(S), V_finite=bool(np.isfinite(est.V_)),
        mse=float(np.sum((S - teacher.S) ** 2) / p.d),
        objective_amp=float(aa.erm_objective(X, y, S, p.loss, p.reg, p.lam, BETA)),
        kkt_amp=float(aa.kkt_residual(X, y, S, p.loss, p.reg, p.lam, BETA)) / scale,
    )
    if not row["convex"]:
        row.update(match=None, stationary=bool(row["kkt_amp"] <= stationarity_tol))
        return
    t0 = timer()
    ref = aa.direct_erm(X, y, p.loss, p.reg, p.lam, beta=BETA, method="lbfgs", random_state=row["seed"])
    t_ref = timer() - t0
    row.update(
        ref_converged=bool(ref.converged), ref_n_iter=int(ref.n_iter), ref_message=str(ref.message),
        t_lbfgs=t_ref, time_ratio=t_amp / t_ref if t_ref > 0 else None,
        rel_dist=_rel_dist(S, ref.S), kkt_lbfgs=float(ref.grad_norm / ref.grad_scale),
        objective_lbfgs=float(ref.objective),
        objective_gap=(row["objective_amp"] - ref.objective) / max(abs(ref.objective), 1e-300),
    )
    dists = [row["rel_dist"]] if ref.converged else []
    if not ref.converged or row["rel_dist"] > match_tol:
        prox = aa.direct_erm(X, y, p.loss, p.reg, p.lam, beta=BETA, method="prox")
        row.update(prox_converged=bool(prox.converged), rel_dist_prox=_rel_dist(S, prox.S),
                   kkt_prox=float(prox.grad_norm / prox.grad_scale), rel_dist_refs=_rel_dist(ref.S, prox.S))
        if prox.converged:
            dists.append(row["rel_dist_prox"])
    row.update(ref_dist=min(dists) if dists else None, stationary=None,
               match=bool(row["converged"] and dists and min(dists) <= match_tol))


def _flag(row) -> tuple[bool, str]:
    if row.get("error"):
        return True, "error: " + row["error"]
    if not row["converged"]:
        return True, "not converged: " + (row.get("message") or "(no message)")
    if row["convex"] and not row.get("match"):
        if row.get("ref_dist") is None:
            return True, "no converged reference: " + row.get("ref_message", "")
        return True, f"mismatch: rel. distance {row['ref_dist']:.2e} to direct_erm"
    if not row["convex"] and not row.get("stationary"):
        return True, f"not stationary: relative KKT residual {row['kkt_amp']:.2e}"
    return False, ""


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def _run_group(args):
    points, kw = args
    warm_up()
    return [run_point(p, **kw) for p in points]


def run_grid(points: list[Point], jobs: int = 1, progress=None, checkpoint=None, **kw) -> list[dict]:
    """Run every point (grouped by data set); ``progress(row, i, total)`` after each point,
    ``checkpoint(rows)`` after each group.  ``jobs > 1``: a spawn-based process pool over the
    groups (give each worker one thread: ``--threads 1``)."""
    groups = OrderedDict()
    for p in points:
        groups.setdefault(p.data_key, []).append(p)
    rows: list[dict] = []
    total = len(points)
    if jobs <= 1:
        warm_up()
        for grp in groups.values():
            for p in grp:
                rows.append(run_point(p, **kw))
                if progress:
                    progress(rows[-1], len(rows), total)
            if checkpoint:
                checkpoint(rows)
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        for out in pool.map(_run_group, [(grp, kw) for grp in groups.values()]):
            for r in out:
                rows.append(r)
                if progress:
                    progress(r, len(rows), total)
            if checkpoint:
                checkpoint(rows)
    return rows


def _median(xs):
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.median(xs)) if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def summarize(rows: list[dict]) -> dict:
    """Converged fraction, fraction matching direct_erm, median iterations, time ratios, flagged."""
    convex = [r for r in rows if r["convex"]]
    nonconvex = [r for r in rows if not r["convex"]]
    conv = [r for r in rows if r["converged"]]
    timed = [r for r in convex if r.get("time_ratio") is not None]
    frac = lambda rs, key: (sum(bool(r.get(key)) for r in rs) / len(rs)) if rs else None  # noqa: E731
    s = {
        "points": len(rows),
        "converged": len(conv),
        "converged_fraction": frac(rows, "converged"),
        "convex_points": len(convex),
        "convex_converged_fraction": frac(convex, "converged"),
        "convex_match_fraction": frac(convex, "match"),
        "nonconvex_points": len(nonconvex),
        "nonconvex_converged_fraction": frac(nonconvex, "converged"),
        "nonconvex_stationary_fraction": frac(nonconvex, "stationary"),
        "median_iterations": _median([r.get("n_iter") for r in rows]),
        "median_iterations_converged": _median([r["n_iter"] for r in conv]),
        "max_iterations_converged": max((r["n_iter"] for r in conv), default=None),
        "damped_fraction": (sum(r.get("max_damping", 0.0) > 0 for r in rows) / len(rows)) if rows else None,
        "median_time_ratio": _median([r["time_ratio"] for r in timed]),
        "mean_time_ratio": _mean([r["time_ratio"] for r in timed]),
        "total_time_ratio": (sum(r["t_amp"] for r in timed) / sum(r["t_lbfgs"] for r in timed)) if timed else None,
        "max_rel_dist_matched": max((r["ref_dist"] for r in convex if r.get("match")), default=None),
        "median_rel_dist": _median([r.get("ref_dist") for r in convex if r["converged"]]),
        "total_time_amp": sum(r.get("t_amp", 0.0) for r in rows),
        "total_time_lbfgs": sum(r.get("t_lbfgs", 0.0) for r in rows),
        "errors": sum(bool(r.get("error")) for r in rows),
        "silent_failures": sum(_silent(r) for r in rows),
        "flagged": [{"point": _label(r), "reason": r["reason"]} for r in rows if r["flagged"]],
    }
    return s


def _silent(r) -> bool:
    """An unconverged or non-finite result that does not say so (what the issue forbids)."""
    if r.get("error"):
        return False
    nonfinite = not (r.get("S_finite", True) and r.get("V_finite", True))
    if not r["converged"]:
        return not r.get("message") or nonfinite
    return nonfinite


def _label(r) -> str:
    return Point(**{k: r[k] for k in Point.__dataclass_fields__}).label()


def by_group(rows: list[dict]) -> list[dict]:
    """One summary line per (loss, reg, channel)."""
    keys = list(dict.fromkeys((r["loss"], r["reg"], r["channel"]) for r in rows))
    out = []
    for k in keys:
        rs = [r for r in rows if (r["loss"], r["reg"], r["channel"]) == k]
        s = summarize(rs)
        out.append({"loss": k[0], "reg": k[1], "channel": k[2], "points": len(rs),
                    "conv": s["converged_fraction"], "match": s["convex_match_fraction"],
                    "iters": s["median_iterations"], "max_it": s["max_iterations_converged"],
                    "damped": s["damped_fraction"], "ratio": s["median_time_ratio"],
                    "mean_ratio": s["mean_time_ratio"], "dist": s["median_rel_dist"]})
    return out


def print_summary(rows: list[dict], file=sys.stdout, match_tol: float = MATCH_TOL) -> dict:
    """Print the per-(loss, reg, channel) table, the grid totals and the flagged points; return
    :func:`summarize`."""
    s = summarize(rows)
    _common.print_table(by_group(rows), [
        ("loss", "loss", "s"), ("reg", "reg", "s"), ("channel", "channel", "s"), ("points", "points", "d"),
        ("conv", "converged", ".3f"), ("match", "=direct", ".3f"), ("iters", "med it", ".0f"),
        ("max_it", "max it conv", "d"), ("damped", "damped", ".2f"), ("dist", "med dist", ".1e"),
        ("ratio", "med AMP/LBFGS", ".3f"), ("mean_ratio", "mean AMP/LBFGS", ".3f")], file=file)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"\npoints {s['points']}: converged {pct(s['converged_fraction'])}; convex points within "
          f"{match_tol:g} of direct_erm {pct(s['convex_match_fraction'])} (max distance "
          f"{num(s['max_rel_dist_matched'], '.1e')}); non-convex stationary "
          f"{pct(s['nonconvex_stationary_fraction'])}", file=file)
    print(f"median iterations {num(s['median_iterations'], '.0f')} (converged points: median "
          f"{num(s['median_iterations_converged'], '.0f')}, max {s['max_iterations_converged']}); "
          f"AMP/L-BFGS wall time: median {num(s['median_time_ratio'], '.3f')}, mean "
          f"{num(s['mean_time_ratio'], '.3f')}, total {num(s['total_time_ratio'], '.3f')} "
          f"({s['total_time_amp']:.1f} s / {s['total_time_lbfgs']:.1f} s)", file=file)
    print(f"errors {s['errors']}, silent failures {s['silent_failures']}, flagged {len(s['flagged'])}", file=file)
    for f in s["flagged"]:
        print(f"  FLAGGED {f['point']}: {f['reason']}", file=file)
    file.flush()
    return s


def _floats(s):
    return tuple(float(v) for v in s.split(","))


def _ints(s):
    return tuple(int(v) for v in s.split(","))


def _strs(s):
    return tuple(v.strip() for v in s.split(",") if v.strip())


def main(argv=None):
    parser = _common.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=_ints, default=None, help="comma-separated, default 60,100")
    parser.add_argument("--T", type=_ints, default=None, help="default 2,3")
    parser.add_argument("--alpha", type=_floats, default=None, help="default 0.05,0.1,0.25,0.5,1")
    parser.add_argument("--lam", type=_floats, default=None, help="default 1e-4,1e-3,1e-2,1e-1")
    parser.add_argument("--reg", type=_strs, default=None, help="default nuclear,frobenius")
    parser.add_argument("--teacher", type=_strs, default=None,
                        help="default wishart:0.2,wishart:0.5,wishart:1,powerlaw:1")
    parser.add_argument("--pairs", choices=["all", "natural"], default="all",
                        help="convex (loss, channel) pairs: all valid ones (default) or the natural ones")
    parser.add_argument("--nonconvex", choices=["auto", "yes", "no"], default="auto",
                        help="softmax_square on softmax targets (auto: if the loss is available)")
    parser.add_argument("--max-points", type=int, default=None, help="deterministic random subset of the grid")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (use with --threads 1)")
    parser.add_argument("--max-iter", type=int, default=MAX_ITER)
    parser.add_argument("--match-tol", type=float, default=MATCH_TOL)
    parser.add_argument("--stationarity-tol", type=float, default=STATIONARITY_TOL)
    parser.add_argument("--linear-noise", type=float, default=LINEAR_NOISE)
    parser.add_argument("--seed", type=int, default=0, help="base seed (mixed with each point's parameters)")
    parser.add_argument("--checkpoint", type=int, default=25, help="rewrite the JSON every N points")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else GRID
    axes = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in base}
    points = make_grid(**axes, pairs=args.pairs, nonconvex={"auto": "auto", "yes": True, "no": False}[args.nonconvex])
    n_full = len(points)
    points = subsample(points, args.max_points, args.seed)
    config = {**{k: list(v) for k, v in axes.items()}, "pairs": args.pairs, "nonconvex": args.nonconvex,
              "max_iter": args.max_iter, "tol": TOL, "match_tol": args.match_tol, "beta": BETA,
              "stationarity_tol": args.stationarity_tol, "linear_noise": args.linear_noise, "seed": args.seed,
              "grid_points": n_full, "run_points": len(points), "jobs": args.jobs, "clock": args.clock,
              "softmax_square_available": softmax_square_available()}
    print(f"{len(points)} of {n_full} grid points, jobs={args.jobs}", flush=True)
    t_start = time.perf_counter()
    if args.jobs <= 1:
        warm_up()
        print(f"warm-up (Numba compilation) {time.perf_counter() - t_start:.1f} s", flush=True)
        t_start = time.perf_counter()
    last = [0]

    def progress(r, i, total):
        status = "ok" if not r["flagged"] else "FLAGGED"
        extra = "" if r.get("rel_dist") is None else f" dist {r['rel_dist']:.1e}"
        extra += "" if r.get("time_ratio") is None else f" AMP/LBFGS {r['time_ratio']:.2f}"
        print(f"[{i}/{total} {time.perf_counter() - t_start:7.1f}s] {_label(r)}: {status} "
              f"it={r.get('n_iter')} damp={r.get('max_damping', 0):.2f}{extra}", flush=True)

    def checkpoint(rows):
        if len(rows) - last[0] >= args.checkpoint:
            last[0] = len(rows)
            _common.write_json("convergence_grid", {"config": config, "partial": True, "rows": rows}, args.out)

    rows = run_grid(points, jobs=args.jobs, progress=progress, checkpoint=checkpoint, max_iter=args.max_iter,
                    match_tol=args.match_tol, stationarity_tol=args.stationarity_tol, base_seed=args.seed,
                    linear_noise=args.linear_noise, clock=args.clock)
    print()
    summary = print_summary(rows, match_tol=args.match_tol)
    summary["elapsed_s"] = time.perf_counter() - t_start
    path = _common.write_json("convergence_grid", {"config": config, "summary": summary, "rows": rows}, args.out)
    print(f"\nwrote {path} ({summary['elapsed_s']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
