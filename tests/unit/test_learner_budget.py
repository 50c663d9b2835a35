"""`learner.max_wall_s` (the wall-time budget `grpo-stream sweep` can give each point)
and the learner's peak-memory metric, in-process on a tiny model and a real buffer."""

from __future__ import annotations

import json
from pathlib import Path

from bench.synth import make_groups
from grpo_stream.core import metric_names as M
from grpo_stream.learner.loop import Learner
from tests.unit.test_learner_loop import append, make_config, tiny  # noqa: F401 (fixture)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_wall_budget_stops_after_the_step_that_spends_it(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    append(run, make_groups(8, group_size=4, prompt_len=6, completion_len=6))
    # max_steps 4 is the cap; 1 ms of wall time is spent by the first step
    cfg = make_config(tiny, run, max_steps=4, max_wall_s=0.001, checkpoint_every=0)
    Learner(cfg, str(run), str(tiny)).run()
    rows = _rows(run)
    assert [r[M.STEP] for r in rows] == [1]
    assert (run / "checkpoints" / "step-1").is_dir()  # the last step is checkpointed
    assert rows[0][M.PEAK_MEMORY_MB] > 10.0  # a torch process's peak RSS, in MB

    run2 = tmp_path / "run2"
    run2.mkdir()
    append(run2, make_groups(8, group_size=4, prompt_len=6, completion_len=6))
    cfg = make_config(tiny, run2, max_steps=2, max_wall_s=3600.0, checkpoint_every=0)
    Learner(cfg, str(run2), str(tiny)).run()
    assert [r[M.STEP] for r in _rows(run2)] == [1, 2]  # a budget not spent: max_steps
