"""Helpers of the ``amp-attention`` command (:mod:`amp_attention.cli`): argument types, memory
estimates, one-line messages.

Argument types (for ``argparse``'s ``type=``) never raise anything but
``argparse.ArgumentTypeError``, whose message says what was expected and what was got; argparse
prefixes it with the option's name (``argument --d: expected ...``).  Numbers are parsed with
``float``/``int`` (so ``1e5`` is accepted for an integer option when it is integer-valued); NaN and
inf are refused everywhere.

Memory estimates count float64 arrays (8 bytes) in Python floats, so that sizes like
``alpha = 1e300`` give an (infinite or huge) estimate instead of overflowing, and are checked with
:func:`amp_attention._validation.check_memory` *before* anything is allocated.  They are upper
bounds of the arrays alive at the same time (not a measurement): see :func:`sampled_run_bytes`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import numpy as np

from ._validation import check_memory
from .whitening import T_MAX

# --------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------


def _bad(expected, s):
    return argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")


def _float(s, expected):
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise _bad(expected, s) from None
    if not math.isfinite(v):
        raise _bad(expected, s)
    return v


def _int(s, expected):
    """An integer from ``'12'`` or an integer-valued float string (``'1e3'``)."""
    try:
        return int(str(s).strip())
    except ValueError:
        pass
    v = _float(s, expected)
    if not v.is_integer():
        raise _bad(expected, s)
    return int(v)


def positive_float(s):
    v = _float(s, "a finite number > 0")
    if v <= 0:
        raise _bad("a finite number > 0", s)
    return v


def nonneg_float(s):
    v = _float(s, "a finite number >= 0")
    if v < 0:
        raise _bad("a finite number >= 0", s)
    return v


def damping(s):
    if s == "auto":
        return s
    v = _float(s, "'auto' or a number in [0, 1)")
    if not 0 <= v < 1:
        raise _bad("'auto' or a number in [0, 1)", s)
    return v


def int_at_least(low):
    """An argparse type: an integer >= ``low``."""

    def parse(s):
        v = _int(s, f"an integer >= {low}")
        if v < low:
            raise _bad(f"an integer >= {low}", s)
        return v

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
seed = int_at_least(0)
n_mc = int_at_least(100)  # the SE's output sample needs at least 100 nodes


def tokens(s):
    """``--T``: tokens per sequence, an integer in 1..T_MAX."""
    v = _int(s, f"an integer in 1..{T_MAX}")
    if not 1 <= v <= T_MAX:
        raise argparse.ArgumentTypeError(f"T must be an integer in 1..{T_MAX}, got {s!r}")
    return v


def comma_list(conv, expected):
    """An argparse type: a non-empty comma list of ``conv`` values (no empty items)."""

    def parse(s):
        items = [x.strip() for x in str(s).split(",")]
        if not any(items) or not all(items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {expected} (no empty item), got {s!r}")
        try:
            return [conv(x) for x in items]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {expected}, got {s!r}") from None

    return parse


#: most values a ``start:stop:num`` range may expand to
MAX_RANGE = 1_000_000


def grid_values(conv, expected):
    """An argparse type for ``sweep``: a comma list ``a,b,c`` or ``start:stop:num`` (``num`` evenly
    spaced values, 1 <= num <= MAX_RANGE), each value passed through ``conv``."""
    comma = comma_list(conv, expected)

    def parse(s):
        parts = str(s).split(":")
        if len(parts) == 1:
            return comma(s)
        what = f"a comma list of {expected} or start:stop:num (num in 1..{MAX_RANGE})"
        if len(parts) != 3:
            raise _bad(what, s)
        try:
            start, stop = _float(parts[0], what), _float(parts[1], what)
            num = _int(parts[2], what)
        except argparse.ArgumentTypeError:
            raise _bad(what, s) from None
        if not 1 <= num <= MAX_RANGE:
            raise _bad(what, s)
        try:
            return [conv(v) for v in np.linspace(start, stop, num).tolist()]
        except argparse.ArgumentTypeError:
            raise _bad(f"{expected} from start:stop:num", s) from None

    return parse


def choice(*names):
    """An argparse type: one of ``names`` (for the sweep's string parameters)."""

    def parse(s):
        if s not in names:
            raise _bad(f"one of {', '.join(names)}", s)
        return s

    return parse


# --------------------------------------------------------------------------------------------
# memory estimates (bytes, Python floats)
# --------------------------------------------------------------------------------------------

_F64 = 8.0
#: what one more worker process of a parallel sweep needs before it computes anything (Python,
#: NumPy, Numba and their libraries; measured ~150 MiB)
PROCESS_BYTES = 200.0 * 2**20


def teacher_bytes(d, teacher="wishart", rho=0.5):
    """The teacher at dimension d: the Wishart factor ``W (d, round(rho d))``, S, its eigenvectors
    and the eigensolver's workspace (a few ``d x d``)."""
    d = float(d)
    r = max(1.0, round(float(rho) * d)) if teacher == "wishart" else 0.0
    return _F64 * (d * r + 8 * d * d)


def sampled_run_bytes(n, T, d, n_test, teacher="wishart", rho=0.5, solver="amp", token_arrays=1.25):
    """Upper bound of what one sampled run needs (``run``, ``bench``, ``spectrum --d``, sweep ``amp``/``erm``).

    Counted in float64 arrays: the tokens X ``(n, T, d)`` and a quarter of X for the temporaries
    of sampling and of the blocked operator (``token_arrays = 1.25``; ``bench`` adds its floor's
    three); ``h``, ``y`` ``(n, T, T)``; the per-sample Gram matrices, their Cholesky factors,
    inverses and temporaries (6 arrays ``(n, K, K)``); GAMP's ``(n, K)`` vectors (omega, g, the previous
    g, Gamma g, z, traces, the prox warm start...: 16); 16 ``d x d`` matrices (S, R, the next S, the
    teacher's, eigendecompositions; direct ERM's L-BFGS memory: 30 more); the teacher
    (:func:`teacher_bytes`); the test set of ``n_test`` sequences (tokens and temporaries, 6 ``(T, T)``
    arrays each).  Returns ``{part: bytes}`` so that a message can say what dominates.
    """
    n, T, d, n_test = float(n), float(T), float(d), float(n_test)
    K = T * (T + 1) / 2
    return {
        "data": _F64 * n * (token_arrays * T * d + 2 * T * T + 6 * K * K + 16 * K),
        "matrices": _F64 * (16 + (30 if solver == "erm" else 0)) * d * d + teacher_bytes(d, teacher, rho),
        "test": _F64 * n_test * (2 * T * d + 6 * T * T),
    }


def se_bytes(T, n_mc):
    """The SE's output sample: about 12 arrays ``(n_mc, K + T^2)`` and one ``(n_mc, K, K)`` (the
    cross-entropy prox's Jacobians) at a time."""
    T, n_mc = float(T), float(n_mc)
    K = T * (T + 1) / 2
    return _F64 * n_mc * (12 * (K + T * T) + K * K)


def check_sampled_run(what, alpha, T, d, n_test, teacher="wishart", rho=0.5, solver="amp", copies=1,
                      token_arrays=1.25):
    """:func:`check_memory` of ``copies`` sampled runs at ``n = alpha d^2``, naming the option to lower."""
    n = float(alpha) * float(d) * float(d)
    parts = sampled_run_bytes(n, T, d, n_test, teacher, rho, solver, token_arrays)
    total = copies * (sum(parts.values()) + (PROCESS_BYTES if copies > 1 else 0.0))
    big = max(parts, key=parts.get)
    if big == "data":
        hint = (f"mostly the n = alpha d^2 = {n:.3g} training sequences of {T} x {d} tokens: "
                f"lower --alpha ({alpha:g}) or --d ({d})")
    elif big == "matrices" and teacher == "wishart" and rho * d > 8 * d:
        hint = f"mostly the teacher's d x round(rho d) Wishart factor: lower --rho ({rho:g}) or --d ({d})"
    elif big == "matrices":
        hint = f"mostly the d x d matrices: lower --d ({d})"
    else:
        hint = f"mostly the {n_test:.3g} test sequences: lower --d ({d})"
    if copies > 1:
        hint += f"; {copies} runs at once: lower --jobs"
    check_memory(total, what, hint)


def check_se(what, T, n_mc, copies=1):
    check_memory(copies * (se_bytes(T, n_mc) + (PROCESS_BYTES if copies > 1 else 0.0)), what,
                 f"lower --n-mc ({n_mc})" + (f" or --jobs ({copies} at once)" if copies > 1 else ""))


def check_teacher(what, d, teacher, rho):
    check_memory(teacher_bytes(d, teacher, rho), what,
                 f"lower --d ({d})" + (f" or --rho ({rho:g})" if teacher == "wishart" else ""))


def small_d_error(exc, d, T, variance):
    """A clearer error for ``variance='sample'`` at a d so small that the per-sample Gram matrices of
    the K = T(T+1)/2 sensing matrices are singular (they live in the d(d+1)/2-dimensional space of
    symmetric matrices); ``exc`` itself when that is not the cause."""
    K = T * (T + 1) // 2
    if variance != "sample" or K <= d * (d + 1) // 2:
        return exc
    d_min = next(k for k in range(1, K + 1) if k * (k + 1) // 2 >= K)
    return ValueError(f"--d {d} is too small for --variance sample at --T {T}: the K = {K} sensing matrices "
                      f"of a sequence span at most d(d+1)/2 = {d * (d + 1) // 2} dimensions, so their Gram "
                      f"matrices are singular ({one_line(exc)}); use --variance scalar or --d >= {d_min}")


def add_precision(p):
    """``--precision`` of the commands that run the ERM SE to its fixed point."""
    p.add_argument("--precision", type=positive_float, default=None,
                   help="--estimator erm: grow the output-side rule until the fixed point's error estimate "
                        "(stderr of m, q, V, mse) is below this (e.g. 1e-4; default: no target)")


def check_precision_estimator(args):
    """``--precision`` needs ``--estimator erm`` (ValueError otherwise)."""
    if args.precision is not None and args.estimator != "erm":
        raise ValueError("--precision applies to --estimator erm (the Bayes-optimal SE has a closed-form or "
                         "exact output side here)")


def add_acceleration(p):
    """``--acceleration`` of the commands that run the state evolution to its fixed point."""
    p.add_argument("--acceleration", choices=["anderson", "none"], default="anderson",
                   help="SE steps: Anderson mixing with the damping, or none (plain damped steps)")


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------

_NONNEG_INT = int_at_least(0)

#: sweep options: (flag, grid parameter, value type, what a value is, help)
SWEEP_OPTIONS = [
    ("--alpha", "alpha", positive_float, "numbers > 0", "sample complexity n / d^2"),
    ("--T", "T", tokens, "integers in 1..8", "tokens per sequence"),
    ("--teacher", "teacher", choice("wishart", "powerlaw", "lowrank"), "names", "teacher: wishart, powerlaw, lowrank"),
    ("--rho", "rho", positive_float, "numbers > 0", "Wishart rank ratio"),
    ("--gamma", "gamma", nonneg_float, "numbers >= 0", "power-law exponent"),
    ("--rank", "rank", positive_int, "integers >= 1", "low-rank teacher rank"),
    ("--channel", "channel", choice("softmax", "hardmax", "linear"), "names", "channel: softmax, hardmax, linear"),
    ("--beta", "beta", positive_float, "numbers > 0", "softmax inverse temperature"),
    ("--noise", "noise", nonneg_float, "numbers >= 0", "noise variance per whitened component"),
    ("--loss", "loss", choice("cross_entropy", "square", "softmax_square"), "names",
     "ERM loss: cross_entropy, square, softmax_square"),
    ("--reg", "reg", choice("nuclear", "frobenius"), "names", "ERM penalty: nuclear, frobenius"),
    ("--lam", "lam", nonneg_float, "numbers >= 0", "ERM regularisation strength"),
    ("--damping", "damping", damping, "'auto' or numbers in [0, 1)", "damping: 'auto' or numbers in [0, 1)"),
    ("--acceleration", "acceleration", choice("anderson", "none"), "names", "SE acceleration: anderson, none"),
    ("--d", "d", positive_int, "integers >= 1", "dimension (sampled kinds; SE: exact spectrum of non-Wishart teachers)"),
    ("--iters", "max_iter", _NONNEG_INT, "integers >= 0", "maximum iterations per point (erm: 0 = its default)"),
    ("--tol", "tol", nonneg_float, "numbers >= 0", "tolerance"),
    ("--n-mc", "n_mc", n_mc, "integers >= 100", "SE output-side node budget"),
    ("--precision", "precision", nonneg_float, "numbers >= 0",
     "ERM SE: target for the fixed point's error estimate, grows the rule (0: none)"),
    ("--output-rule", "output_rule", choice("auto", "qmc", "mc", "gauss_hermite"), "names",
     "SE output-side rule: auto, qmc, mc, gauss_hermite"),
    ("--prox-start", "prox_start", choice("global", "teacher"), "names", "SE softmax_square prox: global, teacher"),
    ("--variance", "variance", choice("sample", "scalar"), "names", "AMP variances: sample, scalar"),
    ("--method", "method", choice("lbfgs", "prox"), "names", "direct ERM method: lbfgs, prox"),
    ("--n-test", "n_test", positive_int, "integers >= 1", "fresh test samples (sampled kinds)"),
]


def check_out(out):
    """Fail before a sweep, not after it, when its output file cannot be written."""
    if not out.lower().endswith((".csv", ".parquet", ".json")):
        raise ValueError(f"--out must end in .csv, .parquet or .json, got {out!r}")
    if out.lower().endswith(".parquet"):
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
            raise ValueError("writing .parquet needs pyarrow (pip install pyarrow); or use .csv / .json")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a directory, expected a file name")
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out!r}: its directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out!r} is not writable")


