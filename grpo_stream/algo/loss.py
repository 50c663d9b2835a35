"""The GRPO loss of one micro-batch: policy term x behaviour weight + beta * KL, aggregated.

    loss, metrics = grpo_loss(cfg.loss, logprobs, old_logprobs, behaviour_logprobs,
                              advantages, mask, total_tokens=n_tok, total_seqs=n_seq,
                              ref_logprobs=None, entropy=None)

Per token (t over completion tokens, mask = 1):

    loss_t = w_t * policy_loss_t + beta * kl_t
    policy_loss_t = -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A)   (policy.py)
    w_t = behaviour correction of pi_old/pi_b, detached               (corrections.py)
    kl_t = estimate of KL(pi_theta || pi_ref), k3 by default             (kl.py)

then reduced with batch-global normalisers (aggregation.py), so the micro-batch losses
of one optimizer batch sum to the full-batch loss. Variants come from the registry
tables keyed by the `LossConfig` strings. `metrics` holds plain floats averaged over
this micro-batch's masked tokens and "num_tokens" (and "num_seqs") for weighting them
across micro-batches. Padding positions may hold anything (even NaN): they are replaced
by zeros before any arithmetic, so they get an exact zero gradient.
"""

from __future__ import annotations

import torch

from grpo_stream.algo.aggregation import AGGREGATIONS
from grpo_stream.algo.corrections import BEHAVIOUR_CORRECTIONS
from grpo_stream.algo.kl import KL_ESTIMATORS, kl_k3
from grpo_stream.algo.policy import POLICY_LOSSES
from grpo_stream.algo.registry import choose
from grpo_stream.core import metric_names as M


def _check_shapes(logprobs, advantages, named: dict[str, torch.Tensor | None]) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(
                f"{name}: shape {tuple(t.shape)} does not match logprobs {tuple(logprobs.shape)}"
            )
    b = logprobs.shape[0]
    if advantages.shape not in ((b,), logprobs.shape):
        raise ValueError(
            f"advantages: expected [{b}] (one per sequence) or {tuple(logprobs.shape)}, "
            f"got {tuple(advantages.shape)}"
        )


def _masked_stats(values: dict[str, torch.Tensor], m: torch.Tensor, n: torch.Tensor):
    """Mean over masked tokens of each [B, T] tensor (bool flags become fractions)."""
    return {k: (v.to(m.dtype) * m).sum() / n for k, v in values.items()}  # {name: []}


def _ratio_extremes(ratio: torch.Tensor, valid: torch.Tensor, any_tok: torch.Tensor):
    if ratio.numel() == 0:  # a micro-batch of 1-token sequences has no target columns
        one = ratio.new_ones(())
        return one, one
    inf = torch.full_like(ratio, float("inf"))  # [B, T]
    lo = torch.where(valid, ratio, inf).min()  # []
    hi = torch.where(valid, ratio, -inf).max()  # []
    one = ratio.new_ones(())
    return torch.where(any_tok, lo, one), torch.where(any_tok, hi, one)


def _kl_term(cfg, logprobs, ref_logprobs, valid):
    """beta * KL per token [B, T], the KL itself for logging, or (None, None)."""
    if ref_logprobs is None:
        if cfg.beta > 0:
            raise ValueError("ref_logprobs: required when loss.beta > 0")
        return None, None
    estimator = choose(KL_ESTIMATORS, "loss.kl_estimator", cfg.kl_estimator)
    ref = torch.where(valid, ref_logprobs.detach(), 0.0)  # [B, T]
    kl = estimator(logprobs, ref)  # [B, T]
    return (cfg.beta * kl if cfg.beta > 0 else None), kl


def grpo_loss(
    cfg,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    total_tokens: float,
    total_seqs: float,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    metrics: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss of this micro-batch (sum over micro-batches = batch loss) and metrics.

    `metrics=False` skips the metrics (and their device sync) and returns an empty dict:
    the fused path calls this once per chunk of rows, then once for the metrics.
    """
    named = {"old_logprobs": old_logprobs, "behaviour_logprobs": behaviour_logprobs}
    named |= {"mask": mask, "ref_logprobs": ref_logprobs, "entropy": entropy}
    _check_shapes(logprobs, advantages, named)
    if not float(total_seqs) > 0:
        raise ValueError(f"total_seqs: must be > 0, got {total_seqs}")
    if not float(total_tokens) >= 0:
        raise ValueError(f"total_tokens: must be >= 0, got {total_tokens}")
    policy_fn = choose(POLICY_LOSSES, "loss.policy_loss", cfg.policy_loss)
    correct = choose(BEHAVIOUR_CORRECTIONS, "loss.behaviour_correction", cfg.behaviour_correction)
    aggregate = choose(AGGREGATIONS, "loss.aggregation", cfg.aggregation)

    valid = mask.bool()  # [B, T]
    m = valid.float()  # [B, T]
    lp = torch.where(valid, logprobs.float(), 0.0)  # [B, T] padding -> 0, zero grad there
    old = torch.where(valid, old_logprobs.detach().float(), 0.0)  # [B, T]
    behaviour = torch.where(valid, behaviour_logprobs.detach().float(), 0.0)  # [B, T]
    adv = advantages.detach().float()  # [B] or [B, T]
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]

    pg, ratio, flags = policy_fn(lp, old, adv, valid, cfg)  # [B, T] x2, {name: [B, T]}
    weight, weight_flags = correct(old, behaviour, valid, cfg)  # [B, T], {name: [B, T]}
    weighted = pg * weight  # [B, T]
    per_token = weighted  # [B, T]
    kl_loss, kl = _kl_term(cfg, lp, ref_logprobs, valid)  # [B, T] or None
    if kl_loss is not None:
        per_token = per_token + kl_loss  # [B, T]
    loss = aggregate(per_token, m, max(float(total_tokens), 1.0), float(total_seqs), cfg)
    if not metrics:
        return loss, {}

    logged = {M.PG_LOSS: weighted, M.RATIO_MEAN: ratio, M.BEHAVIOUR_WEIGHT_MEAN: weight}
    logged[M.APPROX_KL_PROXIMAL] = kl_k3(old, lp.detach())  # KL(pi_old || pi_theta)
    logged[M.APPROX_KL_BEHAVIOUR] = kl_k3(behaviour, old)  # KL(pi_b || pi_old)
    logged[M.BEHAVIOUR_LOGPROB_ABS_DIFF] = (old - behaviour).abs()  # [B, T] 0 at padding
    if kl is not None:
        logged[M.KL_REF] = kl
    if entropy is not None:
        logged[M.ENTROPY] = torch.where(valid, entropy.detach().float(), 0.0)  # [B, T]
    return loss, _metrics(loss, logged | flags | weight_flags, ratio, valid, m)


def _metrics(loss, logged: dict[str, torch.Tensor], ratio, valid, m) -> dict[str, float]:
    """Plain floats over the masked tokens; one device sync for all of them."""
    with torch.no_grad():
        n_tok = m.sum()  # []
        stats = _masked_stats(logged, m, n_tok.clamp(min=1.0))
        stats[M.RATIO_MIN], stats[M.RATIO_MAX] = _ratio_extremes(ratio, valid, n_tok > 0)
        stats[M.LOSS] = loss.detach()
        stats[M.NUM_TOKENS] = n_tok
        stats[M.NUM_SEQS] = m.new_tensor(float(m.shape[0]))
        names = list(stats)
        values = torch.stack([stats[k].float() for k in names]).tolist()
    return dict(zip(names, values, strict=True))
