"""Clipped policy objectives: the current policy pi_theta against the proximal pi_old.

    pg, ratio, flags = POLICY_LOSSES[cfg.policy_loss](logprobs, old, adv, valid, cfg)

Each variant returns the per-token policy loss [B, T] (the negated objective), the
ratio it clipped [B, T], and bool [B, T] flags for the metrics. They differ only in the
ratio:

* ``ppo_clip``: rho = pi_theta(y_t)/pi_old(y_t) per token (PPO / GRPO).
* ``gspo``: the sequence ratio s = exp(mean_t log rho_t) (geometric mean over the
  sequence's masked tokens), used as the GSPO-token form sg[s] * pi_theta/sg[pi_theta]:
  its value is s on every token of the sequence and its gradient s * grad log pi_theta,
  so with seq_mean_token_mean aggregation it equals GSPO's sequence gradient.

Both then take min(rho*A, clip(rho, 1-epsilon_low, 1+epsilon_high)*A) (clip-higher
when epsilon_high > epsilon_low) and, with `dual_clip_c` = c, max(that, c*A) where A < 0
(dual clip: a huge ratio on a negative advantage cannot dominate the batch).
Inputs are already zeroed on padding by the caller, so every value here is finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grpo_stream.core import metric_names as M

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: finite, and far outside any clip range

PolicyLoss = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def _clipped(log_ratio: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor, cfg):
    """log rho [B, T], adv [B, 1] or [B, T] -> (loss [B, T], rho [B, T], flags)."""
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # [B, T]
    low, high = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    unclipped = ratio * adv  # [B, T]
    clipped = ratio.clamp(low, high) * adv  # [B, T]
    objective = torch.minimum(unclipped, clipped)  # [B, T]
    neg = adv < 0  # [B, 1] or [B, T]
    flags = {
        M.CLIP_LOW_FRAC: (ratio < low) & neg & valid,  # clipped branch taken, no gradient
        M.CLIP_HIGH_FRAC: (ratio > high) & (adv > 0) & valid,
    }
    if cfg.dual_clip_c is not None:
        floor = cfg.dual_clip_c * adv  # [B, 1] or [B, T]
        flags[M.DUAL_CLIP_FRAC] = (objective < floor) & neg & valid
        objective = torch.where(neg, torch.maximum(objective, floor), objective)  # [B, T]
    return -objective, ratio, flags


def ppo_clip(logprobs, old, adv, valid, cfg):
    return _clipped(logprobs - old, adv, valid, cfg)  # log rho [B, T]


def gspo(logprobs, old, adv, valid, cfg):
    m = valid.to(logprobs.dtype)  # [B, T]
    seq_tokens = m.sum(dim=1).clamp(min=1.0)  # [B]
    log_s = ((logprobs - old) * m).sum(dim=1) / seq_tokens  # [B] log geometric mean
    # value log s on every token, gradient d log pi_theta(y_t)
    log_ratio = log_s.detach().unsqueeze(1) + logprobs - logprobs.detach()  # [B, T]
    return _clipped(log_ratio, adv, valid, cfg)


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": ppo_clip,
    "gspo": gspo,
}
