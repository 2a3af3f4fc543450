"""The outcome classes of the fuzz campaign (issue 12), shared by the ``test_fuzz_*`` modules.

Every call of a public entry point on a drawn input must end in exactly one of:

* ``"error"``: a ``ValueError`` whose message names the offending argument (the test says which
  argument it spoiled; ``names`` lists the accepted spellings, e.g. ``("alpha",)``);
* ``"finite"``: a result whose every number (arrays, scalars, dataclass fields, ``history``
  dicts, data frames, fitted ``*_`` attributes) is finite;
* ``"flagged"``: a result that says it did not converge: ``diverged`` is true, or ``converged``
  is false with a non-empty ``message`` (or a ``ConvergenceWarning`` was emitted).  A result with
  a non-finite number must carry ``diverged=True`` when it has that flag, else ``converged=False``.

Anything else fails the test: another exception type (a crash), a ``ValueError`` that does not name
the argument, a non-finite number without a flag (silent NaN/inf), or a call running longer than
``timeout`` seconds (a hang).  The CLI variant :func:`cli_outcome` runs ``amp_attention.cli.main``
in-process and requires a zero exit, or a non-zero exit with exactly one line on stderr and no
traceback.

Example counts: :data:`EXAMPLES` gives ``max_examples`` per hypothesis profile; the fuzz tests use
``settings(max_examples=examples(k))`` so that the ``ci`` profile runs a fast subset and the
``thorough`` profile runs at least 1,000 examples over the campaign.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import numbers
import os
import signal
import warnings

import numpy as np

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def examples(ci: int, thorough: int = 200) -> int:
    """``max_examples`` for a fuzz test under the active hypothesis profile."""
    return thorough if PROFILE == "thorough" else ci


class Hang(Exception):
    """Raised inside the call when it runs past its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`Hang` in the main thread after ``seconds`` (SIGALRM; POSIX only)."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise Hang(f"call ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def non_finite_paths(obj, path: str = "result", _depth: int = 0) -> list[str]:
    """Paths of the non-finite numbers inside ``obj`` (empty when everything is finite)."""
    if _depth > 6 or obj is None or isinstance(obj, (str, bytes, bool, np.bool_)):
        return []
    if isinstance(obj, numbers.Number):
        try:
            return [] if np.all(np.isfinite(obj)) else [path]
        except TypeError:
            return []
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fc" and not np.all(np.isfinite(obj)):
            return [path]
        if obj.dtype == object:
            return [p for i, x in enumerate(obj.ravel()[:50]) for p in non_finite_paths(x, f"{path}[{i}]", _depth + 1)]
        return []
    try:
        import pandas as pd

        if isinstance(obj, pd.DataFrame):
            num = obj.select_dtypes("number")
            bad = [c for c in num.columns if not np.all(np.isfinite(num[c].to_numpy(dtype=float)))]
            return [f"{path}[{c!r}]" for c in bad]
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = []
        for f in dataclasses.fields(obj):
            out += non_finite_paths(getattr(obj, f.name), f"{path}.{f.name}", _depth + 1)
        return out
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite_paths(v, f"{path}[{k!r}]", _depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj[:200]) for p in non_finite_paths(v, f"{path}[{i}]", _depth + 1)]
    if hasattr(obj, "get_params") and hasattr(obj, "fit"):  # a fitted scikit-learn estimator
        fitted = {k: v for k, v in vars(obj).items() if k.endswith("_") and not k.startswith("_")}
        return non_finite_paths(fitted, path, _depth + 1)
    return []


def _flags(result):
    """(diverged, converged, message) of a result or fitted estimator; None where absent.

    A data frame (a sweep) is flagged when any row is: ``diverged`` any, ``converged`` all."""
    try:
        import pandas as pd

        if isinstance(result, pd.DataFrame):
            div = bool(result["diverged"].any()) if "diverged" in result else None
            conv = bool(result["converged"].all()) if "converged" in result else None
            return div, conv, "; ".join(map(str, result["message"])) if "message" in result else None
    except ImportError:  # pragma: no cover
        pass
    get = (lambda k: getattr(result, k, getattr(result, k + "_", None)))
    return get("diverged"), get("converged"), get("message")


def outcome(call, names=(), timeout: float = 120.0, nan_ok=()):
    """Run ``call()`` and return its outcome class, failing (``AssertionError``) on a forbidden one.

    ``names``: the argument names of which at least one must appear in a ``ValueError``'s message
    (empty: any ``ValueError`` is accepted, for inputs that are valid but extreme).
    ``nan_ok``: substrings of result paths whose non-finite values are there by design (e.g.
    ``"['mse']"`` of a GAMP history run without ``S_star``).
    Returns ``("error", exc)``, ``("finite", result)`` or ``("flagged", result)``.
    """
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught, time_limit(timeout):
            warnings.simplefilter("always")
            result = call()
    except ValueError as exc:
        msg = str(exc)
        if names:
            assert any(n in msg for n in names), f"ValueError does not name {names}: {msg!r}"
        assert msg.strip(), "ValueError with an empty message"
        return "error", exc
    except Hang as exc:
        raise AssertionError(f"hang: {exc}") from None
    except Exception as exc:  # a crash
        raise AssertionError(f"crash: {type(exc).__name__}: {exc}") from exc
    bad = [p for p in non_finite_paths(result) if not any(k in p for k in nan_ok)]
    diverged, converged, message = _flags(result)
    warned = any(getattr(w.category, "__name__", "") == "ConvergenceWarning" for w in caught)
    if bad:
        if diverged is not None:
            assert bool(diverged), f"non-finite {bad[:3]} without diverged=True"
        else:
            assert converged is not None and not bool(converged), f"silent non-finite values: {bad[:3]}"
        return "flagged", result
    if diverged or (converged is not None and not bool(converged) and (message or warned)):
        return "flagged", result
    if converged is not None and not bool(converged):
        raise AssertionError("converged=False without a message or a ConvergenceWarning")
    return "finite", result


def cli_outcome(argv, timeout: float = 120.0):
    """Run the CLI in-process; return ``(exit_code, stdout, stderr)``.

    Fails on a traceback, an uncaught exception, a hang, or a failure exit whose stderr is not
    exactly one line.
    """
    from amp_attention import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(timeout), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = cli.main(list(argv)) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Hang as exc:
        raise AssertionError(f"CLI hang on {argv}: {exc}") from None
    except Exception as exc:
        raise AssertionError(f"CLI raised {type(exc).__name__} on {argv}: {exc}") from exc
    stderr = err.getvalue()
    assert "Traceback" not in stderr, f"traceback on {argv}:\n{stderr}"
    if code != 0 and not any(a in ("-h", "--help") for a in argv):
        lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("usage:")
                 and not ln.startswith(" ")]
        assert len(lines) == 1, f"failure of {argv} should print one line on stderr, got:\n{stderr}"
    return code, out.getvalue(), stderr


def is_finite_number(x) -> bool:
    return isinstance(x, numbers.Real) and math.isfinite(x)
