"""Dynamic sampling (DAPO) with refill: batches hold only groups whose rewards differ.

- half the prompts give zero-variance groups: every batch still holds `batch_groups`
  groups with variance, the flat ones are dropped once each ("zero_variance") and the
  ledger shows them;
- the refill: the source publishes its position while it reads on, and a generator that
  appends only once it sees that (its staleness gate) completes the batch;
- the bound: at `max_refill_batches` × `batch_groups` groups the step trains on what it
  found; with none found it stops with a clear message, the drops recorded first;
- off (the default), a zero-variance group is trained on as before.
"""

from __future__ import annotations

import pytest

from bench.synth import make_group
from grpo_stream.buffer.cursor import GroupCursor
from grpo_stream.buffer.store import open_reader, open_writer
from grpo_stream.config import load_config
from grpo_stream.core import metric_names as M
from grpo_stream.core import run_records
from grpo_stream.core.jsonl import read as read_jsonl
from grpo_stream.core.run_records import FILE_TRAINED
from grpo_stream.learner.loop import Learner
from grpo_stream.learner.source import BatchSource, NoGroupWithVariance, has_variance
from grpo_stream.run.ledger import compute_ledger
from tests.unit import test_learner_loop as loop_helpers

tiny = loop_helpers.tiny  # the module-scoped tiny model fixture
append, make_config = loop_helpers.append, loop_helpers.make_config


def group(gid: int, flat: bool, run_id: str = "r"):
    g = make_group(gid, run_id=run_id)
    if flat:
        for s in g:
            s.reward = 1.0
    return g


def source(path: str, *overrides: str) -> BatchSource:
    cfg = load_config(None, ["learner.max_staleness=1000", "learner.wait_timeout_s=5",
                             *overrides])  # fmt: skip
    return BatchSource(GroupCursor(open_reader(path), poll_s=0.01), cfg.learner, False)


def test_has_variance_by_hand() -> None:
    g = group(0, flat=True)
    assert not has_variance(g)
    g[2].reward = 1.0 + 2e-6
    assert has_variance(g)
    g[2].reward = 1.0 + 5e-7  # within REWARD_TOLERANCE
    assert not has_variance(g)
    g[2].reward = float("nan")  # a failed reward is the step's to drop, not this filter's
    assert has_variance(g)


def test_every_batch_holds_groups_with_variance(tmp_path) -> None:
    path = str(tmp_path / "buf")
    open_writer(path, run_id="r").append_groups([group(i, flat=i % 2 == 0) for i in range(16)])
    src = source(path, "learner.batch_groups=4", "learner.dynamic_sampling=true")
    advances = []
    src.on_advance = lambda: advances.append(src.position)
    first, second = src.next(0), src.next(0)
    assert [g[0].group_id for g in first.groups] == [1, 3, 5, 7]
    assert [g[0].group_id for g in second.groups] == [9, 11, 13, 15]
    assert [(r["group_id"], r["reason"]) for r in first.drops] == [
        (i, "zero_variance") for i in (0, 2, 4, 6)
    ]
    assert first.drops[0]["detail"] == "reward 1 for all 4"
    assert first.info[M.ZERO_VARIANCE_GROUPS_DROPPED] == 4
    assert (first.info[M.CURSOR_START], first.info[M.CURSOR_END]) == (0, 8)
    assert advances == [4, 6, 7, 12, 14, 15]  # after each read that left the batch short
    assert first.error == "" and second.error == ""


def test_the_generator_refills_once_the_learner_publishes(tmp_path) -> None:
    """Only 4 groups exist until the source says it consumed them: then 4 more come."""
    path = str(tmp_path / "buf")
    w = open_writer(path, run_id="r")
    w.append_groups([group(0, True), group(1, False), group(2, True), group(3, False)])
    src = source(path, "learner.batch_groups=4", "learner.dynamic_sampling=true")
    refilled = []

    def generator_gate_opens() -> None:  # what the staleness gate does on new progress
        if not refilled:
            refilled.append(src.position)
            w.append_groups([group(i, flat=i == 5) for i in range(4, 8)])

    src.on_advance = generator_gate_opens
    batch = src.next(0)
    assert refilled == [4]
    assert [g[0].group_id for g in batch.groups] == [1, 3, 4, 6]
    assert sorted(r["group_id"] for r in batch.drops) == [0, 2, 5]
    assert batch.info[M.CURSOR_END] == 7


