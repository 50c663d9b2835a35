"""Behaviour-policy corrections: per-token weights for pi_old (proximal) != pi_b (vLLM).

The tokens were sampled by vLLM (behaviour pi_b), possibly a few versions behind, and
with a different numerical path than the learner. PPO clips against the proximal policy
pi_old; the remaining mismatch pi_old/pi_b is corrected with a detached weight that
multiplies the per-token policy objective (AReaL's decoupled PPO, truncated IS):

* ``tis``: w = min(pi_old/pi_b, tis_cap)
* ``mask``: w = 1 if mask_low <= pi_old/pi_b <= mask_high else 0 (token dropped)
* ``none``: w = 1

Each returns (weights [B, T], {metric name: bool [B, T] of affected tokens}); a masked
token keeps its place in the normaliser, so the gradient stays independent of how the
batch is split.

    w, flags = BEHAVIOUR_CORRECTIONS[cfg.behaviour_correction](old, behaviour, valid, cfg)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grpo_stream.core import metric_names as M

Correction = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _log_is_ratio(old: torch.Tensor, behaviour: torch.Tensor, valid: torch.Tensor):
    # padding may hold anything: zero it before exp so it cannot overflow into a NaN
    return torch.where(valid, old - behaviour, 0.0).detach()  # [B, T] log(pi_old/pi_b)


def _tis(old, behaviour, valid, cfg):
    ratio = torch.exp(_log_is_ratio(old, behaviour, valid))  # [B, T]
    truncated = (ratio > cfg.tis_cap) & valid  # [B, T]
    return ratio.clamp(max=cfg.tis_cap), {M.TIS_TRUNCATED_FRAC: truncated}


def _mask(old, behaviour, valid, cfg):
    ratio = torch.exp(_log_is_ratio(old, behaviour, valid))  # [B, T]
    inside = (ratio >= cfg.mask_low) & (ratio <= cfg.mask_high)  # [B, T]
    return inside.to(old.dtype), {M.BEHAVIOUR_MASKED_FRAC: ~inside & valid}


def _none(old, behaviour, valid, cfg):
    return torch.ones_like(old), {}


BEHAVIOUR_CORRECTIONS: dict[str, Correction] = {
    "tis": _tis,
    "mask": _mask,
    "none": _none,
}
