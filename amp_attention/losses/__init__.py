"""Output side of ERM-GAMP: per-sample losses, their prox and ``g_out`` (docs/theory.md §4, §5).

Conventions (docs/theory.md §2)
-------------------------------
A sample's preactivations form a symmetric ``T x T`` matrix ``h``; its ``K = T(T+1)/2`` whitened
coordinates are ``z_k = h_ab / c_k`` for pairs ``k = (a, b)``, ``a <= b`` in row-major order,
``c_k = sqrt(2)`` on the diagonal and ``1`` off it (see :mod:`amp_attention.whitening`).  An
off-diagonal ``z_k`` therefore appears twice in ``h`` (entries ``(a, b)`` and ``(b, a)``).

Targets ``y`` are always the raw ``(n, T, T)`` arrays produced by the channel (softmax rows, one-hot
rows or noisy linear preactivations); they need not be symmetric.

Losses (docs/theory.md §4), per sample
--------------------------------------
* :class:`SquareLoss`: ``1/2 ||y - h||_F^2`` over all ``T x T`` entries.  In whitened coordinates
  ``l_y(z) = ||z_y - z||^2 + 1/2 ||(y - y^T)/2||_F^2`` with ``z_y = whiten(y)`` (symmetric part).
* :class:`CrossEntropyLoss`: ``sum_a [ -beta sum_b y_ab h_ab + logsumexp_b(beta h_ab) ]``, convex,
  constant along the global shift ``h -> h + c 11^T`` when the rows of ``y`` sum to one, i.e. along
  the whitened direction ``u ~ (1/c_k)_k`` (:func:`amp_attention.whitening.flat_direction`).
* :class:`SoftmaxSquareLoss`: ``sum_a ||y_a - softmax(beta h_a)||^2`` (no 1/2), flat along ``u``
  for any ``y``, not convex: its prox is the global minimiser over several Newton starts.

Layout
------
* :mod:`~amp_attention.losses.base`: the :class:`Loss` contract (prox, ``g_out`` and its Jacobian,
  the ``V -> 0`` limit), argument validation, :func:`gram_g_out` (``g_out`` at GAMP's
  ``v Gamma_mu``, the variance shapes being :class:`amp_attention.variance.GramVariance`);
* :mod:`~amp_attention.losses.square`: closed form, vectorised NumPy;
* :mod:`~amp_attention.losses.cross_entropy`: damped Newton prox, whose Numba kernels and their
  NumPy twins are in the private ``_cross_entropy_kernels`` (small linear algebra in ``_linalg``);
* :mod:`~amp_attention.losses.softmax_square`: multi-start safeguarded Newton prox, kernels and
  twins in the private ``_softmax_square_kernels``.
"""

from .._validation import check_positive
from .base import Loss, gram_g_out
from .cross_entropy import CrossEntropyLoss, cross_entropy_g_out, cross_entropy_prox
from .softmax_square import SoftmaxSquareLoss, softmax_square_g_out, softmax_square_prox
from .square import SquareLoss, square_g_out, square_prox

__all__ = [
    "Loss",
    "SquareLoss",
    "CrossEntropyLoss",
    "SoftmaxSquareLoss",
    "make_loss",
    "gram_g_out",
    "square_prox",
    "square_g_out",
    "cross_entropy_prox",
    "cross_entropy_g_out",
    "softmax_square_prox",
    "softmax_square_g_out",
]

#: The names :func:`make_loss` accepts.
LOSS_NAMES = ("square", "cross_entropy", "softmax_square")


def make_loss(name: str, beta: float = 1.0, **options) -> Loss:
    """``'square'`` -> :class:`SquareLoss`; ``'cross_entropy'`` -> ``CrossEntropyLoss(beta)``;
    ``'softmax_square'`` -> ``SoftmaxSquareLoss(beta, **options)`` (``beta > 0``; options:
    ``prox_start``, ``tol``, ``max_newton``).

    The square loss has no temperature and ignores ``beta``, which must nevertheless be None or a
    finite number > 0 (a typo such as ``beta='abc'`` or ``beta=-1`` is an error, not silently
    dropped)."""
    if not isinstance(name, str) or name not in LOSS_NAMES:
        raise ValueError(f"loss must be one of {LOSS_NAMES}, got {name!r}")
    if name == "square":
        if beta is not None:
            check_positive(beta, "beta")
        if options:
            raise ValueError(f"loss='square' takes no options, got {sorted(options)}")
        return SquareLoss()
    if name == "cross_entropy":
        if "prox_start" in options:
            raise ValueError("prox_start applies to non-convex losses ('softmax_square'), not loss='cross_entropy'")
        return CrossEntropyLoss(check_positive(beta, "beta"), **options)
    return SoftmaxSquareLoss(check_positive(beta, "beta"), **options)
