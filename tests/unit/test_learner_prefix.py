"""The shared-prefix forward gives the padded forward's numbers (fp32, CPU).

Two architectures with random weights: the tiny Llama of the other learner tests (hidden
128, 2 heads, untied) and SmolLM2-135M's shapes with 2 layers (hidden 576, 9 heads, 3 KV
heads, head_dim 64, tied embeddings). The batch mixes prompts of different lengths in one
micro-batch, a group of one and completions of one token. Compared: per-token log-probs,
entropy, the GRPO loss and every parameter's gradient (fused output layer and not), and
the weights after two clipped AdamW epochs through the real `StepRunner`.
"""

from __future__ import annotations

import random

import pytest
import torch

from bench.synth import ragged_samples
from grpo_stream.algo import grpo_loss
from grpo_stream.buffer.schema import Sample
from grpo_stream.config import Config
from grpo_stream.learner.batch import collate, collate_shared
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.plan import plan_micro_batches
from grpo_stream.learner.policy import sequence_logprobs, sequence_loss
from grpo_stream.learner.step import StepRunner

RTOL = 1e-5
LR = 1e-4
VOCAB, PAD, TEMPERATURE = 49152, 2, 0.7
# (prompt length, completion lengths) per group: ragged prompts, a group of one, and
# one-token completions (group 2 has only those)
SHAPES = [(9, [5, 1, 7, 3]), (4, [6]), (12, [1, 1]), (6, [2, 8, 4])]


def _model(arch: str, attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {
        "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                     num_key_value_heads=2, tie_word_embeddings=False),
        "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                        num_key_value_heads=3, tie_word_embeddings=True),
    }[arch]  # fmt: skip
    cfg = LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=2, head_dim=64, max_position_embeddings=2048,
        rope_theta=100000.0, rms_norm_eps=1e-5, pad_token_id=PAD, **dims,
    )  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.train()
    return model


def _samples(shapes=SHAPES, seed: int = 1) -> tuple[list[Sample], list[float]]:
    return ragged_samples(shapes, seed, "prefix", VOCAB)


def _place(mb, per_sample: list[list[float]]) -> torch.Tensor:
    """Per-sample completion values into mb's [B, T] layout (0 off the mask)."""
    out = torch.zeros_like(mb.mask)  # [B, T]
    out[mb.mask > 0] = torch.tensor([v for i in mb.index.tolist() for v in per_sample[i]])
    return out


def _unplace(mb, t: torch.Tensor) -> list[list[float]]:
    return [t[r][mb.mask[r] > 0].tolist() for r in range(t.shape[0])]


def _old(samples) -> list[list[float]]:
    """A proximal policy away from the current one, so the clip acts."""
    return [[-10.8 + 0.4 * ((7 * i + 3 * j) % 5 - 2) for j in range(len(s.completion_ids))]
            for i, s in enumerate(samples)]  # fmt: skip


def _loss_and_grads(model, mb, samples, fused: bool):
    cfg = Config().loss
    cfg.epsilon_low = cfg.epsilon_high = 0.05
    old = _place(mb, _old(samples))  # [B, T]
    totals = dict(total_tokens=float(mb.mask.sum()), total_seqs=float(len(samples)))
    fixed = (old, mb.behaviour_logprobs, mb.advantages, mb.mask)

    def loss_of(rows, lp):
        o, b, a, m = (x[rows] for x in fixed)
        return grpo_loss(cfg, lp, o, b, a, m, **totals, metrics=False)[0]

    model.zero_grad(set_to_none=True)
    if fused:
        loss, lp, ent = sequence_loss(
            model, mb, TEMPERATURE, 64, lambda r, x, e: loss_of(r, x), True
        )
    else:
        lp, ent = sequence_logprobs(model, mb, TEMPERATURE, 64, with_entropy=True)  # [B, T]
        loss = loss_of(slice(None), lp)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return float(loss.detach()), _unplace(mb, lp.detach()), _unplace(mb, ent.detach()), grads


