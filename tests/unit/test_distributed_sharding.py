"""Unit: how a batch is dealt to data-parallel ranks, and the single-process fallbacks.

The 2-process FSDP2 run itself is tests/integration/test_fsdp_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from grpo_stream.algo import grpo_loss
from grpo_stream.buffer.schema import Sample
from grpo_stream.config import LossConfig
from grpo_stream.learner.batch import collate
from grpo_stream.learner.distributed import (
    all_reduce_scalars,
    broadcast_object,
    count_real,
    init_distributed,
    is_padding,
    is_rank0,
    shard_batch,
    shard_groups,
    shard_indices,
    shard_samples,
)
from grpo_stream.learner.gather import full_state_dict_on_rank0


def _sample(i: int, p: int = 3, c: int = 2) -> Sample:
    return Sample(
        run_id="r",
        prompt_id=f"p{i}",
        sample_index=i % 4,
        policy_version=0,
        prompt_ids=[10 + k for k in range(p)],
        completion_ids=[50 + k for k in range(c)],
        behaviour_logprobs=[-1.0] * c,
        reward=1.0,
        row_id=i,
    )


def _groups(sizes: list[tuple[int, list[int]]]) -> list[Sample]:
    """Groups of (prompt length, completion lengths), prompt g's tokens all 10 + g."""
    out = []
    for g, (p, cs) in enumerate(sizes):
        for k, c in enumerate(cs):
            s = _sample(len(out), p, c)
            s.prompt_ids, s.prompt_id, s.sample_index = [10 + g] * p, f"p{g}", k
            out.append(s)
    return out


@pytest.mark.parametrize("n_groups, world", [(4, 2), (5, 2), (7, 3), (2, 4), (1, 1), (9, 4)])
def test_every_sample_once_whole_groups_and_equal_counts(n_groups: int, world: int) -> None:
    samples = _groups([(3 + g % 3, [2 + g % 4] * (1 + g % 3)) for g in range(n_groups)])
    shares = [shard_indices(samples, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # as many samples on every rank, padding incl.
    real = [i for s in shares for i in s if i is not None]
    assert sorted(real) == list(range(len(samples)))  # nothing dropped, nothing twice
    for s in shares:  # every prompt on one rank only
        for other in shares:
            if other is not s:
                mine = {samples[i].prompt_id for i in s if i is not None}
                assert not mine & {samples[i].prompt_id for i in other if i is not None}


def test_whole_groups_balanced_by_tokens() -> None:
    """Tokens per group = prompt once + every completion: g0 = 9 + 4 x 4 = 25, g1 = 4 + 6 =
    10, g2 = 12 + 2 = 14, g3 = 6 + 3 x 5 = 21, g4 = 3 + 4 = 7 (samples 0-3, 4, 5-6, 7-9,
    10). Largest first to the lightest rank: g0 -> 0 (25), g3 -> 1 (21), g2 -> 1 (35),
    g1 -> 0 (35), g4 -> 0 (the lower rank at a tie: 42)."""
    samples = _groups([(9, [4] * 4), (4, [6]), (12, [1, 1]), (6, [5] * 3), (3, [4])])
    assert shard_groups(samples, 2) == [[0, 1, 2, 3, 4, 10], [5, 6, 7, 8, 9]]
    assert shard_indices(samples, 1, 2) == [5, 6, 7, 8, 9, None]  # padded to 6
    assert shard_groups(samples, 3) == [[0, 1, 2, 3], [7, 8, 9, 10], [4, 5, 6]]  # 25, 28, 24
    # more ranks than groups: the last rank holds only a padding sample
    assert shard_indices(samples[:4], 1, 2) == [None] * 4
    with pytest.raises(ValueError, match="rank 2 / world size 2"):
        shard_indices(samples, 2, 2)


def test_shard_batch_keeps_advantages_aligned_and_pads() -> None:
    samples = [_sample(i) for i in range(5)]  # distinct prompt ids: 5 groups of one
    for i, s in enumerate(samples):
        s.prompt_ids = [10 + i] * 3
    advs = [0.5, -1.0, 2.0, 0.25, -0.75]
    mine, my_advs = shard_batch(samples, advs, 1, 2)  # equal sizes: 0, 2, 4 | 1, 3
    assert [s.row_id for s in mine[:2]] == [1, 3] and my_advs == [-1.0, 0.25, 0.0]
    assert is_padding(mine[2]) and not any(is_padding(s) for s in mine[:2])
    assert count_real(mine) == 2 and count_real(shard_samples(samples, 0, 2)) == 3
    with pytest.raises(ValueError, match="5 samples but 4 advantages"):
        shard_batch(samples, advs[:4], 0, 2)


def test_padding_adds_no_tokens_and_no_loss() -> None:
    samples = [_sample(0, p=1, c=1)]  # a 2-token sample: padding keeps both as prompt
    pad = shard_samples(samples, 1, 2)[0]
    assert pad.prompt_ids == [10, 50] and pad.completion_ids == []
    mb = collate([pad], [0.0], [-1], pad_id=2)
    assert mb.targets.shape == (1, 1) and mb.num_tokens == 0
    lp = torch.tensor([[-2.0]], requires_grad=True)  # [B, T]
    loss, _ = grpo_loss(
        LossConfig(),
        lp,
        lp.detach(),
        mb.behaviour_logprobs,
        mb.advantages,
        mb.mask,
        total_tokens=7.0,
        total_seqs=3.0,
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(lp.grad.abs().sum()) == 0.0


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device.type) == (0, 1, 0, "cpu")
    assert is_rank0() and info.is_rank0
    assert all_reduce_scalars({"b": 2, "a": 1.5}) == {"a": 1.5, "b": 2.0}
    assert broadcast_object({"x": 1}) == {"x": 1}
    with pytest.raises(ValueError, match="op 'avg'"):
        all_reduce_scalars({"a": 1.0}, op="avg")
    lin = torch.nn.Linear(2, 3)
    sd = full_state_dict_on_rank0(lin)
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight.detach())


def test_bad_torchrun_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match=r"\$RANK = 'zero'"):
        init_distributed("cpu")
