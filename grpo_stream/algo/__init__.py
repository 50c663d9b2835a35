"""Pure tensor functions of the GRPO objective: log-probs, advantages, losses, KL, IS.

Nothing here knows about models, processes or buffers; every function takes tensors
and a `LossConfig` and returns tensors (and plain-float metrics). The learner uses:

    from grpo_stream.algo import (compute_advantages, grpo_loss, fused_loss_from_hidden,
                                  token_logprobs_from_hidden, token_logprobs_from_logits)

Variants live in registry tables (`POLICY_LOSSES`, `BEHAVIOUR_CORRECTIONS`,
`AGGREGATIONS`, `KL_ESTIMATORS`, `ADVANTAGES`) keyed by the `LossConfig` strings.
"""

from grpo_stream.algo.advantages import ADVANTAGES, compute_advantages
from grpo_stream.algo.aggregation import AGGREGATIONS
from grpo_stream.algo.corrections import BEHAVIOUR_CORRECTIONS
from grpo_stream.algo.fused import fused_loss_from_hidden
from grpo_stream.algo.kl import KL_ESTIMATORS
from grpo_stream.algo.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits
from grpo_stream.algo.loss import grpo_loss
from grpo_stream.algo.policy import POLICY_LOSSES

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "BEHAVIOUR_CORRECTIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "compute_advantages",
    "fused_loss_from_hidden",
    "grpo_loss",
    "token_logprobs_from_hidden",
    "token_logprobs_from_logits",
]
