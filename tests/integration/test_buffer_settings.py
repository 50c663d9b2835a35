"""Issue 10, defect 1: the `buffer.*` settings reach the buffer in a real run.

The real `grpo-stream generate` (against a real vLLM CPU server on the tiny model) and
`grpo-stream learn` processes, with non-default buffer settings, and what each one did
on disk:

- `buffer.rollup_segments = 0` (no roll-up): every one-group append stays its own
  segment (the default, 4, would merge four of them into one);
- `buffer.max_groups = 4` (retention): the generator deleted the old segments, so the
  store holds exactly the newest 4 of its 10 groups, and the learner's first batch is
  the oldest kept one;
- `buffer.on_corrupt = "error"`: the learner stops at a torn segment, naming it (the
  default, "skip", would skip it and train on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grpo_stream.buffer.store import open_reader

pytestmark = pytest.mark.slow

GROUPS = 10
KEEP = 4


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_stream.cli", *args]


def test_buffer_settings_take_effect_in_generate_and_learn(
    tmp_path, tiny_model_dir, tiny_server
) -> None:
    common = [
        f"run.run_dir={tmp_path}",
        f'server.urls=["{tiny_server.url}"]',
        f"model.path={tiny_model_dir}",
        "buffer.max_groups=4",
        "buffer.rollup_segments=0",
        "buffer.fsync=false",
        "buffer.on_corrupt='error'",
        "buffer.poll_s=0.05",
        "learner.batch_groups=2",
        "learner.max_staleness=1000",
        "sync.transport='none'",
    ]
    generate = [
        *common,
        f"generator.stop_after_groups={GROUPS}",
        "generator.groups_per_write=1",
        "generator.max_ahead_batches=10",  # no learner runs meanwhile: room for all 10
        "generator.wait_for_learner=false",  # ... nor is one waited for
        "generator.group_size=2",
        "generator.max_tokens=4",
        "task.use_chat_template=false",
        "reward.functions=[{name='length_penalty', kwargs={target=4, limit=8}}]",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gen = subprocess.run(_cli("generate", *generate), env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert gen.returncode == 0, gen.stdout + gen.stderr

    store = tmp_path / "buffer"
    reader = open_reader(str(store))
    assert reader.num_groups() == GROUPS
    assert reader.first_group() == GROUPS - KEEP  # retention deleted groups 0..5
    segs = sorted(p.name for p in store.rglob("seg-*.arrow"))
    ranges = [tuple(int(x) for x in name[4:-6].split("-")) for name in segs]
    assert ranges == [(g, g + 1) for g in range(GROUPS - KEEP, GROUPS)]  # none rolled up

    torn = next(p for p in store.rglob("seg-*.arrow") if p.name == segs[2])  # groups 8..9
    torn.write_bytes(torn.read_bytes()[:100])
    learn = subprocess.run(
        _cli("learn", *common, "learner.max_steps=3", "learner.micro_batch_size=4"),
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert learn.returncode != 0, learn.stdout + learn.stderr
    assert segs[2] in learn.stderr, learn.stderr[-3000:]
    assert "Traceback" not in learn.stderr  # a user error: one line naming the segment
    rows = (tmp_path / "trained_batches.jsonl").read_text().splitlines()
    assert [json.loads(r)["group_ids"] for r in rows] == [[6, 7]]  # then the torn one
