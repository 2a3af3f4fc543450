"""Kernels of the sensing operator (Numba) and their plain NumPy twins (docs/theory.md §3, §5).

Private module: :mod:`amp_attention.operator` (:class:`~amp_attention.operator.SensingOperator`)
is the only caller in the package; the tests compare every kernel with its twin.  Naming scheme:
the Numba kernel (or the thin wrapper that fixes its tuning arguments) is ``name``, its NumPy
twin ``name_numpy`` (same result up to rounding, written for clarity, tests only).  Nothing here
validates its arguments: float64 arrays of the documented shapes, C-contiguous where a kernel
writes into a caller's buffer.

Forward (§3)
    :func:`pair_contract` ``H_mu,ab = <X_mu,a, Y_mu,b>`` (``Y = X S``); factored ``S = F diag(sigma)
    F^T``: :func:`pair_contract_weighted` on ``Y = X F``.
Adjoint (§3)
    GEMM path: :func:`mix_tokens_into` / :func:`mix_tokens` ``B_mu = G_mu X_mu``.  SYRK path:
    :func:`sym_eig` (cyclic Jacobi, :func:`sym_eig_kernel`), :func:`eig_row_offsets`,
    :func:`pack_eig_rows`, then :func:`syrk_difference` (BLAS ``dsyrk``; no twin, it is checked
    against ``P^T P - N^T N`` directly).
Per-sample Gram matrices (§5)
    :func:`gram` (token Gram ``X_mu X_mu^T``), :func:`gamma_from_gram`; :func:`sample_gram`
    composes the two, twin :func:`sample_gram_numpy` (materialises the sensing matrices).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from scipy.linalg.blas import dsyrk

from .whitening import pair_indices

__all__ = [
    "pair_contract",
    "pair_contract_numpy",
    "mix_tokens_into",
    "mix_tokens",
    "mix_tokens_numpy",
    "JACOBI_MAX_SWEEPS",
    "EIG_LANES",
    "sym_eig_kernel",
    "sym_eig",
    "sym_eig_numpy",
    "eig_row_offsets",
    "eig_row_offsets_numpy",
    "pack_eig_rows",
    "pack_eig_rows_numpy",
    "syrk_difference",
    "pair_contract_weighted",
    "pair_contract_weighted_numpy",
    "gram",
    "gamma_from_gram",
    "sample_gram",
    "sample_gram_numpy",
]


# --------------------------------------------------------------------------------------------
# Forward contraction (§3) and token mixing (GEMM path of the adjoint)
# --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def pair_contract(X, Y):
    """``H[mu, a, b] = <X[mu, a], Y[mu, b]>`` for a <= b, mirrored (exactly symmetric output).

    With ``Y = X S`` (S symmetric) the full contraction is symmetric up to rounding; computing
    the upper triangle only halves the work and makes the symmetry exact.
    """
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


def pair_contract_numpy(X, Y):
    H = np.einsum("nai,nbi->nab", X, Y)
    return np.triu(H) + np.swapaxes(np.triu(H, 1), 1, 2)


@njit(cache=True, parallel=True)
def mix_tokens_into(G, X, B):
    """``B[mu] = G[mu] @ X[mu]`` (``(T, T) @ (T, d)`` per sample), written into ``B``."""
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


def mix_tokens(G, X):
    """``B[mu] = G[mu] @ X[mu]`` into a fresh array (see :func:`mix_tokens_into`)."""
    return mix_tokens_into(G, X, np.empty(X.shape))


def mix_tokens_numpy(G, X):
    return np.einsum("nab,nbi->nai", G, X)


# Adjoint by symmetric rank-k updates: per-sample eigendecomposition of the symmetric part of G
# (cyclic Jacobi), rows sqrt|lam_k| v_k^T X_mu packed by sign, then P^T P - N^T N (dsyrk).

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


@njit(cache=True)
def eig_row_offsets(lam):
    """Where :func:`pack_eig_rows` writes each sample's rows, from the eigenvalues ``lam (n, T)``.

    Rows with ``lam < 0`` are negative; rows with ``lam != 0`` otherwise (NaN included, so NaN
    propagates into M) are positive; zeros are dropped.  Returns ``(pos_start, neg_start, n_pos,
    n_neg)``: sample mu's positive rows start at row ``pos_start[mu]`` (block ``[0, n_pos)``), its
    negative rows at ``neg_start[mu]`` (block ``[nT - n_neg, nT)``).  Exclusive prefix sums, so
    the packing can run in parallel over samples.
    """
    n, T = lam.shape
    pos_start = np.empty(n, dtype=np.int64)
    neg_start = np.empty(n, dtype=np.int64)
    n_pos = 0
    n_neg = 0
    for mu in range(n):
        pos_start[mu] = n_pos
        neg_start[mu] = n_neg
        for k in range(T):
            lk = lam[mu, k]
            if lk < 0.0:
                n_neg += 1
            elif lk != 0.0:
                n_pos += 1
    first_neg = n * T - n_neg
    for mu in range(n):
        neg_start[mu] += first_neg
    return pos_start, neg_start, n_pos, n_neg


def eig_row_offsets_numpy(lam):
    n, T = lam.shape
    neg = lam < 0.0
    pos = ~neg & (lam != 0.0)
    npos = pos.sum(axis=1)
    nneg = neg.sum(axis=1)
    n_pos = int(npos.sum())
    n_neg = int(nneg.sum())
    pos_start = np.concatenate([[0], np.cumsum(npos)[:-1]])
    neg_start = np.concatenate([[0], np.cumsum(nneg)[:-1]]) + n * T - n_neg
    return pos_start, neg_start, n_pos, n_neg


@njit(cache=True, parallel=True)
def pack_eig_rows(X, lam, V, pos_start, neg_start, W):
    """Rows ``u_mu,k = sqrt|lam_mu,k| V_mu[:, k]^T X_mu`` (length d) written into ``W (nT, d)``.

    Sample mu's rows with ``lam < 0`` go to ``W[neg_start[mu]:]``, those with ``lam != 0``
    otherwise to ``W[pos_start[mu]:]``, in order of k (offsets from :func:`eig_row_offsets`);
    rows of zero eigenvalues are not written.  Then ``sum_mu X_mu^T V_mu diag(lam_mu) V_mu^T X_mu
    = P^T P - N^T N`` with P, N the positive and negative blocks.
    """
    n, T, d = X.shape
    for mu in prange(n):
        ip = pos_start[mu]
        ineg = neg_start[mu]
        for k in range(T):
            lk = lam[mu, k]
            if lk < 0.0:
                row = ineg
                ineg += 1
                s = np.sqrt(-lk)
            elif lk != 0.0:
                row = ip
                ip += 1
                s = np.sqrt(lk)
            else:
                continue
            g = s * V[mu, 0, k]
            for i in range(d):
                W[row, i] = g * X[mu, 0, i]
            for a in range(1, T):
                g = s * V[mu, a, k]
                for i in range(d):
                    W[row, i] += g * X[mu, a, i]
    return W


def pack_eig_rows_numpy(X, lam, V):
    """Twin of :func:`pack_eig_rows`: returns the blocks ``(P, N)`` (rows in the same order)."""
    rows = np.sqrt(np.abs(lam))[:, :, None] * np.einsum("nak,nai->nki", V, X)
    neg = lam < 0.0
    pos = ~neg & (lam != 0.0)
    return rows[pos], rows[neg]


def syrk_difference(P, N):
    """``P^T P - N^T N`` for row blocks ``P (p, d)``, ``N (m, d)`` (C-contiguous), exactly symmetric.

    Two BLAS ``dsyrk`` calls on the F-contiguous transposes (no copy of the blocks), accumulating
    into one d x d upper triangle, which is then mirrored.  Empty blocks are skipped.  Returns a
    C-contiguous (d, d) array.
    """
    d = P.shape[1]
    C = None
    if P.shape[0] > 0:
        C = dsyrk(1.0, P.T, trans=0, lower=0)
    if N.shape[0] > 0:
        if C is None:
            C = dsyrk(-1.0, N.T, trans=0, lower=0)
        else:
            C = dsyrk(-1.0, N.T, beta=1.0, c=C, trans=0, lower=0, overwrite_c=1)
    if C is None:
        return np.zeros((d, d))
    Ct = C.T  # C is F-contiguous with the upper triangle valid: Ct is C-contiguous, lower valid
    M = np.tril(Ct)
    M += np.tril(Ct, -1).T
    return np.ascontiguousarray(M)


# Factored forward: S = F diag(sigma) F^T


@njit(cache=True, parallel=True)
def pair_contract_weighted(Y, sigma):
    """``H[mu, a, b] = sum_i sigma_i Y[mu, a, i] Y[mu, b, i]`` for a <= b, mirrored (exactly symmetric).

    ``Y (n, T, r)``, ``sigma (r,)``; r = 0 gives zeros.
    """
    n, T, r = Y.shape
    H = np.empty((n, T, T))
    for mu in prange(n):
        for a in range(T):
            for b in range(a, T):
                s = 0.0
                for i in range(r):
                    s += sigma[i] * Y[mu, a, i] * Y[mu, b, i]
                H[mu, a, b] = s
                H[mu, b, a] = s
    return H


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
