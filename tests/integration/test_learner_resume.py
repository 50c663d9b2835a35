"""Kill the learner with SIGKILL mid-run and resume: the trained batches and the final
weights equal those of an uninterrupted run (no batch trained twice, none skipped)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.synth import make_groups
from grpo_stream.buffer.store import open_writer

pytestmark = pytest.mark.slow


def _learn(run_dir: Path, tiny: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "grpo_stream.cli", "learn", f"run.run_dir={run_dir}",
        f"model.path={tiny}", "sync.transport=none", "learner.batch_groups=2",
        "learner.max_steps=4", "learner.checkpoint_every=1", "learner.micro_batch_size=4",
        "learner.lr=1e-3", "learner.epochs=2", "generator.temperature=1.0",
        "learner.max_staleness=1000", *extra,
    ]  # fmt: skip


def _prefill(run_dir: Path) -> None:
    w = open_writer(str(run_dir / "buffer"), "arrow", run_id="resume")
    w.append_groups(make_groups(10, group_size=4, prompt_len=6, completion_len=5))
    w.close()


def _batches(run_dir: Path) -> list[list[int]]:
    rows = (run_dir / "trained_batches.jsonl").read_text().splitlines()
    return [json.loads(r)["group_ids"] for r in rows]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        _prefill(d)
    done = subprocess.run(_learn(a, tiny_model_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_learn(b, tiny_model_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (b / "checkpoints" / "step-2").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "learner ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "checkpoints" / "step-4").exists()
    resumed = subprocess.run(_learn(b, tiny_model_dir, "--resume"), capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    assert _batches(a) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert _batches(b) == _batches(a)
    wa = load_file(a / "checkpoints" / "step-4" / "model" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "step-4" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    steps = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
