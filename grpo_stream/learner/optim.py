"""AdamW with a warmup then constant/linear/cosine schedule, in optimizer steps.

One learner step makes `epochs × minibatches_per_epoch` optimizer steps; `max_steps`
learner steps therefore give the schedule its horizon.

AdamW is torch's fused kernel where every parameter lives on a device it supports (CPU,
CUDA; plain or FSDP2-sharded): one pass over each tensor instead of ~6 elementwise
kernels, the cost of the optimizer step that every epoch of a learner step pays
(`bench.choices` measures fused against the default: bench/RESULTS.md).
"""

from __future__ import annotations

import math

import torch

from grpo_stream.config import LearnerConfig


def lr_lambda(cfg: LearnerConfig):
    total = max(cfg.max_steps * cfg.epochs * cfg.minibatches_per_epoch, 1)
    warm = cfg.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return f


FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model, cfg: LearnerConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return opt, sched
