"""Per-epoch-index metrics of the learner step (`clip_frac/epochE`,
`approx_kl_proximal/epochE`) through the real StepRunner on the tiny Llama: epoch 1 runs
on the proximal weights (exactly 0 clipped tokens, KL 0: the seed notes' point about
TRL's single update), later epochs move; and the behaviour/proximal mismatch metric."""

from __future__ import annotations

import pytest
import torch
from learner_helpers import step_setup

from grpo_stream.algo import grpo_loss
from grpo_stream.config import Config
from grpo_stream.core import metric_names as M


def _run(tiny_model_dir, epochs: int, lr: float, fused: bool = True) -> dict:
    _, _, runner, samples, advs = step_setup(
        tiny_model_dir, lr=lr, epochs=epochs, micro_batch_size=4, fused_loss=fused
    )
    return runner.run(samples, advs)


@pytest.mark.parametrize("fused", [True, False])
def test_epoch_one_is_unclipped_and_later_epochs_move(tiny_model_dir, fused):
    m = _run(tiny_model_dir, epochs=3, lr=3e-2, fused=fused)
    assert {M.clip_frac_epoch(e) for e in (1, 2, 3)} <= set(m)
    assert M.clip_frac_epoch(4) not in m
    assert m[M.clip_frac_epoch(1)] == 0.0  # exactly: no token clipped before any update
    assert m[M.approx_kl_epoch(1)] == pytest.approx(0.0, abs=1e-7)
    # two micro-batches, one optimizer step per epoch: epochs 2 and 3 run on moved weights
    assert m[M.approx_kl_epoch(2)] > 1e-4
    assert m[M.clip_frac_epoch(2)] + m[M.clip_frac_epoch(3)] > 0.0
    # the step's overall clip fraction is the token-weighted mean over the epochs
    overall = m[M.CLIP_LOW_FRAC] + m[M.CLIP_HIGH_FRAC]
    per_epoch = sum(m[M.clip_frac_epoch(e)] for e in (1, 2, 3)) / 3
    assert overall == pytest.approx(per_epoch, rel=1e-6)


def test_one_epoch_is_exactly_on_policy(tiny_model_dir):
    """One epoch, one optimizer step: the loss sees the proximal weights. Unfused, the
    forward is the proximal pass's own, so the ratio is exactly 1; the fused output layer
    computes the same log-probs in another order (ratio 1 within 2e-6)."""
    m = _run(tiny_model_dir, epochs=1, lr=1e-3, fused=False)
    assert m[M.RATIO_MIN] == 1.0 and m[M.RATIO_MAX] == 1.0
    assert m[M.clip_frac_epoch(1)] == 0.0 and m[M.approx_kl_epoch(1)] == 0.0
    assert not any(k.startswith(M.CLIP_FRAC + M.EPOCH_SEP + "2") for k in m)
    m = _run(tiny_model_dir, epochs=1, lr=1e-3, fused=True)
    assert m[M.RATIO_MIN] == pytest.approx(1.0, abs=2e-6)
    assert m[M.RATIO_MAX] == pytest.approx(1.0, abs=2e-6)
    assert m[M.clip_frac_epoch(1)] == 0.0


def test_behaviour_logprob_abs_diff_is_the_masked_mean():
    cfg = Config().loss
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])  # [B, T]
    behaviour = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -0.2, float("nan")]])  # [B, T]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # [B, T]
    adv = torch.tensor([1.0, -1.0])  # [B]
    _, m = grpo_loss(cfg, lp, lp, behaviour, adv, mask, total_tokens=5, total_seqs=2)
    # |old - b| over the 5 tokens: 0.5, 1.0, 0, 0, 0.3 (padding NaN ignored)
    assert m[M.BEHAVIOUR_LOGPROB_ABS_DIFF] == pytest.approx(1.8 / 5)
