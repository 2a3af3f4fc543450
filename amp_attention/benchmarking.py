"""Speed measured as ratios in one run (docs/theory.md §10); used by ``amp-attention bench``
and the scripts in ``benchmarks/``.  Nothing here is asserted in tests: wall-clock numbers
depend on the machine, ratios less so.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["best_time", "floor_time", "amp_iteration_ratios"]


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls (JIT, caches)."""
    for _ in range(warmup):
        fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def floor_time(n: int, T: int, d: int, repeats: int = 5, seed: int = 0) -> dict:
    """The floor of one AMP iteration: two GEMMs ``(nT x d)(d x d)`` and ``(d x nT)(nT x d)`` + one ``eigh(d)``."""
    rng = np.random.default_rng(seed)
    Xf = rng.standard_normal((n * T, d))
    B = rng.standard_normal((n * T, d))
    S = rng.standard_normal((d, d))
    S = S + S.T
    t_fwd = best_time(lambda: Xf @ S, repeats)
    t_bwd = best_time(lambda: Xf.T @ B, repeats)
    t_eigh = best_time(lambda: np.linalg.eigh(S), repeats)
    return {"t_gemms": t_fwd + t_bwd, "t_eigh": t_eigh, "t_floor": t_fwd + t_bwd + t_eigh}


def amp_iteration_ratios(d: int, T: int, alpha: float, loss: str = "cross_entropy", reg: str = "nuclear",
                         lam: float = 0.05, repeats: int = 5, seed: int = 0) -> dict:
    """Time of one ERM-AMP iteration (median over ``repeats`` iterations after 3 warm-up ones) over
    the floor, measured in the same run, plus the time of the output side alone."""
    import amp_attention as aa
    from amp_attention.amp import gamp
    from amp_attention.denoisers import make_denoiser
    from amp_attention.losses import make_loss
    from amp_attention.losses import gram_g_out
    from amp_attention.operator import SensingOperator, sample_gram
    from amp_attention.variance import GramVariance

    rng = np.random.default_rng(seed)
    teacher = aa.Teacher.wishart(d, 0.5, rng)
    n = max(1, int(round(alpha * d * d)))
    data = aa.sample_data(n, T, teacher, aa.SoftmaxChannel(1.0), rng)
    loss_obj, den = make_loss(loss, 1.0), make_denoiser(reg, lam)
    warm = 3
    res = gamp(data.X, data.y, loss_obj, den, max_iter=warm + repeats, tol=0)
    t_iter = float(np.median(res.history["time"][warm:]))
    # the output side alone (as GAMP calls it: Gamma factored once, Jacobian traces), at the final state
    gram = GramVariance(sample_gram(data.X))
    z = SensingOperator(data.X).forward(res.S, check=False)
    t_g_out = best_time(lambda: gram_g_out(loss_obj, data.y, z, res.V, gram), repeats)
    fl = floor_time(n, T, d, repeats, seed)
    return {"d": d, "T": T, "n": n, "alpha": alpha, "loss": loss, "reg": reg, "t_iter": t_iter,
            "t_g_out": t_g_out, **fl, "ratio_floor": t_iter / fl["t_floor"]}
