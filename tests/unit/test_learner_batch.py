"""Micro-batches by token budget, and the choice of the shared-prefix layout.

Packing: every sample lands in exactly one micro-batch, none over the budget counted in
the layout that runs (a sample larger than it alone), sorted by length, groups whole in
the shared-prefix layouts where they fit, cut where they do not (micro_batch_size too).
Under FSDP, ranks even out their micro-batch counts at group boundaries, then with
padding micro-batches.
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
from grpo_stream.learner.batch import make_micro_batches, packed_mask_bytes
from grpo_stream.learner.plan import (
    _split_to,
    plan_micro_batches,
    shared_prefix_saving,
    use_shared_prefix,
)
from grpo_stream.learner.split import forward_tokens, pack_indices

RAGGED = [(9, [5, 1, 7, 3]), (4, [6]), (12, [1, 1]), (6, [2, 8, 4]), (20, [3, 9]), (3, [2, 2])]


@pytest.mark.parametrize("layout", ["padded", "cached", "packed"])
@pytest.mark.parametrize("budget", [1, 40, 70, 10_000])
def test_token_budget_packs(layout, budget):
    samples, _ = _samples(RAGGED)
    packs = pack_indices(samples, 16, list(range(len(samples))), budget, layout)
    assert sorted(i for p in packs for i in p) == list(range(len(samples)))
    for p in packs:  # over the budget only a single sample, alone
        assert forward_tokens([samples[i] for i in p], layout) <= budget or len(p) == 1
    if layout != "padded":  # a prompt's rows straddle micro-batches only when they must
        homes = {}
        for k, p in enumerate(packs):
            for i in p:
                group = [s for s in samples if s.prompt_ids == samples[i].prompt_ids]
                if forward_tokens(group, layout) <= budget:
                    assert homes.setdefault(tuple(samples[i].prompt_ids), k) == k
    if budget == 10_000:
        assert len(packs) == 1
    if budget == 1:  # one sample each (every group cut), shortest first
        key = [max(len(samples[i].prompt_ids) + len(samples[i].completion_ids) for i in p)
               for p in packs]  # fmt: skip
        assert len(packs) == len(samples)
        assert key == sorted(key) or layout != "padded"


def _hand(prompt: int, completions: list[int], tag: int) -> list:
    from test_learner_prefix import _sample

    return [_sample([100 + tag] * prompt, [7] * c) for c in completions]


def test_micro_batch_tokens_count_the_layout_that_runs():
    """Group A: prompt 4, completions 3 and 3; group B: prompt 2, completion 5."""
    a, b = _hand(4, [3, 3], 0), _hand(2, [5], 1)
    # packed: one row per group, prompt + each completion but its last token
    assert forward_tokens(a, "packed") == 4 + 2 + 2 and forward_tokens(b, "packed") == 2 + 4
    assert forward_tokens(a + b, "packed") == 2 * 8  # 2 rows, as wide as the longest
    assert forward_tokens(a + b, "cached") == 2 * 4 + 3 * 5  # N x Lp + B x Lc
    assert forward_tokens(a + b, "padded") == 3 * 7  # rows of 4 + 3 and 2 + 5
    lc = Config().learner
    lc.shared_prefix, lc.micro_batch_tokens = True, 16
    mbs = plan_micro_batches(a + b, [0.0] * 3, lc, PAD, _model("tiny"))
    assert [mb.prefix.packed.input_ids.shape for mb in mbs] == [(2, 8)]  # 16 tokens, one
    lc.pack_mask_mib = 0.0  # the KV cache: 23 tokens together, so B (7) then A (10)
    mbs = plan_micro_batches(a + b, [0.0] * 3, lc, PAD, _model("tiny"))
    assert [mb.index.tolist() for mb in mbs] == [[2], [0, 1]]
    assert [mb.prefix.packed for mb in mbs] == [None, None]
    # a group over the budget is cut in order: A packed is 8 > 7, each half 4 + 2 = 6
    assert pack_indices(a + b, 16, [0, 1, 2], 7, "packed") == [[2], [0], [1]]


def test_micro_batch_size_bounds_shared_micro_batches(monkeypatch, capsys):
    """2 groups of 16 with micro_batch_size 8: 4 micro-batches of 8 rows, each runs its
    group's prompt once (was: 2 of 16), said once in the log."""
    monkeypatch.setattr(plan, "_reported", set())
    samples, advs = _samples([(5, [3] * 16), (7, [2] * 16)])
    lc = Config().learner
    lc.shared_prefix, lc.micro_batch_size = True, 8
    for mib in (64.0, 0.0):  # packed groups, then the KV cache
        lc.pack_mask_mib = mib
        mbs = plan_micro_batches(samples, advs, lc, PAD, _model("tiny"))
        assert [mb.index.tolist() for mb in mbs] == [list(range(k, k + 8)) for k in (0, 8, 16, 24)]
        assert [len(mb.prefix.prompt_rows) for mb in mbs] == [1] * 4
        assert {mb.prefix.packed is not None for mb in mbs} == {mib > 0}
    assert capsys.readouterr().err.strip().splitlines() == [
        "[learner] a group larger than one micro-batch (learner.micro_batch_size = 8) runs "
        "in parts, its prompt once in each"
    ]


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
    assert packed_mask_bytes(mid, element_bytes=4) == 4 * (6 + 8 * 19) ** 2  # eager: float32
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
    packs, pads = _split_to([[0, 1, 2, 3, 4], [5], [6, 7]], 5, lambda i: i)
    assert len(packs) == 5 and sorted(i for p in packs for i in p) == list(range(8))
    assert pads == 0
    # single units cannot be cut: the rest of the count is padding micro-batches
    assert _split_to([[0], [1]], 3, lambda i: i) == ([[0], [1]], 1)


