"""Scratch copies of the operator kernels (amp_attention/operator.py) and candidate rewrites.

Not part of the package: this script measures proposed changes before anyone edits
``amp_attention/operator.py``.  For each variant it checks agreement with the package to ~1e-12
(relative) and NaN propagation, then times it against the package and the first version, round-robin in one run.

    python benchmarks/kernel_variants.py [--quick] [--threads N] [--d 100 300] [--T 2 3]

Timed variants (the package is being edited while this is written: ``pkg`` is whatever
``amp_attention.operator`` is at run time; ``v0`` are verbatim copies of the first version)
--------------------------------------------------------------------------------------------
pair_contract (forward, per-sample ``H_ab = <x_a, y_b>``):
  pc_v0       first version: all T^2 pairs, scalar dot in strict IEEE order -> one serial add
              chain per pair, not vectorised;
  pc_pkg      package kernel (at the time of writing: upper triangle a <= b, mirrored, strict);
  pc_tri_fm   upper triangle with ``fastmath={'reassoc', 'contract'}`` ONLY: LLVM may vectorise
              the reduction and use FMA; no 'nnan'/'ninf', so NaN/inf propagate exactly as before;
  pc_fused    ``pc_tri_fm`` plus the trace subtraction and 1/sqrt(d) scaling inside the kernel
              (removes the two strided NumPy passes over H).
  (also defined and checked, not timed by default: pc_full_fm, pc_tri_acc4 - four explicit
  partial sums without any fastmath flag.)
mix_tokens (adjoint, per-sample ``B = G X``):
  mt_v0       first version: ``np.zeros`` then ``+=`` for each nonzero g;
  mt_pkg      package kernel (at the time of writing: ``np.empty``, first token assigns);
  mt_assign_buf  the same loop writing into a preallocated buffer.
fin_pkg       ``np.all(np.isfinite(X))`` as in ``as_float_array`` (run twice per fwd + adj).
end to end (forward + adjoint, core functions, no validation):
  e2e_v0      first version (one GEMM each, full n T d intermediates);
  e2e_pkg     package (at the time of writing: blocks of CHUNK_ROWS rows);
  e2e_pkg_fm  package blocking with ``pc_fused`` in the forward;
  e2e_new_buf one GEMM each, ``pc_fused`` + assign kernel, Y and B written into preallocated
              (n T, d) buffers (``np.matmul(..., out=)``), as an operator object kept across AMP
              iterations would do: no page faults on fresh n T d arrays, 4 BLAS/Numba hand-offs;
  e2e_chunk   blocks of ~2 MB of tokens (cache-sized, d-dependent), buffers reused per block;
  e2e_new_buf_serial  ``e2e_new_buf`` with serial (non-prange) Numba kernels: the GEMMs keep
              all BLAS threads, and there is no hand-off between two thread pools.
``ra(...)`` = end-to-end time / ``gemm2`` (the two bare GEMMs ``X2 @ S``, ``X2.T @ B``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (first: applies --threads)
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from amp_attention import operator as op  # noqa: E402

FM = {"reassoc", "contract"}  # no 'nnan', 'ninf', 'nsz', 'arcp', 'afn'
# No cache=True here: two dispatchers compiled from the same Python function (``_full`` with and
# without fastmath) share one on-disk cache entry, so the second would silently load the first.


def _full(X, Y):
    n, T, d = X.shape
    H = np.empty((n, T, T))
    for mu in prange(n):
        for a in range(T):
            for b in range(T):
                s = 0.0
                for i in range(d):
                    s += X[mu, a, i] * Y[mu, b, i]
                H[mu, a, b] = s
    return H


def _tri(X, Y):
    n, T, d = X.shape
    H = np.empty((n, T, T))
    for mu in prange(n):
        for a in range(T):
            for b in range(a, T):
                s = 0.0
                for i in range(d):
                    s += X[mu, a, i] * Y[mu, b, i]
                H[mu, a, b] = s
                H[mu, b, a] = s
    return H


pc_full = njit(parallel=True)(_full)
pc_full_fm = njit(parallel=True, fastmath=FM)(_full)
pc_tri = njit(parallel=True)(_tri)
pc_tri_fm = njit(parallel=True, fastmath=FM)(_tri)


@njit(parallel=True)
def pc_tri_acc4(X, Y):
    n, T, d = X.shape
    H = np.empty((n, T, T))
    d4 = d - d % 4
    for mu in prange(n):
        for a in range(T):
            for b in range(a, T):
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                for i in range(0, d4, 4):
                    s0 += X[mu, a, i] * Y[mu, b, i]
                    s1 += X[mu, a, i + 1] * Y[mu, b, i + 1]
                    s2 += X[mu, a, i + 2] * Y[mu, b, i + 2]
                    s3 += X[mu, a, i + 3] * Y[mu, b, i + 3]
                for i in range(d4, d):
                    s0 += X[mu, a, i] * Y[mu, b, i]
                s = (s0 + s1) + (s2 + s3)
                H[mu, a, b] = s
                H[mu, b, a] = s
    return H


@njit(parallel=True, fastmath=FM)
def pc_fused(X, Y, tr, scale):
    """``H_ab = (<x_a, y_b> - delta_ab tr) * scale``, upper triangle mirrored (same operations
    as the package's NumPy glue, so identical up to the reassociated dot product)."""
    n, T, d = X.shape
    H = np.empty((n, T, T))
    for mu in prange(n):
        for a in range(T):
            for b in range(a, T):
                s = 0.0
                for i in range(d):
                    s += X[mu, a, i] * Y[mu, b, i]
                if a == b:
                    s -= tr
                s *= scale
                H[mu, a, b] = s
                H[mu, b, a] = s
    return H


@njit(parallel=True)
def mt_v0(G, X):
    """Verbatim copy of the first package version: ``np.zeros`` then ``+=`` per nonzero g."""
    n, T, d = X.shape
    B = np.zeros((n, T, d))
    for mu in prange(n):
        for a in range(T):
            for b in range(T):
                g = G[mu, a, b]
                if g != 0.0:
                    for i in range(d):
                        B[mu, a, i] += g * X[mu, b, i]
    return B


def _pc_fused_body(X, Y, tr, scale):
    n, T, d = X.shape
    H = np.empty((n, T, T))
    for mu in prange(n):
        for a in range(T):
            for b in range(a, T):
                s = 0.0
                for i in range(d):
                    s += X[mu, a, i] * Y[mu, b, i]
                if a == b:
                    s -= tr
                s *= scale
                H[mu, a, b] = s
                H[mu, b, a] = s
    return H


def _mt_assign_body(G, X, B):
    n, T, d = X.shape
    for mu in prange(n):
        for a in range(T):
            g = G[mu, a, 0]
            for i in range(d):
                B[mu, a, i] = g * X[mu, 0, i]
            for b in range(1, T):
                g = G[mu, a, b]
                for i in range(d):
                    B[mu, a, i] += g * X[mu, b, i]
    return B


# serial twins (prange == range without parallel=True): no hand-off between Numba's and BLAS's
# thread pools, which matters when the cores are shared with other processes
pc_fused_serial = njit(fastmath=FM)(_pc_fused_body)
mt_assign_serial = njit(_mt_assign_body)


@njit(parallel=True)
def _mt_assign_into(G, X, B):
    n, T, d = X.shape
    for mu in prange(n):
        for a in range(T):
            g = G[mu, a, 0]
            for i in range(d):
                B[mu, a, i] = g * X[mu, 0, i]
            for b in range(1, T):
                g = G[mu, a, b]
                for i in range(d):
                    B[mu, a, i] += g * X[mu, b, i]
    return B


def mt_assign(G, X, out=None):
    B = np.empty(X.shape) if out is None else out
    return _mt_assign_into(G, X, B)


def finite_pkg(X):
    return bool(np.all(np.isfinite(X)))


def finite_sum(X):
    return bool(np.isfinite(X.sum())) or bool(np.all(np.isfinite(X)))


def pre_v0(X, S):
    """First package version of ``_preactivations`` (one GEMM, full T x T scalar kernel)."""
    n, T, d = X.shape
    Y = (X.reshape(n * T, d) @ S).reshape(n, T, d)
    H = pc_full(X, Y)
    tr = np.trace(S)
    for a in range(T):
        H[:, a, a] -= tr
    H *= 1.0 / np.sqrt(d)
    return H


def back_v0(X, G):
    """First package version of ``_backproject``."""
    n, T, d = X.shape
    B = mt_v0(G, X)
    M = X.reshape(n * T, d).T @ B.reshape(n * T, d)
    M = 0.5 * (M + M.T)
    tr = 0.0
    for a in range(T):
        tr += G[:, a, a].sum()
    M[np.diag_indices(d)] -= tr
    M *= 1.0 / np.sqrt(d)
    return M


def pre_pkg_fm(X, S):
    """The package's current blocked ``_preactivations`` (CHUNK_ROWS rows per block) with the
    fused fastmath kernel instead of ``_pair_contract`` + NumPy glue."""
    n, T, d = X.shape
    tr, sc = np.trace(S), 1.0 / np.sqrt(d)
    H = np.empty((n, T, T))
    step = max(1, getattr(op, "CHUNK_ROWS", 8192) // T)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        Xb = X[lo:hi]
        Y = (Xb.reshape((hi - lo) * T, d) @ S).reshape(hi - lo, T, d)
        H[lo:hi] = pc_fused(Xb, Y, tr, sc)
    return H


def pre_new(X, S, Ybuf=None, serial=False):
    n, T, d = X.shape
    X2 = X.reshape(n * T, d)
    Y = X2 @ S if Ybuf is None else np.matmul(X2, S, out=Ybuf)
    return (pc_fused_serial if serial else pc_fused)(X, Y.reshape(n, T, d), np.trace(S), 1.0 / np.sqrt(d))


def back_new(X, G, Bbuf=None, serial=False):
    n, T, d = X.shape
    Bo = np.empty(X.shape) if Bbuf is None else Bbuf.reshape(n, T, d)
    B = mt_assign_serial(G, X, Bo) if serial else mt_assign(G, X, Bo)
    M = X.reshape(n * T, d).T @ B.reshape(n * T, d)
    M = 0.5 * (M + M.T)
    tr = 0.0
    for a in range(T):
        tr += G[:, a, a].sum()
    M[np.diag_indices(d)] -= tr
    M *= 1.0 / np.sqrt(d)
    return M


def chunk_rows(T, d, target_bytes=2 * 1024**2):
    """Samples per block so that one (block, T, d) slab is ~``target_bytes`` (cache-sized)."""
    return max(1, int(target_bytes // (8 * T * d)))


def pre_chunk(X, S, chunk=None):
    """Forward in sample blocks: Y only ever exists for one block (stays in cache)."""
    n, T, d = X.shape
    chunk = chunk or chunk_rows(T, d)
    tr, sc = np.trace(S), 1.0 / np.sqrt(d)
    H = np.empty((n, T, T))
    Yb = np.empty((min(chunk, n) * T, d))
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        Xc = X[s0:s1]
        Y = np.matmul(Xc.reshape(-1, d), S, out=Yb[: (s1 - s0) * T])
        H[s0:s1] = pc_fused(Xc, Y.reshape(-1, T, d), tr, sc)
    return H


def back_chunk(X, G, chunk=None):
    """Adjoint in sample blocks: M += X_blk^T (G X)_blk; B only ever exists for one block."""
    n, T, d = X.shape
    chunk = chunk or chunk_rows(T, d)
    M = np.zeros((d, d))
    tmp = np.empty((d, d))
    Bb = np.empty((min(chunk, n), T, d))
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        Xc = X[s0:s1]
        B = _mt_assign_into(G[s0:s1], Xc, Bb[: s1 - s0])
        M += np.matmul(Xc.reshape(-1, d).T, B.reshape(-1, d), out=tmp)
    M = 0.5 * (M + M.T)
    tr = 0.0
    for a in range(T):
        tr += G[:, a, a].sum()
    M[np.diag_indices(d)] -= tr
    M *= 1.0 / np.sqrt(d)
    return M


def relerr(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def check(rng):
    """Agreement with the definitions / package to ~1e-12 and NaN/inf propagation."""
    errs = {}

    def upd(k, v):
        errs[k] = max(errs.get(k, 0.0), v)

    for T in (1, 2, 3, 5, 8):
        for d in (1, 3, 7, 64, 101):
            X = rng.standard_normal((9, T, d))
            Yg = rng.standard_normal((9, T, d))
            G = rng.standard_normal((9, T, T))
            W = rng.standard_normal((d, d))
            S = W + W.T
            Y = (X.reshape(-1, d) @ S).reshape(X.shape)  # the forward's Y: H exactly symmetric in exact arithmetic
            ref_g = np.einsum("nai,nbi->nab", X, Yg)
            ref = np.einsum("nai,nbi->nab", X, Y)
            upd("pc_full", relerr(pc_full(X, Yg), ref_g))
            upd("pc_full_fm", relerr(pc_full_fm(X, Yg), ref_g))
            for name, f in (("pc_tri", pc_tri), ("pc_tri_fm", pc_tri_fm), ("pc_tri_acc4", pc_tri_acc4), ("pc_pkg", op._pair_contract)):
                upd(name, relerr(f(X, Y), ref))
            upd("mt_assign", relerr(mt_assign(G, X), np.einsum("nab,nbi->nai", G, X)))
            Hp, Mp = op._preactivations(X, S), op._backproject(X, G)
            upd("pre_new_vs_pkg", relerr(pre_new(X, S), Hp))
            upd("back_new_vs_pkg", relerr(back_new(X, G), Mp))
            Yb, Bb = np.empty((9 * T, d)), np.empty((9 * T, d))
            upd("pre_new_buf_vs_pkg", relerr(pre_new(X, S, Yb), Hp))
            upd("back_new_buf_vs_pkg", relerr(back_new(X, G, Bb), Mp))
            upd("pre_chunk_vs_pkg", relerr(pre_chunk(X, S, chunk=4), Hp))
            upd("pre_new_serial_vs_pkg", relerr(pre_new(X, S, Yb, serial=True), Hp))
            upd("back_new_serial_vs_pkg", relerr(back_new(X, G, Bb, serial=True), Mp))
            upd("pre_pkg_fm_vs_pkg", relerr(pre_pkg_fm(X, S), Hp))
            upd("pre_v0_vs_pkg", relerr(pre_v0(X, S), Hp))
            upd("back_v0_vs_pkg", relerr(back_v0(X, G), Mp))
            upd("back_chunk_vs_pkg", relerr(back_chunk(X, G, chunk=4), Mp))
    # NaN / inf propagation (the unvalidated internal paths used inside AMP must propagate them)
    X = rng.standard_normal((4, 3, 16))
    Y = rng.standard_normal((4, 3, 16))
    G = rng.standard_normal((4, 3, 3))
    W = rng.standard_normal((16, 16))
    S = W + W.T
    for bad in (np.nan, np.inf, -np.inf):
        Yb = Y.copy()
        Yb[1, 2, 5] = bad
        pairs = (("pc_full_fm", pc_full_fm, pc_full), ("pc_tri_fm", pc_tri_fm, pc_tri), ("pc_tri_acc4", pc_tri_acc4, pc_tri),
                 ("pc_fused", lambda X, Y: pc_fused(X, Y, 0.0, 1.0), pc_tri))
        for name, f, base in pairs:
            H, H0 = f(X, Yb), base(X, Yb)
            assert np.array_equal(np.isnan(H), np.isnan(H0)) and np.array_equal(np.isinf(H), np.isinf(H0)), name
            assert not np.all(np.isfinite(H[1])) and np.all(np.isfinite(np.delete(H, 1, axis=0))), name
        Sb = S.copy()
        Sb[3, 7] = Sb[7, 3] = bad
        H, H0 = pre_new(X, Sb), op._preactivations(X, Sb)
        assert np.array_equal(np.isnan(H), np.isnan(H0)) and np.array_equal(np.isinf(H), np.isinf(H0)), "pre_new"
        Gb = G.copy()
        Gb[2, 0, 1] = bad
        B, B0 = mt_assign(Gb, X), op._mix_tokens(Gb, X)
        assert np.array_equal(np.isnan(B), np.isnan(B0)) and np.array_equal(np.isinf(B), np.isinf(B0)), "mt_assign"
        for name, f in (("back_new", back_new), ("back_chunk", lambda X, G: back_chunk(X, G, 3))):
            M, M0 = f(X, Gb), op._backproject(X, Gb)
            assert np.array_equal(np.isnan(M), np.isnan(M0)) and np.array_equal(np.isinf(M), np.isinf(M0)), name
        H, H0 = pre_chunk(X, Sb, 3), op._preactivations(X, Sb)
        assert np.array_equal(np.isnan(H), np.isnan(H0)) and np.array_equal(np.isinf(H), np.isinf(H0)), "pre_chunk"
        Xb = X.copy()
        Xb[0, 1, 3] = bad
        assert not finite_sum(Xb) and not finite_pkg(Xb)
    big = np.full((10, 2, 3), 1e308)
    assert finite_sum(big) and finite_pkg(big)  # overflowing sum falls back to the exact check
    return errs


def main(argv=None):
    p = C.make_parser("Scratch kernel variants for amp_attention/operator.py")
    p.add_argument("--d", type=int, nargs="+", default=None)
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--alpha", type=float, default=0.5)
    args = p.parse_args(argv)
    ds = args.d or ([100] if args.quick else [100, 200, 300])
    Ts = args.T or [2, 3]
    repeats = args.repeats or (5 if args.quick else 9)
    rng = np.random.default_rng(0)
    with np.errstate(all="ignore"):
        errs = check(rng)
    print("max relative difference to the definitions / package:", {k: f"{v:.1e}" for k, v in errs.items()})
    print("NaN/inf propagation: ok")

    rows = []
    for d in ds:
        for T in Ts:
            n = int(round(args.alpha * d * d))
            X = rng.standard_normal((n, T, d))
            W = rng.standard_normal((d, d))
            S = (W + W.T) / np.sqrt(2 * d)
            G = rng.standard_normal((n, T, T))
            G = 0.5 * (G + G.transpose(0, 2, 1))
            X2 = X.reshape(n * T, d)
            Y = (X2 @ S).reshape(n, T, d)
            Bf = rng.standard_normal((n * T, d))
            Yb, Bb = np.empty((n * T, d)), np.empty((n * T, d))
            tr, sc = np.trace(S), 1.0 / np.sqrt(d)
            fns = {
                "gemm2": lambda: (X2 @ S, X2.T @ Bf),
                "gemm2_out": lambda: (np.matmul(X2, S, out=Yb), X2.T @ Bf),
                "pc_v0": lambda: pc_full(X, Y),
                "pc_pkg": lambda: op._pair_contract(X, Y),
                "pc_tri_fm": lambda: pc_tri_fm(X, Y),
                "pc_fused": lambda: pc_fused(X, Y, tr, sc),
                "mt_v0": lambda: mt_v0(G, X),
                "mt_pkg": lambda: op._mix_tokens(G, X),
                "mt_assign_buf": lambda: mt_assign(G, X, Bb.reshape(n, T, d)),
                "fin_pkg": lambda: finite_pkg(X),
                "e2e_v0": lambda: (pre_v0(X, S), back_v0(X, G)),
                "e2e_pkg": lambda: (op._preactivations(X, S), op._backproject(X, G)),
                "e2e_pkg_fm": lambda: (pre_pkg_fm(X, S), op._backproject(X, G)),
                "e2e_new_buf": lambda: (pre_new(X, S, Yb), back_new(X, G, Bb)),
                "e2e_chunk": lambda: (pre_chunk(X, S), back_chunk(X, G)),
                "e2e_new_buf_serial": lambda: (pre_new(X, S, Yb, True), back_new(X, G, Bb, True)),
            }
            t = C.time_interleaved(fns, repeats, clock=args.clock)
            row = dict(d=d, T=T, n=n)
            row.update({k: v["best"] for k, v in t.items()})
            row.update({f"{k}_median": v["median"] for k, v in t.items()})
            E2E = ("e2e_v0", "e2e_pkg", "e2e_pkg_fm", "e2e_new_buf", "e2e_chunk", "e2e_new_buf_serial")
            for k in E2E:
                row[f"ra_{k}"] = row[k] / row["gemm2"]
            rows.append(row)
            print(f"  d={d} T={T} done", flush=True)
    E2E = ("e2e_v0", "e2e_pkg", "e2e_pkg_fm", "e2e_new_buf", "e2e_chunk", "e2e_new_buf_serial")
    cols = [("d", "d", "d"), ("T", "T", "d")] + [
        (k, k, ".4f") for k in ("gemm2", "gemm2_out", "pc_v0", "pc_pkg", "pc_tri_fm", "pc_fused", "mt_v0", "mt_pkg",
                                "mt_assign_buf", "fin_pkg") + E2E
    ] + [(f"ra_{k}", f"ra({k[4:]})", ".2f") for k in E2E]
    print(f"\nbest of {repeats} (seconds); ratio_a = core forward+adjoint / two GEMMs (no validation)")
    C.print_table(rows, cols)
    path = C.write_json("kernel_variants", {"quick": args.quick, "alpha": args.alpha, "errors": errs, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
