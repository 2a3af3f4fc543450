"""Naive references for the tests: the formulas of docs/theory.md written out literally.

Everything here is independent of the package code under test: no ``amp_attention`` operator,
whitening, denoiser or output-factor function is called. The only exception is
:func:`naive_gamp`, which calls the cross-entropy prox through its NumPy twin
``amp_attention.losses._cross_entropy_kernels.ce_prox_numpy`` (itself checked against the compiled
kernel in ``tests/test_losses.py``). The package never imports this module.

The sensing matrices are materialised once, by :func:`sensing_tensor` (memory ``8 n K d^2``
bytes, so keep ``n``, ``T``, ``d`` small); every other reference derives from it. Kernel twins
(NumPy versions of individual Numba kernels) are not here: they sit next to their kernels in the
package. ``benchmarks/naive.py`` is a separate timing baseline.

Conventions (docs/theory.md §2): pairs ``k = (a, b)``, ``a <= b``, enumerated row by row;
``c_k = sqrt 2`` if ``a = b`` and ``1`` otherwise.
"""

import numpy as np
from scipy.special import logsumexp

__all__ = [
    "pairs",
    "naive_whiten",
    "sym_basis",
    "sensing_tensor",
    "naive_forward",
    "naive_adjoint",
    "naive_preactivations",
    "naive_backproject",
    "naive_gram",
    "naive_cross_entropy",
    "naive_gamp",
]


def pairs(T):
    """Pair enumeration of docs/theory.md §2: ``(ia, ib, c)``, arrays of length ``K = T(T+1)/2``
    with the row index ``a``, column index ``b`` (``a <= b``, row by row) and ``c_k``."""
    ia = np.array([a for a in range(T) for b in range(a, T)], dtype=np.int64)
    ib = np.array([b for a in range(T) for b in range(a, T)], dtype=np.int64)
    c = np.array([np.sqrt(2.0) if a == b else 1.0 for a, b in zip(ia, ib)])
    return ia, ib, c


def naive_whiten(Y):
    """Whitened coordinates of docs/theory.md §2: ``(n, T, T) -> (n, K)``,
    ``z_k = (Y_ab + Y_ba) / (2 c_k)`` (the symmetric part of ``Y``)."""
    ia, ib, c = pairs(Y.shape[1])
    return 0.5 * (Y[:, ia, ib] + Y[:, ib, ia]) / c


def sym_basis(d):
    """Orthonormal basis of Sym_d under the Frobenius inner product (docs/theory.md §0): the
    matrices ``e_i e_i^T`` and ``(e_i e_j^T + e_j e_i^T)/sqrt 2`` (``i < j``), shape
    ``(d(d+1)/2, d, d)``."""
    E = []
    for i in range(d):
        for j in range(i, d):
            B = np.zeros((d, d))
            if i == j:
                B[i, i] = 1.0
            else:
                B[i, j] = B[j, i] = 1.0 / np.sqrt(2.0)
            E.append(B)
    return np.array(E)


def sensing_tensor(X):
    """The whitened sensing matrices of docs/theory.md §2-§3, materialised: shape ``(n, K, d, d)``,

    ``A[mu, k] = ( sym(x_a x_b^T) - delta_ab I ) / ( c_k sqrt(d) )``,  ``k = (a, b)``, ``a <= b``,

    with ``x_a = X[mu, a]`` and ``sym(M) = (M + M^T)/2``, so that ``z_{mu,k} = Tr(A[mu, k] S)``.
    """
    n, T, d = X.shape
    ia, ib, c = pairs(T)
    outer = np.einsum("nai,nbj->nabij", X, X)  # x_a x_b^T for every pair of tokens
    A = 0.5 * (outer[:, ia, ib] + outer[:, ib, ia])
    A[:, ia == ib] -= np.eye(d)
    A /= c[None, :, None, None] * np.sqrt(d)
    return A


def naive_forward(X, S):
    """Whitened forward map ``A(S)`` (docs/theory.md §3): ``z_{mu,k} = Tr(A_{mu,k} S)``, shape
    ``(n, K)``."""
    return np.einsum("nkij,ij->nk", sensing_tensor(X), S)


def naive_adjoint(X, w):
    """Whitened adjoint ``A*(w) = sum_{mu,k} w_{mu,k} A_{mu,k}`` (docs/theory.md §3), shape
    ``(d, d)``."""
    return np.einsum("nk,nkij->ij", w, sensing_tensor(X))


def naive_preactivations(X, S):
    """Preactivations ``H`` of shape ``(n, T, T)`` for symmetric ``S`` (docs/theory.md §3):
    ``H_{mu,ab} = (x_a^T S x_b - delta_ab Tr S)/sqrt(d) = c_k Tr(A_{mu,k} S)``, filled into both
    ``(a, b)`` and ``(b, a)``."""
    n, T, _ = X.shape
    ia, ib, c = pairs(T)
    h = naive_forward(X, S) * c
    H = np.empty((n, T, T))
    H[:, ia, ib] = h
    H[:, ib, ia] = h
    return H


