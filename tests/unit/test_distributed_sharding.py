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
    full_state_dict_on_rank0,
    init_distributed,
    is_padding,
    is_rank0,
    shard_batch,
    shard_indices,
    shard_samples,
)


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


@pytest.mark.parametrize("n, world", [(8, 2), (5, 2), (7, 3), (2, 4), (1, 1), (9, 4)])
def test_every_sample_once_and_equal_counts(n: int, world: int) -> None:
    shares = [shard_indices(n, r, world) for r in range(world)]
    assert {len(s) for s in shares} == {-(-n // world)}  # ceil(n / W) on every rank
    real = [i for s in shares for i in s if i is not None]
    assert sorted(real) == list(range(n))  # nothing dropped, nothing twice
    assert all(sum(i is None for i in s) <= 1 for s in shares)  # at most one pad per rank


def test_round_robin_assignment() -> None:
    assert shard_indices(5, 0, 2) == [0, 2, 4]
    assert shard_indices(5, 1, 2) == [1, 3, None]
    with pytest.raises(ValueError, match="rank 2 / world size 2"):
        shard_indices(5, 2, 2)


def test_shard_batch_keeps_advantages_aligned_and_pads() -> None:
    samples = [_sample(i) for i in range(5)]
    advs = [0.5, -1.0, 2.0, 0.25, -0.75]
    mine, my_advs = shard_batch(samples, advs, 1, 2)
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
