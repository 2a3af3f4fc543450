"""Compile (or load from Numba's cache) the kernels a CLI run will use, before it is timed.

Private helper of :mod:`amp_attention.cli`.  :func:`warm_up` runs a copy of the estimator for two
iterations on a tiny problem (32 samples) with the same T, loss, regulariser, channel and adjoint
path as the real run, so that the per-iteration times printed afterwards exclude compilation.

On a cold cache most of that time is Numba compiling, one kernel after another (the
cross-entropy prox alone is ~10 s).  For the losses with a compiled prox, the prox is compiled in
a second (spawned) process while this one compiles the operator and denoiser kernels; this
process then loads the prox from Numba's on-disk cache instead of compiling it again.  If the
second process cannot start or fails, nothing is lost: this process compiles the prox itself.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

__all__ = ["warm_up"]

#: losses whose output side is a large compiled kernel worth compiling in a second process
_HEAVY_LOSSES = ("cross_entropy", "softmax_square")


def _compile_output_side(loss: str, beta: float, T: int) -> None:
    """Child process: call the loss's ``g_out`` (GAMP's fused form) and value once on tiny inputs."""
    import amp_attention as aa
    from amp_attention.losses import gram_g_out
    from amp_attention.variance import GramVariance

    rng = np.random.default_rng(0)
    tiny = aa.sample_data(32, T, aa.Teacher.wishart(6, 0.5, rng), aa.SoftmaxChannel(1.0), rng)
    out = aa.make_loss(loss, beta)
    K = T * (T + 1) // 2
    gram = GramVariance(aa.sample_gram(tiny.X))
    omega = rng.standard_normal((32, K))
    gram_g_out(out, tiny.y, omega, 1.0, gram)
    out.value_z(tiny.y, omega)


def _prox_cached(loss: str) -> bool:
    """Whether Numba's on-disk cache already holds the loss's prox kernel (its index file exists;
    a heuristic: a new T is then compiled in this process, as without the second process)."""
    import os

    from .losses._cross_entropy_kernels import ce_prox
    from .losses._softmax_square_kernels import ss_prox

    kernel = {"cross_entropy": ce_prox, "softmax_square": ss_prox}[loss]
    try:
        return os.path.exists(kernel._cache._cache_file._index_path)
    except AttributeError:  # another Numba version: assume cold
        return False


def _start_output_side(est, T):
    """Start the child compiling the prox, or return None (not a heavy loss, or no process)."""
    loss = getattr(est, "loss", None)
    if loss not in _HEAVY_LOSSES or _prox_cached(loss):
        return None
    try:
        import multiprocessing

        proc = multiprocessing.get_context("spawn").Process(
            target=_compile_output_side, args=(loss, float(est.beta), int(T)), daemon=True)
        proc.start()
        return proc
    except (OSError, ValueError, RuntimeError):  # pragma: no cover - no process available
        return None


def warm_up(est, T: int, d: int, channel) -> float:
    """Compile the kernels of a run of ``est`` at token dimension ``d``; return the seconds spent."""
    import amp_attention as aa
    from sklearn.base import clone

    t0 = time.perf_counter()
    child = _start_output_side(est, T)
    rng = np.random.default_rng(0)
    syrk_d = aa.SensingOperator.SYRK_MIN_D + aa.SensingOperator.SYRK_MIN_D_PER_T * T  # the "auto" rule
    tiny_d = min(d, 6) if d < syrk_d else syrk_d
    tiny = aa.sample_data(32, T, aa.Teacher.wishart(tiny_d, 0.5, rng), channel, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if child is not None:  # meanwhile: the operator and denoiser kernels, not the prox
            op = aa.SensingOperator(tiny.X)
            S = op.adjoint(op.forward(np.eye(tiny_d)))
            op.forward_factored(np.ones((tiny_d, 2)))
            aa.make_denoiser(est.reg, est.lam, est.width).factored(S, 1.0)
            child.join()
        clone(est).set_params(max_iter=2, tol=0.0).fit(tiny.X, tiny.y)
    return time.perf_counter() - t0
