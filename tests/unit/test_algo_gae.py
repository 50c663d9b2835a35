"""GAE, per-token rewards, whitening, explained variance and the clipped value loss, by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from grpo_stream.algo.gae import (
    explained_variance,
    gae,
    masked_moments,
    masked_whiten,
    moments_mean_std,
    token_rewards,
    value_loss,
)

NAN = float("nan")
# two rows of a padded layout: row 0's completion in columns 1..3, row 1's in 0..2
MASK = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)


def _place(row0: list[float], row1: list[float]) -> torch.Tensor:
    """[2, 5] with NaN off the mask: padding must not leak into any output."""
    return torch.tensor([[NAN, *row0, NAN], [*row1, NAN, NAN]])


def test_token_rewards_put_the_score_last_and_charge_the_kl():
    kl = _place([1.0, 2.0, 0.0], [0.5, 0.0, 1.0])
    r = token_rewards(torch.tensor([1.0, 0.0]), MASK, kl=kl, kl_coef=0.1)
    expected = torch.tensor([[0, -0.1, -0.2, 1.0, 0], [-0.05, 0.0, -0.1, 0, 0]])
    assert_close(r, expected)
    assert_close(token_rewards(torch.tensor([1.0, 2.0]), MASK)[1], torch.tensor([0, 0, 2.0, 0, 0]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_values():
    # rewards [-0.1, -0.2, 1.0]: reward-to-go [0.7, 0.8, 1.0]; values [0.2, 0.5, 0.7]
    rewards = _place([-0.1, -0.2, 1.0], [0.0, 0.0, 2.0])
    values = _place([0.2, 0.5, 0.7], [1.0, 1.5, 1.0])
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    assert_close(adv[0], torch.tensor([0.0, 0.5, 0.3, 0.3, 0.0]))
    assert_close(ret[0], torch.tensor([0.0, 0.7, 0.8, 1.0, 0.0]))
    assert_close(adv[1], torch.tensor([1.0, 0.5, 1.0, 0.0, 0.0]))  # 2 - [1, 1.5, 1]
    assert_close(ret[1], torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0]))


def test_gae_with_gamma_lambda_below_one_written_out():
    # gamma 0.9, lambda 0.8, rewards [0, 0, 1], values [0.5, 0.6, 0.7]:
    # delta2 = 1 - 0.7 = 0.3                 A2 = 0.3
    # delta1 = 0.9*0.7 - 0.6 = 0.03          A1 = 0.03 + 0.72*0.3 = 0.246
    # delta0 = 0.9*0.6 - 0.5 = 0.04          A0 = 0.04 + 0.72*0.246 = 0.21712
    rewards = _place([0.0, 0.0, 1.0], [0.0, 0.0, 0.0])
    values = _place([0.5, 0.6, 0.7], [0.0, 0.0, 0.0])
    adv, ret = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    assert_close(adv[0], torch.tensor([0.0, 0.21712, 0.246, 0.3, 0.0]))
    assert_close(ret[0], torch.tensor([0.0, 0.71712, 0.846, 1.0, 0.0]))
    assert_close(adv[1], torch.zeros(5))
    # lambda = 0: one-step TD errors only
    adv0, _ = gae(rewards, values, MASK, gamma=0.9, lam=0.0)
    assert_close(adv0[0], torch.tensor([0.0, 0.04, 0.03, 0.3, 0.0]))


def test_whitening_and_explained_variance():
    x = _place([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    mom = masked_moments(x, MASK)
    assert mom["n"] == 6.0 and mom["sum"] == pytest.approx(12.0)
    mean, std = moments_mean_std(mom)
    assert mean == pytest.approx(2.0) and std == pytest.approx(math.sqrt(2.0 / 6.0))
    w = masked_whiten(x, MASK, mean, std)
    assert_close(w[0], torch.tensor([0.0, -1 / std, 0.0, 1 / std, 0.0]), rtol=1e-5, atol=1e-5)
    assert not torch.isnan(w).any()
    # returns [1, 2, 3] (var 2/3), residuals [0.5, -0.5, 0] (var 1/6): EV = 1 - 1/4
    m = MASK[:1, 1:4]
    ret = masked_moments(torch.tensor([[1.0, 2.0, 3.0]]), m)
    res = masked_moments(torch.tensor([[0.5, -0.5, 0.0]]), m)
    assert explained_variance(ret, res) == pytest.approx(0.75)
    assert math.isnan(explained_variance(res | {"sumsq": 0.0, "sum": 0.0}, res))


def test_clipped_value_loss_by_hand():
    # token 0: (1-2)^2 = 1 < (0.5+0.2-2)^2 = 1.69, clipped: no gradient;
    # token 1: inside the clip, (-0.05)^2; token 2: (2-1)^2 = 1, V = V_old
    values = _place([1.0, -0.05, 2.0], [0.0, 0.0, 0.0]).requires_grad_(True)
    old = _place([0.5, 0.1, 2.0], [0.0, 0.0, 0.0])
    ret = _place([2.0, 0.0, 1.0], [0.0, 0.0, 0.0])
    mask = MASK.clone()
    mask[1] = 0.0  # row 1 is padding here
    loss, m = value_loss(values, old, ret, mask, clip=0.2, total_tokens=3)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0025 + 1.0) / 3)
    assert m["value_loss"] == pytest.approx(0.5 * 2.6925 / 3)
    assert m["value_clip_frac"] == pytest.approx(1 / 3)
    assert m["num_tokens"] == 3.0
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, -0.05 / 3, 1 / 3, 0.0], [0.0] * 5])
    assert_close(values.grad, expected)
    plain, m2 = value_loss(values, old, ret, mask, clip=None, total_tokens=6)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.0025 + 1.0) / 6)
    assert m2["value_clip_frac"] == 0.0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="values: shape"):
        gae(torch.zeros(2, 5), torch.zeros(2, 4), MASK, 1.0, 1.0)
    with pytest.raises(ValueError, match="scores: expected"):
        token_rewards(torch.zeros(3), MASK)


def _gae_by_hand(r: list[float], v: list[float], m: list[int], gamma: float, lam: float):
    """The textbook recursion over the policy's columns alone: the holes are skipped."""
    cols = [t for t, on in enumerate(m) if on]
    adv, ret = [0.0] * len(m), [0.0] * len(m)
    next_v = next_a = 0.0
    for t in reversed(cols):
        next_a = r[t] + gamma * next_v - v[t] + gamma * lam * next_a
        next_v = v[t]
        adv[t], ret[t] = next_a, next_a + v[t]
    return adv, ret


