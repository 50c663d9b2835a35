"""PPO with a critic (loss.advantage = "gae") in the real `grpo-stream learn`: a learner
killed mid-run resumes with the critic's weights and AdamW state, to the same actor and
critic weights as an uninterrupted run, and `replay` from a checkpoint gives the
learner's rows; two FSDP2 gloo processes train the critic (and the actor) as one process,
and resume it (its sharded AdamW state) to the weights of an uninterrupted 2-process run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from bench.synth import make_groups
from grpo_stream.buffer.store import open_writer
from grpo_stream.core import metric_names as M

pytestmark = pytest.mark.slow

GAE = ["loss.advantage=gae", "loss.beta=0.01", "loss.kl_in_reward=0.05", "critic.lr=1e-3",
       "critic.lam=0.9", "critic.value_clip=0.5"]  # fmt: skip
BASE = ["sync.transport=none", "learner.batch_groups=2", "learner.micro_batch_size=4",
        "learner.lr=1e-3", "learner.epochs=2", "generator.temperature=1.0",
        "learner.max_staleness=1000", "learner.num_threads=1", *GAE]  # fmt: skip


def _learn(run_dir: Path, tiny: Path, *extra: str) -> list[str]:
    return ["-m", "grpo_stream.cli", "learn", f"run.run_dir={run_dir}", f"model.path={tiny}",
            *BASE, *extra]  # fmt: skip


def _prefill(run_dir: Path, groups: int, size: int = 4) -> None:
    run_dir.mkdir()
    w = open_writer(str(run_dir / "buffer"), "arrow", run_id="critic")
    w.append_groups(make_groups(groups, group_size=size, prompt_len=6, completion_len=5))
    w.close()


def _weights(run_dir: Path, step: int, part: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step}" / part / "model.safetensors")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sigkill_then_resume_with_the_critic_equals_uninterrupted(tmp_path, tiny_model_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        _prefill(d, groups=8)
    steps = ["learner.max_steps=4", "learner.checkpoint_every=1"]
    _run([sys.executable, *_learn(a, tiny_model_dir, *steps, "learner.keep_checkpoints=4")])
    proc = subprocess.Popen([sys.executable, *_learn(b, tiny_model_dir, *steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    rows = b / "metrics.jsonl"  # its row 2 is written after checkpoint step-2
    while not (rows.is_file() and '"step": 2' in rows.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "learner ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "checkpoints" / "step-4").exists()
    resumed = _run([sys.executable, *_learn(b, tiny_model_dir, *steps, "--resume")])
    assert "resumed from" in resumed.stderr

    for part in ("model", "critic"):
        wa, wb = _weights(a, 4, part), _weights(b, 4, part)
        assert set(wa) == set(wb)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=f"{part}: {k}")
    ca, c2 = _weights(a, 4, "critic"), _weights(a, 2, "critic")
    assert max((ca[k] - c2[k]).abs().max().item() for k in ca) > 1e-4  # the critic trains
    ra, rb = _rows(a / "metrics.jsonl"), _rows(b / "metrics.jsonl")
    assert [r[M.STEP] for r in rb] == [1, 2, 3, 4]
    for r1, r2 in zip(ra, rb, strict=True):
        for k in (M.VALUE_LOSS, M.VALUE_CLIP_FRAC, M.EXPLAINED_VARIANCE, M.LOSS):
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), k

    # replay from step 2 (its critic and both optimizers) gives the learner's rows 3 and 4
    rep = [sys.executable, "-m", "grpo_stream.cli", "replay", str(a), "--checkpoint", "step-2"]
    _run(rep)
    replayed = _rows(a / "replay" / "step-2" / "metrics.jsonl")
    assert [r[M.STEP] for r in replayed] == [3, 4]
    for r1, r2 in zip(ra[2:], replayed, strict=True):
        for k in (M.VALUE_LOSS, M.EXPLAINED_VARIANCE, M.VALUE_MEAN, M.LOSS, M.GRAD_NORM):
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), k


def test_two_process_fsdp_with_the_critic_matches_one_process(tmp_path, tiny_model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        _prefill(d, groups=4, size=3)
    _run([sys.executable, *_learn(one, tiny_model_dir, "learner.max_steps=2")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]  # fmt: skip
    _run([*torchrun, *_learn(two, tiny_model_dir, "learner.max_steps=2")])
    c0 = load_file(Path(tiny_model_dir) / "model.safetensors")
    for part in ("model", "critic"):
        w1, w2 = _weights(one, 2, part), _weights(two, 2, part)
        assert set(w1) == set(w2)
        for k in w1:  # 4 AdamW steps; float reduction order differs between 1 and 2 ranks
            torch.testing.assert_close(w2[k], w1[k], atol=5e-5, rtol=1e-4, msg=f"{part}: {k}")
    critic = _weights(one, 2, "critic")
    assert critic["score.weight"].abs().max() > 1e-4  # the zero head trained
    assert max((critic[k] - c0[k]).abs().max().item() for k in c0 if k in critic) > 1e-4
    for m1, m2 in zip(_rows(one / "metrics.jsonl"), _rows(two / "metrics.jsonl"), strict=True):
        for k in (M.VALUE_LOSS, M.VALUE_CLIP_FRAC, M.EXPLAINED_VARIANCE, M.VALUE_MEAN,
                  M.RETURN_MEAN, M.CRITIC_GRAD_NORM, M.LOSS, M.KL_REF):  # fmt: skip
            assert m2[k] == pytest.approx(m1[k], rel=1e-3, abs=1e-6), k


def test_two_process_resume_with_the_critic_equals_uninterrupted(tmp_path, tiny_model_dir):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for d in (whole, split):
        _prefill(d, groups=6, size=3)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]  # fmt: skip
    every = ["learner.checkpoint_every=2", "learner.keep_checkpoints=2"]

    def learn(run_dir: Path, steps: int, *extra: str) -> None:
        done = _run([*torchrun, *_learn(run_dir, tiny_model_dir, *every,
                                        f"learner.max_steps={steps}", *extra)])  # fmt: skip
        assert f"[learn] finished at step {steps} (last checkpoint: step-{steps})" in done.stderr

    learn(whole, 3)
    learn(split, 2)  # stops after step 2's checkpoint (the critic's sharded AdamW state in it)
    learn(split, 3, "--resume")
    for part in ("model", "critic"):
        a, b = _weights(whole, 3, part), _weights(split, 3, part)
        for k in a:  # the same processes, the same order of every reduction
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=f"{part}: {k}")
    mid = _weights(split, 2, "critic")
    assert max((a[k] - mid[k]).abs().max().item() for k in a) > 1e-5  # step 3 trained it
