"""The attention-indexed model: teachers, tokens and the channels that make ``y`` (docs/theory.md §1).

Shapes: tokens ``X (n, T, d)``, preactivations ``h (n, T, T)``, targets ``y (n, T, T)``.
All arrays are float64 and every random draw goes through a seeded ``numpy.random.Generator``:
the same seed gives bit-identical data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._validation import (
    as_float_array,
    check_memory,
    check_nonnegative,
    check_positive,
    check_rng,
    check_symmetric,
    check_T,
    check_tokens,
)
from .operator import preactivations
from .spectral import SpectralLaw
from .whitening import n_pairs, unwhiten

__all__ = [
    "Teacher",
    "SoftmaxChannel",
    "HardmaxChannel",
    "LinearChannel",
    "Dataset",
    "sample_tokens",
    "sample_data",
    "haar_orthogonal",
    "row_softmax",
    "check_channel",
    "as_spectral_law",
]


def haar_orthogonal(d: int, rng) -> np.ndarray:
    """A Haar-distributed ``d x d`` orthogonal matrix (QR of a Gaussian matrix with sign fix)."""
    d = _check_dim(d)
    rng = check_rng(rng)
    check_memory(4.0 * float(d) * d * 8, f"a Haar orthogonal matrix of size d={d}", "use a smaller d")
    Z = rng.standard_normal((d, d))
    Q, R = np.linalg.qr(Z)
    return Q * np.sign(np.diag(R))


#: Largest size accepted for n and d (larger ones cannot index an array anyway).
MAX_SIZE = 2**62


def _check_dim(d) -> int:
    if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or not 1 <= d <= MAX_SIZE:
        raise ValueError(f"d must be an integer in 1..2^62, got {d!r}")
    return int(d)


def _check_spectrum(lam: np.ndarray, name: str) -> None:
    """Reject spectra whose second moment ``Q* = Tr(S*^2)/d`` overflows float64 (``ValueError``
    naming ``name``): ``Q``, the SE and every quadratic quantity would be inf."""
    with np.errstate(over="ignore"):
        q = float(np.mean(lam * lam))
    if not np.isfinite(q):
        raise ValueError(f"{name}: Q* = Tr(S*^2)/d overflows float64 (max |eigenvalue| = "
                         f"{float(np.max(np.abs(lam))):.3g}; it must stay below ~1e154); rescale the teacher")


@dataclass(frozen=True, eq=False)
class Teacher:
    """A symmetric teacher matrix ``S*`` with its exact spectrum.

    Attributes
    ----------
    S : (d, d) float64, symmetric.
    eigenvalues : (d,) float64, ascending (``S = O diag(eigenvalues) O^T``).
    kind : str, one of ``'wishart', 'powerlaw', 'lowrank', 'custom'``.
    params : dict of the constructor parameters (``rho``, ``gamma``, ...).

    Derived: ``d``, ``Q = Tr(S^2)/d``, ``trace_mean = Tr(S)/d``.
    Build with the class methods (docs/theory.md §1).
    """

    S: np.ndarray
    eigenvalues: np.ndarray
    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        S = check_symmetric(self.S, "S")
        lam = as_float_array(self.eigenvalues, "eigenvalues", ndim=1)
        if lam.shape != (S.shape[0],):
            raise ValueError(f"eigenvalues must have shape ({S.shape[0]},) to match S, got {lam.shape}")
        _check_spectrum(lam, "eigenvalues")
        if not isinstance(self.kind, str) or self.kind not in ("wishart", "powerlaw", "lowrank", "custom"):
            raise ValueError(f"kind must be 'wishart', 'powerlaw', 'lowrank' or 'custom', got {self.kind!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict, got {type(self.params).__name__}")
        object.__setattr__(self, "S", S)
        object.__setattr__(self, "eigenvalues", lam)

    @property
    def d(self) -> int:
        return self.S.shape[0]

    @property
    def Q(self) -> float:
        """``Q* = Tr(S*^2)/d``."""
        return float(np.mean(self.eigenvalues**2))

    @property
    def trace_mean(self) -> float:
        """``Tr(S*)/d``."""
        return float(np.mean(self.eigenvalues))

    @classmethod
    def _from_spectrum(cls, eigenvalues, rng, kind, params, name="eigenvalues") -> "Teacher":
        lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
        _check_spectrum(lam, name)
        O = haar_orthogonal(lam.size, rng)
        S = (O * lam) @ O.T
        S = 0.5 * (S + S.T)
        return cls(S=S, eigenvalues=lam, kind=kind, params=params)

    @classmethod
    def wishart(cls, d: int, rho: float, rng=None) -> "Teacher":
        """``S* = W W^T / sqrt(r d)``, ``W in R^{d x r}`` iid N(0, 1), ``r = max(1, round(rho d))``.

        ``Tr(S*)/d -> sqrt(rho)`` and ``Q* -> 1 + rho`` as d grows.
        """
        d = _check_dim(d)
        rho = check_positive(rho, "rho")
        rng = check_rng(rng)
        check_memory(16.0 * d * max(1.0, rho * d) + 24.0 * d * d, f"Teacher.wishart(d={d}, rho={rho})",
                     "use a smaller d or rho")
        r = max(1, int(round(rho * d)))
        W = rng.standard_normal((d, r))
        S = (W @ W.T) / np.sqrt(r * d)
        S = 0.5 * (S + S.T)
        lam = np.linalg.eigvalsh(S)
        return cls(S=S, eigenvalues=lam, kind="wishart", params={"rho": rho, "rank": r})

    @classmethod
    def powerlaw(cls, d: int, gamma: float, rng=None, cutoff: int | None = None) -> "Teacher":
        """Eigenvalues ``k^-gamma`` for ``k <= cutoff`` (0 beyond), rescaled to ``Q* = 1``; Haar basis."""
        d = _check_dim(d)
        gamma = check_nonnegative(gamma, "gamma")
        if cutoff is None:
            cutoff = d
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, np.integer)) or not 1 <= cutoff <= d:
            raise ValueError(f"cutoff must be an integer in 1..d={d}, got {cutoff!r}")
        k = np.arange(1, d + 1, dtype=np.float64)
        lam = np.where(k <= cutoff, k**-gamma, 0.0)
        lam *= 1.0 / np.sqrt(np.mean(lam**2))
        return cls._from_spectrum(lam, rng, "powerlaw", {"gamma": gamma, "cutoff": int(cutoff)})

    @classmethod
    def lowrank(cls, d: int, rank: int, rng=None, strength: float = 1.0) -> "Teacher":
        """``rank`` spikes of equal eigenvalue ``strength * sqrt(d / rank)`` on a Haar subspace.

        The scaling keeps ``Q* = strength^2`` (like a Wishart teacher at small ``rho = rank/d``).
        """
        d = _check_dim(d)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= d:
            raise ValueError(f"rank must be an integer in 1..d={d}, got {rank!r}")
        strength = check_positive(strength, "strength")
        lam = np.zeros(d)
        lam[:rank] = strength * np.sqrt(d / rank)
        return cls._from_spectrum(lam, rng, "lowrank", {"rank": int(rank), "strength": strength},
                                  name="strength")

    @classmethod
    def custom(cls, eigenvalues, rng=None) -> "Teacher":
        """Given eigenvalues (length d) in a Haar-random basis."""
        lam = as_float_array(eigenvalues, "eigenvalues", ndim=1)
        return cls._from_spectrum(lam, rng, "custom", {})

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"Teacher.{self.kind}(d={self.d}{', ' if p else ''}{p}; Q*={self.Q:.4g})"


# --------------------------------------------------------------------------------------------
# Channels that make y from the teacher's preactivations h* (docs/theory.md §1)
# --------------------------------------------------------------------------------------------


def _check_h(h) -> np.ndarray:
    h = as_float_array(h, "h", ndim=3)
    if h.shape[1] != h.shape[2]:
        raise ValueError(f"h must have shape (n, T, T), got {h.shape}")
    check_T(h.shape[1])
    return h


def _as_h(h) -> np.ndarray:
    """``h`` as a float64 array with at least one axis (no finiteness check: a link may see the
    non-finite iterates of a diverged run), else ``ValueError`` naming ``h``."""
    try:
        arr = np.asarray(h, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"h must be a real numeric array, got {type(h).__name__}") from None
    if arr.ndim < 1 or arr.shape[-1] < 1:
        raise ValueError(f"h must have a non-empty last axis, got shape {arr.shape}")
    return arr


def row_softmax(h: np.ndarray, beta: float) -> np.ndarray:
    """Row-wise ``softmax(beta * h)`` along the last axis, stable for every finite ``beta > 0``.

    The row maximum of ``h`` is subtracted *before* the multiplication by ``beta``:
    ``softmax(beta (h - max h))``.  Every exponent is then ``<= 0`` (``-inf`` at worst, never
    ``inf - inf``), so ``beta = 1e306`` or ``1.7e308`` with entries of ``h`` hundreds apart gives
    the one-hot argmax row instead of NaN.
    """
    h = _as_h(h)
    beta = check_positive(beta, "beta")
    short = h.shape[-1] < 8  # (rows of T <= 7 tokens: column-wise loops, as numpy's own order)
    with np.errstate(over="ignore"):  # beta (h - max h) may overflow to -inf: exp gives 0, exactly
        s = beta * (h - (_columnwise(np.maximum, h) if short else h.max(axis=-1))[..., None])
    e = np.exp(s)
    return e / (_columnwise(np.add, e) if short else e.sum(axis=-1))[..., None]


def _columnwise(op, a):
    """``op.reduce(a, axis=-1)`` as a loop over the (few) columns, in order: the same numbers as
    numpy's reduction of a short last axis (a sequential loop below 8 elements), without its
    per-row overhead."""
    out = a[..., 0].copy()
    for j in range(1, a.shape[-1]):
        op(out, a[..., j], out=out)
    return out


def _whitened_noise(rng, n: int, T: int) -> np.ndarray:
    """Symmetric ``(n, T, T)`` noise ``xi`` with ``whiten(xi)`` iid standard normal: off-diagonal
    variance 1, diagonal variance 2 (one draw ``rng.standard_normal((n, K))``).  Shared by every
    noisy channel, so that ``noise`` means the same thing for all of them."""
    return unwhiten(rng.standard_normal((n, n_pairs(T))), T)


def _noisy(h: np.ndarray, noise: float, rng) -> np.ndarray:
    """``h + sqrt(noise) xi`` (``xi`` from :func:`_whitened_noise`); ``h`` itself when
    ``noise == 0`` (no random number is drawn; ``rng`` is still validated)."""
    rng = check_rng(rng)
    if noise == 0.0:
        return h
    n, T, _ = h.shape
    return h + np.sqrt(noise) * _whitened_noise(rng, n, T)


_NOISE_DOC = """
    ``noise >= 0`` is the variance of the noise added to the preactivations before the nonlinearity,
    per *whitened* component: ``xi`` is symmetric with off-diagonal variance 1 and diagonal
    variance 2 (the structure of ``h*`` itself and of :class:`LinearChannel`'s noise), so
    ``whiten(sqrt(noise) xi)`` has iid ``N(0, noise)`` entries.  A paper that writes the noise as
    ``Delta`` with diagonal variance ``Delta`` and off-diagonal variance ``Delta/2`` uses
    ``noise = Delta/2``.  With ``noise = 0`` no random number is drawn.  The noise is drawn from
    ``rng`` after the tokens (:func:`sample_data`).  :meth:`phi` is always the noiseless map."""


@dataclass(frozen=True)
class SoftmaxChannel:
    """``y_a = softmax_b(beta (h*_ab + sqrt(noise) xi_ab))`` row-wise (each row of ``y`` sums to 1).
    Needs T >= 2 (docs/theory.md §1).
    """

    beta: float = 1.0
    noise: float = 0.0

    def __post_init__(self):
        check_positive(self.beta, "beta")
        check_nonnegative(self.noise, "noise")

    def __call__(self, h, rng=None) -> np.ndarray:
        h = _check_h(h)
        if h.shape[1] == 1:
            raise ValueError("the softmax channel needs T >= 2 tokens: with T = 1 every target is y = 1")
        return row_softmax(_noisy(h, self.noise, rng), self.beta)

    def phi(self, h) -> np.ndarray:
        """Noiseless map ``h -> softmax(beta h)`` row-wise (test errors compare ``phi(h*)`` with
        ``phi(h_hat)``), whatever ``noise``."""
        return row_softmax(h, self.beta)


@dataclass(frozen=True)
class HardmaxChannel:
    """One-hot argmax of each row of ``h* + sqrt(noise) xi`` (the ``beta -> infinity`` limit of
    :class:`SoftmaxChannel`); ties go to the lowest index.  Needs T >= 2 (docs/theory.md §1).
    """

    noise: float = 0.0

    def __post_init__(self):
        check_nonnegative(self.noise, "noise")

    def __call__(self, h, rng=None) -> np.ndarray:
        return _one_hot_argmax(_noisy(self._check(h), self.noise, rng))

    def phi(self, h) -> np.ndarray:
        """Noiseless map: the one-hot argmax rows of ``h``, whatever ``noise``."""
        return _one_hot_argmax(self._check(h))

    @staticmethod
    def _check(h) -> np.ndarray:
        h = _check_h(h)
        if h.shape[1] == 1:
            raise ValueError("the hardmax channel needs T >= 2 tokens: with T = 1 every target is y = 1")
        return h


def _one_hot_argmax(h: np.ndarray) -> np.ndarray:
    idx = np.argmax(h, axis=-1)
    y = np.zeros_like(h)
    np.put_along_axis(y, idx[..., None], 1.0, axis=-1)
    return y


SoftmaxChannel.__doc__ += _NOISE_DOC
HardmaxChannel.__doc__ += _NOISE_DOC


@dataclass(frozen=True)
class LinearChannel:
    """``y = h* + sqrt(noise) xi``, ``xi`` symmetric with off-diagonal variance 1, diagonal variance 2
    (whitened variance ``noise``; a paper's ``Delta`` with diagonal variance ``Delta`` and
    off-diagonal variance ``Delta/2`` is ``noise = Delta/2``).  ``noise = 0`` draws nothing."""

    noise: float = 0.0

    def __post_init__(self):
        check_nonnegative(self.noise, "noise")

    def __call__(self, h, rng=None) -> np.ndarray:
        h = _check_h(h)
        if self.noise == 0.0:
            check_rng(rng)
            return h.copy()
        return _noisy(h, self.noise, rng)

    def phi(self, h) -> np.ndarray:
        """Noiseless map: the identity."""
        return _as_h(h)


CHANNELS = (SoftmaxChannel, HardmaxChannel, LinearChannel)


def check_channel(channel, name: str = "channel"):
    """Return ``channel`` if it is one of the model's channels, else a ``ValueError`` naming ``name``."""
    if not isinstance(channel, CHANNELS):
        raise ValueError(f"{name} must be SoftmaxChannel, HardmaxChannel or LinearChannel, "
                         f"got {type(channel).__name__}")
    return channel


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """Sampled data: tokens ``X (n, T, d)``, targets ``y (n, T, T)``, teacher preactivations ``h (n, T, T)``."""

    X: np.ndarray
    y: np.ndarray
    h: np.ndarray

    def __post_init__(self):
        X = check_tokens(self.X, keep_float32=True)  # float32 tokens stay float32
        n, T = X.shape[0], X.shape[1]
        for name in ("y", "h"):
            arr = as_float_array(getattr(self, name), name, ndim=3)
            if arr.shape != (n, T, T):
                raise ValueError(f"{name} must have shape (n, T, T) = {(n, T, T)} to match X, got {arr.shape}")
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "X", X)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def T(self) -> int:
        return self.X.shape[1]

    @property
    def d(self) -> int:
        return self.X.shape[2]