def test_gae_carries_the_outcome_across_an_environment_turn():
    # an episode: two model tokens, one environment token (mask 0), two model tokens;
    # reward 1 at the end, V = 0, gamma = lambda = 1: every model token's return is 1
    mask = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.float32)
    rewards = torch.tensor([[0.0, 0.0, NAN, 0.0, 1.0]])
    adv, ret = gae(rewards, torch.zeros(1, 5), mask, gamma=1.0, lam=1.0)
    assert_close(ret, torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]]))
    assert_close(adv, torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]]))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("lam", [1.0, 0.95, 0.0])
def test_gae_on_masks_with_gaps_matches_the_hand_recursion(gamma: float, lam: float):
    # padding before and after, and two holes of different widths inside the episode
    m = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    r = [NAN, -0.1, 0.0, NAN, NAN, 0.2, NAN, -0.05, 1.0, NAN]
    v = [NAN, 0.3, 0.1, 7.0, -3.0, 0.6, 9.0, 0.2, 0.4, NAN]
    mask = torch.tensor([m], dtype=torch.float32)
    adv, ret = gae(torch.tensor([r]), torch.tensor([v]), mask, gamma=gamma, lam=lam)
    clean = [x if on else 0.0 for x, on in zip(r, m, strict=True)]
    want_adv, want_ret = _gae_by_hand(
        clean, [x if on else 0.0 for x, on in zip(v, m, strict=True)], m, gamma, lam
    )
    assert_close(adv[0], torch.tensor(want_adv))
    assert_close(ret[0], torch.tensor(want_ret))
    # the same episode without its holes gives the same numbers on the model's columns
    keep = [t for t, on in enumerate(m) if on]
    a2, r2 = gae(torch.tensor([[r[t] for t in keep]]), torch.tensor([[v[t] for t in keep]]),
                 torch.ones(1, len(keep)), gamma=gamma, lam=lam)  # fmt: skip
    assert_close(adv[0, keep], a2[0])
    assert_close(ret[0, keep], r2[0])