def test_split_to_cuts_at_group_boundaries_only():
    """Groups by prompt: g0 = 0-3, g1 = 4-5, g2 = 6-7, g3 = 8. The micro-batch of the
    most groups is cut in half (by groups), never inside a group; then padding."""
    group = {i: g for g, ix in enumerate([[0, 1, 2, 3], [4, 5], [6, 7], [8]]) for i in ix}
    packs, pads = _split_to([list(range(8)), [8]], 3, group.get)
    assert (packs, pads) == ([[0, 1, 2, 3], [4, 5, 6, 7], [8]], 0)  # 3 groups: 1 | 2
    packs, pads = _split_to([list(range(8)), [8]], 6, group.get)
    assert (packs, pads) == ([[0, 1, 2, 3], [4, 5], [6, 7], [8]], 2)


def test_fsdp_padding_micro_batches_learn_nothing():
    """A rank with fewer micro-batches gets zero-token padding micro-batches (index -1)
    in the step's layout; FSDP padding samples go in no micro-batch."""
    from grpo_stream.learner.distributed import padding_sample

    samples, advs = _samples([(5, [3] * 4)])
    pad = padding_sample(samples[0])
    mbs = [plan._padding_micro_batch(samples[0], PAD, lay) for lay in ("padded", "packed")]
    assert [mb.index.tolist() for mb in mbs] == [[-1], [-1]] and mbs[0].prefix is None
    assert mbs[1].prefix.packed is not None and [mb.num_tokens for mb in mbs] == [0, 0]
    lc = Config().learner
    lc.shared_prefix = True
    (mb,) = plan_micro_batches(samples + [pad, pad], advs + [0.0, 0.0], lc, PAD, _model("tiny"))
    assert mb.index.tolist() == [0, 1, 2, 3]
    (mb,) = plan_micro_batches([pad, pad], [0.0, 0.0], lc, PAD, _model("tiny"))  # only padding
    assert mb.index.tolist() == [0] and mb.num_tokens == 0


@pytest.mark.parametrize("pack_mib", [64.0, 0.0])
def test_padding_micro_batches_change_no_update(monkeypatch, pack_mib):
    """Two padding micro-batches added to a step's (as a rank with fewer micro-batches
    gets under FSDP) change no weight and no metric, with sequence-mean aggregation,
    whose normaliser counts sequences: padding rows (index -1) count as none."""
    import random

    from grpo_stream.learner import step
    from grpo_stream.learner.optim import build_optimizer

    def train(pads: int):
        cfg = Config()
        cfg.loss.aggregation, cfg.loss.epsilon_low, cfg.loss.epsilon_high = (
            "seq_mean_token_mean", 0.01, 0.01,
        )  # fmt: skip
        lc = cfg.learner
        lc.shared_prefix, lc.epochs, lc.lr, lc.pack_mask_mib = True, 2, 1e-4, pack_mib
        model = _model("tiny")
        opt, sched = build_optimizer(model, lc)
        runner = step.StepRunner(cfg, model, None, opt, sched, torch.device("cpu"), pad_id=PAD)
        layout = "packed" if pack_mib else "cached"

        def padded_plan(samples, *args):
            mbs = plan_micro_batches(samples, *args)
            return mbs + [plan._padding_micro_batch(samples[0], PAD, layout)] * pads

        monkeypatch.setattr(step, "plan_micro_batches", padded_plan)
        random.seed(0)
        metrics = runner.run(*_samples())
        return {k: p.detach().clone() for k, p in model.named_parameters()}, metrics

    (w0, m0), (w2, m2) = train(0), train(2)
    for k in ("loss", "grad_norm", "clip_low_frac", "clip_high_frac", "ratio_max"):
        assert m2[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-9), k
    for k, w in w0.items():
        torch.testing.assert_close(w2[k], w, rtol=1e-5, atol=1e-6)


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
