"""Kernels of the sensing operator (Numba) and their plain NumPy twins (docs/theory.md §3, §5).

Private module: :mod:`amp_attention.operator` (:class:`~amp_attention.operator.SensingOperator`)
is the only caller in the package; the tests compare every kernel with its twin.  Naming scheme:
the Numba kernel (or the thin wrapper that fixes its tuning arguments) is ``name``, its NumPy
twin ``name_numpy`` (same result up to rounding, written for clarity, tests only).  Nothing here
validates its arguments: float64 arrays of the documented shapes (tokens of the blocked kernels:
float64 or float32), C-contiguous.

Blocked kernels (§3; the GEMMs inside Numba, one block of samples at a time, see the section
at the end): :func:`forward_blocked` (twin :func:`pair_contract_numpy` of ``X S``),
:func:`forward_factored_blocked` (``S = F diag(sigma) F^T``, twin
:func:`pair_contract_weighted_numpy` of ``X F``), :func:`backproject_gemm_blocked` (twin
:func:`mix_tokens_numpy` + one GEMM), :func:`backproject_syrk_blocked` on the per-sample
eigendecompositions of :func:`sym_eig` (cyclic Jacobi, :func:`sym_eig_kernel`, twin
:func:`sym_eig_numpy`; packed rows twin :func:`pack_eig_rows_numpy`), with BLAS ``syrk`` called
from Numba by :func:`syrk_into`.
Per-sample Gram matrices (§5)
    :func:`gram` (token Gram ``X_mu X_mu^T``), :func:`gamma_from_gram`; :func:`sample_gram`
    composes the two, twin :func:`sample_gram_numpy` (materialises the sensing matrices).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from llvmlite import ir
from numba import types
from numba.extending import get_cython_function_address, intrinsic

from .whitening import pair_indices

__all__ = [
    "pair_contract_numpy",
    "mix_tokens_numpy",
    "JACOBI_MAX_SWEEPS",
    "EIG_LANES",
    "sym_eig_kernel",
    "sym_eig",
    "sym_eig_numpy",
    "pack_eig_rows_numpy",
    "pair_contract_weighted_numpy",
    "gram",
    "gamma_from_gram",
    "sample_gram",
    "sample_gram_numpy",
    "ADJOINT_CHUNKS",
    "BLOCK_BYTES",
    "block_size",
    "SYRK_ADDRESS",
    "syrk_into",
    "forward_blocked",
    "forward_factored_blocked",
    "backproject_gemm_blocked",
    "backproject_syrk_blocked",
]


# --------------------------------------------------------------------------------------------
# NumPy twins of the forward contraction (§3) and of the token mixing (GEMM path of the adjoint)
# --------------------------------------------------------------------------------------------


def pair_contract_numpy(X, Y):
    H = np.einsum("nai,nbi->nab", X, Y)
    return np.triu(H) + np.swapaxes(np.triu(H, 1), 1, 2)


def mix_tokens_numpy(G, X):
    return np.einsum("nab,nbi->nai", G, X)


# Adjoint by symmetric rank-k updates: per-sample eigendecomposition of the symmetric part of G
# (cyclic Jacobi), rows sqrt|lam_k| v_k^T X_mu packed by sign, then P^T P - N^T N (syrk; the
# packing and the syrk calls are in backproject_syrk_blocked below).

JACOBI_MAX_SWEEPS = 50  # T <= 8 converges in < 10 sweeps; the cap only bounds pathological input
EIG_LANES = 32  # samples diagonalised in lock-step (SIMD over samples)
_EPS = float(np.finfo(np.float64).eps)


@njit(cache=True, parallel=True, error_model="numpy")
def sym_eig_kernel(G, lanes, max_sweeps):
    """Cyclic Jacobi eigendecomposition of ``Gs_mu = (G_mu + G_mu^T)/2`` for every sample.

    ``G (n, T, T)`` -> ``lam (n, T)`` (unsorted) and ``V (n, T, T)`` (orthonormal eigenvectors as
    columns) with ``Gs_mu = V_mu diag(lam_mu) V_mu^T``.

    Per sample: the upper triangle of Gs is scaled by a power of two so that ``max |Gs| in [1/2, 1)``
    (exact; no overflow below), then sweeps over the pairs ``p < q`` in row order, each rotation
    zeroing ``a_pq`` with ``t = tan(phi) = sgn(h) g / (|h| + sqrt(h^2 + g^2))``, ``h = a_qq - a_pp``,
    ``g = 2 a_pq`` (the smaller root of ``t^2 + 2 (h/g) t - 1 = 0``) and the diagonal updated as
    ``a_pp - t a_pq``, ``a_qq + t a_pq``.  A sample stops (is frozen) once its off-diagonal
    Frobenius norm is <= eps ||Gs||_F; within a sweep a pair is rotated only if
    ``|a_pq| > eps ||Gs||_F / T`` (while the stopping test fails some pair exceeds that, so each
    sweep makes progress).  At most ``max_sweeps`` sweeps.  A zero matrix gives ``lam = 0, V = I``;
    a non-finite entry gives NaN ``lam`` and ``V`` (no iteration).

    ``lanes`` samples are processed in lock-step, lane index innermost, so that the rotation
    arithmetic vectorises over samples (a runtime ``lanes`` keeps LLVM from fully unrolling the
    lane loops, which would block vectorisation).  A frozen lane is not touched, so each sample's
    result does not depend on ``lanes`` or on the other samples.  ``error_model="numpy"``: the
    rotation of a frozen lane may divide by zero; the result is discarded (``t = 0``).
    """
    n, T, _ = G.shape
    L = lanes
    nblk = (n + L - 1) // L
    lam = np.empty((n, T))
    V = np.empty((n, T, T))
    nchunk = min(nblk, 256)
    for ch in prange(nchunk):
        A = np.empty((T, T, L))  # upper triangle used
        W = np.empty((T, T, L))
        tol2 = np.empty(L)
        skip = np.empty(L)
        back1 = np.empty(L)
        back2 = np.empty(L)
        bad = np.empty(L, dtype=np.bool_)
        cc = np.empty(L)
        ss = np.empty(L)
        off2 = np.empty(L)
        for blk in range(ch * nblk // nchunk, (ch + 1) * nblk // nchunk):
            m0 = blk * L
            nb = min(L, n - m0)
            # ---- load, scale, stopping thresholds
            for l in range(L):
                amax = 0.0
                bad[l] = False
                if l < nb:
                    for a in range(T):
                        for b in range(a, T):
                            x = 0.5 * (G[m0 + l, a, b] + G[m0 + l, b, a])
                            A[a, b, l] = x
                            ax = abs(x)
                            if not ax < np.inf:  # inf or NaN
                                bad[l] = True
                            elif ax > amax:
                                amax = ax
                if bad[l] or l >= nb or amax == 0.0:
                    for a in range(T):
                        for b in range(a, T):
                            A[a, b, l] = 0.0
                    back1[l] = 1.0
                    back2[l] = 1.0
                    tol2[l] = 0.0
                    skip[l] = np.inf
                else:
                    # scale by 2^-e (amax = m 2^e, m in [1/2, 1)), as two factors so that
                    # neither overflows (e ranges over -1073..1024)
                    e = math.frexp(amax)[1]
                    k1 = (-e) // 2
                    s1 = math.ldexp(1.0, k1)
                    s2 = math.ldexp(1.0, -e - k1)
                    back1[l] = math.ldexp(1.0, -k1)
                    back2[l] = math.ldexp(1.0, e + k1)
                    nrm2 = 0.0
                    for a in range(T):
                        x = A[a, a, l] * s1 * s2
                        A[a, a, l] = x
                        nrm2 += x * x
                        for b in range(a + 1, T):
                            x = A[a, b, l] * s1 * s2
                            A[a, b, l] = x
                            nrm2 += 2.0 * x * x
                    # stop: sum_{p<q} a_pq^2 <= (eps ||A||_F)^2 / 2, i.e. ||offdiag||_F <= eps ||A||_F
                    tol2[l] = 0.5 * _EPS * _EPS * nrm2
                    # T(T-1)/2 pairs at or below this pass the stopping test
                    skip[l] = _EPS * np.sqrt(nrm2) / T
                for a in range(T):
                    for b in range(T):
                        W[a, b, l] = 0.0
                    W[a, a, l] = 1.0
            # ---- sweeps
            sweeps = 0
            while sweeps < max_sweeps:
                for l in range(L):
                    off2[l] = 0.0
                for p in range(T - 1):
                    for q in range(p + 1, T):
                        for l in range(L):
                            off2[l] += A[p, q, l] * A[p, q, l]
                active = False
                for l in range(L):
                    if off2[l] <= tol2[l]:
                        skip[l] = np.inf  # converged: frozen from now on
                    else:
                        active = True
                if not active:
                    break
                sweeps += 1
                for p in range(T - 1):
                    for q in range(p + 1, T):
                        for l in range(L):
                            apq = A[p, q, l]
                            h = A[q, q, l] - A[p, p, l]
                            g = 2.0 * apq
                            t = g / (abs(h) + np.sqrt(h * h + g * g))
                            t = t if h >= 0.0 else -t
                            rotate = abs(apq) > skip[l]
                            t = t if rotate else 0.0  # t = 0: c = 1, s = 0, lane unchanged
                            c = 1.0 / np.sqrt(t * t + 1.0)
                            cc[l] = c
                            ss[l] = t * c
                            A[p, p, l] -= t * apq
                            A[q, q, l] += t * apq
                            A[p, q, l] = 0.0 if rotate else apq
                        # columns p and q of the symmetric matrix, addressed in the upper triangle
                        for r in range(p):
                            for l in range(L):
                                x = A[r, p, l]
                                y = A[r, q, l]
                                A[r, p, l] = cc[l] * x - ss[l] * y
                                A[r, q, l] = ss[l] * x + cc[l] * y
                        for r in range(p + 1, q):
                            for l in range(L):
                                x = A[p, r, l]
                                y = A[r, q, l]
                                A[p, r, l] = cc[l] * x - ss[l] * y
                                A[r, q, l] = ss[l] * x + cc[l] * y
                        for r in range(q + 1, T):
                            for l in range(L):
                                x = A[p, r, l]
                                y = A[q, r, l]
                                A[p, r, l] = cc[l] * x - ss[l] * y
                                A[q, r, l] = ss[l] * x + cc[l] * y
                        for r in range(T):
                            for l in range(L):
                                x = W[r, p, l]
                                y = W[r, q, l]
                                W[r, p, l] = cc[l] * x - ss[l] * y
                                W[r, q, l] = ss[l] * x + cc[l] * y
            # ---- store
            for l in range(nb):
                mu = m0 + l
                if bad[l]:
                    for a in range(T):
                        lam[mu, a] = np.nan
                        for b in range(T):
                            V[mu, a, b] = np.nan
                else:
                    for a in range(T):
                        lam[mu, a] = A[a, a, l] * back1[l] * back2[l]
                        for b in range(T):
                            V[mu, a, b] = W[a, b, l]
    return lam, V


def sym_eig(G):
    """``lam (n, T), V (n, T, T)`` with ``(G_mu + G_mu^T)/2 = V_mu diag(lam_mu) V_mu^T`` (Jacobi,
    :func:`sym_eig_kernel`; eigenvalues not sorted)."""
    return sym_eig_kernel(G, EIG_LANES, JACOBI_MAX_SWEEPS)


def sym_eig_numpy(G):
    """Twin of :func:`sym_eig` (LAPACK ``eigh``; eigenvalues ascending)."""
    return np.linalg.eigh(0.5 * (G + np.swapaxes(G, 1, 2)))


def pack_eig_rows_numpy(X, lam, V):
    """Twin of :func:`pack_eig_rows`: returns the blocks ``(P, N)`` (rows in the same order)."""
    rows = np.sqrt(np.abs(lam))[:, :, None] * np.einsum("nak,nai->nki", V, X)
    neg = lam < 0.0
    pos = ~neg & (lam != 0.0)
    return rows[pos], rows[neg]


# Factored forward: S = F diag(sigma) F^T


def pair_contract_weighted_numpy(Y, sigma):
    H = np.einsum("nai,i,nbi->nab", Y, sigma, Y)
    return np.triu(H) + np.swapaxes(np.triu(H, 1), 1, 2)


# --------------------------------------------------------------------------------------------
# Per-sample Gram matrices of the sensing matrices (§5)
# --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def gram(X):
    """Token Gram matrices ``X[mu] @ X[mu].T``, ``(n, T, d) -> (n, T, T)`` (upper triangle, mirrored)."""
    n, T, d = X.shape
    out = np.empty((n, T, T))
    for mu in prange(n):
        for a in range(T):
            for b in range(a, T):
                s = 0.0
                for i in range(d):
                    s += X[mu, a, i] * X[mu, b, i]
                out[mu, a, b] = s
                out[mu, b, a] = s
    return out


@njit(cache=True, parallel=True)
def gamma_from_gram(Gm, ia, ib, c, d):
    """``Gamma_{kk'}`` (docs/theory.md §5) from the token Gram matrices ``Gm (n, T, T)``; ``ia, ib, c``
    from :func:`~amp_attention.whitening.pair_indices`, ``d`` the token dimension as a float.
    Returns ``(n, K, K)``, exactly symmetric."""
    n = Gm.shape[0]
    K = ia.shape[0]
    out = np.empty((n, K, K))
    norm = 2.0 / (d + 1.0)
    for mu in prange(n):
        for k in range(K):
            a = ia[k]
            b = ib[k]
            for kp in range(k, K):
                cc = ia[kp]
                e = ib[kp]
                v = 0.5 * (Gm[mu, a, cc] * Gm[mu, b, e] + Gm[mu, a, e] * Gm[mu, b, cc])
                if a == b:
                    v -= Gm[mu, cc, e]
                if cc == e:
                    v -= Gm[mu, a, b]
                if a == b and cc == e:
                    v += d
                v *= norm / (d * c[k] * c[kp])
                out[mu, k, kp] = v
                out[mu, kp, k] = v
    return out


def sample_gram(X):
    """``Gamma (n, K, K)`` from tokens ``X (n, T, d)``: :func:`gamma_from_gram` of :func:`gram`
    (twin :func:`sample_gram_numpy`)."""
    ia, ib, c = pair_indices(X.shape[1])
    return gamma_from_gram(gram(X), ia, ib, c, float(X.shape[2]))


def sample_gram_numpy(X):
    """Twin of :func:`sample_gram`: Frobenius inner products of the materialised sensing matrices.

    Forms the K sensing matrices ``A_k = (sym(x_a x_b^T) - delta_ab I) / (c_k sqrt d)`` per sample
    (O(n K d^2) memory: tests only).
    """
    n, T, d = X.shape
    ia, ib, c = pair_indices(T)
    outer = np.einsum("nai,nbj->nabij", X, X)
    A = 0.5 * (outer[:, ia, ib] + outer[:, ib, ia])
    A[:, ia == ib] -= np.eye(d)
    A /= c[None, :, None, None] * np.sqrt(d)
    return np.einsum("nkij,nlij->nkl", A, A) * 2.0 / (d + 1.0)


# --------------------------------------------------------------------------------------------
# Blocked kernels: the GEMMs inside Numba, one block of samples at a time (no n T d buffer)
# --------------------------------------------------------------------------------------------
#
# Each block of ``block`` samples is one BLAS call made from a Numba thread (``np.dot`` /
# ``?syrk`` through scipy's ``cython_blas``), so BLAS runs single-threaded inside a parallel loop
# over blocks: the caller (:class:`~amp_attention.operator.SensingOperator`) limits BLAS to one
# thread around these calls.  Memory is one ``(block T, d)`` temporary per running block instead
# of an ``(n, T, d)`` work buffer.  Block sizes depend on (T, d) only and the adjoint sums a fixed
# number of partial matrices in a fixed order, so results do not depend on the thread count.
# Tokens may be float32 (GEMMs in float32) or float64; every sum over samples is in float64.

ADJOINT_CHUNKS = 16  # partial (d, d) sums of the adjoint (fixed: results independent of threads)
BLOCK_BYTES = 1 << 20  # about this many bytes of tokens per block


def block_size(T: int, d: int, itemsize: int = 8) -> int:
    """Samples per block: about :data:`BLOCK_BYTES` of tokens, at least 1 (depends on T, d only)."""
    return max(1, BLOCK_BYTES // (T * d * itemsize))


#: addresses of BLAS ``dsyrk`` / ``ssyrk`` (scipy's ``cython_blas``), looked up at import; passed to
#: the kernels as arguments (an address baked into cached machine code would be stale next run).
SYRK_ADDRESS = {
    np.dtype(np.float64): get_cython_function_address("scipy.linalg.cython_blas", "dsyrk"),
    np.dtype(np.float32): get_cython_function_address("scipy.linalg.cython_blas", "ssyrk"),
}


@intrinsic
def _call_fortran10(typingctx, fn, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9):
    """Call the Fortran-ABI routine at address ``fn`` with ten pointer arguments (given as ints)."""
    sig = types.void(types.intp, *([types.intp] * 10))

    def codegen(context, builder, signature, args):
        ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [ptr] * 10)
        f = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(f, [builder.inttoptr(x, ptr) for x in args[1:]])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def syrk_into(P, C, alpha, syrk_address):
    """``C = alpha P^T P`` on the upper triangle of the C-contiguous ``C (d, d)`` (lower: untouched).

    ``P (p, d)`` C-contiguous, same dtype as C; ``syrk_address`` is ``SYRK_ADDRESS[P.dtype]``.  The
    row-major P is the column-major ``(d, p)`` matrix P^T, so ``syrk('L', 'N')`` gives ``P^T P`` in
    the column-major lower triangle, which is the row-major upper one.
    """
    p, d = P.shape
    chars = np.array([76, 78], dtype=np.uint8)  # 'L', 'N'
    ints = np.array([d, p, d, d], dtype=np.int32)
    sc = np.empty(2, dtype=P.dtype)
    sc[0] = alpha
    sc[1] = 0.0
    _call_fortran10(syrk_address, chars[0:].ctypes.data, chars[1:].ctypes.data, ints[0:].ctypes.data,
                    ints[1:].ctypes.data, sc[0:].ctypes.data, P.ctypes.data, ints[2:].ctypes.data,
                    sc[1:].ctypes.data, C.ctypes.data, ints[3:].ctypes.data)


@njit(cache=True, parallel=True)
def forward_blocked(X, S, block):
    """``H[mu, a, b] = x_mu,a^T S x_mu,b`` (upper triangle mirrored), ``(n, T, T)`` float64.

    Per block: ``Y = X_block S`` (one GEMM in X's dtype, S cast to it by the caller), then the
    pair contractions in float64.  Twin: :func:`pair_contract_numpy` of ``X S``.
    """
    n, T, d = X.shape
    H = np.empty((n, T, T))
    nb = (n + block - 1) // block
    for ib in prange(nb):
        lo = ib * block
        hi = min(n, lo + block)
        Xb = np.ascontiguousarray(X[lo:hi]).reshape(((hi - lo) * T, d))
        Y = np.dot(Xb, S)
        for j in range(hi - lo):
            for a in range(T):
                for b in range(a, T):
                    s = 0.0
                    for i in range(d):
                        s += np.float64(Xb[j * T + a, i]) * np.float64(Y[j * T + b, i])
                    H[lo + j, a, b] = s
                    H[lo + j, b, a] = s
    return H


@njit(cache=True, parallel=True)
def forward_factored_blocked(X, F, sigma, block):
    """``H[mu, a, b] = sum_i sigma_i (x_mu,a^T F_i)(x_mu,b^T F_i)``, ``(n, T, T)`` float64.

    Per block: ``Y = X_block F`` (one GEMM, F ``(d, r)`` in X's dtype), then weighted pair sums in
    float64.  Twin: :func:`pair_contract_weighted_numpy` of ``X F``.
    """
    n, T, d = X.shape
    r = F.shape[1]
    H = np.empty((n, T, T))
    nb = (n + block - 1) // block
    for ib in prange(nb):
        lo = ib * block
        hi = min(n, lo + block)
        Xb = np.ascontiguousarray(X[lo:hi]).reshape(((hi - lo) * T, d))
        Y = np.dot(Xb, F)
        for j in range(hi - lo):
            for a in range(T):
                for b in range(a, T):
                    s = 0.0
                    for i in range(r):
                        s += sigma[i] * np.float64(Y[j * T + a, i]) * np.float64(Y[j * T + b, i])
                    H[lo + j, a, b] = s
                    H[lo + j, b, a] = s
    return H


@njit(cache=True, parallel=True)
def backproject_gemm_blocked(G, X, block, chunks):
    """``sum_mu X_mu^T G_mu X_mu`` ``(d, d)`` float64 (not symmetrised; no trace part, no scale).

    Per block ``B = G_block X_block`` then one GEMM ``X_block^T B`` added to one of ``chunks``
    float64 partial sums (block ``ib`` -> partial ``ib % chunks``), summed in order at the end.
    Twin: :func:`mix_tokens_numpy` + one GEMM.
    """
    n, T, d = X.shape
    nb = (n + block - 1) // block
    nc = min(chunks, nb)
    parts = np.zeros((nc, d, d))
    for c in prange(nc):
        for ib in range(c, nb, nc):
            lo = ib * block
            hi = min(n, lo + block)
            m = hi - lo
            Xb = np.ascontiguousarray(X[lo:hi]).reshape((m * T, d))
            B = np.empty((m * T, d), dtype=X.dtype)
            for j in range(m):
                for a in range(T):
                    for i in range(d):
                        s = 0.0
                        for b in range(T):
                            s += G[lo + j, a, b] * Xb[j * T + b, i]
                        B[j * T + a, i] = s
            P = np.dot(Xb.T, B)
            for i in range(d):
                for j in range(d):
                    parts[c, i, j] += P[i, j]
    M = parts[0].copy()
    for c in range(1, nc):
        M += parts[c]
    return M


@njit(cache=True, parallel=True)
def backproject_syrk_blocked(X, lam, V, block, chunks, syrk_address):
    """``sum_mu X_mu^T V_mu diag(lam_mu) V_mu^T X_mu = P^T P - N^T N``, ``(d, d)`` float64, exactly symmetric.

    ``lam (n, T)``, ``V (n, T, T)`` from :func:`sym_eig`; ``syrk_address = SYRK_ADDRESS[X.dtype]``.  Per block, the rows
    ``sqrt|lam_k| v_k^T X_mu`` are packed by the sign of ``lam_k`` (zeros dropped) into two block
    buffers P, N (X's dtype), and ``P^T P``, ``N^T N`` (BLAS ``syrk``, upper triangle) are added to
    one of ``chunks`` float64 partial sums, summed in order at the end and mirrored.
    Twin: :func:`pack_eig_rows_numpy` + ``P^T P - N^T N``.
    """
    n, T, d = X.shape
    nb = (n + block - 1) // block
    nc = min(chunks, nb)
    parts = np.zeros((nc, d, d))
    for c in prange(nc):
        P = np.empty((block * T, d), dtype=X.dtype)
        N = np.empty((block * T, d), dtype=X.dtype)
        C = np.empty((d, d), dtype=X.dtype)
        for ib in range(c, nb, nc):
            lo = ib * block
            hi = min(n, lo + block)
            ip = 0
            ineg = 0
            for mu in range(lo, hi):
                for k in range(T):
                    lk = lam[mu, k]
                    if lk < 0.0:
                        s = np.sqrt(-lk)
                        for i in range(d):
                            acc = 0.0
                            for a in range(T):
                                acc += V[mu, a, k] * X[mu, a, i]
                            N[ineg, i] = s * acc
                        ineg += 1
                    elif lk != 0.0:
                        s = np.sqrt(lk)
                        for i in range(d):
                            acc = 0.0
                            for a in range(T):
                                acc += V[mu, a, k] * X[mu, a, i]
                            P[ip, i] = s * acc
                        ip += 1
            if ip > 0:
                syrk_into(P[:ip], C, 1.0, syrk_address)
                for i in range(d):
                    for j in range(i, d):
                        parts[c, i, j] += C[i, j]
            if ineg > 0:
                syrk_into(N[:ineg], C, 1.0, syrk_address)
                for i in range(d):
                    for j in range(i, d):
                        parts[c, i, j] -= C[i, j]
    M = parts[0].copy()
    for c in range(1, nc):
        M += parts[c]
    for i in range(d):
        for j in range(i + 1, d):
            M[j, i] = M[i, j]
    return M
