"""grpo_loss: hand-computed values, gradients, micro-batch invariance, registry errors."""

import math
import typing

import pytest
import torch
from torch.testing import assert_close

from grpo_stream.algo import (
    ADVANTAGES,
    AGGREGATIONS,
    BEHAVIOUR_CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    grpo_loss,
)
from grpo_stream.config import LossConfig

LOG_HALF = math.log(0.5)
NAN = float("nan")


def _case():
    """Two sequences; seq 0: A=+1, 3 tokens; seq 1: A=-1, 2 tokens + 1 padding (NaN)."""
    old = torch.full((2, 3), LOG_HALF)  # [B, T]
    ratios = torch.tensor([[1.0, 1.5, 0.9], [0.7, 1.1, 1.0]])  # pi_theta / pi_old
    logprobs = (old + ratios.log()).clone()
    logprobs[1, 2] = NAN  # padding may hold garbage
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    return logprobs.requires_grad_(), old, adv, mask


def _loss(cfg, logprobs, old, adv, mask, behaviour=None, n_tok=5.0, n_seq=2.0, **kw):
    behaviour = old if behaviour is None else behaviour
    return grpo_loss(
        cfg, logprobs, old, behaviour, adv, mask, total_tokens=n_tok, total_seqs=n_seq, **kw
    )


def test_ppo_clip_hand_values_token_mean():
    logprobs, old, adv, mask = _case()
    loss, m = _loss(LossConfig(), logprobs, old, adv, mask)
    # objective min(rA, clip(r, .8, 1.2)A): seq0 [1.0, 1.2 (clipped), 0.9]; seq1 [-0.8 (clipped), -1.1]
    assert_close(loss, torch.tensor((-1.0 - 1.2 - 0.9 + 0.8 + 1.1) / 5))
    loss.backward()
    # clipped tokens and padding: 0; else -A * r / 5
    expected = torch.tensor([[-1.0 / 5, 0.0, -0.9 / 5], [0.0, 1.1 / 5, 0.0]])
    assert_close(logprobs.grad, expected)
    assert m["num_tokens"] == 5.0 and m["num_seqs"] == 2.0
    assert m["clip_low_frac"] == pytest.approx(0.2) and m["clip_high_frac"] == pytest.approx(0.2)
    assert m["ratio_mean"] == pytest.approx(5.2 / 5)
    assert m["ratio_min"] == pytest.approx(0.7) and m["ratio_max"] == pytest.approx(1.5)
    assert m["behaviour_weight_mean"] == pytest.approx(1.0) and m["tis_truncated_frac"] == 0.0
    k3 = [r - 1 - math.log(r) for r in (1.0, 1.5, 0.9, 0.7, 1.1)]
    assert m["approx_kl_proximal"] == pytest.approx(sum(k3) / 5, rel=1e-5)
    assert m["approx_kl_behaviour"] == 0.0


def test_other_aggregations_hand_values():
    logprobs, old, adv, mask = _case()
    seq = LossConfig(aggregation="seq_mean_token_mean")
    loss, _ = _loss(seq, logprobs, old, adv, mask)
    assert_close(loss, torch.tensor(((-1.0 - 1.2 - 0.9) / 3 + (0.8 + 1.1) / 2) / 2))
    const = LossConfig(aggregation="constant", constant_normalizer=4.0)
    loss, _ = _loss(const, logprobs, old, adv, mask)
    assert_close(loss, torch.tensor((-1.0 - 1.2 - 0.9 + 0.8 + 1.1) / (2 * 4.0)))
    with pytest.raises(ValueError, match="loss.constant_normalizer"):
        _loss(LossConfig(aggregation="constant"), logprobs, old, adv, mask)


def test_clip_higher_and_dual_clip():
    logprobs, old, adv, mask = _case()
    cfg = LossConfig(epsilon_low=0.2, epsilon_high=0.6)  # 1.5 is now inside [0.8, 1.6]
    loss, m = _loss(cfg, logprobs, old, adv, mask)
    assert_close(loss, torch.tensor((-1.0 - 1.5 - 0.9 + 0.8 + 1.1) / 5))
    assert m["clip_high_frac"] == 0.0
    # ratio 5 on a negative advantage: PPO gives -5, the dual clip floor c*A = -3
    lp = (old + torch.tensor([[0.0, 0.0, 0.0], [math.log(5.0), 0.0, 0.0]])).requires_grad_()
    loss, m = _loss(LossConfig(dual_clip_c=3.0), lp, old, adv, mask)
    assert_close(loss, torch.tensor((-3.0 + 3.0 + 1.0) / 5))
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-0.2, -0.2, -0.2], [0.0, 0.2, 0.0]]))
    assert m["dual_clip_frac"] == pytest.approx(0.2)


