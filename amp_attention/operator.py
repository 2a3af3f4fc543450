"""The matrix-free sensing operator and its adjoint (docs/theory.md §3 and §5).

:class:`SensingOperator` is built once from the tokens ``X (n, T, d)``: it validates X once, owns
one reusable float64 work buffer of X's shape for every ``n T d`` GEMM intermediate, and applies
the maps below.  The free functions (:func:`preactivations`, :func:`backproject`,
:func:`forward_whitened`, :func:`adjoint_whitened`, :func:`sample_gram`) are thin wrappers that
build an operator and call one method.  The Numba kernels and their NumPy twins live in the
private module :mod:`amp_attention._operator_kernels`.

Forward ``preactivations(S) -> H (n, T, T)`` (§3)::

    H_ab = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)

computed as the GEMM ``Y = X.reshape(nT, d) @ S`` (into the work buffer) followed by per-sample
``T x T`` contractions ``H_mu = X_mu Y_mu^T`` (Numba, parallel over samples, upper triangle
mirrored so H is exactly symmetric).

Factored forward ``preactivations_factored(F, sigma)`` for ``S = F diag(sigma) F^T`` with
``F (d, r)`` (e.g. the low-rank output of the nuclear denoiser): ``Y = X.reshape(nT, d) @ F``
(GEMM, ``2 nT d r`` flops instead of ``2 nT d^2``), then the weighted contractions
``H_mu,ab = sum_i sigma_i Y_mu,a,i Y_mu,b,i`` (Numba), minus ``delta_ab Tr S`` with
``Tr S = sum_i sigma_i ||F_:,i||^2``, over sqrt(d).

Adjoint ``backproject(G) -> M (d, d)`` (§3)::

    M = sym( sum_mu sum_ab G_mu,ab (x_a x_b^T - delta_ab I) ) / sqrt(d)

Only the symmetric part ``Gs_mu = (G_mu + G_mu^T)/2`` matters.  Two paths, same result up to
rounding (``method="auto"`` picks by shape, :attr:`SensingOperator.adjoint_method`):

- ``"syrk"`` (d >= 60 + 10 T): per sample ``Gs_mu = sum_k lam_k v_k v_k^T`` (cyclic Jacobi on the
  ``T x T`` matrix, Numba, samples in SIMD lock-step), and the rows ``u_k = sqrt|lam_k| v_k^T X_mu``
  (length d) are packed into the ``(nT, d)`` work buffer: rows with ``lam_k > 0`` in a block P at
  the front, rows with ``lam_k < 0`` in a block N at the back (zero eigenvalues are dropped; prefix
  counts let the packing run in parallel over samples).  Then
  ``sum_mu X_mu^T Gs_mu X_mu = P^T P - N^T N``: two symmetric rank-k updates (BLAS ``dsyrk`` on the
  F-contiguous transposes of the blocks, no copy; upper triangle, mirrored so M is exactly
  symmetric), half the flops of the GEMM below;
- ``"gemm"`` (the form of docs/theory.md §3, faster at small d where the per-sample
  eigendecomposition is not repaid): ``B_mu = G_mu X_mu`` (Numba, into the work buffer) and one
  GEMM ``X.reshape(nT, d).T @ B``, symmetrised.

Both then subtract the trace part ``sum_mu Tr G_mu I`` and scale by 1/sqrt(d).
Adjoint means ``sum(H(S) * G) == Tr(S M(G))`` for symmetric S.

Whitened forms (§5): ``forward(S) -> (n, K)`` is ``A(S)_{mu k} = h_ab / c_k`` (``forward_factored``
for a factored S), and ``adjoint(w)`` is ``A*(w)`` (builds ``G_aa = w_k / sqrt 2``,
``G_ab = G_ba = w_k / 2``, :func:`whitened_to_G`).  ``gram() -> Gamma (n, K, K)`` are the
normalised per-sample Gram matrices of the K sensing matrices (``E Gamma = I_K``).

Validation: the constructor checks X once.  Every method checks its matrix argument (shape,
dtype, finiteness, symmetry of S) and names it in the ``ValueError``; ``check=False`` skips that
for arguments the caller already knows to be float64 arrays of the right shape (S symmetric),
e.g. GAMP's iterates.  :meth:`SensingOperator.check_S` etc. are the checks the methods run, for
validating once up front.  With ``check=False`` a method does no copy and no O(d^2) scan beyond
the computation itself.

No per-sample d x d matrix is ever formed; memory is O(n T d).  The work buffer makes an operator
non-reentrant: do not call one instance from several threads at once.  No result is a view of the
buffer.
"""

