"""Issue 12, defect 3: a generator started by hand stops by itself when the learner
finishes. Both are the real CLI in subprocesses against a real vLLM CPU server (the
tiny model); nobody signals the generator. Before the fix it waited at the staleness
gate forever ("(waiting for learner)")."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from grpo_stream.buffer.store import open_reader
from grpo_stream.core.progress import read_progress

pytestmark = pytest.mark.slow


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_stream.cli", *args]


def test_hand_started_generator_exits_when_the_learner_finishes(
    tmp_path, tiny_model_dir, tiny_server
) -> None:
    overrides = [
        f"run.run_dir={tmp_path}",
        f'server.urls=["{tiny_server.url}"]',
        f"model.path={tiny_model_dir}",
        "generator.group_size=2",
        "generator.max_tokens=4",
        "generator.max_ahead_batches=1",
        "learner.batch_groups=2",
        "learner.max_steps=1",
        "learner.micro_batch_size=4",
        "sync.transport='none'",
        "task.use_chat_template=false",
        "reward.functions=[{name='length_penalty', kwargs={target=4, limit=8}}]",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gen = subprocess.Popen(
        _cli("generate", *overrides), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        learn = subprocess.run(
            _cli("learn", *overrides), env=env, capture_output=True, text=True, timeout=600
        )
        assert learn.returncode == 0, learn.stdout + learn.stderr
        t_learner_done = time.monotonic()
        out, _ = gen.communicate(timeout=90)  # no signal: it must stop on its own
        waited = time.monotonic() - t_learner_done
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.communicate()
    assert gen.returncode == 0, out
    assert "the learner finished (step 1, 2 groups consumed); stopping" in out
    progress = read_progress(str(tmp_path / "buffer"))
    assert (progress.finished, progress.step, progress.consumed_groups) == (True, 1, 2)
    # the gate held it at 2 batches ahead: 2 consumed + 2 * (1 + 1) allowed at most
    assert 2 <= open_reader(str(tmp_path / "buffer")).num_groups() <= 6
    assert waited < 60
