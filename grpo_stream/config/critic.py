"""The `[critic]` section: PPO's value model and GAE (used with `loss.advantage = "gae"`).

With `loss.advantage = "gae"` the learner trains a value model beside the policy
(`grpo_stream.learner.critic`): a Hugging Face decoder with one scalar per token, its
own AdamW, trained in the same mu epochs on the same micro-batches as the actor, never
synced to vLLM. The advantages are then GAE over the completion tokens, the sequence's
reward at its last token (and, with `loss.kl_in_reward`, classic PPO's per-token KL
penalty). Every field here is refused unless `loss.advantage = "gae"`
(`config.rules.VARIANT_RULES`).

    [loss]
    advantage = "gae"
    [critic]
    init = "policy"      # or a folder: a reward model (`grpo-stream rm train`), a checkpoint
    lr = 1e-5
"""

from __future__ import annotations

from pydantic import Field

from grpo_stream.config.sections import _Section


class CriticConfig(_Section):
    init: str = Field(
        "policy",
        description='the value model\'s starting weights: "policy" (the initial policy '
        "model, a fresh scalar head), or a Hugging Face folder (path): a one-label reward "
        "model (`grpo-stream rm train`; its head is kept) or a causal LM",
    )
    lr: float = Field(1e-5, gt=0, description="the critic's AdamW learning rate (constant)")
    weight_decay: float = Field(0.0, ge=0, description="the critic's AdamW weight decay")
    max_grad_norm: float = Field(
        1.0, gt=0, description="clip the critic's gradient's global L2 norm"
    )
    value_clip: float | None = Field(
        0.2,
        gt=0,
        description="PPO value clip: V stays within this of V_old in the loss's clipped "
        "term (reward units); unset: the plain squared error",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount per completion token")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (1: Monte Carlo, 0: TD)")
    whiten: bool = Field(
        True,
        description="whiten the GAE advantages over the batch's completion tokens (mean 0, "
        "std 1; every rank's tokens)",
    )
