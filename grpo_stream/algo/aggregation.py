"""Reduce a per-token loss [B, T] to the scalar a micro-batch contributes.

Every mode divides by *batch-global* normalisers (the whole optimizer batch, passed in
by the caller), so summing the micro-batch losses gives exactly the full-batch loss and
gradient however the batch is split:

* ``token_mean`` (DAPO): sum of all masked tokens / total_tokens.
* ``seq_mean_token_mean`` (DeepSeekMath): each sequence's token mean, summed,
  / total_seqs. A sequence is never split across micro-batches, so its own token count
  is local.
* ``constant`` (Dr. GRPO): sum of all masked tokens / (total_seqs * constant_normalizer),
  every token weighted the same whatever the lengths.

    loss = AGGREGATIONS[cfg.aggregation](per_token, mask, total_tokens, total_seqs, cfg)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Aggregation = Callable[[torch.Tensor, torch.Tensor, float, float, object], torch.Tensor]


def _token_mean(per_token, mask, total_tokens, total_seqs, cfg):
    return (per_token * mask).sum() / total_tokens  # []


def _seq_mean_token_mean(per_token, mask, total_tokens, total_seqs, cfg):
    seq_tokens = mask.sum(dim=1).clamp(min=1.0)  # [B] an empty sequence contributes 0
    return ((per_token * mask).sum(dim=1) / seq_tokens).sum() / total_seqs  # []


def _constant(per_token, mask, total_tokens, total_seqs, cfg):
    if cfg.constant_normalizer is None:
        raise ValueError(
            "loss.constant_normalizer: must be set for loss.aggregation='constant' "
            "(e.g. generator.max_tokens)"
        )
    return (per_token * mask).sum() / (total_seqs * cfg.constant_normalizer)  # []


AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "constant": _constant,
}
