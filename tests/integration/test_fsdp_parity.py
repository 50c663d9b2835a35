"""Integration: 2-process FSDP2 (gloo, CPU) == 1 process, for one GRPO optimizer step.

The test starts `torchrun --nproc-per-node 2` on THIS file (the `__main__` block is the
per-rank worker), so `init_distributed()` reads the real torchrun environment. Both sides
train a tiny random Llama (SmolLM2 tokenizer) on the same 5 synthetic samples through the
real code path: `collate` → `sequence_logprobs` (via `ShardedPolicy` on the FSDP side) →
`grpo_loss` with batch-global normalisers → `clip_grad_norm` → one AdamW step. Five samples
over two ranks exercise the padding sample (rank 0 gets 2 real + 1 padding), and the
sequence-mean aggregation exercises `count_real` (padding must not count in total_seqs).
A proximal policy different from the current one makes the PPO clip act.

Checked (fp32): summed rank losses == single-process loss (rel 1e-5); gradients, updated
parameters (full state dict gathered on rank 0, and again after a `save_pretrained` round
trip) and AdamW's exp_avg state equal the single-process ones (rel 1e-5 of each tensor's
scale; see `_close`).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_stream.algo import grpo_loss
from grpo_stream.buffer.schema import Sample
from grpo_stream.config import LossConfig, ModelConfig
from grpo_stream.learner.batch import collate
from grpo_stream.learner.distributed import count_real
from grpo_stream.learner.policy import sequence_logprobs
from grpo_stream.serving.model import build_tiny_model, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
LR, MAX_NORM, MICRO, TEMPERATURE, CHUNK = 1e-3, 0.5, 2, 0.9, 4096
RTOL = 1e-5  # fp32, relative to each tensor's largest magnitude
LOSS_CFG = LossConfig(aggregation="seq_mean_token_mean", epsilon_low=0.1, epsilon_high=0.1)


def synthetic_batch(vocab: int = 49152) -> tuple[list[Sample], list[float]]:
    """5 samples with ragged prompts/completions, random tokens and behaviour log-probs."""
    rng = random.Random(7)
    samples, advs = [], []
    for i, (p, c) in enumerate([(5, 7), (3, 11), (8, 4), (4, 9), (6, 6)]):
        samples.append(
            Sample(
                run_id="parity",
                prompt_id=f"p{i // 2}",
                sample_index=i % 2,
                policy_version=0,
                prompt_ids=[rng.randrange(3, vocab) for _ in range(p)],
                completion_ids=[rng.randrange(3, vocab) for _ in range(c)],
                behaviour_logprobs=[-rng.uniform(9.0, 12.0) for _ in range(c)],
                reward=float(i % 2),
                row_id=i,
            )
        )
        advs.append([1.2, -0.7, 0.4, -1.5, 0.9][i])
    return samples, advs


def proximal(lp: torch.Tensor, mb) -> torch.Tensor:
    """A fixed per-(sample, position) offset from the current log-probs: ratio != 1."""
    t = torch.arange(lp.shape[1], dtype=torch.float32)  # [T]
    return lp.detach() + 0.3 * torch.sin(1.3 * mb.index.float()[:, None] + 0.7 * t)  # [B, T]


def micro_batches(samples, advs, index):
    return [
        collate(samples[k : k + MICRO], advs[k : k + MICRO], index[k : k + MICRO], pad_id=2)
        for k in range(0, len(samples), MICRO)
    ]


def train_step(logprob_fn, mbs, total_tokens: float, total_seqs: float) -> float:
    """Σ micro-batch losses (this process's share), with backward on each."""
    loss_sum = 0.0
    for mb in mbs:
        lp, _ = logprob_fn(mb)  # [B, T]
        loss, _ = grpo_loss(
            LOSS_CFG,
            lp.float(),
            proximal(lp, mb),
            mb.behaviour_logprobs,
            mb.advantages,
            mb.mask,
            total_tokens=total_tokens,
            total_seqs=total_seqs,
        )
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale + 1e-12, msg=what)


