"""The real `grpo-stream learn` under torchrun: 2 gloo processes with FSDP2 on CPU train
the same batches to the same weights as one process (tolerance stated below), and a
2-process run stopped at a checkpoint resumes (weights, sharded AdamW state, scheduler,
cursor) to the same weights as an uninterrupted one. The same holds for a LoRA policy
(its adapter gathered from the shards, the reference its own base with the adapter off)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from bench.synth import make_groups
from grpo_stream.buffer.store import open_writer

pytestmark = pytest.mark.slow

OVERRIDES = [
    "sync.transport=none", "learner.batch_groups=2", "learner.max_steps=2",
    "learner.micro_batch_size=4", "learner.lr=1e-3", "learner.epochs=2",
    "learner.max_staleness=1000", "generator.temperature=1.0", "learner.num_threads=1",
]  # fmt: skip


def _prefill(run_dir: Path, groups: int = 4) -> None:
    run_dir.mkdir()
    w = open_writer(str(run_dir / "buffer"), "arrow", run_id="fsdp")
    w.append_groups(make_groups(groups, group_size=3, prompt_len=6, completion_len=5))
    w.close()


def _weights(run_dir: Path, step: int = 2, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step}" / "model" / f"{name}.safetensors")


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port())]  # fmt: skip


def _batches(d: Path) -> list[list[int]]:
    return [json.loads(x)["group_ids"] for x in (d / "trained_batches.jsonl").open()]


def test_two_process_fsdp_learner_matches_one_process(tmp_path, tiny_model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        _prefill(d)
    args = ["-m", "grpo_stream.cli", "learn", f"model.path={tiny_model_dir}", *OVERRIDES]
    single = subprocess.run([sys.executable, *args, f"run.run_dir={one}"], capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([*_torchrun(), *args, f"run.run_dir={two}"], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert _batches(one) == _batches(two) == [[0, 1], [2, 3]]
    w1, w2 = _weights(one), _weights(two)
    assert set(w1) == set(w2)
    w0 = load_file(Path(tiny_model_dir) / "model.safetensors")
    moved = 0.0
    for k in w1:
        # 4 AdamW steps; float reduction order differs between 1 and 2 processes
        torch.testing.assert_close(w2[k], w1[k], atol=5e-5, rtol=1e-4)
        moved = max(moved, (w1[k] - w0[k]).abs().max().item())
    assert moved > 1e-3  # the weights did train: equality is not trivial

    def metrics(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").open()]

    # logged metrics cover the whole batch (reduced over ranks), not rank 0's half
    for m1, m2 in zip(metrics(one), metrics(two), strict=True):
        for k in ("loss", "pg_loss", "entropy", "ratio_max", "ratio_min", "grad_norm",
                  "approx_kl_proximal", "tokens", "completion_tokens", "reward_mean"):  # fmt: skip
            assert m2[k] == pytest.approx(m1[k], rel=1e-3, abs=1e-6), k
    assert metrics(one)[-1]["ratio_max"] > 1.0  # second step, second epoch: off-policy


def test_two_process_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for d in (whole, split):
        _prefill(d, groups=8)
    # keep_checkpoints=2: the split run's step-2 is read at the end
    args = ["-m", "grpo_stream.cli", "learn", f"model.path={tiny_model_dir}", *OVERRIDES,
            "learner.checkpoint_every=2", "learner.keep_checkpoints=2"]  # fmt: skip

    def learn(run_dir: Path, steps: int, *extra: str) -> None:
        cmd = [*_torchrun(), *args, f"run.run_dir={run_dir}", f"learner.max_steps={steps}"]
        done = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"[learn] finished at step {steps} (last checkpoint: step-{steps})" in done.stderr

    learn(whole, 4)
    learn(split, 2)  # stops after step 2's checkpoint, as a killed run would have left it
    learn(split, 4, "--resume")
    assert _batches(whole) == _batches(split) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    w_whole, w_split, w_mid = _weights(whole, 4), _weights(split, 4), _weights(split, 2)
    for k in w_whole:  # the same processes, the same order of every reduction
        torch.testing.assert_close(w_split[k], w_whole[k], atol=1e-6, rtol=1e-5)
    assert max((w_whole[k] - w_mid[k]).abs().max().item() for k in w_whole) > 1e-3


LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=16", "loss.beta=0.1"]


def test_two_process_lora_matches_one_process_and_resumes(tmp_path, tiny_model_dir):
    """1 process, 2 steps == 2 processes' step 2 (of 4); 2 + resume 2 == 4 uninterrupted.
    beta > 0: every step also runs the adapter-off reference under FSDP."""
    one, whole, split = tmp_path / "one", tmp_path / "whole", tmp_path / "split"
    for d in (one, whole, split):
        _prefill(d, groups=8)
    args = ["-m", "grpo_stream.cli", "learn", f"model.path={tiny_model_dir}", *OVERRIDES,
            *LORA, "learner.checkpoint_every=2", "learner.keep_checkpoints=2"]  # fmt: skip

    def learn(launcher: list[str], run_dir: Path, steps: int, *extra: str) -> None:
        cmd = [*launcher, *args, f"run.run_dir={run_dir}", f"learner.max_steps={steps}"]
        done = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    learn([sys.executable], one, 2)
    learn(_torchrun(), whole, 4)
    learn(_torchrun(), split, 2)
    learn(_torchrun(), split, 4, "--resume")
    assert _batches(whole) == _batches(split) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    saved = sorted(p.name for p in (whole / "checkpoints" / "step-4" / "model").iterdir())
    assert saved == ["adapter_config.json", "adapter_model.safetensors"]  # no base weights
    adapter = "adapter_model"
    w_one, w_mid = _weights(one, 2, adapter), _weights(whole, 2, adapter)
    assert set(w_one) == set(w_mid) and all("lora_" in k for k in w_one)
    for k in w_one:  # reduction order differs between 1 and 2 processes
        torch.testing.assert_close(w_mid[k], w_one[k], atol=5e-5, rtol=1e-4)
    w_whole, w_split = _weights(whole, 4, adapter), _weights(split, 4, adapter)
    for k in w_whole:  # the same processes, the same order of every reduction
        torch.testing.assert_close(w_split[k], w_whole[k], atol=1e-6, rtol=1e-5)
    lora_b = [k for k in w_one if "lora_B" in k]  # zero at the start: any change is a step
    assert max(w_one[k].abs().max().item() for k in lora_b) > 1e-3
    assert max((w_whole[k] - w_mid[k]).abs().max().item() for k in w_whole) > 1e-3
    rows = {d: [json.loads(x) for x in (d / "metrics.jsonl").open()] for d in (one, whole)}
    for m1, m2 in zip(rows[one], rows[whole][:2], strict=True):  # the KL: adapter off
        for k in ("loss", "kl", "grad_norm"):
            assert m2[k] == pytest.approx(m1[k], rel=1e-3, abs=1e-6), k
    assert rows[one][-1]["kl"] > 1e-6  # the adapter moved the policy off the reference
