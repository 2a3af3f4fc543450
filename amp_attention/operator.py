"""The matrix-free sensing operator and its adjoint (DESIGN.md sections 3 and 5).

Forward ``preactivations(X, S) -> H (n, T, T)``::

    H_ab = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)

computed as the GEMM ``Y = X.reshape(nT, d) @ S`` followed by per-sample ``T x T`` contractions
``H_mu = X_mu Y_mu^T`` (Numba, parallel over samples).  The GEMM can write into a caller-owned
buffer of X's shape (``work``), so that an AMP run allocates the ``n T d`` intermediate once.

Adjoint ``backproject(X, G) -> M (d, d)``::

    M = sym( sum_mu sum_ab G_mu,ab (x_a x_b^T - delta_ab I) ) / sqrt(d)

computed as per-sample ``B_mu = G_mu X_mu`` (Numba, into the same kind of buffer) followed by one
GEMM ``X.reshape(nT, d).T @ B.reshape(nT, d)``, then symmetrised, minus the trace part.
Adjoint means ``sum(H(S) * G) == Tr(S M(G))`` for symmetric S.

Whitened forms (section 5): ``forward_whitened(X, S) -> (n, K)`` is ``A(S)_{mu k} = h_ab / c_k``,
and ``adjoint_whitened(X, w)`` is ``A*(w)`` (builds ``G_aa = w_k / sqrt 2``, ``G_ab = G_ba = w_k / 2``).
``sample_gram(X) -> Gamma (n, K, K)`` are the normalised per-sample Gram matrices of the K sensing
matrices (``E Gamma = I_K``).

No per-sample d x d matrix is ever formed; memory is O(n T d).  Each Numba kernel ``_x`` has a
plain NumPy twin ``_x_numpy`` used in the tests.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

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


def _backproject(X, G, work=None):
    """Unvalidated adjoint; ``work`` as in :func:`_preactivations` (holds ``B = G X``)."""
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
