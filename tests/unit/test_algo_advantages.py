"""Group-relative advantages: hand-computed values for every baseline and the zero-variance rule."""

import math

import pytest
import torch
from torch.testing import assert_close

from grpo_stream.algo import compute_advantages
from grpo_stream.config import LossConfig

REWARDS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 1.0],  # mean 0.5, unbiased std sqrt(1/3)
        [0.5, 0.5, 0.5, 0.5],  # zero variance
        [0.0, 0.0, 0.0, 3.0],  # mean 0.75, unbiased std sqrt((3*0.5625 + 5.0625)/3) = 1.5
    ]
)
EPS = 1e-6


def test_group_std_scaling():
    adv, keep, metrics = compute_advantages(REWARDS, LossConfig())
    s0 = math.sqrt(1.0 / 3.0)
    a0 = 0.5 / (s0 + EPS)
    expected = torch.tensor(
        [
            [a0, -a0, -a0, a0],
            [0.0, 0.0, 0.0, 0.0],
            [-0.75 / (1.5 + EPS)] * 3 + [2.25 / (1.5 + EPS)],
        ]
    )
    assert_close(adv, expected)
    assert keep.tolist() == [True, True, True]
    assert metrics["zero_variance_groups"] == 1.0
    assert metrics["zero_variance_frac"] == pytest.approx(1 / 3)
    assert metrics["reward_mean"] == pytest.approx(7.0 / 12)


def test_dr_grpo_no_std_and_dynamic_sampling_drop():
    cfg = LossConfig(scale_std=False, drop_zero_variance=True)
    adv, keep, metrics = compute_advantages(REWARDS, cfg)
    expected = torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.75, -0.75, -0.75, 2.25]]
    )
    assert_close(adv, expected)
    assert keep.tolist() == [True, False, True]
    assert metrics["kept_groups"] == 2.0


def test_batch_std():
    adv, _, _ = compute_advantages(REWARDS, LossConfig(advantage="batch_std"))
    values = REWARDS.flatten().tolist()
    mean = sum(values) / 12
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 11)  # unbiased, over all 12
    centred = torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.75, -0.75, -0.75, 2.25]]
    )
    assert_close(adv, centred / (std + EPS))


def test_leave_one_out():
    cfg = LossConfig(advantage="leave_one_out", scale_std=False)
    adv, _, _ = compute_advantages(REWARDS, cfg)
    # r=1 in [1,0,0,1]: others (0+0+1)/3 -> 2/3; r=3 in [0,0,0,3]: others 0 -> 3; r=0: -1
    expected = torch.tensor(
        [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 3.0]]
    )
    assert_close(adv, expected)
    scaled, _, _ = compute_advantages(REWARDS, LossConfig(advantage="leave_one_out"))
    assert_close(scaled[2], expected[2] / (1.5 + EPS))


def test_all_groups_zero_variance_is_finite_zero():
    rewards = torch.full((2, 3), 0.1)  # 0.1 is inexact in binary: the mean may not be 0.1
    for mode in ("group", "batch_std", "leave_one_out"):
        adv, keep, _ = compute_advantages(
            rewards, LossConfig(advantage=mode, drop_zero_variance=True)
        )
        assert_close(adv, torch.zeros(2, 3), atol=0, rtol=0)
        assert keep.tolist() == [False, False]


def test_bad_rewards_name_the_field():
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages(torch.zeros(4), LossConfig())
    with pytest.raises(ValueError, match="G >= 2"):
        compute_advantages(torch.zeros(3, 1), LossConfig())
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([[1.0, float("nan")]]), LossConfig())
    with pytest.raises(ValueError, match="loss.advantage: unknown 'foo'"):
        compute_advantages(REWARDS, LossConfig.model_construct(advantage="foo"))


def test_batch_normalised_return_keeps_equal_groups():
    # REINFORCE++: one baseline and spread for the batch; the all-0.5 group keeps its signal
    adv, keep, _ = compute_advantages(REWARDS, LossConfig(advantage="batch"))
    values = REWARDS.flatten().tolist()
    mean = sum(values) / 12
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 11)
    assert_close(adv, (REWARDS - mean) / (std + EPS))
    assert adv[1].abs().min() > 0.05 and keep.all()  # (0.5 - 7/12) / std, not zeroed


def test_gae_passes_the_raw_reward_to_the_critic():
    adv, keep, m = compute_advantages(REWARDS, LossConfig(advantage="gae"))
    assert_close(adv, REWARDS, atol=0, rtol=0)  # no centring, no scaling, no zeroing
    assert keep.all() and m["zero_variance_groups"] == 1.0
    _, keep, _ = compute_advantages(REWARDS, LossConfig(advantage="gae", drop_zero_variance=True))
    assert keep.tolist() == [True, False, True]