def check_sweep_memory(args, grid):
    """:func:`check_memory` at the sweep grid's largest point (a Cartesian product: the largest alpha,
    d, T... occur together), times the runs going at once, and for the rows themselves.  Returns the
    number of rows (points times seeds)."""
    from .sweep import PARAMETERS

    spec = PARAMETERS[args.kind]
    hi = {k: max(grid.get(k, [v])) if k not in ("teacher", "damping") else None for k, v in spec.items()}
    n_rows = float(args.seeds)
    for v in grid.values():
        n_rows *= len(v)
    check_memory(n_rows * 4096.0, f"a sweep of {n_rows:.3g} rows", "use fewer values per option or --seeds")
    copies = max(1, min(int(n_rows), args.jobs or (2 if args.scheduler == "local" else 1)))
    teacher = "wishart" if "wishart" in grid.get("teacher", [spec["teacher"]]) else "other"
    if args.kind in ("amp", "erm", "bayes_amp"):
        check_sampled_run(f"sweep {args.kind} at d={hi['d']}, T={hi['T']}, alpha={hi['alpha']:g}", hi["alpha"],
                          hi["T"], hi["d"], hi["n_test"], teacher, hi["rho"], "erm" if args.kind == "erm" else "amp",
                          copies)
    else:
        check_se(f"sweep {args.kind} at T={hi['T']}, n_mc={hi['n_mc']}", hi["T"], hi["n_mc"], copies)
        if any(t != "wishart" for t in grid.get("teacher", [spec["teacher"]])):
            check_teacher(f"the exact spectrum of a teacher at d={hi['d']}", hi["d"], "other", hi["rho"])
    return int(n_rows)