# ---------------------------------------------------------------- the per-rank worker
def _worker(out: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from grpo_stream.learner import distributed as D
    from grpo_stream.learner import gather as G

    torch.manual_seed(0)
    info = D.init_distributed("cpu")
    assert info.world_size == 2 and dist_backend() == "gloo", (info, dist_backend())
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = D.shard_model(hf, info)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.99))
    samples, advs = synthetic_batch()
    mine, my_advs = D.shard_batch(samples, advs, info.rank, info.world_size)
    index = [s.row_id for s in mine]
    mbs = micro_batches(mine, my_advs, index)
    tot = D.all_reduce_scalars(
        {"tokens": sum(mb.num_tokens for mb in mbs), "seqs": count_real(mine)}
    )
    local = train_step(lambda mb: policy(mb, TEMPERATURE, CHUNK), mbs, tot["tokens"], tot["seqs"])
    loss = D.all_reduce_scalars({"loss": local})["loss"]
    grads = {n: p.grad.full_tensor() for n, p in D.unwrap(policy).named_parameters()}
    grad_norm = D.clip_grad_norm(policy.parameters(), MAX_NORM)
    opt.step()
    params = G.full_state_dict_on_rank0(policy)
    optim = G.full_optimizer_state_dict_on_rank0(policy, opt)
    try:  # ranks passing different keys must fail loudly, not add unrelated numbers
        D.all_reduce_scalars({"a" if info.rank == 0 else "b": 1.0})
        mismatch_raised = False
    except RuntimeError:
        mismatch_raised = True
    if info.is_rank0:
        D.unwrap(policy).save_pretrained(out / "saved", state_dict=params)
        exp_avg = {k: v["exp_avg"] for k, v in optim["state"].items()}
        torch.save(
            {
                "loss": loss,
                "grads": grads,
                "params": params,
                "grad_norm": grad_norm,
                "totals": tot,
                "n_local": len(mine),
                "exp_avg": exp_avg,
                "mismatch_raised": mismatch_raised,
            },
            out / "rank0.pt",
        )


def dist_backend() -> str:
    import torch.distributed as dist

    return dist.get_backend()


# ---------------------------------------------------------------- the test


def _free_port() -> int:
    for port in range(29500, 29510):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 29500-29509 for the torchrun rendezvous")


def _reference(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from grpo_stream.learner.distributed import clip_grad_norm

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99))
    samples, advs = synthetic_batch()
    mbs = micro_batches(samples, advs, [s.row_id for s in samples])
    tokens = float(sum(mb.num_tokens for mb in mbs))
    loss = train_step(
        lambda mb: sequence_logprobs(model, mb, TEMPERATURE, CHUNK),
        mbs,
        tokens,
        float(len(samples)),
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grad_norm = clip_grad_norm(model.parameters(), MAX_NORM)
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    exp_avg = {names[id(p)]: s["exp_avg"] for p, s in opt.state.items()}
    return {
        "loss": loss,
        "grads": grads,
        "params": model.state_dict(),
        "grad_norm": grad_norm,
        "tokens": tokens,
        "exp_avg": exp_avg,
    }


@pytest.mark.slow
def test_two_rank_fsdp_step_equals_single_process(tmp_path: Path) -> None:
    tok_dir = resolve_model_path(ModelConfig())
    model_dir = build_tiny_model(tmp_path / "tiny", tok_dir, num_layers=2, hidden=64, heads=2)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        __file__,
        str(tmp_path),
        str(model_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order as the single-threaded ranks
    try:
        ref = _reference(model_dir)
    finally:
        torch.set_num_threads(threads)

    assert got["mismatch_raised"]
    assert got["n_local"] == 3  # whole groups by tokens: rank 0 holds 1, 2 and a padding one
    assert got["totals"] == {"tokens": ref["tokens"], "seqs": 5.0}  # padding not counted
    assert abs(got["loss"] - ref["loss"]) <= RTOL * abs(ref["loss"]), (got["loss"], ref["loss"])
    assert abs(got["grad_norm"] - ref["grad_norm"]) <= RTOL * ref["grad_norm"]
    assert ref["grad_norm"] > MAX_NORM  # the clip acted, on both sides alike
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        _close(got["grads"][name], g, f"grad {name}")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    saved_sd = saved.state_dict()
    before = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    for name, p in ref["params"].items():
        assert not torch.equal(p, before[name]) or name.endswith("rotary_emb.inv_freq"), name
        _close(got["params"][name], p, f"param {name}")
        _close(saved_sd[name], p, f"saved param {name}")
    for name, m in ref["exp_avg"].items():
        _close(got["exp_avg"]["module." + name], m, f"exp_avg {name}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
    import torch.distributed as dist

    dist.destroy_process_group()
    sys.exit(0)
