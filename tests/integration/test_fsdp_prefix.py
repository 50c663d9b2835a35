"""Integration: the shared-prefix forward under FSDP2 (2 gloo processes) == 1 padded process.

The test starts `torchrun --nproc-per-node 2` on THIS file (the `__main__` block is the
per-rank worker). Each rank runs the real `StepRunner` with learner.shared_prefix = true
on its shard of 11 samples in 5 groups (whole groups balanced by tokens: rank 0 groups 0
and 1, 35 tokens, 5 samples and a padding one; rank 1 groups 2-4, 41 tokens, 6 samples;
2 micro-batches of at most 4 each): two learner steps of two clipped epochs each,
AdamW. Step 1 runs the packed groups (one forward of prompt + completions per row, the
grouped attention mask); step 2 the KV-cache path (learner.pack_mask_mib = 0), where
every decoder layer runs twice per forward (the prompt pass, then the completion pass on
its KV cache), so FSDP2 all-gathers and reduce-scatters each layer twice. The gradient
must still be the single process's. Checked: both ranks used the shared layout in the
expected form, and after each step the metrics, after both the gathered weights, equal
one process's two steps on the padded layout (fp32). Also: the ranks agree on packing
(a rank whose groups do not fit makes the other rank use the KV cache too), and
learner.completion_passes splits completions by length alone but never under FSDP.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.synth import ragged_samples
from grpo_stream.buffer.schema import Sample
from grpo_stream.config import Config

ROOT = Path(__file__).resolve().parents[2]
VOCAB, PAD = 49152, 2
SHAPES = [(9, [5, 1, 7, 3]), (4, [6]), (12, [1, 1]), (6, [2, 8, 4]), (3, [4])]


def batch() -> tuple[list[Sample], list[float]]:
    return ragged_samples(SHAPES, 3, "fsdp-prefix", VOCAB)


def config(shared: bool) -> Config:
    cfg = Config()
    cfg.generator.temperature = 0.7
    cfg.loss.epsilon_low = cfg.loss.epsilon_high = 0.01
    lc = cfg.learner
    lc.shared_prefix, lc.epochs, lc.lr, lc.micro_batch_size, lc.logprob_chunk_size = (
        shared,
        2,
        1e-4,
        4,
        64,
    )
    return cfg


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, rope_theta=100000.0,
        pad_token_id=PAD, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def _worker(out: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from grpo_stream.learner import distributed as D
    from grpo_stream.learner import gather as G
    from grpo_stream.learner.optim import build_optimizer
    from grpo_stream.learner.plan import plan_micro_batches
    from grpo_stream.learner.step import StepRunner

    info = D.init_distributed("cpu")
    policy = D.shard_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), info
    )
    cfg = config(shared=True)
    opt, sched = build_optimizer(policy, cfg.learner)
    runner = StepRunner(cfg, policy, None, opt, sched, info.device, pad_id=PAD, world=2)
    samples, advs = batch()
    mine, my_advs = D.shard_batch(samples, advs, info.rank, info.world_size)
    lc = cfg.learner
    mbs = plan_micro_batches(mine, my_advs, lc, PAD, policy, info.world_size)
    layouts = D.all_reduce_scalars(
        {
            "shared": float(all(mb.prefix for mb in mbs)),
            "packed": float(all(mb.prefix.packed for mb in mbs)),
        },
        "min",
    )
    layouts |= _split_and_vote(lc, policy, info)
    random.seed(0)
    metrics = [runner.run(mine, my_advs)]  # step 1: packed groups
    lc.pack_mask_mib = 0.0
    mbs = plan_micro_batches(mine, my_advs, lc, PAD, policy, info.world_size)
    layouts["cached"] = float(all(mb.prefix and mb.prefix.packed is None for mb in mbs))
    random.seed(1)
    metrics.append(runner.run(mine, my_advs))  # step 2: the KV cache
    params = G.full_state_dict_on_rank0(policy)
    if info.is_rank0:
        torch.save({"params": params, "metrics": metrics, "layouts": layouts}, out / "rank0.pt")


def _split_and_vote(lc, policy, info) -> dict[str, float]:
    """learner.completion_passes (4) splits a shard's completions by length in one process,
    never under FSDP (every rank must make the same model calls): a group of 2- and
    30-token completions, each rank's shard in one micro-batch, on the KV cache. And when
    one rank's groups may not be packed (its pack_mask_mib is 0), no rank packs."""
    from grpo_stream.learner import distributed as D
    from grpo_stream.learner.plan import plan_micro_batches

    tail, tail_advs = D.shard_batch(*ragged_samples([(5, [2, 2, 30, 30] * 2)], 4, "tail", VOCAB),
                                    info.rank, info.world_size)  # fmt: skip
    cached = lc.model_copy(update={"pack_mask_mib": 0.0})
    alone = plan_micro_batches(tail, tail_advs, cached, PAD, policy, 1)
    fsdp = plan_micro_batches(tail, tail_advs, cached, PAD, policy, info.world_size)
    out = {"split_alone": float(any(mb.prefix.chunks for mb in alone)),
           "split_fsdp": float(any(mb.prefix.chunks for mb in fsdp))}  # fmt: skip
    mine = lc if info.rank == 0 else cached
    out["packed_alone"] = float(plan_micro_batches(tail, tail_advs, mine, PAD, policy, 1)[0]
                                .prefix.packed is not None)  # fmt: skip
    voted = plan_micro_batches(tail, tail_advs, mine, PAD, policy, info.world_size)
    out["packed_voted"] = float(any(mb.prefix.packed is not None for mb in voted))
    return D.all_reduce_scalars(out, "max")


def _reference(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from grpo_stream.learner.optim import build_optimizer
    from grpo_stream.learner.step import StepRunner

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    cfg = config(shared=False)
    opt, sched = build_optimizer(model, cfg.learner)
    runner = StepRunner(cfg, model, None, opt, sched, torch.device("cpu"), pad_id=PAD)
    metrics = []
    for step in range(2):
        random.seed(step)
        metrics.append(runner.run(*batch()))
    return {"params": model.state_dict(), "metrics": metrics}


@pytest.mark.slow
def test_two_rank_fsdp_shared_prefix_equals_one_padded_process(tmp_path: Path) -> None:
    from test_fsdp_parity import _free_port

    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           __file__, str(tmp_path), str(model_dir)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _reference(model_dir)
    finally:
        torch.set_num_threads(threads)
    lay = got["layouts"]
    assert lay["shared"] == lay["packed"] == lay["cached"] == 1.0
    assert lay["split_alone"] == 1.0 and lay["split_fsdp"] == 0.0
    assert lay["packed_alone"] == 1.0 and lay["packed_voted"] == 0.0
    # ("tokens" differs by design: it counts the padding sample's 2 prompt tokens)
    for step, (mine, want) in enumerate(zip(got["metrics"], ref["metrics"], strict=True)):
        for k in ("loss", "grad_norm", "clip_low_frac", "clip_high_frac", "entropy"):
            assert mine[k] == pytest.approx(want[k], rel=1e-5, abs=1e-9), (step, k)
        assert want["clip_low_frac"] + want["clip_high_frac"] > 0
    for k, w in ref["params"].items():  # AdamW: an absolute bound, see test_learner_prefix
        torch.testing.assert_close(
            got["params"][k], w, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
        )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
