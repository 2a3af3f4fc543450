"""amp_attention: approximate message passing and state evolution for single-head attention.

The contract (conventions, equations, checks) is ``docs/theory.md``; section numbers ``§N`` in
docstrings refer to it.  Layout, bottom to top:

* model: ``model`` (teachers, tokens, channels that make y; teacher -> spectral law),
  ``whitening`` (pair coordinates);
* the sensing operator: ``operator`` (:class:`SensingOperator`, matrix-free forward map and adjoint);
* factors (``factors`` holds the two contracts): output factors ``losses`` (square,
  cross-entropy) and ``bayes_outputs``; input factors ``denoisers`` (nuclear, Frobenius, RIE) over
  ``spectral`` (laws, free probability, quadrature); ``variance`` (GAMP's per-sample variances);
* the two loops, on the scaffold of ``loop``: ``amp`` (GAMP) and ``se`` (state evolution, ERM and
  Bayes-optimal); ``thresholds`` (recovery / interpolation / counting bound);
* above the loops: ``estimators`` (scikit-learn :class:`ERMAttention`, :class:`BayesAttention`),
  ``erm`` (direct training baseline), ``sweep`` (parameter grids on any executor), ``cli``.

Thread policy: one GAMP iteration alternates BLAS calls (GEMM, SYRK, eigh) with Numba kernels
parallel over samples.  OpenBLAS worker threads busy-wait for a long time after each call, and on
a machine with few cores they then starve the Numba threads (measured on 2 cores: the iteration
took 1.7x longer).  Importing this package therefore sets ``OPENBLAS_THREAD_TIMEOUT=4`` (workers
sleep after ~2^4 cycles of idling) unless it is already set, which takes effect only if NumPy has
not been imported yet; otherwise set it in the environment yourself.  Thread counts are the usual
``OPENBLAS_NUM_THREADS`` / ``NUMBA_NUM_THREADS``.
"""

import os as _os
import sys as _sys

if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.2.0"

from .model import (  # noqa: F401, E402
    Dataset,
    HardmaxChannel,
    LinearChannel,
    SoftmaxChannel,
    Teacher,
    sample_data,
    sample_tokens,
)
from .operator import (  # noqa: F401, E402
    SensingOperator,
    adjoint_whitened,
    backproject,
    forward_whitened,
    preactivations,
    sample_gram,
)
from .whitening import pair_indices, unwhiten, whiten  # noqa: F401, E402
from .factors import InputFactor, OutputFactor  # noqa: F401, E402
from .losses import CrossEntropyLoss, SoftmaxSquareLoss, SquareLoss, make_loss  # noqa: F401, E402
from .bayes_outputs import BayesLinearOutput, BayesSoftmaxOutput  # noqa: F401, E402
from .denoisers import (  # noqa: F401, E402
    FrobeniusDenoiser,
    NuclearDenoiser,
    RIEDenoiser,
    make_denoiser,
    nuclear_prox,
    spectral_divergence,
)
from .spectral import SpectralLaw  # noqa: F401, E402
from .amp import AMPResult, gamp  # noqa: F401, E402
from .se import BayesSEResult, SEResult, bayes_state_evolution, state_evolution  # noqa: F401, E402
from .thresholds import (  # noqa: F401, E402
    ThresholdResult,
    bayes_threshold,
    interpolation_threshold,
    perfect_recovery_threshold,
    recovery_threshold,
)
from .estimators import BayesAttention, ERMAttention  # noqa: F401, E402
from .erm import ERMResult, direct_erm, erm_gradient, erm_objective, kkt_residual  # noqa: F401, E402
from .sweep import sweep  # noqa: F401, E402
