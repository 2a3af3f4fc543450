"""The matrix-free sensing operator and its adjoint (DESIGN.md sections 3 and 5).

Forward ``preactivations(X, S) -> H (n, T, T)``::

    H_ab = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)

computed as the GEMM ``Y = X.reshape(nT, d) @ S`` followed by per-sample ``T x T`` contractions
``H_mu = X_mu Y_mu^T`` (Numba, parallel over samples, upper triangle mirrored so H is exactly
symmetric).  The GEMM can write into a caller-owned buffer of X's shape (``work``), so that an AMP
run allocates the ``n T d`` intermediate once.

Factored forward ``_preactivations_factored(X, F, sigma)`` for ``S = F diag(sigma) F^T`` with
``F (d, r)`` (e.g. the low-rank output of the nuclear denoiser): ``Y = X.reshape(nT, d) @ F``
(GEMM, ``2 nT d r`` flops instead of ``2 nT d^2``), then the weighted contractions
``H_mu,ab = sum_i sigma_i Y_mu,a,i Y_mu,b,i`` (Numba), minus ``delta_ab Tr S`` with
``Tr S = sum_i sigma_i ||F_:,i||^2``, over sqrt(d).

Adjoint ``backproject(X, G) -> M (d, d)``::

    M = sym( sum_mu sum_ab G_mu,ab (x_a x_b^T - delta_ab I) ) / sqrt(d)

Only the symmetric part ``Gs_mu = (G_mu + G_mu^T)/2`` matters.  Two paths, same result up to
rounding (``_backproject(X, G, work, method="auto")`` picks by shape):

- ``_backproject_syrk`` (d >= 60 + 10 T): per sample ``Gs_mu = sum_k lam_k v_k v_k^T`` (cyclic
  Jacobi on the ``T x T`` matrix, Numba, samples in SIMD lock-step), and the rows
  ``u_k = sqrt|lam_k| v_k^T X_mu`` (length d) are packed into an ``(nT, d)`` buffer: rows with
  ``lam_k > 0`` in a block P at the front, rows with ``lam_k < 0`` in a block N at the back (zero
  eigenvalues are dropped; prefix counts let the packing run in parallel over samples).  Then
  ``sum_mu X_mu^T Gs_mu X_mu = P^T P - N^T N``: two symmetric rank-k updates (BLAS ``dsyrk`` on
  the F-contiguous transposes of the blocks, no copy; upper triangle, mirrored so M is exactly
  symmetric), half the flops of the GEMM below;
- ``_backproject_gemm`` (the form of DESIGN.md section 3, faster at small d where the per-sample
  eigendecomposition is not repaid): ``B_mu = G_mu X_mu`` (Numba) and one GEMM
  ``X.reshape(nT, d).T @ B``, symmetrised.

Both then subtract the trace part ``sum_mu Tr G_mu I`` and scale by 1/sqrt(d), and can use the same
caller-owned ``work`` buffer as the forward (for the packed rows / for B).
Adjoint means ``sum(H(S) * G) == Tr(S M(G))`` for symmetric S.

Whitened forms (section 5): ``forward_whitened(X, S) -> (n, K)`` is ``A(S)_{mu k} = h_ab / c_k``
(``_forward_whitened_factored`` for a factored S), and ``adjoint_whitened(X, w)`` is ``A*(w)``
(builds ``G_aa = w_k / sqrt 2``, ``G_ab = G_ba = w_k / 2``).
``sample_gram(X) -> Gamma (n, K, K)`` are the normalised per-sample Gram matrices of the K sensing
matrices (``E Gamma = I_K``).

No per-sample d x d matrix is ever formed; memory is O(n T d).  Each Numba kernel ``_x`` has a
plain NumPy twin ``_x_numpy`` used in the tests.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from scipy.linalg.blas import dsyrk

from ._validation import as_float_array, check_symmetric, check_tokens
from .whitening import pair_indices

__all__ = [
    "preactivations",
    "backproject",
    "forward_whitened",
    "adjoint_whitened",
    "sample_gram",
    "whitened_to_G",
]


# --------------------------------------------------------------------------------------------
# Kernels (Numba) and their NumPy twins
# --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _pair_contract(X, Y):
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


def _pair_contract_numpy(X, Y):
    H = np.einsum("nai,nbi->nab", X, Y)
    return np.triu(H) + np.swapaxes(np.triu(H, 1), 1, 2)


@njit(cache=True, parallel=True)
def _mix_tokens_into(G, X, B):
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


def _mix_tokens(G, X):
    """``B[mu] = G[mu] @ X[mu]`` into a fresh array (see :func:`_mix_tokens_into`)."""
    return _mix_tokens_into(G, X, np.empty(X.shape))


def _mix_tokens_numpy(G, X):
    return np.einsum("nab,nbi->nai", G, X)


# Adjoint by symmetric rank-k updates: per-sample eigendecomposition of the symmetric part of G
# (cyclic Jacobi), rows sqrt|lam_k| v_k^T X_mu packed by sign, then P^T P - N^T N (dsyrk).

_JACOBI_MAX_SWEEPS = 50  # T <= 8 converges in < 10 sweeps; the cap only bounds pathological input
_EIG_LANES = 32  # samples diagonalised in lock-step (SIMD over samples)
_EPS = float(np.finfo(np.float64).eps)


@njit(cache=True, parallel=True, error_model="numpy")
def _sym_eig_kernel(G, lanes, max_sweeps):
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


def _sym_eig(G):
    """``lam (n, T), V (n, T, T)`` with ``(G_mu + G_mu^T)/2 = V_mu diag(lam_mu) V_mu^T`` (Jacobi,
    :func:`_sym_eig_kernel`; eigenvalues not sorted)."""
    return _sym_eig_kernel(G, _EIG_LANES, _JACOBI_MAX_SWEEPS)


def _sym_eig_numpy(G):
    """Twin of :func:`_sym_eig` (LAPACK ``eigh``; eigenvalues ascending)."""
    return np.linalg.eigh(0.5 * (G + np.swapaxes(G, 1, 2)))


@njit(cache=True)
def _eig_row_offsets(lam):
    """Where :func:`_pack_eig_rows` writes each sample's rows, from the eigenvalues ``lam (n, T)``.

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


