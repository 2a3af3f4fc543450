"""Parameter sweeps: state evolution, AMP, direct ERM and their Bayes-optimal counterparts over a grid.

``sweep(kind, grid, seeds=1, executor=None, cache=None, progress=True)`` evaluates every point of
the Cartesian product of ``grid`` (a mapping from parameter names to lists) for every seed index and
returns a tidy :class:`pandas.DataFrame`, one row per (point, seed): the point's full parameter set,
``seed``, then ``m, q, mse, V, A_hat, m_hat, q_hat, test_error, test_error_noisy, train_loss,
train_objective, stderr_m, stderr_q, stderr_V, stderr_mse, converged, n_iter, message, wall_time,
cached`` (``stderr_*``: the ERM SE's error estimate of its fixed point, ``SEResult.stderr``; NaN
where there is none).

Reproducibility.  Each point's random stream is a :class:`numpy.random.SeedSequence` built from a
hash of the canonical JSON of ``(kind, full parameter set, seed index)``, never from the worker, so
the frame does not depend on the executor (bit for bit, except ``wall_time`` and ``cached``).  Each
point runs with one BLAS and one Numba thread (parallel reductions round differently with other
thread counts); a sweep parallelises over points instead.

Warm starts.  ERM state-evolution points that differ only in ``alpha`` form a *chain*: they are run
in increasing ``alpha``, each started from the previous converged fixed point
(``state_evolution(..., init=(m, q, V))``, docs/theory.md §7.3).  A chain is one unit of work; every
other kind's unit is a single point.

Executors.  ``None`` / ``'serial'``; an ``int`` (that many local processes) or ``'processes'``
(``jobs`` processes, default ``os.cpu_count()``); any :class:`concurrent.futures.Executor`; Dask
(the ``distributed`` extra, imported only when used): a ``dask.distributed.Client``, a scheduler
address such as ``'tcp://host:8786'``, or ``'local'`` (a ``LocalCluster`` of ``jobs`` single-threaded
worker processes, closed afterwards).  On Slurm, start a cluster with ``dask_jobqueue.SLURMCluster``
and pass ``Client(cluster)``.

Cache.  With ``cache=DIR`` every computed point is written to ``DIR/<key>.json`` as soon as its unit
finishes, ``key`` a hash of the kind, full parameter set, seed index and ``amp_attention.__version__``
(for an SE point also the alphas before it in its chain, which set its warm start: adding a smaller
alpha to a chain recomputes the points above it); a re-run loads the stored points and computes only
the missing ones (an interrupted sweep resumes).  Floats are stored with ``repr`` precision, so cached
rows equal computed ones bit for bit.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .output_sample import DEFAULT_N_MC

__all__ = ["sweep", "KINDS", "PARAMETERS", "OUTPUT_COLUMNS", "point_seed", "read_sweep", "write_sweep",
           "progress_bar"]

_MODEL = {"alpha": 0.3, "T": 2, "teacher": "wishart", "rho": 0.5, "gamma": 1.0, "rank": 1,
          "channel": "softmax", "beta": 1.0, "noise": 0.0}
_ERM = {"loss": "cross_entropy", "reg": "nuclear", "lam": 0.05}

#: every kind's parameters and their defaults, in column order ('erm': ``max_iter = 0`` means
#: direct_erm's own default; ``d`` of the SE kinds: the exact-spectrum dimension of non-Wishart teachers;
#: ``acceleration`` of the SE kinds: 'anderson' or 'none' (the SE's alias of ``acceleration=None``);
#: ``precision`` of 'se': the SE's target for its error estimate, 0 for none)
PARAMETERS = {
    "se": {**_MODEL, **_ERM, "damping": "auto", "acceleration": "anderson", "max_iter": 200, "tol": 1e-8,
           "n_mc": DEFAULT_N_MC, "output_rule": "auto", "prox_start": "global", "precision": 0.0, "d": 200},
    "bayes_se": {**_MODEL, "damping": "auto", "acceleration": "anderson", "max_iter": 1000, "tol": 1e-10,
                 "n_mc": DEFAULT_N_MC, "output_rule": "auto", "d": 200},
    "amp": {**_MODEL, **_ERM, "d": 100, "damping": "auto", "max_iter": 200, "tol": 1e-8,
            "variance": "sample", "n_test": 2000},
    "erm": {**_MODEL, **_ERM, "d": 100, "method": "lbfgs", "max_iter": 0, "tol": 1e-10, "n_test": 2000},
    "bayes_amp": {**_MODEL, "d": 100, "damping": "auto", "max_iter": 200, "tol": 1e-8,
                  "variance": "sample", "n_test": 2000},
}
KINDS = tuple(PARAMETERS)

OUTPUT_COLUMNS = ["m", "q", "mse", "V", "A_hat", "m_hat", "q_hat", "test_error", "test_error_noisy",
                  "train_loss", "train_objective", "stderr_m", "stderr_q", "stderr_V", "stderr_mse",
                  "converged", "n_iter", "message", "wall_time"]

_FLOAT = {"alpha", "rho", "gamma", "beta", "noise", "lam", "tol", "precision"}
_INT = {"T", "rank", "d", "max_iter", "n_mc", "n_test"}
_CHOICES = {"teacher": ("wishart", "powerlaw", "lowrank"), "channel": ("softmax", "hardmax", "linear"),
            "loss": ("cross_entropy", "square", "softmax_square"), "reg": ("nuclear", "frobenius"),
            "output_rule": ("auto", "qmc", "mc", "gauss_hermite"), "prox_start": ("global", "teacher"),
            "variance": ("sample", "scalar"), "method": ("lbfgs", "prox"), "acceleration": ("anderson", "none")}


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


def _normalise(name, v):
    """A parameter value in canonical Python form (so equal values hash equally); a numeric string
    (``'0.1'``) is read as its number.  Errors name the parameter."""
    if isinstance(v, np.generic):
        v = v.item()
    numeric = name in _FLOAT or name in _INT or (name == "damping" and not (isinstance(v, str) and v == "auto"))
    if numeric and isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if numeric and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
        what = "a finite number or 'auto'" if name == "damping" else "a finite number"
        raise ValueError(f"sweep: {name} must be {what}, got {v!r}")
    if name in _INT:
        if v != int(v):
            raise ValueError(f"sweep: {name} must be an integer, got {v!r}")
        return int(v)
    if numeric:
        return float(v)
    if name == "damping":
        return v
    if not isinstance(v, str):
        raise ValueError(f"sweep: {name} must be a string, got {v!r}")
    if name in _CHOICES and v not in _CHOICES[name]:
        raise ValueError(f"sweep: {name} must be one of {_CHOICES[name]}, got {v!r}")
    return v


def _points(kind, grid):
    """The Cartesian product of ``grid`` over the kind's defaults: a list of full parameter dicts."""
    if not isinstance(kind, str) or kind not in PARAMETERS:
        raise ValueError(f"sweep: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    spec = PARAMETERS[kind]
    if not isinstance(grid, Mapping):
        raise ValueError(f"sweep: grid must be a mapping from parameter names to lists of values, got {grid!r}")
    grid = dict(grid)
    unknown = [k for k in grid if k not in spec]
    if unknown:
        raise ValueError(f"sweep: unknown parameter(s) for kind {kind!r}: {', '.join(map(str, unknown))}; "
                         f"expected some of {', '.join(spec)}")
    values = {}
    for k, v in grid.items():
        vals = [v] if isinstance(v, (str, bytes)) or not np.iterable(v) else list(v)
        if not vals:
            raise ValueError(f"sweep: empty list of values for parameter {k!r}")
        values[k] = [_normalise(k, x) for x in vals]
    names = list(values)
    out = []
    for combo in itertools.product(*(values[k] for k in names)):
        p = dict(spec)
        p.update(zip(names, combo))
        out.append(p)
    return out


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def point_seed(kind, params, seed_index) -> np.random.SeedSequence:
    """The point's SeedSequence: a hash of ``(kind, full parameter set, seed index)`` (not the worker)."""
    h = hashlib.sha256(_canonical({"kind": kind, "params": params, "seed": int(seed_index)}).encode())
    return np.random.SeedSequence(int.from_bytes(h.digest()[:16], "little"))


def _cache_key(kind, params, seed_index, warm_start_alphas=None) -> str:
    """Hash of the kind, full parameter set, seed index, package version and, for SE chains, the
    alphas run before this point (its warm start)."""
    from . import __version__

    payload = {"kind": kind, "params": params, "seed": int(seed_index), "version": __version__}
    if warm_start_alphas is not None:
        payload["warm_start_alphas"] = list(warm_start_alphas)
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# one point
# --------------------------------------------------------------------------------------------


def _channel(p):
    from .model import HardmaxChannel, LinearChannel, SoftmaxChannel

    if p["channel"] == "softmax":
        return SoftmaxChannel(p["beta"], p["noise"])
    if p["channel"] == "hardmax":
        return HardmaxChannel(p["noise"])
    return LinearChannel(p["noise"])


def _teacher(p, rng):
    from .model import Teacher

    if p["teacher"] == "wishart":
        return Teacher.wishart(p["d"], p["rho"], rng)
    if p["teacher"] == "powerlaw":
        return Teacher.powerlaw(p["d"], p["gamma"], rng)
    return Teacher.lowrank(p["d"], p["rank"], rng)


def _law(p, rng):
    """The SE's spectral law: the Wishart limit law, else the exact spectrum of a teacher at ``d``."""
    from .spectral import SpectralLaw

    if p["teacher"] == "wishart":
        return SpectralLaw.wishart(p["rho"])
    return SpectralLaw.atoms(_teacher(p, rng).eigenvalues)


def _f(v):
    if v is None:
        return float("nan")
    return float(v)


def _last(h, key):
    a = h.get(key)
    return float(a[-1]) if a is not None and len(a) else float("nan")


def _row_from_se(r):
    h = r.history
    return {"m": _f(r.m), "q": _f(r.q), "mse": _f(r.mse), "V": _f(r.V), "A_hat": _last(h, "A_hat"),
            "m_hat": _last(h, "m_hat"), "q_hat": _last(h, "q_hat"),
            "test_error": _f(getattr(r, "test_error", None)),
            "test_error_noisy": _f(getattr(r, "test_error_noisy", None)),
            "train_loss": _f(getattr(r, "train_loss", None)),
            "train_objective": _f(getattr(r, "train_objective", None)),
            **{f"stderr_{k}": _f((r.stderr or {}).get(k)) for k in ("m", "q", "V", "mse")},
            "converged": bool(r.converged), "n_iter": int(r.n_iter), "message": str(r.message)}


def _overlaps(S, S_star):
    d = S.shape[0]
    m = float(np.sum(S * S_star)) / d
    q = float(np.sum(S * S)) / d
    mse = float(np.sum((S - S_star) ** 2)) / d
    return m, q, mse


def _test_errors(p, teacher, channel, h_hat_of, rng):
    from .model import sample_data

    test = sample_data(p["n_test"], p["T"], teacher, channel, rng)
    phi = channel.phi
    h_hat = h_hat_of(test.X)
    te = float(np.mean(np.sum((phi(test.h) - phi(h_hat)) ** 2, axis=(1, 2))))
    ten = float(np.mean(np.sum((test.y - phi(h_hat)) ** 2, axis=(1, 2))))
    return te, ten


def _run_sampled(kind, p, ss):
    """amp / erm / bayes_amp on one sampled instance (teacher, data and test set from ``ss``)."""
    from .model import sample_data

    rng_teacher, rng_data, rng_test, rng_fit = (np.random.default_rng(s) for s in ss.spawn(4))
    d = p["d"]
    n = max(1, int(round(p["alpha"] * d * d)))
    teacher = _teacher(p, rng_teacher)
    channel = _channel(p)
    data = sample_data(n, p["T"], teacher, channel, rng_data)
    nan = float("nan")
    if kind in ("amp", "bayes_amp"):
        from .estimators import BayesAttention, ERMAttention

        if kind == "amp":
            est = ERMAttention(loss=p["loss"], reg=p["reg"], lam=p["lam"], beta=p["beta"], variance=p["variance"],
                               max_iter=p["max_iter"], tol=p["tol"], damping=p["damping"])
        else:
            est = BayesAttention(channel, teacher, variance=p["variance"], max_iter=p["max_iter"], tol=p["tol"],
                                 damping=p["damping"])
        est.fit(data.X, data.y, S_star=teacher.S)
        h = est.history_
        m, q, mse = _overlaps(est.S_, teacher.S)
        te, ten = _test_errors(p, teacher, channel, est.decision_function, rng_test)
        return {"m": m, "q": q, "mse": mse, "V": _f(est.V_), "A_hat": _last(h, "A_hat"), "m_hat": nan,
                "q_hat": nan, "test_error": te, "test_error_noisy": ten, "train_loss": _last(h, "train_loss"),
                "train_objective": _last(h, "train_objective"), "converged": bool(est.converged_),
                "n_iter": int(est.n_iter_), "message": str(est.message_)}
    from .erm import direct_erm, erm_objective
    from .operator import preactivations

    res = direct_erm(data.X, data.y, loss=p["loss"], reg=p["reg"], lam=p["lam"], beta=p["beta"],
                     method=p["method"], tol=p["tol"], max_iter=p["max_iter"] or None,
                     random_state=int(rng_fit.integers(2**31)))
    m, q, mse = _overlaps(res.S, teacher.S)
    te, ten = _test_errors(p, teacher, channel, lambda X: preactivations(X, res.S), rng_test)
    loss_sum = erm_objective(data.X, data.y, res.S, loss=p["loss"], reg=p["reg"], lam=0.0, beta=p["beta"])
    return {"m": m, "q": q, "mse": mse, "V": nan, "A_hat": nan, "m_hat": nan, "q_hat": nan, "test_error": te,
            "test_error_noisy": ten, "train_loss": float(loss_sum) / n, "train_objective": float(res.objective) / d**2,
            "converged": bool(res.converged), "n_iter": int(res.n_iter), "message": str(res.message)}


class _SingleThreaded:
    """One BLAS thread and one Numba thread while a point runs.

    Parallel reductions (Numba ``prange`` sums, threaded BLAS) round differently with different
    thread counts, and a dask worker or a spawned process does not have the driver's thread count:
    single-threaded points make the frame independent of the executor (and a sweep parallelises over
    points anyway, without oversubscribing the cores)."""

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        self._blas = threadpool_limits(limits=1)
        try:
            import numba

            self._numba = numba.get_num_threads()
            numba.set_num_threads(1)
        except ImportError:  # pragma: no cover - numba is a dependency
            self._numba = None
        return self

    def __exit__(self, *exc):
        if self._numba is not None:
            import numba

            numba.set_num_threads(self._numba)
        self._blas.restore_original_limits()
        return False


def _run_point(kind, p, seed_index, init=None):
    ss = point_seed(kind, p, seed_index)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _SingleThreaded():
        warnings.simplefilter("ignore")  # non-convergence is reported in the row (converged, message)
        if kind == "se":
            from .se import state_evolution

            law = _law(p, np.random.default_rng(ss.spawn(1)[0]))
            r = state_evolution(p["alpha"], p["T"], law, _channel(p), p["loss"], p["reg"], p["lam"], p["beta"],
                                n_mc=p["n_mc"], max_iter=p["max_iter"], tol=p["tol"], damping=p["damping"],
                                seed=int(ss.generate_state(1)[0]), init=init, output_rule=p["output_rule"],
                                prox_start=p["prox_start"], acceleration=p["acceleration"],
                                precision=p["precision"] or None)
            row = _row_from_se(r)
        elif kind == "bayes_se":
            from .se import bayes_state_evolution

            law = _law(p, np.random.default_rng(ss.spawn(1)[0]))
            r = bayes_state_evolution(p["alpha"], p["T"], law, _channel(p), max_iter=p["max_iter"], tol=p["tol"],
                                      damping=p["damping"], predictions=True, n_mc=p["n_mc"],
                                      seed=int(ss.generate_state(1)[0]), output_rule=p["output_rule"],
                                      acceleration=p["acceleration"])
            row = _row_from_se(r)
        else:
            row = _run_sampled(kind, p, ss)
    row["wall_time"] = time.perf_counter() - t0
    return row


def _run_unit(kind, unit):
    """Run a unit of work (a chain for 'se', else one point).

    ``unit`` is a list of ``(index, params, seed_index, cached_row_or_None)``, in increasing alpha for a
    chain; cached rows are not recomputed but give the warm start of the next point.  Returns
    ``[(index, row), ...]`` for the computed points only.
    """
    out = []
    init = None
    for idx, p, s, cached in unit:
        row = cached if cached is not None else _run_point(kind, p, s, init)
        if cached is None:
            out.append((idx, row))
        init = (row["m"], row["q"], row["V"]) if kind == "se" and row["converged"] else None
    return out


# --------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------


def _is_dask_client(obj):
    return type(obj).__name__ == "Client" and type(obj).__module__.split(".")[0] == "distributed"


class _Serial:
    """The serial executor, with the ``submit`` interface of :mod:`concurrent.futures`."""

    def submit(self, fn, *args):
        f = cf.Future()
        try:
            f.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            f.set_exception(exc)
        return f


def _open_executor(executor, jobs):
    """``(executor with submit, close callback, lazy)``; lazy: the serial one, where submit runs."""
    if executor is None or executor == "serial":
        return _Serial(), (lambda: None), True
    if isinstance(executor, bool):
        raise ValueError(f"sweep: invalid executor {executor!r}")
    if isinstance(executor, (int, np.integer)) or executor == "processes":
        n = int(executor) if not isinstance(executor, str) else int(jobs or os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"sweep: the number of jobs (executor={executor!r}, jobs={jobs!r}) must be >= 1, got {n}")
        if n == 1:
            return _Serial(), (lambda: None), True
        import multiprocessing

        ex = cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"))
        return ex, (lambda: ex.shutdown(wait=True, cancel_futures=True)), False
    if isinstance(executor, cf.Executor):
        return executor, (lambda: None), False
    if _is_dask_client(executor):
        return executor.get_executor(), (lambda: None), False
    if isinstance(executor, str):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("Dask executors need the 'distributed' extra: pip install "
                              "'amp_attention[distributed]'") from exc
        if executor == "local":
            cluster = LocalCluster(n_workers=int(jobs or 2), threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)

            def close():
                client.close()
                cluster.close()

            return client.get_executor(), close, False
        if "://" in executor or ":" in executor:
            client = Client(executor)
            return client.get_executor(), client.close, False
    raise ValueError(f"sweep: unknown executor {executor!r}; expected None, 'serial', an int, 'processes', "
                     "'local', a scheduler address, a dask.distributed.Client or a concurrent.futures.Executor")


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


class _LineWriter:
    """A file for tqdm that turns its ``\\r`` frames into plain lines (logs, pipes)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total=None, desc=None, file=None, disable=False, **kwargs):
    """A tqdm bar on stderr: animated on a terminal, else plain lines at most every 10 s."""
    from tqdm.auto import tqdm

    file = sys.stderr if file is None else file
    is_tty = hasattr(file, "isatty") and file.isatty()
    if not is_tty:
        kwargs.setdefault("mininterval", 10.0)
        kwargs.setdefault("ascii", True)
        file = _LineWriter(file)
    return tqdm(total=total, desc=desc, file=file, disable=disable, dynamic_ncols=is_tty, **kwargs)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


def _cache_load(cache, key):
    path = Path(cache) / f"{key}.json"
    try:
        with open(path) as fh:
            return json.load(fh)["row"]
    except (OSError, ValueError, KeyError):
        return None


def _cache_store(cache, key, kind, p, s, row):
    from . import __version__

    path = Path(cache) / f"{key}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump({"kind": kind, "params": p, "seed": s, "version": __version__, "row": row}, fh)
    os.replace(tmp, path)  # atomic: an interrupted write leaves no half file


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------


def _check_seeds(seeds):
    """``seeds``: an integer >= 1 (indices ``0..seeds-1``) or a non-empty list of integers >= 0."""
    def is_int(s, lo):
        return isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_)) and s >= lo
    if is_int(seeds, 1):
        return list(range(int(seeds)))
    if isinstance(seeds, (list, tuple, range, np.ndarray)) and len(seeds) and all(is_int(s, 0) for s in seeds):
        return [int(s) for s in seeds]
    raise ValueError(f"sweep: seeds must be an integer >= 1 or a non-empty list of integers >= 0, got {seeds!r}")


def sweep(kind, grid, seeds=1, executor=None, cache=None, progress=True, jobs=None):
    """Evaluate ``kind`` on every point of the grid for every seed; see the module docstring.

    Parameters
    ----------
    kind : 'se' (``state_evolution``), 'bayes_se' (``bayes_state_evolution``), 'amp' (``ERMAttention``
        on sampled data), 'erm' (``direct_erm`` on sampled data) or 'bayes_amp' (``BayesAttention``).
    grid : mapping from parameter names (``PARAMETERS[kind]``) to lists of values (a scalar is a
        one-element list); unspecified parameters take the defaults of ``PARAMETERS[kind]``.
    seeds : number of seed indices per point (0..seeds-1), or an explicit list of seed indices.
    executor : None / 'serial', an int (local processes), 'processes' (``jobs`` local processes), a
        ``concurrent.futures.Executor``, a ``dask.distributed.Client``, a scheduler address, or
        'local' (a Dask ``LocalCluster`` of ``jobs`` workers, default 2).
    cache : directory for per-point JSON results (created if needed); None: no cache.
    progress : show a tqdm progress bar on stderr.

    Returns
    -------
    pandas.DataFrame with the parameter columns, ``seed``, ``OUTPUT_COLUMNS`` and ``cached``.
    """
    import pandas as pd

    points = _points(kind, grid)
    seed_list = _check_seeds(seeds)
    if not isinstance(progress, (bool, np.bool_)):
        raise ValueError(f"sweep: progress must be True or False, got {progress!r}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, numbers.Integral) or jobs < 1):
        raise ValueError(f"sweep: jobs must be None or an integer >= 1, got {jobs!r}")
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise ValueError(f"sweep: cache must be None or a directory path, got {cache!r}")
    tasks = [(p, s) for p in points for s in seed_list]  # row order: grid product, seeds innermost
    rows = [None] * len(tasks)
    cached_flags = [False] * len(tasks)
    # units of work: chains along alpha for the ERM SE, single points otherwise
    if kind == "se":
        chains = {}
        for i, (p, s) in enumerate(tasks):
            chains.setdefault(_canonical({"p": {k: v for k, v in p.items() if k != "alpha"}, "s": s}), []).append(i)
        units = [sorted(ix, key=lambda i: tasks[i][0]["alpha"]) for ix in chains.values()]
    else:
        units = [[i] for i in range(len(tasks))]
    # an SE point's result depends on its warm start: its key includes the alphas before it in its chain
    keys = [None] * len(tasks)
    for u in units:
        for j, i in enumerate(u):
            before = [tasks[k][0]["alpha"] for k in u[:j]] if kind == "se" else None
            keys[i] = _cache_key(kind, tasks[i][0], tasks[i][1], before)
    if cache is not None:
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"sweep: cache must be a directory that can be created and written, got {cache!r}: "
                             f"{exc}") from None
        for i, key in enumerate(keys):
            row = _cache_load(cache, key)
            if row is not None:
                rows[i], cached_flags[i] = row, True
    units = [u for u in units if any(rows[i] is None for i in u)]
    n_todo = sum(rows[i] is None for u in units for i in u)

    ex, close, lazy = _open_executor(executor, jobs)
    bar = progress_bar(total=n_todo, desc=f"sweep {kind}", disable=not progress or n_todo == 0, unit="pt")
    try:
        payloads = [[(i, tasks[i][0], tasks[i][1], rows[i]) for i in u] for u in units]
        if lazy:
            futures = (ex.submit(_run_unit, kind, pl) for pl in payloads)
        else:
            futures = cf.as_completed([ex.submit(_run_unit, kind, pl) for pl in payloads])
        for fut in futures:
            for i, row in fut.result():
                rows[i] = row
                if cache is not None:
                    _cache_store(cache, keys[i], kind, tasks[i][0], tasks[i][1], row)
                bar.update(1)
    finally:
        bar.close()
        close()

    params = list(PARAMETERS[kind])
    records = [{**p, "seed": s, **{c: row.get(c, math.nan) for c in OUTPUT_COLUMNS}, "cached": flag}
               for (p, s), row, flag in zip(tasks, rows, cached_flags)]
    df = pd.DataFrame.from_records(records, columns=params + ["seed"] + OUTPUT_COLUMNS + ["cached"])
    return _typed(df, kind)


def _typed(df, kind):
    """Fixed column dtypes (so frames compare equal whatever the source: computed, cached or CSV)."""
    for c in df.columns:
        if c in _FLOAT or c in ("m", "q", "mse", "V", "A_hat", "m_hat", "q_hat", "test_error", "test_error_noisy",
                                "train_loss", "train_objective", "wall_time") or c.startswith("stderr_"):
            df[c] = df[c].astype("float64")
        elif c in _INT or c in ("seed", "n_iter"):
            df[c] = df[c].astype("int64")
        elif c in ("converged", "cached"):
            df[c] = df[c].astype(bool)
        else:
            df[c] = df[c].astype(object)
    return df


def write_sweep(df, path):
    """Write a sweep frame to ``.csv``, ``.parquet`` or ``.json`` (records), chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".parquet":
        try:
            df.to_parquet(path, index=False)
        except ImportError as exc:  # no pyarrow / fastparquet
            raise ValueError(f"writing {path.name}: {exc}") from exc
    elif suffix == ".json":
        recs = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                for r in df.astype(object).to_dict(orient="records")]
        with open(path, "w") as fh:
            json.dump(recs, fh)
    else:
        raise ValueError(f"output file must end in .csv, .parquet or .json, got {path.name!r}")


def read_sweep(path, kind=None):
    """Read a sweep frame written by :func:`write_sweep` (CSV floats read back exactly)."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # pandas >= 3 parses floats exactly by default (and deprecates float_precision)
        exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
        df = pd.read_csv(path, keep_default_na=False, na_values=["", "NaN", "nan"], **exact)
    elif suffix == ".parquet":
        df = pd.read_parquet(path)
    elif suffix == ".json":
        with open(path) as fh:
            df = pd.DataFrame.from_records(json.load(fh))
    else:
        raise ValueError(f"expected a .csv, .parquet or .json file, got {path.name!r}")
    return _typed(df, kind)