def test_the_bound_trains_on_what_it_found_then_stops_with_a_message(tmp_path, capsys) -> None:
    path = str(tmp_path / "buf")
    open_writer(path, run_id="r").append_groups(
        [group(i, flat=i != 3) for i in range(8)] + [group(i, True) for i in range(8, 16)]
    )
    src = source(path, "learner.batch_groups=4", "learner.dynamic_sampling=true",
                 "learner.max_refill_batches=2")  # fmt: skip
    short = src.next(0)
    assert [g[0].group_id for g in short.groups] == [3] and short.error == ""
    assert short.info[M.CURSOR_END] == 8  # 2 x 4 groups read, no more
    assert "1 of 4 groups with reward variance after reading 8 groups" in capsys.readouterr().err
    empty = src.next(0)
    assert empty.groups == [] and len(empty.drops) == 8
    assert "none of 8 groups in a row had rewards that differ" in empty.error
    assert "learner.dynamic_sampling = false" in empty.error


def test_off_keeps_zero_variance_groups(tmp_path) -> None:
    path = str(tmp_path / "buf")
    open_writer(path, run_id="r").append_groups([group(i, flat=i % 2 == 0) for i in range(4)])
    batch = source(path, "learner.batch_groups=4").next(0)
    assert [g[0].group_id for g in batch.groups] == [0, 1, 2, 3] and batch.drops == []


def test_the_learner_trains_only_groups_with_variance_and_the_ledger_counts_the_rest(
    tiny, tmp_path
) -> None:
    run = tmp_path / "run"
    cfg = make_config(tiny, run, max_steps=2, batch_groups=2, dynamic_sampling=True)
    append(run, [group(i, flat=i % 2 == 0, run_id="loop-test") for i in range(8)])
    Learner(cfg, str(run), str(tiny)).run()
    trained = [r["group_ids"] for r in read_jsonl(str(run / FILE_TRAINED))]
    assert trained == [[1, 3], [5, 7]]
    led = compute_ledger(str(run), str(run / "buffer"))
    assert led.counts["zero_variance"] == 4 and led.counts["trained"] == 4
    assert led.multi == {} and led.ok


def test_the_learner_stops_on_a_task_with_no_variance(tiny, tmp_path) -> None:
    run = tmp_path / "run"
    cfg = make_config(tiny, run, max_steps=2, batch_groups=2, dynamic_sampling=True,
                      max_refill_batches=2)  # fmt: skip
    append(run, [group(i, flat=True, run_id="loop-test") for i in range(6)])
    with pytest.raises(NoGroupWithVariance, match="none of 4 groups in a row"):
        Learner(cfg, str(run), str(tiny)).run()
    drops = read_jsonl(str(run / run_records.FILE_DROPS))
    assert [(d["group_id"], d["reason"]) for d in drops] == [(i, "zero_variance") for i in range(4)]


def test_a_refill_past_the_generators_end_leaves_its_part_in_the_buffer(tmp_path) -> None:
    """The generator finished with 4 groups, 2 of them flat: the refill cannot complete,
    and the 2 groups with variance it read are not consumed (a short last batch)."""
    from grpo_stream.buffer.cursor import NoMoreGroups

    path = str(tmp_path / "buf")
    open_writer(path, run_id="r").append_groups([group(i, flat=i < 2) for i in range(4)])
    src = source(path, "learner.batch_groups=4", "learner.dynamic_sampling=true")
    src.cursor.final_groups = lambda: 4
    with pytest.raises(NoMoreGroups):
        src.next(0)
    assert src.position == 0 and src.cursor.state()["position"] == 0
