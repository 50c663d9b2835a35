"""The shared-prefix forward gives the padded forward's numbers (fp32, CPU).

Three architectures with random weights: the tiny Llama of the other learner tests
(hidden 128, 2 heads, untied), SmolLM2-135M's shapes with 2 layers (hidden 576, 9 heads,
3 KV heads, head_dim 64, tied embeddings) and a tiny Qwen2 (Qwen2.5's q/k/v biases, made
random; 4 heads, 2 KV heads, tied), the model types in `prefix.SUPPORTED_MODEL_TYPES`. The batch mixes prompts of different lengths in one
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
from grpo_stream.learner.batch import collate, collate_shared, packed_mask_bytes
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.plan import plan_micro_batches
from grpo_stream.learner.policy import sequence_logprobs, sequence_loss
from grpo_stream.learner.prefix import grouped_attention_mask
from grpo_stream.learner.step import StepRunner

RTOL = 1e-5
LR = 1e-4
VOCAB, PAD, TEMPERATURE = 49152, 2, 0.7
# (prompt length, completion lengths) per group: ragged prompts, a group of one, and
# one-token completions (group 2 has only those)
SHAPES = [(9, [5, 1, 7, 3]), (4, [6]), (12, [1, 1]), (6, [2, 8, 4])]


def _qwen2(attn: str, seed: int, **window):
    """A tiny random Qwen2 (Qwen2.5-0.5B's kinds: q/k/v biases, grouped KV heads, tied
    embeddings, rms_norm_eps 1e-6), its biases random too (init leaves them 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6, pad_token_id=PAD, tie_word_embeddings=True, **window,
    )  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
    model.train()
    return model