# --------------------------------------------------------------------------------------------
# messages and streams
# --------------------------------------------------------------------------------------------


def one_line(exc) -> str:
    """An exception's message on one line (its type name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _Indented:
    """A text stream that indents every line written to it by two spaces (progress output)."""

    def __init__(self, stream):
        self.stream = stream
        self.at_start = True

    def write(self, s):
        out = []
        for piece in s.splitlines(keepends=True):
            if self.at_start and piece.strip():
                out.append("  ")
            out.append(piece)
            self.at_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(s)

    def flush(self):
        self.stream.flush()


@contextlib.contextmanager
def indented_progress():
    """While the block runs, lines written to a non-terminal stderr are indented (progress bars,
    iteration lines), so that an error message is the only unindented line of a failed command."""
    stream = sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        yield
        return
    with contextlib.redirect_stderr(_Indented(stream)):
        yield


def search_progress(desc, disable):
    """``(bar, progress)`` for a search of unknown length (the thresholds): a progress bar on stderr
    and the ``progress(alpha, value, converged)`` callable that advances it by one SE run."""
    from amp_attention.sweep import progress_bar

    with indented_progress():  # the bar keeps the (indenting) stream it was created with
        bar = progress_bar(desc=desc, disable=disable, bar_format="{desc}: {n_fmt} SE runs [{elapsed}{postfix}]")

    def progress(alpha, value, converged):
        bar.set_postfix_str(f"alpha={alpha:.5g} criterion={value:.3g}{'' if converged else ' (not converged)'}",
                            refresh=False)
        bar.update(1)
    return bar, progress


def one_line_warning(prog):
    """A ``warnings.showwarning`` printing ``prog: warning: Category: message`` on one line."""

    def show(message, category, filename, lineno, file=None, line=None):
        stream = sys.stderr if file is None else file
        try:
            stream.write(f"{prog}: warning: {category.__name__}: {one_line(message)}\n")
        except (OSError, ValueError):  # a closed stream: drop the warning
            pass

    return show