def _close(actual, expected, what: str) -> None:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=RTOL * scale + 1e-12, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize(
    "arch,attn,fused,split",
    [("tiny", "sdpa", True, True), ("tiny", "sdpa", False, True), ("tiny", "eager", True, True),
     ("tiny", "sdpa", True, False), ("smollm2", "sdpa", True, True),
     ("smollm2", "sdpa", False, True), ("smollm2", "sdpa", True, False)],
)  # fmt: skip
def test_logprobs_loss_and_gradients_equal_the_padded_path(arch, attn, fused, split):
    model = _model(arch, attn)
    samples, advs = _samples()
    index = list(range(len(samples)))
    padded = collate(samples, advs, index, PAD)
    shared = collate_shared(samples, advs, index, PAD, completion_passes=4 if split else 1)
    assert shared.prefix.prompt_rows.tolist() == [0, 4, 5, 7]  # one prompt pass per group
    # split: two completion passes, completions of 1..3 tokens (3 wide), then 4..8 (8 wide)
    assert shared.prefix.chunk_widths == ([3, 8] if split else [])
    assert len(set(shared.prefix.prompt_lens.tolist())) == 4  # ragged prompts, one batch
    want = _loss_and_grads(model, padded, samples, fused)
    got = _loss_and_grads(model, shared, samples, fused)
    assert [len(x) for x in got[1]] == [len(s.completion_ids) for s in samples]
    _close(got[0], want[0], "loss")
    for i in range(len(samples)):
        _close(got[1][i], want[1][i], f"log-probs of sample {i}")
        _close(got[2][i], want[2][i], f"entropy of sample {i}")
    assert want[0] != 0.0
    for name, g in want[3].items():
        assert g.abs().max() > 0, name  # every parameter is in the test
        _close(got[3][name], g, f"gradient of {name}")


def _train(arch: str, shared: bool, **learner):
    cfg = Config()
    cfg.generator.temperature = TEMPERATURE
    cfg.loss.epsilon_low = cfg.loss.epsilon_high = 0.01
    lc = cfg.learner
    lc.shared_prefix, lc.epochs, lc.lr, lc.micro_batch_size, lc.logprob_chunk_size = (
        shared,
        2,
        LR,
        8,
        64,
    )
    for k, v in learner.items():
        setattr(lc, k, v)
    model = _model(arch)
    opt, sched = build_optimizer(model, lc)
    runner = StepRunner(cfg, model, None, opt, sched, torch.device("cpu"), pad_id=PAD)
    samples, advs = _samples()
    random.seed(0)
    metrics = runner.run(samples, advs)
    layouts = {mb.prefix is not None for mb in plan_micro_batches(samples, advs, lc, PAD, model)}
    assert layouts == {shared}
    return {k: p.detach().clone() for k, p in model.named_parameters()}, metrics


@pytest.mark.parametrize("arch,fused", [("tiny", True), ("tiny", False), ("smollm2", True)])
def test_two_clipped_adamw_epochs_give_the_padded_weights(arch, fused):
    (w_pad, m_pad), (w_sh, m_sh) = (_train(arch, s, fused_loss=fused) for s in (False, True))
    assert m_pad["clip_low_frac"] + m_pad["clip_high_frac"] > 0.05  # the clip acts
    assert m_pad["ratio_max"] != 1.0
    for k in ("loss", "grad_norm", "clip_low_frac", "clip_high_frac", "entropy"):
        assert m_sh[k] == pytest.approx(m_pad[k], rel=1e-5, abs=1e-9), k
    assert m_sh["tokens"] == m_pad["tokens"]  # counted on the sequences, as in the padded path
    # The gradients agree to ~1e-6 relative, but AdamW moves every weight by ~lr whatever
    # its gradient's size: for the few weights whose gradient is ~0 the rounding noise is
    # a large share of it, and their steps differ by up to ~3% of lr (6e-5 seen at lr 1e-3,
    # on 1e-4 of the weights). At lr 1e-4 that stays under the absolute bound 1e-5.
    init = _model(arch).state_dict()
    for k, w in w_pad.items():
        torch.testing.assert_close(w_sh[k], w, rtol=RTOL, atol=1e-5)
        assert float((w - init[k]).abs().max()) > LR  # two AdamW steps moved every tensor


@pytest.mark.parametrize("passes,widths", [(4, [3, 8]), (1, [])])
def test_completion_passes_reach_the_plan(passes, widths):
    """`learner.completion_passes` splits the completion pass by length in one process
    (under FSDP never: tests/integration/test_fsdp_prefix.py)."""
    lc = Config().learner
    lc.shared_prefix, lc.completion_passes, lc.micro_batch_size = True, passes, 16
    samples, advs = _samples()
    (mb,) = plan_micro_batches(samples, advs, lc, PAD, _model("tiny"))
    assert mb.prefix is not None and mb.prefix.chunk_widths == widths