def naive_backproject(X, G):
    """Adjoint of the preactivations for any ``G`` of shape ``(n, T, T)`` (docs/theory.md §3):
    ``M = sym( sum_mu sum_ab G_{mu,ab} (x_a x_b^T - delta_ab I) ) / sqrt(d)``, shape ``(d, d)``.

    Only the symmetric part of ``G_mu`` matters: ``sym(x_a x_b^T - delta_ab I)/sqrt(d) = c_k A_k``
    is multiplied by ``G_ab`` and by ``G_ba`` (once if ``a = b``), so ``M = A*(w)`` with
    ``w_k = (G_ab + G_ba)/c_k = 2 z_k(G)``."""
    return naive_adjoint(X, 2.0 * naive_whiten(G))


def naive_gram(X):
    """Per-sample Gram matrices of docs/theory.md §3 from the materialised sensing matrices:
    ``Gamma_{mu,kk'} = 2/(d+1) <A_{mu,k}, A_{mu,k'}>_F``, shape ``(n, K, K)``."""
    d = X.shape[2]
    A = sensing_tensor(X)
    return np.einsum("nkij,nlij->nkl", A, A) * 2.0 / (d + 1.0)


def naive_cross_entropy(y, H, beta):
    """The cross-entropy loss of docs/theory.md §4 literally, summed over samples:
    ``sum_a [-beta sum_b y_ab h_ab + logsumexp_b(beta h_ab)]``."""
    return float(np.sum(-beta * np.sum(y * H, axis=-1) + logsumexp(beta * H, axis=-1)))


def naive_gamp(X, y, loss, reg, lam, beta, n_iter, variance="sample", damping=0.0):
    """Plain transcription of the ERM-GAMP iteration of docs/theory.md §5.

    Materialised sensing matrices (:func:`sensing_tensor`, :func:`naive_gram`), the closed-form
    square-loss output factor or the NumPy cross-entropy prox twin ``ce_prox_numpy``, an explicit
    eigendecomposition and divided differences for the divergence. ``loss`` is ``"square"`` or
    ``"cross_entropy"``, ``reg`` is ``"nuclear"`` or ``"frobenius"``; ``variance`` is ``"sample"``
    (``V_mu = V Gamma_mu``) or ``"scalar"`` (``V_mu = V I_K``); ``damping`` relaxes ``S`` and ``V``.
    Starts from ``S^0 = 0``, ``V^0 = 1`` and runs exactly ``n_iter`` iterations.

    Returns the list ``[(S^{t+1}, V^{t+1})]`` of length ``n_iter``.
    """
    from amp_attention.losses._cross_entropy_kernels import ce_prox_numpy

    n, T, d = X.shape
    A = sensing_tensor(X)
    K = A.shape[1]
    Gamma = naive_gram(X)
    if variance == "scalar":
        Gamma = np.broadcast_to(np.eye(K), (n, K, K))
    S, V, g_prev = np.zeros((d, d)), 1.0, np.zeros((n, K))
    out = []
    for _ in range(n_iter):
        # 1. Onsager-corrected cavity mean
        z = np.einsum("nkij,ij->nk", A, S)
        Vmu = V * Gamma
        omega = z - np.einsum("nkl,nl->nk", Vmu, g_prev)
        # 2. output factor
        if loss == "square":
            inv = np.linalg.inv(np.eye(K)[None] + 2.0 * Vmu)
            zy = naive_whiten(y)
            p = np.einsum("nkl,nl->nk", inv, 2.0 * np.einsum("nkl,nl->nk", Vmu, zy) + omega)
            g, dg = 2.0 * (zy - p), 2.0 * inv
        else:
            _, g, dg, _, status = ce_prox_numpy(y, omega, np.ascontiguousarray(Vmu), beta)
            assert np.all(status <= 1)
        # 3.-4. precision and effective observation
        A_hat = np.einsum("nkl,nkl->", Gamma, dg) / d**2
        R = S + np.einsum("nk,nkij->ij", g, A) / (d * A_hat)
        # 5.-6. spectral denoiser and its divergence
        lv, U = np.linalg.eigh(R)
        if reg == "nuclear":
            f, fp = np.maximum(lv - lam / A_hat, 0.0), (lv > lam / A_hat).astype(float)
        else:
            f, fp = lv * A_hat / (A_hat + lam), np.full(d, A_hat / (A_hat + lam))
        div = fp.sum()
        for i in range(d):
            for j in range(i + 1, d):
                div += (f[i] - f[j]) / (lv[i] - lv[j]) if abs(lv[i] - lv[j]) > 1e-12 else 0.5 * (fp[i] + fp[j])
        S_new, V_new = (U * f) @ U.T, div / (d**2 * A_hat)
        S = (1 - damping) * S_new + damping * S
        V = (1 - damping) * V_new + damping * V
        g_prev = g
        out.append((S, V))
    return out
