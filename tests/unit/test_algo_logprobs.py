"""Chunked log-probs and entropy against the naive full log_softmax path."""

import math

import pytest
import torch
from torch.testing import assert_close

from grpo_stream.algo import token_logprobs_from_hidden, token_logprobs_from_logits


def _naive(logits, ids, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, T, V]
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    ent = -(logp.exp() * logp).sum(-1)  # [B, T]
    return lp, ent


def test_logits_hand_value():
    # softmax([0, ln 3]) = [1/4, 3/4]; at temperature 2: softmax([0, ln 3 / 2]) = [1, sqrt 3] / (1 + sqrt 3)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # [1, 2, 2]
    ids = torch.tensor([[1, 0]])
    lp = token_logprobs_from_logits(logits, ids, chunk_size=1)
    assert_close(lp, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    lp_t = token_logprobs_from_logits(logits, ids, chunk_size=1, temperature=2.0)
    s3 = math.sqrt(3.0)
    assert_close(lp_t, torch.tensor([[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]]))


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_logits_matches_naive_with_grad(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)  # [B, T, V]
    ids = torch.randint(0, 11, (2, 5), generator=g)
    coef = torch.randn(2, 5, generator=g)  # [B, T] arbitrary upstream gradient
    lp = token_logprobs_from_logits(logits, ids, chunk_size, temperature=0.7)
    (gx,) = torch.autograd.grad((lp * coef).sum(), logits)
    ref, _ = _naive(logits, ids, temperature=0.7)
    (gref,) = torch.autograd.grad((ref * coef).sum(), logits)
    assert_close(lp, ref)
    assert_close(gx, gref)


def _hidden_case(seed=0, b=3, t=7, h=16, v=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)  # [B, T, H]
    weight = (0.5 * torch.randn(v, h, generator=g)).requires_grad_()  # [V, H]
    ids = torch.randint(0, v, (b, t), generator=g)  # [B, T]
    c_lp = torch.randn(b, t, generator=g)  # [B, T]
    c_ent = torch.randn(b, t, generator=g)  # [B, T]
    return hidden, weight, ids, c_lp, c_ent


@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (4, 0.7), (1000, 1.3)])
def test_hidden_matches_naive_fp32(chunk_size, temperature):
    hidden, weight, ids, c_lp, c_ent = _hidden_case()
    lp, ent = token_logprobs_from_hidden(
        hidden, weight, ids, chunk_size, with_entropy=True, temperature=temperature
    )
    grads = torch.autograd.grad((lp * c_lp + ent * c_ent).sum(), (hidden, weight))
    ref_lp, ref_ent = _naive(hidden @ weight.t(), ids, temperature)
    ref_grads = torch.autograd.grad((ref_lp * c_lp + ref_ent * c_ent).sum(), (hidden, weight))
    assert lp.dtype == torch.float32 and lp.shape == (3, 7)
    assert_close(lp, ref_lp)
    assert_close(ent, ref_ent)
    assert_close(grads[0], ref_grads[0])
    assert_close(grads[1], ref_grads[1])


def test_hidden_logprobs_only_and_frozen_head():
    hidden, weight, ids, c_lp, _ = _hidden_case(seed=1)
    frozen = weight.detach()  # the lm head does not train: only d/d hidden is computed
    lp, ent = token_logprobs_from_hidden(hidden, frozen, ids, chunk_size=5)
    assert ent is None
    (gh,) = torch.autograd.grad((lp * c_lp).sum(), hidden)
    ref_lp, _ = _naive(hidden @ frozen.t(), ids)
    (gref,) = torch.autograd.grad((ref_lp * c_lp).sum(), hidden)
    assert_close(lp, ref_lp)
    assert_close(gh, gref)


def test_hidden_no_grad_matches():
    hidden, weight, ids, _, _ = _hidden_case(seed=2)
    with torch.no_grad():
        lp, ent = token_logprobs_from_hidden(hidden, weight, ids, 2, with_entropy=True)
        ref_lp, ref_ent = _naive(hidden @ weight.t(), ids)
    assert not lp.requires_grad
    assert_close(lp, ref_lp)
    assert_close(ent, ref_ent)


def test_hidden_bf16_autocast_close_to_naive_autocast():
    hidden, weight, ids, c_lp, c_ent = _hidden_case(seed=3, h=32, v=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = token_logprobs_from_hidden(hidden, weight, ids, 4, with_entropy=True)
        ref_lp, ref_ent = _naive(hidden @ weight.t(), ids)  # the matmul runs in bf16 too
    grads = torch.autograd.grad((lp * c_lp + ent * c_ent).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_lp * c_lp + ref_ent * c_ent).sum(), (hidden, weight))
    assert lp.dtype == torch.float32
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == weight.dtype
    for x in (lp, ent, *grads):
        assert torch.isfinite(x).all()
    # same bf16 logits, float32 softmax in both: close up to bf16 rounding of gradients
    assert_close(lp, ref_lp, atol=1e-3, rtol=1e-3)
    assert_close(ent, ref_ent, atol=1e-3, rtol=1e-3)
    assert_close(grads[0], ref_grads[0], atol=5e-2, rtol=2e-2)
    assert_close(grads[1], ref_grads[1], atol=5e-2, rtol=2e-2)
    fp32_lp, _ = _naive((hidden @ weight.t()).detach(), ids)  # bf16 stays near fp32
    assert_close(lp, fp32_lp, atol=0.1, rtol=0.05)


def test_shape_errors_name_the_argument():
    hidden, weight, ids, _, _ = _hidden_case()
    with pytest.raises(ValueError, match="ids"):
        token_logprobs_from_hidden(hidden, weight, ids[:, :3])
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_logprobs_from_hidden(hidden, weight[:, :3], ids)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_logits(
            torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 4, 0.0
        )
