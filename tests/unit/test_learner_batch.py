"""Micro-batches by token budget, and the choice of the shared-prefix layout.

Packing: every sample lands in exactly one micro-batch, none over the budget (a sample or
group larger than it alone), sorted by length, groups whole in the shared-prefix layout.
The update does not depend on the split: a token-budget step equals one big batch.
`auto` takes the shared prefix only when it saves enough; an unsupported model falls
back to the padded layout with one log line.
"""

from __future__ import annotations

import pytest
import torch
from test_learner_prefix import PAD, _model, _samples, _train

from grpo_stream.config import Config
from grpo_stream.learner import plan
from grpo_stream.learner.batch import (
    forward_tokens,
    make_micro_batches,
    pack_indices,
    packed_mask_bytes,
)
from grpo_stream.learner.plan import (
    _split_to,
    plan_micro_batches,
    shared_prefix_saving,
    use_shared_prefix,
)

RAGGED = [(9, [5, 1, 7, 3]), (4, [6]), (12, [1, 1]), (6, [2, 8, 4]), (20, [3, 9]), (3, [2, 2])]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("budget", [1, 40, 70, 10_000])
def test_token_budget_packs(shared, budget):
    samples, _ = _samples(RAGGED)
    packs = pack_indices(samples, 16, list(range(len(samples))), budget, shared)
    assert sorted(i for p in packs for i in p) == list(range(len(samples)))
    for p in packs:
        ss = [samples[i] for i in p]
        unit = len({tuple(s.prompt_ids) for s in ss}) == 1 if shared else len(p) == 1
        assert forward_tokens(ss, shared) <= budget or unit, (p, budget)
    if shared:  # a prompt's rows never straddle two micro-batches
        homes = {}
        for k, p in enumerate(packs):
            for i in p:
                assert homes.setdefault(tuple(samples[i].prompt_ids), k) == k
    if budget == 10_000:
        assert len(packs) == 1
    if budget == 1:  # one unit each, shortest first
        key = [max(len(samples[i].prompt_ids) + len(samples[i].completion_ids) for i in p)
               for p in packs]  # fmt: skip
        assert len(packs) == (6 if shared else len(samples))
        assert key == sorted(key) or shared


def test_budget_cuts_padding():
    samples, advs = _samples(RAGGED)
    by_size = make_micro_batches(samples, advs, 4, PAD, list(range(len(samples))))
    by_tokens = make_micro_batches(samples, advs, 4, PAD, list(range(len(samples))), max_tokens=48)
    padded = [int(mb.attention_mask.numel()) for mb in by_size]
    packed = [int(mb.attention_mask.numel()) for mb in by_tokens]
    real = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    assert sum(int(mb.attention_mask.sum()) for mb in by_tokens) == real
    assert max(packed) <= 48 and sum(packed) < sum(padded)


@pytest.mark.parametrize("shared", [False, True])
def test_token_budget_step_equals_one_big_batch(shared):
    w_big, m_big = _train("tiny", shared, micro_batch_size=100)
    w_small, m_small = _train("tiny", shared, micro_batch_tokens=40)
    assert m_big["loss"] == pytest.approx(m_small["loss"], rel=1e-5)
    assert m_big["grad_norm"] == pytest.approx(m_small["grad_norm"], rel=1e-5)
    for k, w in w_big.items():
        torch.testing.assert_close(w_small[k], w, rtol=1e-5, atol=1e-5)