def test_behaviour_corrections():
    logprobs, old, adv, mask = _case()
    # pi_old/pi_b = 3 on token (0, 0) and 0.25 on token (1, 1)
    behaviour = old.clone()
    behaviour[0, 0] = old[0, 0] - math.log(3.0)
    behaviour[1, 1] = old[1, 1] + math.log(4.0)
    loss, m = _loss(LossConfig(tis_cap=2.0), logprobs, old, adv, mask, behaviour)
    # weights [2, 1, 1], [1, 0.25]: tokens -1.0*2, -1.2, -0.9, 0.8, 1.1*0.25
    assert_close(loss, torch.tensor((-2.0 - 1.2 - 0.9 + 0.8 + 0.275) / 5))
    assert m["tis_truncated_frac"] == pytest.approx(0.2)
    assert m["behaviour_weight_mean"] == pytest.approx((2 + 1 + 1 + 1 + 0.25) / 5)
    loss, m = _loss(LossConfig(behaviour_correction="mask"), logprobs, old, adv, mask, behaviour)
    assert_close(loss, torch.tensor((-1.2 - 0.9 + 0.8) / 5))  # both tokens outside [0.5, 2]
    assert m["behaviour_masked_frac"] == pytest.approx(0.4)
    loss, _ = _loss(LossConfig(behaviour_correction="none"), logprobs, old, adv, mask, behaviour)
    assert_close(loss, torch.tensor((-1.0 - 1.2 - 0.9 + 0.8 + 1.1) / 5))


def test_gspo_sequence_ratio():
    logprobs, old, adv, mask = _case()
    s0 = (1.0 * 1.5 * 0.9) ** (1 / 3)  # 1.1052: geometric mean, inside the clip
    s1 = (0.7 * 1.1) ** 0.5  # 0.8775, A<0: min(-s, -clip(s)) = -s
    loss, m = _loss(LossConfig(policy_loss="gspo"), logprobs, old, adv, mask)
    assert_close(loss, torch.tensor((-3 * s0 + 2 * s1) / 5))
    loss.backward()
    assert_close(logprobs.grad, torch.tensor([[-s0 / 5] * 3, [s1 / 5, s1 / 5, 0.0]]))
    assert m["ratio_max"] == pytest.approx(s0, rel=1e-6)


