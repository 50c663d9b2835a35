"""PPO with a critic: per-token rewards, GAE, whitening and the clipped value loss.

    rewards = token_rewards(scores, mask, kl=old_lp - ref_lp, kl_coef=c)  # [B, T]
    adv, ret = gae(rewards, values, mask, gamma, lam)                      # [B, T] x2
    adv = masked_whiten(adv, mask, *moments_mean_std(masked_moments(adv, mask)))
    loss, metrics = value_loss(new_values, values, ret, mask, clip, total_tokens=n)

Tensors are [B, T] over target columns; `mask` is 1 exactly on the policy's tokens. In
a padded layout that is one contiguous run per row; in a multi-turn episode the
environment's tokens inside the row are 0 too (a mask with holes). The sequence's score (the rule, the reward model, or their sum) is the reward of its last
completion token; classic PPO (`loss.kl_in_reward`) also charges every token
`-kl_coef * (log pi_old - log pi_ref)`. GAE runs backward over each row:

    delta_t = r_t + gamma * V_{t+1} - V_t       (V past the last token = 0: terminal)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                          (the value target)

where t+1 is the row's next *masked* column: the recursion steps over the holes (the
environment's turns are not actions, so they are neither discounted nor terminal), and
only the row's end ends the episode, as verl does on observation tokens. With
gamma = lam = 1, A_t = (reward-to-go from t) - V_t. Positions off the mask may
hold anything (NaN included): they are zeroed first, and their outputs are 0. Whitening
uses moments given by the caller, so the learner can take them over the whole batch
(every micro-batch and rank), not one micro-batch.
"""

from __future__ import annotations

import torch

from grpo_stream.core import metric_names as M


def _check(mask: torch.Tensor, **named: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask: expected [B, T], got shape {tuple(mask.shape)}")
    for name, t in named.items():
        if t.shape != mask.shape:
            raise ValueError(
                f"{name}: shape {tuple(t.shape)} does not match mask {tuple(mask.shape)}"
            )


def token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """scores [B] (one per sequence) -> rewards [B, T]: the score at each row's last
    masked column, minus `kl_coef * kl` on every masked column (kl: [B, T] or None)."""
    valid = mask.bool()  # [B, T]
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores: expected [{mask.shape[0]}], got shape {tuple(scores.shape)}")
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    last = torch.where(valid, cols, -1).amax(dim=1)  # [B] -1: a row with no token
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)  # [B, T]
    rows = (last >= 0).nonzero(as_tuple=True)[0]  # [B'] rows with a completion
    rewards[rows, last[rows]] = scores[rows].float()
    if kl is not None and kl_coef != 0.0:
        _check(mask, kl=kl)
        rewards = rewards - kl_coef * torch.where(valid, kl.float(), 0.0)  # [B, T]
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, T], returns [B, T]), 0 off the mask (module docstring)."""
    _check(mask, rewards=rewards, values=values)
    m = mask.float()  # [B, T]
    valid = m.bool()  # [B, T]
    r = torch.where(valid, rewards.float(), 0.0)  # [B, T]
    v = torch.where(valid, values.float(), 0.0)  # [B, T]
    B, T = m.shape
    adv = torch.zeros_like(v)  # [B, T]
    next_v = v.new_zeros(B)  # [B] V_{t+1}, 0 past the last token
    next_a = v.new_zeros(B)  # [B] A_{t+1}
    for t in range(T - 1, -1, -1):
        on = valid[:, t]  # [B]
        delta = r[:, t] + gamma * next_v - v[:, t]  # [B]
        a = (delta + gamma * lam * next_a) * m[:, t]  # [B] 0 off the mask
        adv[:, t] = a
        # off the mask the next value and advantage carry over: a hole inside an episode
        # passes the future through, and columns before the completion read nothing
        next_v = torch.where(on, v[:, t], next_v)  # [B]
        next_a = torch.where(on, a, next_a)  # [B]
    returns = (adv + v) * m  # [B, T]
    return adv, returns


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """{"n", "sum", "sumsq"} of x over the mask: sums that add over micro-batches/ranks."""
    _check(mask, x=x)
    valid = mask.bool()  # [B, T]
    xv = torch.where(valid, x.double(), 0.0)  # [B, T]
    stats = torch.stack([valid.double().sum(), xv.sum(), (xv * xv).sum()]).tolist()
    return dict(zip(("n", "sum", "sumsq"), stats, strict=True))


def moments_mean_std(moments: dict[str, float]) -> tuple[float, float]:
    """(mean, population std) from summed `masked_moments`; (0, 0) with no tokens."""
    n = moments["n"]
    if n <= 0:
        return 0.0, 0.0
    mean = moments["sum"] / n
    return mean, max(moments["sumsq"] / n - mean * mean, 0.0) ** 0.5


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, mean: float, std: float, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / (std + eps) on the mask, 0 off it: [B, T]."""
    _check(mask, x=x)
    return torch.where(mask.bool(), (x.float() - mean) / (std + eps), 0.0)  # [B, T]


def explained_variance(returns: dict[str, float], residuals: dict[str, float]) -> float:
    """1 - Var(R - V) / Var(R) from summed `masked_moments` of the returns R and the
    residuals R - V: 1 a perfect critic, 0 one no better than a constant, < 0 worse.
    NaN when the returns do not vary (nothing to explain)."""
    _, std_r = moments_mean_std(returns)
    _, std_res = moments_mean_std(residuals)
    if std_r == 0.0:
        return float("nan")
    return 1.0 - std_res**2 / std_r**2


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    *,
    total_tokens: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's value loss of one micro-batch: sum over masked tokens of
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2), divided by the
    batch's `total_tokens` (so micro-batches sum to the batch's mean); `clip` None: the
    unclipped square. Metrics: the mean loss per token here, the fraction of tokens
    where the clipped term is the larger (its gradient is then 0), and num_tokens."""
    _check(mask, old_values=old_values, returns=returns, values=values)
    valid = mask.bool()  # [B, T]
    v = torch.where(valid, values.float(), 0.0)  # [B, T] padding -> 0, zero grad there
    old = torch.where(valid, old_values.detach().float(), 0.0)  # [B, T]
    ret = torch.where(valid, returns.detach().float(), 0.0)  # [B, T]
    plain = (v - ret) ** 2  # [B, T]
    if clip is None:
        per_token, clipped = plain, torch.zeros_like(valid)  # [B, T] x2
    else:
        v_clip = old + (v - old).clamp(-clip, clip)  # [B, T]
        other = (v_clip - ret) ** 2  # [B, T]
        # the clamp acted and its term is the larger (inside the clip the two are equal up
        # to rounding, which must not count)
        clipped = ((v - old).abs() > clip) & (other > plain)  # [B, T]
        per_token = torch.maximum(plain, other)  # [B, T]
    per_token = 0.5 * torch.where(valid, per_token, 0.0)  # [B, T]
    loss = per_token.sum() / max(float(total_tokens), 1.0)  # []
    with torch.no_grad():
        n = valid.float().sum()  # []
        stats = torch.stack(
            [
                per_token.sum() / n.clamp(min=1.0),
                (clipped & valid).float().sum() / n.clamp(min=1.0),
                n,
            ]
        ).tolist()
    return loss, {M.VALUE_LOSS: stats[0], M.VALUE_CLIP_FRAC: stats[1], M.NUM_TOKENS: stats[2]}
