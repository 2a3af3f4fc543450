"""Input validation shared by the public functions: clear ``ValueError``s, no silent broadcasting."""

from __future__ import annotations

import numbers
import os

import numpy as np

from .whitening import T_MAX

__all__ = [
    "as_float_array",
    "check_tokens",
    "check_symmetric",
    "check_positive",
    "check_nonnegative",
    "check_rng",
    "check_T",
    "available_memory",
    "check_memory",
    "InsufficientMemoryError",
    "check_targets",
    "check_real",
]


def as_float_array(x, name: str, ndim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Return ``x`` as a float64 array, checking dimension, emptiness and finiteness.

    Ragged nested sequences and other inputs NumPy cannot turn into an array give a
    ``ValueError`` naming ``name`` (not NumPy's "inhomogeneous shape" message)."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be a real numeric array (not a ragged nested sequence), "
                         f"got {type(x).__name__}: {exc}") from None
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if not all_finite(arr):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def all_finite(arr: np.ndarray, block: int = 1 << 20) -> bool:
    """``np.all(np.isfinite(arr))`` without a boolean temporary of arr's size (blocks of ``block``)."""
    if not arr.flags.c_contiguous:
        return bool(np.all(np.isfinite(arr)))
    flat = arr.reshape(-1)
    if flat.size <= block:
        return bool(np.all(np.isfinite(flat)))
    return all(bool(np.all(np.isfinite(flat[i:i + block]))) for i in range(0, flat.size, block))


def check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or not 1 <= T <= T_MAX:
        raise ValueError(f"T must be an integer in 1..{T_MAX}, got {T!r}")
    return int(T)


def check_tokens(X, keep_float32: bool = False) -> np.ndarray:
    """Tokens ``X`` of shape ``(n, T, d)``, n >= 1, 1 <= T <= 8, d >= 1, finite -> float64, C-contiguous.

    ``keep_float32``: a float32 array stays float32 (no copy when C-contiguous), for the float32
    operator; anything else becomes float64.
    """
    if keep_float32 and isinstance(X, np.ndarray) and X.dtype == np.float32:
        if X.ndim != 3:
            raise ValueError(f"X must be 3-dimensional, got shape {X.shape}")
        if X.size == 0:
            raise ValueError(f"X must not be empty, got shape {X.shape}")
        if not all_finite(X):
            raise ValueError("X contains NaN or inf")
    else:
        X = as_float_array(X, "X", ndim=3)
    check_T(X.shape[1])
    return np.ascontiguousarray(X)


def check_symmetric(S, name: str = "S", d: int | None = None, rtol: float = 1e-10) -> np.ndarray:
    """A finite symmetric ``(d, d)`` matrix (symmetric to relative tolerance ``rtol``)."""
    S = as_float_array(S, name, ndim=2)
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be square (d, d), got shape {S.shape}")
    if d is not None and S.shape[0] != d:
        raise ValueError(f"{name} must have shape ({d}, {d}) to match the tokens, got {S.shape}")
    scale = max(np.max(np.abs(S)), 1e-300)
    if np.max(np.abs(S - S.T)) > rtol * scale:
        raise ValueError(f"{name} must be symmetric")
    return np.ascontiguousarray(S)


def _finite_float(x):
    """``float(x)`` for a real number (not a bool) that is finite as a float64, else None
    (also for ints too large for a float and for real types NumPy cannot handle)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        return None
    try:
        v = float(x)
    except (OverflowError, TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def check_positive(x, name: str) -> float:
    v = _finite_float(x)
    if v is None or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return v


def check_nonnegative(x, name: str) -> float:
    v = _finite_float(x)
    if v is None or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return v


def check_rng(rng, name: str = "rng") -> np.random.Generator:
    """Accept a ``numpy.random.Generator``, an int seed >= 0, or None (fresh entropy).

    ``name`` is the argument's name in the caller (``seed``, ``random_state``...) for the message.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"{name} must be an int seed >= 0, a numpy.random.Generator or None, got {rng!r}")
        return np.random.default_rng(int(rng))
    raise ValueError(f"{name} must be a numpy.random.Generator, an int seed >= 0 or None, "
                     f"got {type(rng).__name__}")


def available_memory() -> int | None:
    """Bytes of memory available to this process (Linux ``MemAvailable``; None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - non-POSIX
        return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


class InsufficientMemoryError(MemoryError, ValueError):
    """Raised before allocating when a call would need more memory than is available.

    A ``MemoryError`` (what it is) and a ``ValueError`` (the arguments ask for too much; the
    message names them), so either ``except`` clause catches it.
    """


def check_memory(nbytes: float, what: str, hint: str = "") -> None:
    """Raise :class:`InsufficientMemoryError` *before* allocating when ``what`` would need more than the available memory.

    ``nbytes``: the estimated need in bytes (a float, so that products of huge sizes do not
    overflow); the message states the need and what is available, plus ``hint``.  Does nothing
    where the available memory is unknown.
    """
    avail = available_memory()
    if np.isfinite(nbytes) and (avail is None or nbytes <= avail):
        return
    need = _gib(nbytes) if np.isfinite(nbytes) else "an unbounded amount of memory"
    have = f", {_gib(avail)} available" if avail is not None else ""
    raise InsufficientMemoryError(f"{what} would need {need}{have}{'; ' + hint if hint else ''}")


def check_targets(y, n: int, T: int, *, stochastic: bool = False, what: str = "") -> np.ndarray:
    """Targets ``y (n, T, T)`` matching tokens ``X (n, T, d)``, finite -> float64, C-contiguous.

    ``stochastic``: the rows must be probability vectors (entries >= -1e-12, row sums within 1e-8
    of 1), as the cross-entropy needs; ``what`` names the reason in the message (e.g. the loss).
    """
    y = as_float_array(y, "y", ndim=3)
    if y.shape != (n, T, T):
        raise ValueError(f"y must have shape (n, T, T) = {(n, T, T)} to match X, got {y.shape}")
    if stochastic:
        if np.any(y < -1e-12):
            raise ValueError(f"y must be non-negative{what} (rows are probabilities), got min {y.min():.3g}")
        dev = float(np.max(np.abs(y.sum(axis=-1) - 1.0)))
        if dev > 1e-8:
            raise ValueError(f"y rows must sum to 1{what} (softmax / hardmax targets), got a row sum off by {dev:.3g}")
    return np.ascontiguousarray(y)

def check_real(x, name: str) -> float:
    """A finite real number (not a bool), as a float; ``ValueError`` naming ``name`` otherwise."""
    v = _finite_float(x)
    if v is None:
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
    return v
