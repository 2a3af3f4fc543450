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

Thread policy (:mod:`amp_attention.threads`): the GEMMs of the sensing operator run inside Numba
threads, one block of samples each, with BLAS limited to one thread meanwhile (threadpoolctl), so
BLAS and Numba never compete for the cores, whatever the import order; nothing is written to the
environment.  The Numba thread count is the usual ``NUMBA_NUM_THREADS``.
"""

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
