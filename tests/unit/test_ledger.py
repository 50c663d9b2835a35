"""The exactly-once ledger (issue 12): records that survive a torn line, the learner's
refusals (another lineage, a version ahead, stale), the join of buffer, trained batches,
drops and generator failures by prompt, the gaps a killed generator leaves and how a
restarted one continues, and the generator's wait for the learner's lineage."""

from __future__ import annotations

import asyncio
import json
import math
import threading

from bench.synth import make_group
from grpo_stream.buffer.cursor import GroupCursor, refusal
from grpo_stream.buffer.store import open_reader, open_writer
from grpo_stream.core import jsonl, run_records
from grpo_stream.core.progress import LearnerProgress, write_progress
from grpo_stream.generator import resume
from grpo_stream.generator.gate import StalenessGate
from grpo_stream.run import ledger
from grpo_stream.tasks.prompt import Prompt


def _prompts(n: int):
    return (Prompt(prompt_id=f"p{i}", text=f"q{i}", answer="") for i in range(n))


def test_a_torn_last_line_is_skipped_and_cut_before_the_next_append(tmp_path) -> None:
    path = str(tmp_path / "x.jsonl")
    jsonl.append(path, [{"a": 1}])
    with open(path, "a") as f:
        f.write('{"a": 2')  # a kill in the middle of a write
    assert jsonl.read(path) == [{"a": 1}]
    jsonl.append(path, [{"a": 3}])
    assert jsonl.read(path) == [{"a": 1}, {"a": 3}]
    assert open(path).read() == '{"a": 1}\n{"a": 3}\n'


def test_lineage_is_stamped_in_the_run_id_and_read_back() -> None:
    assert run_records.stamp("r1", "abc") == "r1@abc"
    assert run_records.stamp("r1", "") == "r1"
    assert run_records.lineage_of("r1@abc") == "abc"
    assert run_records.lineage_of("r1") == ""  # rows from before lineages


def test_the_cursor_refuses_another_lineage_a_version_ahead_and_stale(tmp_path) -> None:
    path = str(tmp_path / "buf")
    w = open_writer(path, run_id="r")
    groups = [
        make_group(0, version=2, run_id="r@mine"),  # fine
        make_group(1, version=2, run_id="r@theirs"),  # another lineage
        make_group(2, version=5, run_id="r@mine"),  # ahead of the learner's 3
        make_group(3, version=0, run_id="r@mine"),  # stale: 3 - 0 > 1
        make_group(4, version=3, run_id="legacy"),  # no lineage: accepted
    ]
    w.append_groups(groups)
    cur = GroupCursor(open_reader(path))
    fresh, stale = cur.next_groups(5, 5, max_staleness=1, current_version=3, lineage="mine")
    assert [g[0].group_id for g in fresh] == [0, 4]
    assert stale == 1
    assert [(g[0].group_id, why) for g, why in cur.last_drops] == [
        (1, "lineage"),
        (2, "ahead"),
        (3, "stale"),
    ]
    assert (cur.skipped_lineage, cur.skipped_ahead, cur.skipped_stale) == (1, 1, 1)
    assert cur.state()["skipped_ahead"] == 1
    # the version at request end counts too: a sync that crossed the request
    g = make_group(5, version=3, run_id="r@mine")
    g[1].policy_version_end = 4
    assert refusal(g, 3, None, "mine") == "ahead"
    # a learner that never versions the servers (sync.transport = "none") refuses none as
    # ahead: a shared server left at another run's version 7 is not "the future"
    assert refusal(g, 3, None, "mine", refuse_ahead=False) == ""
    assert refusal(make_group(6, version=7, run_id="r"), 0, 1000, "mine", False) == ""
    assert refusal(make_group(7, version=0, run_id="r@theirs"), 3, None, "mine", False) == (
        "lineage"
    )


def test_no_weight_sync_means_no_ahead_refusal(tmp_path) -> None:
    """The learner's batch source knows whether it versions the servers."""
    from grpo_stream.config import load_config
    from grpo_stream.learner.source import BatchSource

    path = str(tmp_path / "buf")
    open_writer(path, run_id="r").append_groups([make_group(0, version=7, run_id="r")])
    cfg = load_config(None, ["learner.batch_groups=1", "learner.max_staleness=1000"])
    src = BatchSource(GroupCursor(open_reader(path)), cfg.learner, versions_servers=False)
    assert [g[0].group_id for g in src.next(0).groups] == [0]
    src = BatchSource(GroupCursor(open_reader(path)), cfg.learner, versions_servers=True)
    assert src.next(0).groups == [] and src.cursor.skipped_ahead == 1


