"""Why the generator stopped, and what the learner does then (issue 20, defect 6):

- `generator.stop_after_groups` counts the groups in the buffer, so a restarted generator
  (after a crash) does not write another N; the end record says `stop_after_groups`;
- a finite dataset ends the generator with `exhausted`;
- a learner waiting for groups that will not come ends cleanly (checkpointed, progress
  `finished`) instead of timing out.

The generator runs for real against a scripted HTTP server on 127.0.0.1 (fake_vllm):
the fault injected is the restart; what is tested is the generator's own counting.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fake_vllm import CannedServer
from test_generator_client import good_body
from test_learner_loop import append, groups_with, make_config, tiny  # noqa: F401 (fixture)

from grpo_stream.buffer.cursor import GroupCursor, NoMoreGroups
from grpo_stream.buffer.store import open_reader
from grpo_stream.config import ModelConfig, load_config
from grpo_stream.core import generator_end as end
from grpo_stream.core.progress import read_progress
from grpo_stream.generator.loop import Generator
from grpo_stream.learner.loop import Learner
from grpo_stream.serving.model import resolve_model_path


def _generate(rd: Path, *overrides: str, runs: int = 1) -> list[tuple[int, str]]:
    """Run the generator `runs` times in a row (each a fresh one, as after a restart);
    (groups in the buffer, the stop reason) after each."""

    async def main() -> list[tuple[int, str]]:
        async with CannedServer() as srv:
            srv.script["/v1/completions"] = [(200, json.dumps(good_body(2)))]
            srv.script["/weight_info"] = [(200, '{"weight_version": "0"}')]
            cfg = load_config(None, [f"run.run_dir={rd}", f'server.urls=["{srv.url}"]',
                                     "generator.wait_for_learner=false", "generator.group_size=2",
                                     "learner.batch_groups=8", *overrides])  # fmt: skip
            tok = str(resolve_model_path(ModelConfig()))
            out = []
            for _ in range(runs):
                gen = Generator(cfg, str(rd), tok)
                out.append((await gen.run(), gen.stop_reason()))
            return out

    return asyncio.run(main())


def test_stop_after_groups_counts_the_groups_a_restarted_generator_finds(tmp_path) -> None:
    rd = tmp_path / "run"
    got = _generate(rd, "generator.stop_after_groups=3", runs=2)
    assert got == [(3, end.STOP_AFTER_GROUPS), (3, end.STOP_AFTER_GROUPS)]
    r = open_reader(str(rd / "buffer"))
    assert r.num_groups() == 3  # not 3 more after the restart
    rec = end.read_generator_end(str(rd / "buffer"))
    assert (rec.reason, rec.groups, rec.work_done) == (end.STOP_AFTER_GROUPS, 3, True)
    # a raised limit: the next generator adds only the difference
    assert _generate(rd, "generator.stop_after_groups=5") == [(5, end.STOP_AFTER_GROUPS)]


def test_a_finite_dataset_ends_the_generator_as_exhausted(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n"
                            for i in range(4)))  # fmt: skip
    rd = tmp_path / "run"
    task = ["task.name=jsonl", f"task.path={data}", "task.passes=1"]
    assert _generate(rd, *task, runs=2) == [(4, end.EXHAUSTED), (4, end.EXHAUSTED)]
    rec = end.read_generator_end(str(rd / "buffer"))
    assert (rec.reason, rec.groups) == (end.EXHAUSTED, 4)


def test_a_cursor_is_told_when_no_more_groups_will_come(tmp_path) -> None:
    append(tmp_path, groups_with(set(), [0] * 5))
    cur = GroupCursor(open_reader(str(tmp_path / "buffer")), poll_s=0.01)
    final: list[int | None] = [None]
    cur.final_groups = lambda: final[0]
    assert len(cur.next_groups(2, timeout_s=5)[0]) == 2
    with pytest.raises(TimeoutError):  # the generator may still write: a time-out
        cur.next_groups(4, timeout_s=0.1)
    final[0] = 5
    assert len(cur.next_groups(2, timeout_s=5)[0]) == 2
    with pytest.raises(NoMoreGroups, match="finished its work with 5 groups.*1 left after "
                                           "group 4, fewer than 2"):  # fmt: skip
        cur.next_groups(2, timeout_s=600)
    assert cur.position == 4  # the leftover group was not consumed
    final[0] = 7  # a record saying more groups than are visible yet: keep waiting
    with pytest.raises(TimeoutError):
        cur.next_groups(2, timeout_s=0.1)


def test_the_learner_trains_what_is_there_and_ends_cleanly(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0] * 5))
    end.write_generator_end(str(run / "buffer"), end.EXHAUSTED, groups=5)
    cfg = make_config(tiny, run, max_steps=10, max_staleness=100, wait_timeout_s=30.0,
                      checkpoint_every=5)  # fmt: skip
    (run / "config.toml").write_text(cfg.to_toml())
    Learner(cfg, str(run), str(tiny)).run()  # before: a 30 s wait, then TimeoutError
    batches = [json.loads(x) for x in (run / "trained_batches.jsonl").read_text().splitlines()]
    assert [b["group_ids"] for b in batches] == [[0, 1], [2, 3]]
    assert (run / "checkpoints" / "step-2").is_dir()  # the last step is checkpointed
    p = read_progress(str(run / "buffer"))
    assert (p.step, p.consumed_groups, p.finished) == (2, 4, True)
