"""fused_loss_from_hidden: same loss and gradients as log-probs -> grpo_loss -> backward."""

import math

import pytest
import torch
from torch.testing import assert_close

from grpo_stream.algo import fused_loss_from_hidden, grpo_loss, token_logprobs_from_hidden
from grpo_stream.config import LossConfig


def _case(seed=0, b=4, t=6, h=16, v=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)  # [B, T, H]
    weight = (0.5 * torch.randn(v, h, generator=g)).requires_grad_()  # [V, H]
    ids = torch.randint(0, v, (b, t), generator=g)  # [B, T]
    with torch.no_grad():
        lp0, _ = token_logprobs_from_hidden(hidden, weight, ids)  # [B, T]
    old = lp0 + 0.3 * torch.randn(b, t, generator=g)  # proximal: ratios well off 1
    behaviour = old + 0.2 * torch.randn(b, t, generator=g)  # [B, T]
    ref = lp0 + 0.1 * torch.randn(b, t, generator=g)  # [B, T]
    adv = torch.randn(b, generator=g)  # [B]
    mask = torch.ones(b, t)
    mask[1, 4:] = 0  # padding
    mask[2, :2] = 0  # prompt positions
    return hidden, weight, ids, old, behaviour, ref, adv, mask


CONFIGS = [
    LossConfig(),
    LossConfig(policy_loss="gspo", aggregation="seq_mean_token_mean"),
    LossConfig(beta=0.05, kl_estimator="k3", behaviour_correction="mask", epsilon_high=0.28),
    LossConfig(aggregation="constant", constant_normalizer=8, dual_clip_c=3.0, beta=0.1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["ppo", "gspo", "kl_mask", "constant_dual"])
@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (12, 0.7), (1000, 1.3)])
def test_fused_matches_unfused_loss_and_grads(cfg, chunk_size, temperature):
    hidden, weight, ids, old, beh, ref, adv, mask = _case()
    totals = {"total_tokens": float(mask.sum()), "total_seqs": 4.0}
    ref = ref if cfg.beta > 0 else None

    lp, _ = token_logprobs_from_hidden(hidden, weight, ids, 5, temperature=temperature)
    want, _ = grpo_loss(cfg, lp, old, beh, adv, mask, ref_logprobs=ref, **totals)
    want_grads = torch.autograd.grad(want, (hidden, weight))

    calls = []

    def loss_fn(rows, lp_rows, ent_rows):
        calls.append((rows.start, rows.stop))
        r = None if ref is None else ref[rows]
        args = (old[rows], beh[rows], adv[rows], mask[rows])
        return grpo_loss(cfg, lp_rows, *args, ref_logprobs=r, metrics=False, **totals)[0]

    loss, lp_f, ent = fused_loss_from_hidden(
        hidden, weight, ids, loss_fn, chunk_size, temperature=temperature, with_entropy=True
    )
    got_grads = torch.autograd.grad(loss, (hidden, weight))
    assert_close(loss, want)
    assert_close(lp_f, lp.detach())
    assert_close(got_grads[0], want_grads[0])
    assert_close(got_grads[1], want_grads[1])
    assert not lp_f.requires_grad and not ent.requires_grad
    rows = max(1, chunk_size // 6)  # whole sequences per chunk: T = 6
    assert calls == [(s, min(s + rows, 4)) for s in range(0, 4, rows)]


def test_hand_computed_gradient_one_token():
    # V = 2, H = 1, h = 1, W = [[0], [ln 3]]: p = [1/4, 3/4]; token 1 sampled, loss = -2 lp
    hidden = torch.ones(1, 1, 1, requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    ids = torch.tensor([[1]])
    loss, lp, ent = fused_loss_from_hidden(
        hidden, weight, ids, lambda rows, x, e: -2.0 * x.sum(), with_entropy=True
    )
    assert_close(lp, torch.tensor([[math.log(0.75)]]))
    assert_close(ent, torch.tensor([[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]))
    (3.0 * loss).backward()  # upstream gradient scales the stored ones
    # d lp / d z = onehot - p = [-1/4, 1/4]; d loss / d z = -2 * that * 3 = [1.5, -1.5]
    assert_close(weight.grad, torch.tensor([[1.5], [-1.5]]))
    # d loss / d h = dz . W = -1.5 ln 3
    assert_close(hidden.grad, torch.tensor([[[-1.5 * math.log(3.0)]]]))


def test_frozen_head_and_loss_without_gradient():
    hidden, weight, ids, *_ = _case()
    weight.requires_grad_(False)
    loss, _, _ = fused_loss_from_hidden(hidden, weight, ids, lambda r, x, e: (0 * x).sum() + 1.0)
    (gh,) = torch.autograd.grad(loss, hidden)
    assert_close(gh, torch.zeros_like(hidden))
    # a loss that does not touch the log-probs at all still works (zero gradient)
    const = lambda r, x, e: torch.tensor(2.0)  # noqa: E731
    assert float(fused_loss_from_hidden(hidden, weight, ids, const)[0].detach()) == 2.0  # one chunk
    assert (
        float(fused_loss_from_hidden(hidden, weight, ids, const, chunk_size=6)[0].detach()) == 8.0
    )


def test_bf16_autocast_close_to_fp32():
    hidden, weight, ids, old, beh, _, adv, mask = _case(v=257)
    cfg = LossConfig()
    totals = {"total_tokens": float(mask.sum()), "total_seqs": 4.0}

    def loss_fn(rows, lp, ent):
        args = (old[rows], beh[rows], adv[rows], mask[rows])
        return grpo_loss(cfg, lp, *args, metrics=False, **totals)[0]

    want = fused_loss_from_hidden(hidden, weight, ids, loss_fn, 12)[0]
    gw_want = torch.autograd.grad(want, weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_loss_from_hidden(hidden, weight, ids, loss_fn, 12)[0]
    gw = torch.autograd.grad(got, weight)[0]
    assert gw.dtype == torch.float32
    assert_close(got, want, atol=2e-2, rtol=5e-2)
    assert float((gw - gw_want).norm() / gw_want.norm()) < 0.05


def test_errors_name_the_argument():
    hidden, weight, ids, *_ = _case()
    with pytest.raises(ValueError, match="loss_fn: must return a scalar"):
        fused_loss_from_hidden(hidden, weight, ids, lambda r, x, e: x)
    with pytest.raises(ValueError, match="ids: shape"):
        fused_loss_from_hidden(hidden, weight, ids[:, :2], lambda r, x, e: x.sum())
    with pytest.raises(ValueError, match="chunk_size"):
        fused_loss_from_hidden(hidden, weight, ids, lambda r, x, e: x.sum(), chunk_size=0)