def _write_run(tmp_path, n_groups: int, prompt_of=lambda g: f"p{g}"):
    run = tmp_path / "run"
    run.mkdir()
    buf = str(run / "buffer")
    w = open_writer(buf, run_id="run")
    groups = [make_group(g, run_id="run@L") for g in range(n_groups)]
    for gid, g in enumerate(groups):
        for s in g:
            s.prompt_id = prompt_of(gid)
    groups[2][1].reward, groups[2][1].reward_error = math.nan, "slow_fn: timed out after 5s"
    w.append_groups(groups)
    w.close()
    return run, buf


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_prompt_lands_in_exactly_one_state(tmp_path) -> None:
    run, buf = _write_run(tmp_path, 6)
    _jsonl(run / "trained_batches.jsonl", [
        {"step": 1, "group_ids": [0, 1]},
        {"step": 2, "group_ids": [2, 3]},  # 2 is then dropped for its failed reward
    ])  # fmt: skip
    _jsonl(run / "dropped_groups.jsonl", [
        {"group_id": 2, "reason": "reward_failed", "detail": "slow_fn: timed out after 5s"},
        {"group_id": 4, "reason": "stale", "detail": "policy_version 0"},
    ])  # fmt: skip
    run_records.record_failure(str(run), "p7", "prompt p7: 4 attempts failed")
    led = ledger.compute_ledger(str(run), buf, _prompts(20))
    assert led.counts == {"trained": 3, "stale": 1, "reward_failed": 1, "generation_failed": 1,
                          "lineage": 0, "ahead": 0, "corrupt": 0, "zero_variance": 0,
                          "in_buffer": 1}  # fmt: skip
    # p6 was started (p7 after it was) but is nowhere: lost
    assert led.none == ["p6"]
    assert led.multi == {} and led.duplicated_groups == 0
    assert not led.ok
    text = ledger.format_ledger(led)
    assert "no state: p6" in text and "trained 3" in text


def test_a_prompt_trained_twice_or_sampled_twice_is_named(tmp_path) -> None:
    run, buf = _write_run(tmp_path, 4, prompt_of=lambda g: f"p{min(g, 2)}")  # groups 2, 3: p2
    _jsonl(run / "trained_batches.jsonl", [
        {"step": 1, "group_ids": [0, 1]},
        {"step": 2, "group_ids": [1]},  # trained again
    ])  # fmt: skip
    led = ledger.compute_ledger(str(run), buf, _prompts(3))
    assert led.multi["p1"] == ["trained:1", "trained:2"]
    assert led.duplicated_groups == 1  # p2 has two groups
    assert "p2" in led.multi and led.none == []


def test_a_resumed_learner_forgets_the_drops_after_its_checkpoint(tmp_path) -> None:
    rows = [{"group_id": i, "reason": "stale"} for i in (1, 4, 7)]
    _jsonl(tmp_path / "dropped_groups.jsonl", rows)
    run_records.truncate_drops(str(tmp_path), 5)
    assert [r["group_id"] for r in jsonl.read(str(tmp_path / "dropped_groups.jsonl"))] == [
        1,
        4,
    ]


def test_a_restarted_generator_fills_gaps_once_then_continues(tmp_path) -> None:
    run, buf = _write_run(tmp_path, 5, prompt_of=lambda g: f"p{[0, 1, 3, 5, 6][g]}")
    run_records.record_failure(str(run), "p4", "failed")
    started, oldest = resume.started_prompts(buf, str(run))
    assert started == {"p0", "p1", "p3", "p4", "p5", "p6"} and oldest is None
    ids = [p.prompt_id for p in resume.continue_prompts(_prompts(10), started, oldest)]
    assert ids == ["p2", "p7", "p8", "p9"]  # p2 was in flight when it died
    # retention deleted the groups before p3: prompts before it are done
    ids = [p.prompt_id for p in resume.continue_prompts(_prompts(10), {"p3", "p5"}, "p3")]
    assert ids == ["p4", "p6", "p7", "p8", "p9"]


def test_the_generator_waits_for_a_running_learners_lineage(tmp_path) -> None:
    buf = str(tmp_path)
    write_progress(buf, LearnerProgress(consumed_groups=0))  # a learner still pushing
    gate = StalenessGate(buf, allowance=2, poll_s=0.05)

    async def main() -> str:
        await gate.start()
        t = threading.Timer(0.3, write_progress, (buf, LearnerProgress(lineage="abc")))
        t.start()
        try:
            return await asyncio.wait_for(gate.wait_for_lineage(asyncio.Event()), 10)
        finally:
            t.join()

    assert asyncio.run(main()) == "abc"
    assert gate.lineage == "abc"


def test_a_finished_learners_lineage_is_not_taken(tmp_path) -> None:
    buf = str(tmp_path)
    write_progress(buf, LearnerProgress(lineage="old", finished=True))
    gate = StalenessGate(buf, allowance=2, poll_s=0.05)
    stop = asyncio.Event()

    async def main() -> str:
        asyncio.get_running_loop().call_later(0.3, stop.set)
        return await gate.wait_for_lineage(stop)

    assert asyncio.run(main()) == ""
    assert gate.lineage == ""


def test_an_id_the_source_never_yields_does_not_make_later_prompts_lost() -> None:
    # p0, p2 started, p1 in between is lost; "other-7" (another config) is never found:
    # the walk stops at its bound, and the prompts after p2 were never started
    assert ledger._missing(_prompts(10**9), {"p0", "p2", "other-7"}) == ["p1"]