def _check_dtype(dtype) -> np.dtype:
    if dtype not in ("float64", "float32", np.float64, np.float32):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    return np.dtype(dtype)


def sample_tokens(n: int, T: int, d: int, rng=None, dtype="float64") -> np.ndarray:
    """Tokens ``X (n, T, d)`` with iid N(0, 1) entries, of ``dtype`` 'float64' (default) or 'float32'.

    float32 tokens are drawn as float32 normals (half the memory; a different stream from the
    float64 draws, so not the float64 tokens rounded).  Sizes whose array would not fit in the
    available memory (or whose element count overflows) raise
    :class:`~amp_attention._validation.InsufficientMemoryError` (a ``ValueError``) naming ``n``
    and ``d`` before anything is allocated."""
    n = _check_count(n)
    T = check_T(T)
    d = _check_dim(d)
    rng = check_rng(rng)
    dtype = _check_dtype(dtype)
    _check_token_memory(n, T, d, float(dtype.itemsize))
    return rng.standard_normal((n, T, d), dtype=dtype)


def _check_count(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_SIZE:
        raise ValueError(f"n must be an integer in 1..2^62, got {n!r}")
    return int(n)


def _check_token_memory(n: int, T: int, d: int, per_entry: float) -> None:
    """Before allocating ``(n, T, d)`` tokens (``per_entry`` bytes per token entry, all arrays
    included): reject counts that overflow int64 or exceed the available memory, naming n and d."""
    if float(n) * T * d >= 2.0**62:
        raise ValueError(f"n * T * d = {n} * {T} * {d} overflows the largest array size; use a smaller n or d")
    check_memory(float(n) * T * d * per_entry, f"n={n} sequences of T={T} tokens in d={d}",
                 "use a smaller n or d")


def sample_data(n: int, T: int, teacher: Teacher, channel, rng=None, dtype="float64") -> Dataset:
    """Sample ``n`` sequences of ``T`` tokens and their targets ``y = channel(h(S*; X))``.

    The tokens are drawn first, then the channel noise, from the same generator ``rng``.
    ``dtype='float32'`` draws float32 tokens (:func:`sample_tokens`; ``h`` then comes from float32
    GEMMs, relative error ~1e-7) for the float32 path of GAMP; ``h`` and ``y`` are float64.  No
    temporary of the tokens' size is made: memory is X plus ``O(n T^2)``.
    """
    if not isinstance(teacher, Teacher):
        raise ValueError(f"teacher must be an amp_attention.Teacher, got {type(teacher).__name__}")
    check_channel(channel)
    n = _check_count(n)
    T = check_T(T)
    rng = check_rng(rng)
    if T == 1 and isinstance(channel, (SoftmaxChannel, HardmaxChannel)):
        raise ValueError(f"{type(channel).__name__} needs T >= 2 tokens: with T = 1 every target is y = 1")
    dtype = _check_dtype(dtype)
    # X (n, T, d) plus y, h and the channel's temporaries (n, T, T) each
    _check_token_memory(n, T, teacher.d, dtype.itemsize + 40.0 * T / teacher.d)
    X = sample_tokens(n, T, teacher.d, rng, dtype)
    h = preactivations(X, teacher.S)
    y = channel(h, rng)
    return Dataset(X=X, y=y, h=h)


# --------------------------------------------------------------------------------------------
# Teacher -> spectral law (the one place where it is decided)
# --------------------------------------------------------------------------------------------


def as_spectral_law(teacher, spectrum: str = "exact", name: str = "teacher") -> SpectralLaw:
    """The teacher's spectral law, for the SE input side and the RIE (docs/theory.md §7).

    ``teacher``: a :class:`Teacher` or a :class:`SpectralLaw` (returned unchanged).
    ``spectrum='exact'`` uses the finite-d eigenvalues as atoms; ``'limit'`` uses the
    d -> infinity law where one is known (Wishart(rho)), else the atoms.  ``name`` is the argument
    named in error messages.
    """
    if not isinstance(spectrum, str) or spectrum not in ("exact", "limit"):
        raise ValueError(f"spectrum must be 'exact' or 'limit', got {spectrum!r}")
    if isinstance(teacher, SpectralLaw):
        return teacher
    if not isinstance(teacher, Teacher):
        raise ValueError(f"{name} must be a Teacher (whose eigenvalues are used) or a SpectralLaw, "
                         f"got {type(teacher).__name__}")
    if spectrum == "limit" and teacher.kind == "wishart":
        return SpectralLaw.wishart(teacher.params["rho"])
    return SpectralLaw.atoms(teacher.eigenvalues)
