"""The matrix-free sensing operator and its adjoint (docs/theory.md §3 and §5).

:class:`SensingOperator` is built once from the tokens ``X (n, T, d)``: it validates X once and
applies the maps below, one block of samples at a time.  The free functions
(:func:`preactivations`, :func:`backproject`, :func:`forward_whitened`, :func:`adjoint_whitened`,
:func:`sample_gram`) are thin wrappers that build an operator and call one method.  The Numba
kernels and their NumPy twins live in the private module :mod:`amp_attention._operator_kernels`.

Blocking and threads: the samples are cut into blocks of about 1 MiB of tokens (the block size
depends on T, d and the dtype only); a Numba loop, parallel over blocks, issues one BLAS call per
block from its own thread, with BLAS limited to one thread meanwhile
(:func:`amp_attention.threads.single_threaded_blas`).  Memory beyond X and the results is one
``(block T, d)`` temporary per running thread (and, for the adjoint, 16 partial ``(d, d)`` sums);
no ``(n, T, d)`` intermediate is ever formed.  The adjoint sums its 16 partials in a fixed order,
so results do not depend on the thread count.

dtype: float64 tokens (default), or float32 tokens kept as float32 (``X`` given as a float32
array): the GEMMs then run in float32 (``S``, ``F`` are cast to float32 for them), while every sum
over samples and every result (``H``, ``M``, Gram matrices) is float64.

Forward ``preactivations(S) -> H (n, T, T)`` (§3)::

    H_ab = (x_a^T S x_b - delta_ab Tr S) / sqrt(d)

computed per block as the GEMM ``Y = X_block.reshape(bT, d) @ S`` followed by per-sample ``T x T``
contractions ``H_mu = X_mu Y_mu^T`` (upper triangle mirrored so H is exactly symmetric).

Factored forward ``preactivations_factored(F, sigma)`` for ``S = F diag(sigma) F^T`` with
``F (d, r)`` (e.g. the low-rank output of the nuclear denoiser): per block ``Y = X_block F`` (GEMM,
``2 nT d r`` flops in all instead of ``2 nT d^2``), then the weighted contractions
``H_mu,ab = sum_i sigma_i Y_mu,a,i Y_mu,b,i``, minus ``delta_ab Tr S`` with
``Tr S = sum_i sigma_i ||F_:,i||^2``, over sqrt(d).

Adjoint ``backproject(G) -> M (d, d)`` (§3)::

    M = sym( sum_mu sum_ab G_mu,ab (x_a x_b^T - delta_ab I) ) / sqrt(d)

Only the symmetric part ``Gs_mu = (G_mu + G_mu^T)/2`` matters.  Two paths, same result up to
rounding (``method="auto"`` picks by shape, :attr:`SensingOperator.adjoint_method`):

- ``"syrk"`` (d >= 60 + 10 T): per sample ``Gs_mu = sum_k lam_k v_k v_k^T`` (cyclic Jacobi on the
  ``T x T`` matrix, Numba, samples in SIMD lock-step); per block the rows
  ``u_k = sqrt|lam_k| v_k^T X_mu`` (length d) are packed by the sign of ``lam_k`` into two row
  blocks P and N (zero eigenvalues dropped), and ``sum_mu X_mu^T Gs_mu X_mu = P^T P - N^T N``:
  symmetric rank-k updates (BLAS ``syrk``, upper triangle, mirrored so M is exactly symmetric),
  half the flops of the GEMM below;
- ``"gemm"`` (the form of docs/theory.md §3, faster at small d where the per-sample
  eigendecomposition is not repaid): per block ``B_mu = G_mu X_mu`` and one GEMM
  ``X_block^T B``, symmetrised.

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
the computation itself.  No per-sample d x d matrix is ever formed.
"""

from __future__ import annotations

import numpy as np

