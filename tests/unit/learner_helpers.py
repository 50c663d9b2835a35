"""Shared set-up of the learner-step unit tests (`test_learner_step`, `test_epoch_metrics`).

    cfg, model, runner, samples, advs = step_setup(tiny_model_dir, epochs=2, lr=1e-2)

A real `StepRunner` on the tiny Llama (CPU, seeded), and one batch of 2 synthetic groups
of 4 (prompt 6, completion 5 tokens) with their advantages.
"""

from __future__ import annotations

import random

import torch

from bench.synth import make_groups
from grpo_stream.config import Config
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm
from grpo_stream.learner.step import StepRunner, batch_advantages


class OwnProximalPassRunner(StepRunner):
    """A `StepRunner` whose pi_old always comes from its own no-grad pass at the batch's
    starting weights (as with several optimizer steps per epoch), never from epoch 1's
    forward: the reference that reuse is compared against."""

    def _frozen_logprobs(self, mbs, own_pass: bool):
        return super()._frozen_logprobs(mbs, True)


def step_setup(tiny_model_dir, runner_cls=StepRunner, **learner):
    """(cfg, model, runner, samples, advs); `learner` overrides learner.* (defaults: lr 1e-3,
    1 epoch, micro_batch_size 8); `runner_cls` builds the runner."""
    cfg = Config()
    cfg.generator.temperature = 1.0
    for k, v in {"lr": 1e-3, "epochs": 1, "micro_batch_size": 8, **learner}.items():
        setattr(cfg.learner, k, v)
    torch.manual_seed(0)
    random.seed(0)
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"))
    opt, sched = build_optimizer(model, cfg.learner)
    runner = runner_cls(cfg, model, None, opt, sched, torch.device("cpu"), pad_id=0)
    groups = make_groups(2, group_size=4, prompt_len=6, completion_len=5)
    samples, advs, _ = batch_advantages(groups, cfg)
    return cfg, model, runner, samples, advs
