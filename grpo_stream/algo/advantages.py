"""Group-relative advantages from the rewards of whole groups (G completions per prompt).

    advantages, keep, metrics = compute_advantages(rewards, cfg.loss)  # rewards [N, G]

`cfg.advantage` picks the baseline and spread from `ADVANTAGES`:

* ``group``: (r - mean_group) / (std_group + eps), DeepSeekMath GRPO.
* ``batch_std``: (r - mean_group) / (std_batch + eps), the group mean as baseline but
  one spread for the whole batch (as in "Lite PPO"), so small-spread groups are not
  blown up.
* ``leave_one_out``: r - mean of the *other* G-1 rewards (RLOO), divided by
  (std_group + eps) when scaling.
* ``batch``: (r - mean_batch) / (std_batch + eps), REINFORCE++'s batch-normalised
  return: no group baseline, so a group whose rewards are all equal still carries
  signal (its advantages are not zeroed).
* ``gae``: the reward itself, passed on per sequence: the learner's critic turns it
  into per-token GAE advantages (`algo.gae`, `learner.critic`); no scaling, no zeroing.

Standard deviations are unbiased (Bessel, as `torch.std`, TRL and verl use).
`scale_std=False` skips the division (Dr. GRPO). A group whose rewards are all equal
has zero variance and carries no learning signal: its advantages are exactly 0 (never a
0/0), it is counted in the metrics, and with `drop_zero_variance` (DAPO dynamic sampling)
its `keep` flag is False so the caller can leave it out of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grpo_stream.algo.registry import choose
from grpo_stream.core import metric_names as M

# (rewards [N, G]) -> (centred rewards [N, G], spread broadcastable to [N, G])
Baseline = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _group(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centred = r - r.mean(dim=1, keepdim=True)  # [N, G]
    return centred, r.std(dim=1, keepdim=True)  # [N, 1]


def _batch_std(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centred = r - r.mean(dim=1, keepdim=True)  # [N, G]
    return centred, r.std()  # [] one spread over all N*G rewards


def _leave_one_out(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = r.shape[1]
    others = (r.sum(dim=1, keepdim=True) - r) / (g - 1)  # [N, G] mean of the other G-1
    return r - others, r.std(dim=1, keepdim=True)  # [N, G], [N, 1]


def _batch(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return r - r.mean(), r.std()  # [N, G], [] over all N*G rewards


def _terminal(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return r, r.new_ones(())  # [N, G], []: the reward, for the critic (see RAW_REWARD)


ADVANTAGES: dict[str, Baseline] = {
    "group": _group,
    "batch_std": _batch_std,
    "leave_one_out": _leave_one_out,
    "batch": _batch,
    "gae": _terminal,
}
# no group baseline: an all-equal group keeps its advantages (they are not 0/0 noise)
NO_GROUP_BASELINE = frozenset({"batch", "gae"})
# the per-sequence output is the raw reward (no division by the spread)
RAW_REWARD = frozenset({"gae"})


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected [N_groups, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards: a group needs G >= 2 completions, got G={rewards.shape[1]}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards: contains NaN or infinite values")


def compute_advantages(
    rewards: torch.Tensor, cfg
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """rewards [N, G] -> (advantages [N, G] float32, keep_mask [N] bool, metrics)."""
    _check_rewards(rewards)
    baseline = choose(ADVANTAGES, "loss.advantage", cfg.advantage)
    r = rewards.float()  # [N, G]
    centred, spread = baseline(r)  # [N, G], [N, 1] or []
    scale = cfg.scale_std and cfg.advantage not in RAW_REWARD
    adv = centred / (spread + cfg.advantage_eps) if scale else centred  # [N, G]
    zero_var = r.amax(dim=1) == r.amin(dim=1)  # [N]
    if cfg.advantage not in NO_GROUP_BASELINE:
        adv = adv.masked_fill(zero_var.unsqueeze(1), 0.0)  # [N, G] exact zeros, no 0/0 noise
    keep = ~zero_var if cfg.drop_zero_variance else torch.ones_like(zero_var)  # [N]
    n = r.shape[0]
    stats = torch.stack(
        [
            r.mean(),
            r.std() if r.numel() > 1 else r.new_zeros(()),
            zero_var.float().sum(),
            keep.float().sum(),
            adv.abs().mean(),
        ]
    ).tolist()
    metrics = {
        M.REWARD_MEAN: stats[0],
        M.REWARD_STD: stats[1],
        M.ZERO_VARIANCE_GROUPS: stats[2],
        M.ZERO_VARIANCE_FRAC: stats[2] / n,
        M.KEPT_GROUPS: stats[3],
        M.ADVANTAGE_ABS_MEAN: stats[4],
    }
    return adv, keep, metrics
