"""Compile (or load from Numba's cache) the kernels a CLI run will use, before it is timed.

Private helper of :mod:`amp_attention.cli`.  :func:`warm_up` runs a copy of the estimator for two
iterations on a tiny problem (32 samples) with the same T, loss, regulariser, channel and adjoint
path as the real run, so that the per-iteration times printed afterwards exclude compilation.

On a cold cache most of a first run is Numba compiling, one kernel after another (~25 s of CPU
for the default run; the cross-entropy prox alone ~10 s).  The work is split over two processes:
for the losses with a compiled prox, :func:`start_output_side` starts a second (spawned) process
that compiles the output side (the prox with GAMP's Jacobian trace, the loss value, the per-sample
Gram matrices) as early as possible, and this process compiles the rest meanwhile (sampling the
data, the operator and denoiser kernels, and the spectral kernels of the state evolution), then
loads the child's kernels from Numba's on-disk cache instead of compiling them again.  If the
second process cannot start or fails, nothing is lost: this process compiles them itself.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

__all__ = ["start_output_side", "warm_up"]

#: losses whose output side is a large compiled kernel worth compiling in a second process
_HEAVY_LOSSES = ("cross_entropy", "softmax_square")


def _compile_output_side(loss: str, beta: float, T: int) -> None:
    """Child process: the loss's ``g_out`` (GAMP's fused form) and value once on tiny inputs, and the
    per-sample Gram matrices.  The inputs are made without the operator kernels (the parent
    compiles those): Dirichlet rows as targets, Gaussian tokens."""
    import amp_attention as aa
    from amp_attention.losses import gram_g_out
    from amp_attention.variance import GramVariance

    rng = np.random.default_rng(0)
    n, K = 32, T * (T + 1) // 2
    y = rng.dirichlet(np.ones(T), size=(n, T))
    gram = GramVariance(aa.sample_gram(rng.standard_normal((n, T, 6))))
    omega = rng.standard_normal((n, K))
    out = aa.make_loss(loss, beta)
    gram_g_out(out, y, omega, 1.0, gram)
    out.value_z(y, omega)


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


def start_output_side(est, T):
    """Start the child compiling the output side of a run of ``est``, or return None (not a heavy
    loss, already cached, or no process available).  Pass the result to :func:`warm_up`."""
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


def _compile_input_side(est, tiny, teacher, tiny_d) -> None:
    """This process, while the child works: the operator and denoiser kernels and the spectral
    kernels of the state evolution's input side (not the output side: the child's)."""
    import amp_attention as aa
    from amp_attention.spectral import SpectralLaw, r_density

    op = aa.SensingOperator(tiny.X)
    S = op.adjoint(op.forward(np.eye(tiny_d)))
    op.forward_factored(np.ones((tiny_d, 2)))
    aa.make_denoiser(est.reg, est.lam, est.width).factored(S, 1.0)
    r_density(SpectralLaw.atoms(teacher.eigenvalues), 1.0, 0.5).grid((0.1,))


def warm_up(est, T: int, d: int, channel, child=None) -> float:
    """Compile the kernels of a run of ``est`` at token dimension ``d``; return the seconds spent.

    ``child``: the process of :func:`start_output_side` (started early, so that it overlaps with
    whatever the caller does in between), or None."""
    import amp_attention as aa
    from sklearn.base import clone

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    syrk_d = aa.SensingOperator.SYRK_MIN_D + aa.SensingOperator.SYRK_MIN_D_PER_T * T  # the "auto" rule
    tiny_d = min(d, 6) if d < syrk_d else syrk_d
    teacher = aa.Teacher.wishart(tiny_d, 0.5, rng)
    tiny = aa.sample_data(32, T, teacher, channel, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if child is not None:
            _compile_input_side(est, tiny, teacher, tiny_d)
            child.join()
        clone(est).set_params(max_iter=2, tol=0.0).fit(tiny.X, tiny.y)
    return time.perf_counter() - t0