def test_auto_uses_the_shared_prefix_when_it_saves_enough():
    model = _model("tiny")
    long_prompts, _ = _samples([(45, [10] * 8), (44, [9] * 8)])
    singles, _ = _samples([(45, [10]), (44, [9])])  # G = 1: nothing to share
    short_prompts, _ = _samples([(2, [60] * 8)])
    assert shared_prefix_saving(long_prompts) == pytest.approx(1 - (89 + 152) / (712 + 152))
    assert shared_prefix_saving(singles) == 0.0
    assert use_shared_prefix("auto", long_prompts, model)
    assert not use_shared_prefix("auto", singles, model)
    assert shared_prefix_saving(short_prompts) < plan.AUTO_MIN_SAVED
    assert not use_shared_prefix("auto", short_prompts, model)
    assert use_shared_prefix(True, singles, model)
    assert not use_shared_prefix(False, long_prompts, model)
    # packed groups pay off from a smaller saving than the KV-cache path
    mid, mid_advs = _samples([(6, [20] * 8)])
    saving = shared_prefix_saving(mid)  # 1 - (6 + 160) / (48 + 160)
    assert plan.AUTO_MIN_SAVED_PACKED <= saving < plan.AUTO_MIN_SAVED
    assert use_shared_prefix("auto", mid, model, packable=True)
    assert not use_shared_prefix("auto", mid, model, packable=False)
    assert not use_shared_prefix("auto", short_prompts, model, packable=True)  # 0.028
    lc = Config().learner
    assert packed_mask_bytes(mid) == (6 + 8 * 19) ** 2
    for mib, layout in ((0.0, None), (158**2 / 2**20, "packed"), (158**2 / 2**20 - 1e-6, None)):
        lc.pack_mask_mib = mib
        (mb,) = plan_micro_batches(mid, mid_advs, lc, PAD, model)
        packed = mb.prefix is not None and mb.prefix.packed is not None
        assert ("packed" if packed else mb.prefix) == layout  # else padded (no prefix)


def test_unsupported_model_falls_back_with_one_log_line(monkeypatch, capsys):
    monkeypatch.setattr(plan, "_reported", set())
    model = _model("tiny")
    model.gradient_checkpointing_enable()
    samples, _ = _samples()
    assert not use_shared_prefix(True, samples, model)
    assert not use_shared_prefix("auto", samples, model)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "gradient checkpointing" in lines[0], lines
    model = _model("tiny", attn="flex_attention")
    assert not use_shared_prefix(True, samples, model)
    assert "flex_attention" in capsys.readouterr().err
    from transformers import MistralConfig, MistralForCausalLM

    other = MistralForCausalLM(MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    ))  # fmt: skip
    assert not use_shared_prefix(True, samples, other)
    assert not use_shared_prefix("auto", samples, other)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "[learner] shared-prefix forward off, padded layout instead: model_type 'mistral' "
        "is not among the checked ones (llama, qwen2; learner.prefix.SUPPORTED_MODEL_TYPES)"
    ]


def test_split_to_equal_counts():
    packs = _split_to([[0, 1, 2, 3, 4], [5], [6, 7]], 5)
    assert len(packs) == 5 and sorted(i for p in packs for i in p) == list(range(8))
    with pytest.raises(RuntimeError):
        _split_to([[0], [1]], 3)


def test_completion_chunks_by_hand():
    from grpo_stream.learner.batch import completion_chunks

    # one length, one row, or too little to save: one pass of every row
    assert completion_chunks([5, 5, 5], 4) == [[0, 1, 2]]
    assert completion_chunks([1], 4) == [[0]]
    assert completion_chunks([3, 4], 4) == [[0, 1]]  # 2 x 4 + 16 = 24 < 3 + 4 + 2 x 16 = 39
    # 16 rows of 16 and 16 of 4: 2 passes cost 16 x 4 + 16 x 16 + 2 x 16 = 352 < 16 + 512
    lens = [16] * 16 + [4] * 16
    assert completion_chunks(lens, 4) == [list(range(16, 32)), list(range(16))]
    # one-token completions are two columns wide (the pass always runs), so 1 and 2 join
    ones, twos = [i for i in range(32) if i % 2 == 0], [i for i in range(32) if i % 2 == 1]
    assert completion_chunks([1, 2] * 16 + [30] * 8, 4) == [ones + twos, list(range(32, 40))]
    # at most max_chunks passes; the split minimises padded tokens + cost per pass
    lens = [10, 20, 30, 40, 50, 60]
    assert completion_chunks(lens, max_chunks=2, cost=0) == [[0, 1, 2], [3, 4, 5]]
    assert completion_chunks(lens, max_chunks=6, cost=0) == [[i] for i in range(6)]
    assert completion_chunks(lens, max_chunks=6, cost=1000) == [list(range(6))]