def _model(arch: str, attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    if arch == "qwen2":
        return _qwen2(attn, seed)
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


# the shared-prefix paths: one forward of packed groups, or the KV cache (its completion
# pass in one pass or split by length); 64 MiB: packed (learner.pack_mask_mib's default)
MODES = {"packed": dict(pack_mask_bytes=64 << 20), "cached": {}, "split": dict(completion_passes=4)}


@pytest.mark.parametrize(
    "arch,attn,fused,mode",
    [("tiny", "sdpa", True, "split"), ("tiny", "sdpa", False, "split"),
     ("tiny", "eager", True, "split"), ("tiny", "sdpa", True, "cached"),
     ("smollm2", "sdpa", True, "split"), ("smollm2", "sdpa", False, "split"),
     ("smollm2", "sdpa", True, "cached"), ("tiny", "sdpa", True, "packed"),
     ("tiny", "sdpa", False, "packed"), ("tiny", "eager", True, "packed"),
     ("smollm2", "sdpa", True, "packed"), ("smollm2", "eager", False, "packed"),
     ("qwen2", "sdpa", True, "split"), ("qwen2", "sdpa", False, "cached"),
     ("qwen2", "eager", True, "split"), ("qwen2", "sdpa", True, "packed"),
     ("qwen2", "sdpa", False, "packed"), ("qwen2", "eager", True, "packed")],
)  # fmt: skip
def test_logprobs_loss_and_gradients_equal_the_padded_path(arch, attn, fused, mode):
    model = _model(arch, attn)
    samples, advs = _samples()
    index = list(range(len(samples)))
    padded = collate(samples, advs, index, PAD)
    shared = collate_shared(samples, advs, index, PAD, **MODES[mode])
    assert shared.prefix.prompt_rows.tolist() == [0, 4, 5, 7]  # one prompt pass per group
    # split: two completion passes, completions of 1..3 tokens (3 wide), then 4..8 (8 wide)
    assert shared.prefix.chunk_widths == ([3, 8] if mode == "split" else [])
    assert (shared.prefix.packed is not None) == (mode == "packed")
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
    mbs = plan_micro_batches(samples, advs, lc, PAD, model)
    assert {mb.prefix is not None for mb in mbs} == {shared}
    if shared:  # the path the setting asked for
        assert {mb.prefix.packed is not None for mb in mbs} == {lc.pack_mask_mib > 0}
    return {k: p.detach().clone() for k, p in model.named_parameters()}, metrics


@pytest.mark.parametrize(
    "arch,fused,pack_mib",
    [("tiny", True, 64.0), ("tiny", False, 64.0), ("smollm2", True, 64.0), ("tiny", True, 0.0),
     ("qwen2", True, 64.0), ("qwen2", False, 0.0)],
)  # fmt: skip  # 64 MiB: packed groups (the default); 0: the KV cache
def test_two_clipped_adamw_epochs_give_the_padded_weights(arch, fused, pack_mib):
    (w_pad, m_pad), (w_sh, m_sh) = (
        _train(arch, s, fused_loss=fused, pack_mask_mib=pack_mib) for s in (False, True)
    )
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
    lc.pack_mask_mib = 0.0  # the KV-cache path, where completion passes apply
    samples, advs = _samples()
    (mb,) = plan_micro_batches(samples, advs, lc, PAD, _model("tiny"))
    assert mb.prefix is not None and mb.prefix.chunk_widths == widths


# SHAPES packed: rows of 9 + 4 + 0 + 6 + 2 = 21, 4 + 5 = 9, 12 + 0 + 0 = 12 and
# 6 + 1 + 7 + 3 = 17 tokens, so the mask is 4 x 21 x 21 = 1764 elements: 1764 bytes as
# sdpa's boolean mask, 4 x 1764 = 7056 as eager's float32 one
@pytest.mark.parametrize(
    "attn,mask_bytes,packed",
    [("sdpa", 1764, True), ("sdpa", 1763, False), ("eager", 7056, True), ("eager", 7055, False),
     ("eager", 1764, False)],
)  # fmt: skip
def test_pack_mask_mib_reaches_the_plan(attn, mask_bytes, packed):
    lc = Config().learner
    lc.shared_prefix, lc.micro_batch_size, lc.pack_mask_mib = True, 16, mask_bytes / 2**20
    samples, advs = _samples()
    (mb,) = plan_micro_batches(samples, advs, lc, PAD, _model("tiny", attn))
    assert (mb.prefix.packed is not None) == packed
    if packed:
        assert mb.prefix.packed.input_ids.shape == (4, 21) and mb.prefix.packed.mask_bytes == 1764
    else:  # the KV cache, its completions split by length (completion_passes = 4)
        assert mb.prefix.chunk_widths == [3, 8]


def _sample(prompt: list[int], completion: list[int]) -> Sample:
    return Sample(run_id="hand", prompt_id=str(prompt), sample_index=0, policy_version=0,
                  prompt_ids=prompt, completion_ids=completion,
                  behaviour_logprobs=[-1.0] * len(completion), reward=0.0)  # fmt: skip


def test_packed_rows_and_grouped_mask_by_hand():
    """Prompt [5, 6] with completions [7, 8, 9] and [10]; prompt [11] with [12, 13]."""
    samples = [_sample([5, 6], [7, 8, 9]), _sample([11], [12, 13]), _sample([5, 6], [10])]
    pk = collate_shared(samples, [0.0] * 3, [0, 1, 2], PAD, pack_mask_bytes=32).prefix.packed
    # row 0: prompt a, completion 0's inputs [7, 8] (9 is only a target), completion 2's
    # inputs [] (10 is predicted from the prompt); row 1: prompt b, then [12]
    assert pk.input_ids.tolist() == [[5, 6, 7, 8], [11, 12, 0, 0]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert pk.segments.tolist() == [[0, 0, 1, 1], [0, 1, -1, -1]]
    # flattened [2 x 4] positions behind each target, 8: none (past the completion)
    assert pk.gather.tolist() == [[1, 2, 3], [4, 5, 8], [1, 8, 8]]
    T, F = True, False
    want = [
        [[T, F, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]],
        [[T, F, F, F], [T, T, F, F], [F, F, T, F], [F, F, F, T]],
    ]  # row 1's padding queries see only themselves
    assert grouped_attention_mask(pk.segments, "sdpa")[:, 0].tolist() == want
    additive = grouped_attention_mask(pk.segments, "eager")[:, 0]  # [2, 4, 4] float32
    lowest = torch.finfo(torch.float32).min
    assert additive.tolist() == [[[0.0 if x else lowest for x in r] for r in m] for m in want]
    # two completions after one prompt: [5, 6, 7, 8, 3] -> 1 row x 5^2 = 25 bytes
    pair = [samples[0], _sample([5, 6], [3, 4])]
    got = [collate_shared(pair, [0.0] * 2, [0, 1], PAD, pack_mask_bytes=b).prefix.packed
           for b in (25, 24)]  # fmt: skip
    assert got[0].segments.tolist() == [[0, 0, 1, 1, 2]] and got[1] is None
    # the plan's estimate (before collation) is the same size, empty completions too
    for batch in (samples, pair, [_sample([5, 6], [])]):
        idx = list(range(len(batch)))
        mb = collate_shared(batch, [0.0] * len(batch), idx, PAD, pack_mask_bytes=1 << 20)
        assert packed_mask_bytes(batch) == mb.prefix.packed.mask_bytes


def test_qwen2_with_sliding_layers_falls_back_and_full_attention_is_supported():
    """Qwen2's sliding window covers the layers from max_window_layers on (only with
    use_sliding_window): a custom mask and the KV cache would drop the window, so such a
    model takes the padded path; with every layer full attention it takes the prefix."""
    from grpo_stream.learner.prefix import unsupported_reason

    sliding = _qwen2("sdpa", 0, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert unsupported_reason(sliding) == (
        "sliding-window attention in 1 layer(s) (sliding_window = 4)"
    )
    full = _qwen2("sdpa", 0, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert full.config.layer_types == ["full_attention"] * 2
    assert unsupported_reason(full) is None and unsupported_reason(_model("qwen2")) is None