def test_kl_to_reference():
    logprobs, old, adv, mask = _case()
    lp_first = old.clone().requires_grad_()  # ratio 1 everywhere
    ref = old + math.log(0.5)  # pi_ref = pi_theta / 2: x = log(ref/theta) = -ln 2
    k3 = 0.5 + math.log(2.0) - 1.0  # e^x - x - 1
    loss, m = _loss(LossConfig(beta=0.1), lp_first, old, adv, mask, ref_logprobs=ref)
    policy = (-1.0 * 3 + 1.0 * 2) / 5
    assert_close(loss, torch.tensor(policy + 0.1 * k3))
    assert m["kl_ref"] == pytest.approx(k3, rel=1e-5)
    for name, value in (("k1", math.log(2.0)), ("k2", 0.5 * math.log(2.0) ** 2)):
        _, m = _loss(
            LossConfig(beta=0.1, kl_estimator=name), lp_first, old, adv, mask, ref_logprobs=ref
        )
        assert m["kl_ref"] == pytest.approx(value, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        _loss(LossConfig(beta=0.1), lp_first, old, adv, mask)
    _, m = _loss(LossConfig(beta=0.0), lp_first, old, adv, mask)  # no reference needed
    assert "kl_ref" not in m


def test_first_epoch_ratio_is_exactly_one():
    _, old, adv, mask = _case()
    lp = old.clone().requires_grad_()
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    _, m = _loss(LossConfig(), lp, old, adv, mask, entropy=ent)
    assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_mean"] == 1.0
    assert m["clip_low_frac"] == 0.0 and m["clip_high_frac"] == 0.0
    assert m["approx_kl_proximal"] == 0.0
    assert m["entropy"] == pytest.approx(3.0)


def _random_batch(seed, b=8, t=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()  # [B, T]
    old = -torch.rand(b, t, generator=g) * 3  # [B, T]
    behaviour = old + 0.3 * torch.randn(b, t, generator=g)
    logprobs = old + 0.3 * torch.randn(b, t, generator=g)
    ref = old + 0.2 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    return logprobs, old, behaviour, adv, mask, ref


AGG_CFGS = [
    LossConfig(aggregation="token_mean"),
    LossConfig(aggregation="seq_mean_token_mean"),
    LossConfig(aggregation="constant", constant_normalizer=6.0),
]


@pytest.mark.parametrize("cfg", AGG_CFGS, ids=lambda c: c.aggregation)
def test_first_epoch_gradient_is_plain_policy_gradient(cfg):
    _, old, _, adv, mask, _ = _random_batch(1)
    lp = old.clone().requires_grad_()
    loss, _ = _loss(cfg, lp, old, adv, mask, n_tok=float(mask.sum()), n_seq=8.0)
    loss.backward()
    per_token = -adv.unsqueeze(1) * mask  # [B, T] d(-A log pi)/d log pi on completion tokens
    norm = {
        "token_mean": mask.sum(),
        "seq_mean_token_mean": mask.sum(1, keepdim=True) * 8.0,
        "constant": torch.tensor(8.0 * 6.0),
    }[cfg.aggregation]
    assert_close(lp.grad, per_token / norm)


@pytest.mark.parametrize("policy", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("cfg", AGG_CFGS, ids=lambda c: c.aggregation)
def test_micro_batch_split_keeps_gradient(cfg, policy):
    cfg = cfg.model_copy(update={"policy_loss": policy, "beta": 0.05})
    logprobs, old, behaviour, adv, mask, ref = _random_batch(2)
    totals = {"n_tok": float(mask.sum()), "n_seq": 8.0}
    full = logprobs.clone().requires_grad_()
    loss, _ = _loss(cfg, full, old, adv, mask, behaviour, ref_logprobs=ref, **totals)
    loss.backward()
    split = logprobs.clone().requires_grad_()
    total = 0.0
    for idx in torch.arange(8).split(2):  # 4 micro-batches of 2 sequences
        part, _ = _loss(
            cfg,
            split[idx],
            old[idx],
            adv[idx],
            mask[idx],
            behaviour[idx],
            ref_logprobs=ref[idx],
            **totals,
        )
        part.backward()
        total = total + part.detach()
    assert_close(total, loss.detach())
    assert_close(split.grad, full.grad)
    assert full.grad.abs().sum() > 0


def test_property_finite_and_zero_grad_on_padding():
    names = [
        (p, c, a, k)
        for p in POLICY_LOSSES
        for c in BEHAVIOUR_CORRECTIONS
        for a in AGGREGATIONS
        for k in KL_ESTIMATORS
    ]
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        p, c, a, k = names[int(torch.randint(len(names), (1,), generator=g))]
        cfg = LossConfig(
            policy_loss=p,
            behaviour_correction=c,
            aggregation=a,
            kl_estimator=k,
            beta=0.1,
            constant_normalizer=7.0,
            dual_clip_c=3.0 if seed % 2 else None,
        )
        b, t = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        mask = torch.rand(b, t, generator=g) < 0.6  # [B, T] arbitrary holes
        scale = 5.0 * float(torch.rand((), generator=g))
        lp = -torch.rand(b, t, generator=g) * 5
        old, behaviour, ref = (lp + scale * torch.randn(b, t, generator=g) for _ in range(3))
        garbage = torch.tensor([NAN, float("inf"), -float("inf"), 1e30])[
            torch.randint(4, (b, t), generator=g)
        ]
        lp = torch.where(mask, lp, garbage).requires_grad_()
        old, behaviour, ref = (torch.where(mask, x, garbage) for x in (old, behaviour, ref))
        adv = torch.randn(b, generator=g)
        loss, m = _loss(
            cfg,
            lp,
            old,
            adv,
            mask,
            behaviour,
            n_tok=max(float(mask.sum()), 1.0),
            n_seq=float(b),
            ref_logprobs=ref,
        )
        loss.backward()
        assert torch.isfinite(loss), (seed, cfg)
        assert torch.isfinite(lp.grad).all(), (seed, cfg)
        assert (lp.grad[~mask] == 0).all(), (seed, cfg)
        assert all(math.isfinite(v) for v in m.values()), (seed, m)


def test_registry_names_match_config_and_unknown_names_fail():
    fields = LossConfig.model_fields
    for field, table in (
        ("policy_loss", POLICY_LOSSES),
        ("behaviour_correction", BEHAVIOUR_CORRECTIONS),
        ("aggregation", AGGREGATIONS),
        ("kl_estimator", KL_ESTIMATORS),
        ("advantage", ADVANTAGES),
    ):
        assert set(typing.get_args(fields[field].annotation)) == set(table), field
    logprobs, old, adv, mask = _case()
    for field in ("policy_loss", "behaviour_correction", "aggregation"):
        cfg = LossConfig.model_construct(**{field: "foo"})
        with pytest.raises(ValueError, match=f"loss.{field}: unknown 'foo' \\(choose from"):
            _loss(cfg, logprobs, old, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        _loss(LossConfig(), logprobs, old, adv[:1], mask)
    with pytest.raises(ValueError, match="mask"):
        _loss(LossConfig(), logprobs, old, adv, mask[:, :2])