from __future__ import annotations

import numpy as np

from . import _operator_kernels as _k
from ._validation import as_float_array, check_symmetric, check_tokens
from .whitening import pair_indices

__all__ = [
    "SensingOperator",
    "preactivations",
    "backproject",
    "forward_whitened",
    "adjoint_whitened",
    "sample_gram",
    "whitened_to_G",
]


class SensingOperator:
    """The sensing operator of the tokens ``X (n, T, d)`` (docs/theory.md §3, §5).

    Parameters
    ----------
    X : (n, T, d) tokens, n >= 1, 1 <= T <= 8, d >= 1, finite.  Converted once to a C-contiguous
        float64 array (no copy if it already is one).
    check : if False, X is trusted to be exactly that already (no scan, no copy).

    Attributes: ``n, T, d, K`` (``K = T (T+1)/2`` whitened coordinates per sample), ``X`` (the
    validated tokens), ``work`` (the reusable ``(n, T, d)`` float64 buffer that holds every GEMM
    intermediate; allocated once, its content between calls is unspecified), ``adjoint_method``.

    Methods (``check=True``: the argument is validated and a bad one raises a ``ValueError`` naming
    it; ``check=False``: it is used as given, see the module docstring):

    - ``preactivations(S) -> (n, T, T)`` and whitened ``forward(S) -> (n, K)``, S ``(d, d)`` symmetric;
    - ``preactivations_factored(F, sigma=None) -> (n, T, T)`` and ``forward_factored(F, sigma=None)
      -> (n, K)`` for ``S = F diag(sigma) F^T``, F ``(d, r)``, sigma ``(r,)`` (None: ones);
    - ``backproject(G) -> (d, d)``, G ``(n, T, T)``, and whitened ``adjoint(w) -> (d, d)``,
      w ``(n, K)``;
    - ``gram() -> (n, K, K)``, computed on the first call and cached.

    ``sum(preactivations(S) * G) == Tr(S backproject(G))`` and ``sum(forward(S) * w) ==
    Tr(S adjoint(w))`` up to rounding.  Not thread-safe (one shared work buffer).
    """

    #: Shape rule of the ``"auto"`` adjoint (measured at one thread, d x alpha d^2 samples): the
    #: syrk path pays a per-sample Jacobi (~T^3) and BLAS overheads that the saved ``nT d^2`` flops
    #: repay once d >= ~70 (T <= 3), ~100 (T = 5), ~145 (T = 8); it is used when
    #: ``d >= SYRK_MIN_D + SYRK_MIN_D_PER_T * T``.
    SYRK_MIN_D = 60
    SYRK_MIN_D_PER_T = 10

    def __init__(self, X, *, check: bool = True):
        if check:
            X = check_tokens(X)
        n, T, d = X.shape
        self._X = X
        self._n, self._T, self._d = n, T, d
        self._ia, self._ib, self._c = pair_indices(T)
        self._work = np.empty(X.shape)
        # (nT, d) views of X and of the buffer for the GEMMs
        self._X2 = X.reshape(n * T, d)
        self._work2 = self._work.reshape(n * T, d)
        self._gamma = None

    def __repr__(self):
        return f"SensingOperator(n={self._n}, T={self._T}, d={self._d})"

    # ---------------------------------------------------------------- shapes

    @property
    def n(self) -> int:
        """Number of samples."""
        return self._n

    @property
    def T(self) -> int:
        """Tokens per sample."""
        return self._T

    @property
    def d(self) -> int:
        """Token dimension (S is ``(d, d)``)."""
        return self._d

    @property
    def K(self) -> int:
        """Whitened coordinates per sample, ``T (T+1)/2``."""
        return self._ia.size

    @property
    def X(self) -> np.ndarray:
        """The validated tokens ``(n, T, d)`` (C-contiguous float64)."""
        return self._X

    @property
    def work(self) -> np.ndarray:
        """The reusable ``(n, T, d)`` work buffer (same object for the operator's lifetime)."""
        return self._work

    @property
    def adjoint_method(self) -> str:
        """The adjoint path ``method="auto"`` takes for this shape: ``"syrk"`` or ``"gemm"``."""
        return "syrk" if self._d >= self.SYRK_MIN_D + self.SYRK_MIN_D_PER_T * self._T else "gemm"

    # ---------------------------------------------------------------- argument checks

    def check_S(self, S) -> np.ndarray:
        """``S`` as a finite symmetric C-contiguous float64 ``(d, d)`` array, or ``ValueError``."""
        return check_symmetric(S, "S", d=self._d)

    def check_G(self, G) -> np.ndarray:
        """``G`` as a finite C-contiguous float64 ``(n, T, T)`` array (any symmetry), or ``ValueError``."""
        G = as_float_array(G, "G", ndim=3)
        n, T = self._n, self._T
        if G.shape != (n, T, T):
            raise ValueError(f"G must have shape (n, T, T) = {(n, T, T)} to match X, got {G.shape}")
        return np.ascontiguousarray(G)

    def check_w(self, w) -> np.ndarray:
        """``w`` as a finite float64 ``(n, K)`` array, or ``ValueError``."""
        n, K = self._n, self.K
        w = as_float_array(w, "w", ndim=2)
        if w.shape != (n, K):
            raise ValueError(f"w must have shape (n, K) = {(n, K)}, got {w.shape}")
        return w

    def check_factor(self, F, sigma=None):
        """``(F, sigma)``: F a finite float64 ``(d, r)`` array (any r >= 0), sigma a finite float64
        ``(r,)`` array (None: ones), or ``ValueError``."""
        F = as_float_array(F, "F", ndim=2, allow_empty=True)
        if F.shape[0] != self._d:
            raise ValueError(f"F must have shape (d, r) with d = {self._d}, got {F.shape}")
        r = F.shape[1]
        if sigma is None:
            return F, np.ones(r)
        sigma = as_float_array(sigma, "sigma", ndim=1, allow_empty=True)
        if sigma.shape != (r,):
            raise ValueError(f"sigma must have shape (r,) = ({r},) to match F, got {sigma.shape}")
        return F, sigma

    # ---------------------------------------------------------------- forward (§3, §5)

    def preactivations(self, S, *, check: bool = True) -> np.ndarray:
        """``H_ab = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)`` per sample, ``(d, d) -> (n, T, T)``
        (docs/theory.md §3); H is exactly symmetric."""
        if check:
            S = check_symmetric(S, "S", d=self._d)
        n, T, d = self._n, self._T, self._d
        Y = np.matmul(self._X2, S, out=self._work2)
        H = _k.pair_contract(self._X, Y.reshape(n, T, d))
        tr = np.trace(S)
        for a in range(T):
            H[:, a, a] -= tr
        H *= 1.0 / np.sqrt(d)
        return H

    def forward(self, S, *, check: bool = True) -> np.ndarray:
        """Whitened forward map ``A(S)_{mu k} = h_ab(S; X_mu) / c_k``, ``(d, d) -> (n, K)``
        (docs/theory.md §5)."""
        H = self.preactivations(S, check=check)
        return H[:, self._ia, self._ib] / self._c

    def preactivations_factored(self, F, sigma=None, *, check: bool = True) -> np.ndarray:
        """:meth:`preactivations` of ``S = F diag(sigma) F^T``, ``F (d, r)``, ``sigma (r,)`` -> ``(n, T, T)``.

        Any r >= 0 (r > d allowed); ``sigma=None`` means ones (``S = F F^T``).  When ``r <= d`` the
        first ``n T r`` entries of the work buffer, viewed as ``(nT, r)``, hold ``Y = X F`` (else Y
        is allocated).  Equals ``preactivations(F diag(sigma) F^T)`` up to rounding, in ``2 nT d r``
        flops for the GEMM instead of ``2 nT d^2``; H is exactly symmetric.  With ``check=False``
        sigma may be any real array (converted to float64 here).
        """
        if check:
            F, sigma = self.check_factor(F, sigma)
        elif sigma is None:
            sigma = np.ones(F.shape[1])
        n, T, d = self._n, self._T, self._d
        r = F.shape[1]
        sigma = np.ascontiguousarray(sigma, dtype=np.float64)
        if r > d:
            Y = self._X2 @ F
        else:
            Y = np.matmul(self._X2, F, out=self._work.reshape(-1)[: n * T * r].reshape(n * T, r))
        H = _k.pair_contract_weighted(Y.reshape(n, T, r), sigma)
        tr = float(np.einsum("ij,ij->j", F, F) @ sigma)  # Tr S = sum_i sigma_i ||F[:, i]||^2
        for a in range(T):
            H[:, a, a] -= tr
        H *= 1.0 / np.sqrt(d)
        return H

    def forward_factored(self, F, sigma=None, *, check: bool = True) -> np.ndarray:
        """Whitened forward ``(n, K)`` for ``S = F diag(sigma) F^T`` (shapes and buffer use as in
        :meth:`preactivations_factored`; docs/theory.md §5)."""
        H = self.preactivations_factored(F, sigma, check=check)
        return H[:, self._ia, self._ib] / self._c

    # ---------------------------------------------------------------- adjoint (§3, §5)

    def backproject(self, G, *, method: str = "auto", check: bool = True) -> np.ndarray:
        """Adjoint of :meth:`preactivations`: ``M = sym(sum_mu sum_ab G_ab (x_a x_b^T - delta_ab I)) / sqrt(d)``.

        ``G (n, T, T)`` (need not be symmetric) -> the C-contiguous, exactly symmetric ``(d, d)`` M
        with ``sum(preactivations(S) * G) == Tr(S M)`` (docs/theory.md §3).  ``method``: ``"syrk"``
        (symmetric rank-k updates, half the flops), ``"gemm"`` or ``"auto"``
        (:attr:`adjoint_method`); see the module docstring.  The result does not depend on the
        buffer's previous content.
        """
        if check:
            G = self.check_G(G)
        if method == "auto":
            method = self.adjoint_method
        if method == "syrk":
            return self._backproject_syrk(G)
        if method == "gemm":
            return self._backproject_gemm(G)
        raise ValueError(f"method must be 'auto', 'syrk' or 'gemm', got {method!r}")

    def _backproject_syrk(self, G):
        """``Gs_mu = V diag(lam) V^T`` per sample (:func:`~._operator_kernels.sym_eig`), rows
        ``sqrt|lam_k| v_k^T X_mu`` packed by sign into the work buffer (rows of zero eigenvalues are
        neither written nor read, so stale content does not matter), then ``P^T P - N^T N``
        (:func:`~._operator_kernels.syrk_difference`), minus the trace part, over sqrt(d)."""
        n, T, d = self._n, self._T, self._d
        lam, V = _k.sym_eig(G)
        pos_start, neg_start, n_pos, n_neg = _k.eig_row_offsets(lam)
        W = self._work2
        _k.pack_eig_rows(self._X, lam, V, pos_start, neg_start, W)
        M = _k.syrk_difference(W[:n_pos], W[n * T - n_neg :])
        tr = 0.0
        for a in range(T):
            tr += G[:, a, a].sum()
        M[np.diag_indices(d)] -= tr
        M *= 1.0 / np.sqrt(d)
        return M

    def _backproject_gemm(self, G):
        """The GEMM form (docs/theory.md §3): ``B_mu = G_mu X_mu`` (Numba, into the work buffer), then
        ``X.reshape(nT, d).T @ B``, symmetrised, minus the trace part, over sqrt(d)."""
        n, T, d = self._n, self._T, self._d
        B = _k.mix_tokens_into(G, self._X, self._work)
        M = self._X2.T @ B.reshape(n * T, d)
        M = 0.5 * (M + M.T)
        tr = 0.0
        for a in range(T):
            tr += G[:, a, a].sum()
        M[np.diag_indices(d)] -= tr
        M *= 1.0 / np.sqrt(d)
        return M

    def adjoint(self, w, *, check: bool = True) -> np.ndarray:
        """Adjoint of :meth:`forward`: ``A*(w) = sum_mu sum_k w_mu,k A_mu,k``, ``(n, K) -> (d, d)``
        symmetric, with ``sum(forward(S) * w) == Tr(S adjoint(w))`` (docs/theory.md §5).  The
        ``"auto"`` path of :meth:`backproject` on :func:`whitened_to_G` ``(w)``."""
        if check:
            w = self.check_w(w)
        return self.backproject(whitened_to_G(w, self._T), check=False)

    # ---------------------------------------------------------------- Gram matrices (§5)

    def gram(self) -> np.ndarray:
        """Per-sample normalised Gram matrices ``Gamma_mu (n, K, K)`` of the K sensing matrices.

        ``Gamma_{kk'} = 2/(d+1) <A_k, A_k'>_F`` with ``A_k = (sym(x_a x_b^T) - delta_ab I)/(c_k sqrt d)``,
        computed from the token Gram ``X_mu X_mu^T`` only (docs/theory.md §5); ``E Gamma = I_K``.
        Computed on the first call and cached: later calls return the same array (do not modify it).
        """
        if self._gamma is None:
            self._gamma = _k.sample_gram(self._X)
        return self._gamma