from . import _operator_kernels as _k
from ._validation import as_float_array, check_symmetric, check_tokens
from .threads import single_threaded_blas
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
        float64 array (no copy if it already is one); a float32 array stays float32 (the GEMMs
        then run in float32, the sums over samples in float64; see the module docstring).
    check : if False, X is trusted to be exactly that already (no scan, no copy).

    Attributes: ``n, T, d, K`` (``K = T (T+1)/2`` whitened coordinates per sample), ``X`` (the
    validated tokens), ``dtype``, ``block`` (samples per block), ``adjoint_method``.

    Methods (``check=True``: the argument is validated and a bad one raises a ``ValueError`` naming
    it; ``check=False``: it is used as given, see the module docstring):

    - ``preactivations(S) -> (n, T, T)`` and whitened ``forward(S) -> (n, K)``, S ``(d, d)`` symmetric;
    - ``preactivations_factored(F, sigma=None) -> (n, T, T)`` and ``forward_factored(F, sigma=None)
      -> (n, K)`` for ``S = F diag(sigma) F^T``, F ``(d, r)``, sigma ``(r,)`` (None: ones);
    - ``backproject(G) -> (d, d)``, G ``(n, T, T)``, and whitened ``adjoint(w) -> (d, d)``,
      w ``(n, K)``;
    - ``gram() -> (n, K, K)``, computed on the first call and cached.

    ``sum(preactivations(S) * G) == Tr(S backproject(G))`` and ``sum(forward(S) * w) ==
    Tr(S adjoint(w))`` up to rounding.  Methods may be called from several threads at once.
    """

    #: Shape rule of the ``"auto"`` adjoint (measured at one thread, d x alpha d^2 samples): the
    #: syrk path pays a per-sample Jacobi (~T^3) and BLAS overheads that the saved ``nT d^2`` flops
    #: repay once d >= ~70 (T <= 3), ~100 (T = 5), ~145 (T = 8); it is used when
    #: ``d >= SYRK_MIN_D + SYRK_MIN_D_PER_T * T``.
    SYRK_MIN_D = 60
    SYRK_MIN_D_PER_T = 10

    def __init__(self, X, *, check: bool = True):
        if check:
            X = check_tokens(X, keep_float32=True)
        n, T, d = X.shape
        self._X = X
        self._n, self._T, self._d = n, T, d
        self._ia, self._ib, self._c = pair_indices(T)
        self._block = _k.block_size(T, d, X.itemsize)
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
    def dtype(self) -> np.dtype:
        """The tokens' dtype (float64, or float32 when X was given in float32): the GEMMs' dtype."""
        return self._X.dtype

    @property
    def block(self) -> int:
        """Samples per block of the blocked kernels (depends on T, d and the dtype only)."""
        return self._block

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
        T, d = self._T, self._d
        with single_threaded_blas():
            H = _k.forward_blocked(self._X, np.ascontiguousarray(S, dtype=self._X.dtype), self._block)
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

        Any r >= 0 (r > d allowed); ``sigma=None`` means ones (``S = F F^T``).  Equals ``preactivations(F diag(sigma) F^T)`` up to rounding, in ``2 nT d r``
        flops for the GEMM instead of ``2 nT d^2``; H is exactly symmetric.  With ``check=False``
        sigma may be any real array (converted to float64 here).
        """
        if check:
            F, sigma = self.check_factor(F, sigma)
        elif sigma is None:
            sigma = np.ones(F.shape[1])
        T, d = self._T, self._d
        sigma = np.ascontiguousarray(sigma, dtype=np.float64)
        with single_threaded_blas():
            H = _k.forward_factored_blocked(self._X, np.ascontiguousarray(F, dtype=self._X.dtype), sigma,
                                            self._block)
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
        (:attr:`adjoint_method`); see the module docstring.
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
        ``sqrt|lam_k| v_k^T X_mu`` packed by sign per block, ``P^T P - N^T N`` summed over blocks
        (:func:`~._operator_kernels.backproject_syrk_blocked`), minus the trace part, over sqrt(d)."""
        T, d = self._T, self._d
        lam, V = _k.sym_eig(G)
        with single_threaded_blas():
            M = _k.backproject_syrk_blocked(self._X, lam, V, self._block, _k.ADJOINT_CHUNKS,
                                            _k.SYRK_ADDRESS[self._X.dtype])
        tr = 0.0
        for a in range(T):
            tr += G[:, a, a].sum()
        M[np.diag_indices(d)] -= tr
        M *= 1.0 / np.sqrt(d)
        return M

    def _backproject_gemm(self, G):
        """The GEMM form (docs/theory.md §3): per block ``B_mu = G_mu X_mu`` and ``X_block^T B``, summed
        over blocks (:func:`~._operator_kernels.backproject_gemm_blocked`), symmetrised, minus the
        trace part, over sqrt(d)."""
        T, d = self._T, self._d
        with single_threaded_blas():
            M = _k.backproject_gemm_blocked(G, self._X, self._block, _k.ADJOINT_CHUNKS)
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