def _eig_row_offsets_numpy(lam):
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
def _pack_eig_rows(X, lam, V, pos_start, neg_start, W):
    """Rows ``u_mu,k = sqrt|lam_mu,k| V_mu[:, k]^T X_mu`` (length d) written into ``W (nT, d)``.

    Sample mu's rows with ``lam < 0`` go to ``W[neg_start[mu]:]``, those with ``lam != 0``
    otherwise to ``W[pos_start[mu]:]``, in order of k (offsets from :func:`_eig_row_offsets`);
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


def _pack_eig_rows_numpy(X, lam, V):
    """Twin of :func:`_pack_eig_rows`: returns the blocks ``(P, N)`` (rows in the same order)."""
    rows = np.sqrt(np.abs(lam))[:, :, None] * np.einsum("nak,nai->nki", V, X)
    neg = lam < 0.0
    pos = ~neg & (lam != 0.0)
    return rows[pos], rows[neg]


def _syrk_difference(P, N):
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
def _pair_contract_weighted(Y, sigma):
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


def _pair_contract_weighted_numpy(Y, sigma):
    H = np.einsum("nai,i,nbi->nab", Y, sigma, Y)
    return np.triu(H) + np.swapaxes(np.triu(H, 1), 1, 2)


@njit(cache=True, parallel=True)
def _gram(X):
    """Token Gram matrices ``X[mu] @ X[mu].T``, shape (n, T, T)."""
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
def _gamma_from_gram(Gm, ia, ib, c, d):
    """``Gamma_{kk'}`` of DESIGN.md section 5 from the token Gram matrices ``Gm (n, T, T)``."""
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


def _sample_gram_numpy(X):
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
# Public operator
# --------------------------------------------------------------------------------------------


def preactivations(X, S) -> np.ndarray:
    """``H_ab = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)`` for every sample; shape ``(n, T, T)``.

    Parameters
    ----------
    X : (n, T, d) tokens.   S : (d, d) symmetric.
    """
    X = check_tokens(X)
    n, T, d = X.shape
    S = check_symmetric(S, "S", d=d)
    return _preactivations(X, S)


def _preactivations(X, S, work=None):
    """Unvalidated forward. ``work``: optional float64 buffer of X's shape for the GEMM output
    ``Y = X S`` (GAMP reuses one buffer for every forward and adjoint of a run)."""
    n, T, d = X.shape
    X2 = X.reshape(n * T, d)
    if work is None:
        Y = X2 @ S
    else:
        Y = np.matmul(X2, S, out=work.reshape(n * T, d))
    H = _pair_contract(X, Y.reshape(n, T, d))
    tr = np.trace(S)
    for a in range(T):
        H[:, a, a] -= tr
    H *= 1.0 / np.sqrt(d)
    return H


def _preactivations_factored(X, F, sigma, work=None):
    """Unvalidated forward for a factored ``S = F diag(sigma) F^T``; returns ``H (n, T, T)``.

    Parameters
    ----------
    X : (n, T, d) float64 tokens.   F : (d, r) float64, any r >= 0 (r > d allowed).
    sigma : (r,) real weights (e.g. +-1 signs of the eigenvalues, or the eigenvalues themselves).
    work : optional C-contiguous float64 buffer of X's shape; when ``r <= d`` its first ``n T r``
        entries, viewed as ``(nT, r)``, hold ``Y = X.reshape(nT, d) @ F`` (else Y is allocated).

    Equals :func:`_preactivations` ``(X, F diag(sigma) F^T)`` up to rounding, in ``2 nT d r`` flops
    for the GEMM instead of ``2 nT d^2``; H is exactly symmetric.
    """
    n, T, d = X.shape
    r = F.shape[1]
    sigma = np.ascontiguousarray(sigma, dtype=np.float64)
    X2 = X.reshape(n * T, d)
    if work is None or r > d:
        Y = X2 @ F
    else:
        Y = np.matmul(X2, F, out=work.reshape(-1)[: n * T * r].reshape(n * T, r))
    H = _pair_contract_weighted(Y.reshape(n, T, r), sigma)
    tr = float(np.einsum("ij,ij->j", F, F) @ sigma)  # Tr S = sum_i sigma_i ||F[:, i]||^2
    for a in range(T):
        H[:, a, a] -= tr
    H *= 1.0 / np.sqrt(d)
    return H


def _check_G(G, X):
    G = as_float_array(G, "G", ndim=3)
    n, T, _ = X.shape
    if G.shape != (n, T, T):
        raise ValueError(f"G must have shape (n, T, T) = {(n, T, T)} to match X, got {G.shape}")
    return np.ascontiguousarray(G)


def backproject(X, G) -> np.ndarray:
    """Adjoint of :func:`preactivations`: ``M = sym(sum_mu sum_ab G_ab (x_a x_b^T - delta_ab I)) / sqrt(d)``.

    Parameters
    ----------
    X : (n, T, d) tokens.   G : (n, T, T) (need not be symmetric).

    Returns the symmetric ``(d, d)`` matrix M with ``sum(preactivations(X, S) * G) == Tr(S M)``.
    """
    X = check_tokens(X)
    G = _check_G(G, X)
    return _backproject(X, G)


# Shape rule of :func:`_backproject` (measured at one thread, d x alpha d^2 samples): the syrk path
# pays a per-sample Jacobi (~T^3) and BLAS overheads that the saved ``nT d^2`` flops repay once
# d >= ~70 (T <= 3), ~100 (T = 5), ~145 (T = 8).
_SYRK_MIN_D = 60
_SYRK_MIN_D_PER_T = 10


def _backproject(X, G, work=None, method="auto"):
    """Unvalidated adjoint; ``X (n, T, d)``, ``G (n, T, T)`` float64, returns the symmetric
    ``(d, d)`` M (C-contiguous).

    ``method``: ``"syrk"`` (:func:`_backproject_syrk`, half the flops), ``"gemm"``
    (:func:`_backproject_gemm`) or ``"auto"``: syrk when ``d >= 60 + 10 T``, where it is the faster
    one, else gemm.  ``work`` as in :func:`_preactivations`; the result does not depend on it.
    """
    if method == "auto":
        n, T, d = X.shape
        method = "syrk" if d >= _SYRK_MIN_D + _SYRK_MIN_D_PER_T * T else "gemm"
    if method == "syrk":
        return _backproject_syrk(X, G, work)
    if method == "gemm":
        return _backproject_gemm(X, G, work)
    raise ValueError(f"method must be 'auto', 'syrk' or 'gemm', got {method!r}")


def _backproject_syrk(X, G, work=None):
    """Adjoint by symmetric rank-k updates (module docstring); ``X (n, T, d)``, ``G (n, T, T)``.

    ``Gs_mu = (G_mu + G_mu^T)/2 = V diag(lam) V^T`` per sample (:func:`_sym_eig`), rows
    ``sqrt|lam_k| v_k^T X_mu`` packed by sign into an ``(nT, d)`` buffer (:func:`_pack_eig_rows`),
    then ``sum_mu X_mu^T Gs_mu X_mu = P^T P - N^T N`` (:func:`_syrk_difference`), minus the trace
    part, over sqrt(d).  ``work``: optional C-contiguous float64 buffer of X's shape that holds the
    packed rows (rows of zero eigenvalues are neither written nor read, so stale content does not
    matter).  Returns a C-contiguous, exactly symmetric ``(d, d)`` array.
    """
    n, T, d = X.shape
    lam, V = _sym_eig(G)
    pos_start, neg_start, n_pos, n_neg = _eig_row_offsets(lam)
    W = np.empty((n * T, d)) if work is None else work.reshape(n * T, d)
    _pack_eig_rows(X, lam, V, pos_start, neg_start, W)
    M = _syrk_difference(W[:n_pos], W[n * T - n_neg :])
    tr = 0.0
    for a in range(T):
        tr += G[:, a, a].sum()
    M[np.diag_indices(d)] -= tr
    M *= 1.0 / np.sqrt(d)
    return M


def _backproject_gemm(X, G, work=None):
    """The GEMM form of the adjoint (DESIGN.md section 3): ``B_mu = G_mu X_mu`` (Numba, into
    ``work`` if given), then ``X.reshape(nT, d).T @ B``, symmetrised, minus the trace part.  Twice
    the flops of :func:`_backproject_syrk` but no per-sample eigendecomposition: faster at small d."""
    n, T, d = X.shape
    B = _mix_tokens_into(G, X, np.empty(X.shape) if work is None else work.reshape(X.shape))
    M = X.reshape(n * T, d).T @ B.reshape(n * T, d)
    M = 0.5 * (M + M.T)
    tr = 0.0
    for a in range(T):
        tr += G[:, a, a].sum()
    M[np.diag_indices(d)] -= tr
    M *= 1.0 / np.sqrt(d)
    return M


def whitened_to_G(w: np.ndarray, T: int) -> np.ndarray:
    """``w (n, K) -> G (n, T, T)`` with ``G_aa = w_k / sqrt 2`` and ``G_ab = G_ba = w_k / 2``.

    Then ``backproject(X, G) = A*(w) = sum_mu sum_k w_mu,k A_mu,k`` (section 5).
    """
    ia, ib, c = pair_indices(T)
    scale = np.where(ia == ib, 1.0 / np.sqrt(2.0), 0.5)
    G = np.zeros((w.shape[0], T, T))
    G[:, ia, ib] = w * scale
    G[:, ib, ia] += np.where(ia == ib, 0.0, 1.0) * w * scale
    return G


def forward_whitened(X, S) -> np.ndarray:
    """Whitened forward map ``A(S)_{mu k} = h_ab(S; X_mu) / c_k``, shape ``(n, K)``."""
    X = check_tokens(X)
    S = check_symmetric(S, "S", d=X.shape[2])
    return _forward_whitened(X, S)


def _forward_whitened(X, S, work=None):
    ia, ib, c = pair_indices(X.shape[1])
    H = _preactivations(X, S, work)
    return H[:, ia, ib] / c


def _forward_whitened_factored(X, F, sigma, work=None):
    """Whitened forward ``z (n, K)`` for ``S = F diag(sigma) F^T`` (see
    :func:`_preactivations_factored` for shapes and ``work``)."""
    ia, ib, c = pair_indices(X.shape[1])
    H = _preactivations_factored(X, F, sigma, work)
    return H[:, ia, ib] / c


def adjoint_whitened(X, w) -> np.ndarray:
    """Adjoint of :func:`forward_whitened`: ``A*(w) (d, d)``, with ``sum(A(S) * w) == Tr(S A*(w))``."""
    X = check_tokens(X)
    n, T, _ = X.shape
    K = pair_indices(T)[0].size
    w = as_float_array(w, "w", ndim=2)
    if w.shape != (n, K):
        raise ValueError(f"w must have shape (n, K) = {(n, K)}, got {w.shape}")
    return _adjoint_whitened(X, w)


def _adjoint_whitened(X, w, work=None):
    return _backproject(X, whitened_to_G(w, X.shape[1]), work)


def sample_gram(X) -> np.ndarray:
    """Per-sample normalised Gram matrices ``Gamma_mu (n, K, K)`` of the K sensing matrices.

    ``Gamma_{kk'} = 2/(d+1) <A_k, A_k'>_F`` with ``A_k = (sym(x_a x_b^T) - delta_ab I)/(c_k sqrt d)``,
    computed from the token Gram ``X_mu X_mu^T`` only (DESIGN.md section 5). ``E Gamma = I_K``.
    """
    X = check_tokens(X)
    ia, ib, c = pair_indices(X.shape[1])
    return _gamma_from_gram(_gram(X), ia, ib, c, float(X.shape[2]))
