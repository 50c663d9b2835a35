"""A hand-built 3-turn episode: its stored tokens, policy mask and behaviour log-probs,
and a loss that leaves the environment's tokens out of every sum.

The episode is assembled with the generator's `EpisodeTokens` (model turn, tool
result, model turn, tool result, model turn), stored in both backends and read back,
then trained on by the learner's own batch layouts (padded, shared-prefix on the KV
cache, packed groups) and the fused output layer. The reference loss is computed from
one plain forward of the same tokens, with the environment tokens' positions *removed*
from the tensors before `grpo_loss` (so no mask is needed there at all).
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo_stream.algo import grpo_loss
from grpo_stream.buffer.schema import Sample
from grpo_stream.buffer.store import open_reader, open_writer
from grpo_stream.config import Config
from grpo_stream.core import metric_names as M
from grpo_stream.generator.episodes import EpisodeTokens
from grpo_stream.learner.batch import collate, collate_shared
from grpo_stream.learner.policy import sequence_logprobs, sequence_loss

VOCAB, TEMPERATURE = 64, 0.8
PROMPT = [5, 6, 7, 8]
# (model turn ids, their behaviour log-probs) and the environment turns between them
TURNS = [
    ([10, 11, 2], [-0.5, -1.25, -0.75]),
    ([12, 2], [-2.0, -0.25]),
    ([13, 14, 2], [-1.0, -3.0, -0.125]),
]
ENV = [[30, 31, 32], [33, 34]]
IDS = [10, 11, 2, 30, 31, 32, 12, 2, 33, 34, 13, 14, 2]
MASK = [1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
LOGPROBS = [-0.5, -1.25, -0.75, 0.0, 0.0, 0.0, -2.0, -0.25, 0.0, 0.0, -1.0, -3.0, -0.125]


def _episode() -> EpisodeTokens:
    tok = EpisodeTokens(list(PROMPT))
    for k, (ids, lps) in enumerate(TURNS):
        tok.add_model(ids, lps)
        if k < len(ENV):
            tok.add_env(ENV[k])
    return tok


def _samples() -> list[Sample]:
    """The 3-turn episode and a single-turn sample (no mask: all policy) of one group."""
    t = _episode()
    common = dict(run_id="r", prompt_id="p0", policy_version=0, prompt_ids=t.prompt_ids)
    episode = Sample(
        **common,
        sample_index=0,
        completion_ids=t.completion_ids,
        behaviour_logprobs=t.logprobs,
        policy_mask=t.policy_mask,
        reward=1.0,
    )
    single = Sample(**common, sample_index=1, completion_ids=[15, 16, 2],
                    behaviour_logprobs=[-0.5, -0.5, -0.5], reward=0.0)  # fmt: skip
    return [episode, single]


def test_the_episode_is_one_sequence_with_its_mask_and_logprobs():
    t = _episode()
    assert t.completion_ids == IDS
    assert t.policy_mask == MASK
    assert t.logprobs == LOGPROBS
    assert t.ids() == PROMPT + IDS and len(t) == 17
    with pytest.raises(ValueError, match="3 tokens with 2 log-probs"):
        t.add_model([1, 2, 3], [-1.0, -1.0])


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_the_buffer_stores_the_episode_token_exact(tmp_path, backend):
    w = open_writer(str(tmp_path / "buf"), backend, fsync=False)
    w.append_groups([_samples()])
    w.close()
    [group] = open_reader(str(tmp_path / "buf")).read_groups(0, 1)
    ep, single = group
    assert ep.prompt_ids == PROMPT and ep.completion_ids == IDS
    assert ep.policy_mask == MASK
    assert ep.behaviour_logprobs == LOGPROBS  # all exact in float32
    assert single.policy_mask == [] and single.completion_ids == [15, 16, 2]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, pad_token_id=0)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().train()


def _loss_cfg():
    cfg = Config().loss
    cfg.epsilon_low = cfg.epsilon_high = 0.05  # the clip acts on some tokens
    cfg.beta, cfg.aggregation = 0.1, "seq_mean_token_mean"  # KL in; per-sequence counts matter
    return cfg


def _old(n: int) -> torch.Tensor:
    """A proximal policy away from the current one: [n]."""
    return torch.tensor([-3.9 + 0.3 * ((5 * j) % 7 - 3) for j in range(n)])


def _reference_loss(model, samples, advantages):
    """One plain forward per sample; env positions removed, then grpo_loss unmasked."""
    cfg, total = _loss_cfg(), 0.0
    n_tok = sum(sum(s.policy_mask or [1] * len(s.completion_ids)) for s in samples)
    for s, adv in zip(samples, advantages, strict=True):
        ids = torch.tensor([s.prompt_ids + s.completion_ids])  # [1, L]
        logits = model(input_ids=ids).logits[:, :-1].float() / TEMPERATURE  # [1, L-1, V]
        lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [1, L-1]
        lp = lp[:, len(s.prompt_ids) - 1 :]  # [1, C] completion targets
        keep = torch.tensor(s.policy_mask or [1] * len(s.completion_ids)).bool()  # [C]
        lp = lp[:, keep]  # [1, C_policy]: the env tokens are gone
        n = lp.shape[1]
        old, ref = _old(len(keep))[keep][None], (_old(len(keep))[keep] - 0.2)[None]  # [1, n]
        beh = torch.tensor(s.behaviour_logprobs)[keep][None]  # [1, n]
        loss, m = grpo_loss(cfg, lp, old, beh, torch.tensor([adv]), torch.ones(1, n),
                            total_tokens=n_tok, total_seqs=len(samples), ref_logprobs=ref)  # fmt: skip
        total = total + loss
    return total


def _learner_loss(model, mb, fused: bool):
    cfg = _loss_cfg()
    # place pi_old/pi_ref on the completion columns of each row (policy or not)
    old, ref = _place(mb, _old), _place(mb, lambda n: _old(n) - 0.2)
    totals = dict(total_tokens=float(mb.mask.sum()), total_seqs=float(mb.mask.shape[0]))
    fixed = (old, mb.behaviour_logprobs, mb.advantages, mb.mask, ref)

    def loss_of(rows, lp):
        o, b, a, m, r = (x[rows] for x in fixed)
        return grpo_loss(cfg, lp, o, b, a, m, **totals, ref_logprobs=r)

    if fused:
        loss, lp, _ = sequence_loss(model, mb, TEMPERATURE, 8, lambda r, x, e: loss_of(r, x)[0])
        return loss, loss_of(slice(None), lp.detach())[1]
    lp, _ = sequence_logprobs(model, mb, TEMPERATURE, 8)  # [B, T]
    return loss_of(slice(None), lp)


def _place(mb, per_length) -> torch.Tensor:
    """per_length(C) [C] into each row's completion columns of mb's layout [B, T]."""
    out = torch.zeros_like(mb.mask)  # [B, T]
    samples = _samples()
    for r, i in enumerate(mb.index.tolist()):
        s = samples[i]
        C, P = len(s.completion_ids), len(s.prompt_ids)
        start = 0 if mb.prefix is not None else P - 1
        out[r, start : start + C] = per_length(C)
    return out


LAYOUTS = {
    "padded": lambda ss: collate(ss, [1.5, -1.5], [0, 1], 0),
    "kv_cache": lambda ss: collate_shared(ss, [1.5, -1.5], [0, 1], 0),
    "packed": lambda ss: collate_shared(ss, [1.5, -1.5], [0, 1], 0, pack_mask_bytes=1 << 20),
}


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_loss_leaves_environment_tokens_out_of_every_sum(layout, fused):
    model, samples = _model(), _samples()
    mb = LAYOUTS[layout](samples)
    if layout == "packed":
        assert mb.prefix.packed is not None
    assert mb.num_tokens == 8 + 3  # policy tokens only: 8 of the episode, 3 single-turn
    assert float(mb.behaviour_logprobs[mb.mask == 0].abs().sum()) == 0.0
    loss, metrics = _learner_loss(model, mb, fused)
    expected = _reference_loss(model, samples, [1.5, -1.5])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics[M.NUM_TOKENS] == 11
    assert math.isfinite(metrics[M.CLIP_LOW_FRAC]) and math.isfinite(metrics[M.KL_REF])
    # the environment's tokens change the loss only as context: with them as targets the
    # loss differs (the check above can fail)
    unmasked = LAYOUTS[layout]([_without_mask(samples[0]), samples[1]])
    other, _ = _learner_loss(model, unmasked, fused)
    assert not torch.isclose(other, expected, rtol=1e-3)


def _without_mask(s: Sample) -> Sample:
    from dataclasses import replace

    return replace(s, policy_mask=[])


def test_a_mask_of_the_wrong_length_is_refused():
    from dataclasses import replace

    bad = replace(_samples()[0], policy_mask=[1, 0], row_id=7)
    with pytest.raises(ValueError, match="sample 7: 13 completion tokens but a policy_mask of 2"):
        collate([bad], [1.0], [0], 0)
