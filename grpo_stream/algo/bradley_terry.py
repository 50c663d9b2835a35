"""The Bradley–Terry loss of a reward model trained on preference pairs.

P(chosen ≻ rejected) = σ(r_c − r_r), so the loss is −log σ(r_c − r_r), averaged over
pairs; a pair counts as right when r_c > r_r (a tie is wrong: the model has not ranked
it). Used by `grpo-stream rm train` (`grpo_stream.rm.train`):

    loss, metrics = bradley_terry_loss(chosen_scores, rejected_scores)   # [P], [P]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean −log σ(chosen − rejected) over P pairs; metrics: accuracy and mean margin."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"expected two [P] tensors, got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")  # fmt: skip
    margin = chosen - rejected  # [P]
    loss = -F.logsigmoid(margin).mean()  # []
    metrics = {
        "loss": float(loss.detach()),
        "accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.detach().mean()),
    }
    return loss, metrics


def pairwise_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """The share of pairs the scores rank right (chosen strictly above rejected)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"pairwise_accuracy: {len(chosen)} and {len(rejected)} scores")
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
