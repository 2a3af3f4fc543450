"""amp_attention: approximate message passing and state evolution for single-head attention.

The contract (conventions, equations, checks) is DESIGN.md; section numbers in docstrings refer
to it.  Layout: ``model`` (teachers, tokens, channels that make y), ``operator`` (matrix-free
sensing map and adjoint), ``whitening`` (pair coordinates), ``channels`` (losses: prox, g_out),
``denoisers`` (spectral prox, divergence), ``amp`` (the GAMP loop), ``se`` (its scalar mirror),
``erm`` (direct training baseline), ``cli``.
"""

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