# --------------------------------------------------------------------------------------------
# Free functions: build an operator, call one method
# --------------------------------------------------------------------------------------------


def preactivations(X, S) -> np.ndarray:
    """``H_ab = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)`` for every sample; shape ``(n, T, T)``.

    Parameters
    ----------
    X : (n, T, d) tokens.   S : (d, d) symmetric.

    See :meth:`SensingOperator.preactivations` (docs/theory.md §3).
    """
    return SensingOperator(X).preactivations(S)


def backproject(X, G) -> np.ndarray:
    """Adjoint of :func:`preactivations`: ``M = sym(sum_mu sum_ab G_ab (x_a x_b^T - delta_ab I)) / sqrt(d)``.

    Parameters
    ----------
    X : (n, T, d) tokens.   G : (n, T, T) (need not be symmetric).

    Returns the symmetric ``(d, d)`` matrix M with ``sum(preactivations(X, S) * G) == Tr(S M)``.
    See :meth:`SensingOperator.backproject` (docs/theory.md §3).
    """
    return SensingOperator(X).backproject(G)


def whitened_to_G(w: np.ndarray, T: int) -> np.ndarray:
    """``w (n, K) -> G (n, T, T)`` with ``G_aa = w_k / sqrt 2`` and ``G_ab = G_ba = w_k / 2``.

    Then ``backproject(X, G) = A*(w) = sum_mu sum_k w_mu,k A_mu,k`` (docs/theory.md §5).
    """
    ia, ib, c = pair_indices(T)
    scale = np.where(ia == ib, 1.0 / np.sqrt(2.0), 0.5)
    G = np.zeros((w.shape[0], T, T))
    G[:, ia, ib] = w * scale
    G[:, ib, ia] += np.where(ia == ib, 0.0, 1.0) * w * scale
    return G


def forward_whitened(X, S) -> np.ndarray:
    """Whitened forward map ``A(S)_{mu k} = h_ab(S; X_mu) / c_k``, shape ``(n, K)``.

    See :meth:`SensingOperator.forward` (docs/theory.md §5).
    """
    return SensingOperator(X).forward(S)


def adjoint_whitened(X, w) -> np.ndarray:
    """Adjoint of :func:`forward_whitened`: ``A*(w) (d, d)``, with ``sum(A(S) * w) == Tr(S A*(w))``.

    See :meth:`SensingOperator.adjoint` (docs/theory.md §5).
    """
    return SensingOperator(X).adjoint(w)


def sample_gram(X) -> np.ndarray:
    """Per-sample normalised Gram matrices ``Gamma_mu (n, K, K)`` of the K sensing matrices.

    ``Gamma_{kk'} = 2/(d+1) <A_k, A_k'>_F`` with ``A_k = (sym(x_a x_b^T) - delta_ab I)/(c_k sqrt d)``,
    computed from the token Gram ``X_mu X_mu^T`` only (docs/theory.md §5). ``E Gamma = I_K``.
    See :meth:`SensingOperator.gram`.
    """
    return SensingOperator(X).gram()
