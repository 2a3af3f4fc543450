"""amp_attention: approximate message passing and state evolution for single-head attention.

The contract (conventions, equations, checks) is DESIGN.md; section numbers in docstrings refer
to it.  Layout: ``model`` (teachers, tokens, channels that make y), ``operator`` (matrix-free
sensing map and adjoint), ``whitening`` (pair coordinates), ``channels`` (losses: prox, g_out),
``denoisers`` (spectral prox, divergence), ``amp`` (the GAMP loop), ``se`` (its scalar mirror),
``erm`` (direct training baseline), ``cli``.

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

__version__ = "0.1.0"

from .model import (  # noqa: F401
    Dataset,
    HardmaxChannel,
    LinearChannel,
    SoftmaxChannel,
    Teacher,
    sample_data,
    sample_tokens,
)
from .operator import (  # noqa: F401
    adjoint_whitened,
    backproject,
    forward_whitened,
    preactivations,
    sample_gram,
)
from .whitening import pair_indices, unwhiten, whiten  # noqa: F401
from .channels import CrossEntropyLoss, SquareLoss  # noqa: F401
from .denoisers import (  # noqa: F401
    FrobeniusDenoiser,
    NuclearDenoiser,
    nuclear_prox,
    spectral_divergence,
)
from .amp import AMPResult, ERMAttention, gamp  # noqa: F401
from .erm import ERMResult, direct_erm, erm_gradient, erm_objective, kkt_residual  # noqa: F401
from .spectral import SpectralLaw  # noqa: F401
from .se import SEResult, state_evolution  # noqa: F401
from .bayes import (  # noqa: F401
    BayesAttention,
    BayesLinearOutput,
    BayesSoftmaxOutput,
    RIEDenoiser,
    bayes_state_evolution,
)
