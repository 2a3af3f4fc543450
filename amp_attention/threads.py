"""Thread policy: BLAS and Numba never compete for the cores (docs/theory.md §10).

The heavy work of one GAMP iteration runs in Numba kernels parallel over samples, including the
GEMMs of the sensing operator, which each Numba thread issues for its own block of samples
(:mod:`amp_attention._operator_kernels`).  BLAS must then run single-threaded: a threaded BLAS
called from several Numba threads oversubscribes the cores, and OpenBLAS worker threads that
busy-wait after a call starve the Numba threads that follow (measured on 2 cores: 1.7x slower
iterations).  :func:`single_threaded_blas` limits every loaded BLAS library to one thread for the
duration of a ``with`` block (threadpoolctl), whatever the import order of NumPy and this package,
and writes no environment variable.  The Numba thread count is the usual ``NUMBA_NUM_THREADS`` /
``numba.set_num_threads``.
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["single_threaded_blas"]

_lock = threading.Lock()
_state = {"controller": None, "depth": 0}


def _controller():
    from threadpoolctl import ThreadpoolController

    if _state["controller"] is None:
        _state["controller"] = ThreadpoolController()  # enumerates the loaded BLAS once (~1 ms)
    return _state["controller"]


@contextlib.contextmanager
def single_threaded_blas():
    """Limit all loaded BLAS libraries to one thread inside the block (re-entrant, ~20 us).

    Nested uses cost nothing; the previous limits are restored when the outermost block exits.
    BLAS limits are process-wide: when several Python threads run GAMP at once, the first to leave
    restores the limits while the others still run (their results are unchanged; only their BLAS
    calls may then oversubscribe the cores).
    """
    with _lock:
        outer = _state["depth"] == 0
        _state["depth"] += 1
    try:
        if outer:
            with _controller().limit(limits=1, user_api="blas"):
                yield
        else:
            yield
    finally:
        with _lock:
            _state["depth"] -= 1
