"""Arrow segment roll-up: merged contents, overlap resolution, concurrent readers, retention."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil

import pyarrow as pa
import pytest

from bench.synth import make_group, reader_worker
from grpo_stream.buffer import GroupsDeletedError, open_reader
from grpo_stream.buffer.arrow_reader import ArrowReader
from grpo_stream.buffer.arrow_rollup import Segment, plan_rollup, resolve_covering, segment_name
from grpo_stream.buffer.arrow_store import ArrowWriter

CTX = mp.get_context("spawn")
ROLLUP = {"rollup_segments": 4, "rollup_target_groups": 16}  # tiers: 1-3, 4-15, >= 16


def _write(path, n, per_append=1, **opts) -> ArrowWriter:
    w = ArrowWriter(str(path), run_id="rollup", fsync=False, **opts)
    for i in range(0, n, per_append):
        w.append_groups([make_group(i + j, version=(i + j) // 5) for j in range(per_append)])
    return w


def _seg_files(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.startswith("seg-") or f.endswith(".tmp"))


def _plain(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata(None).combine_chunks()


def test_rollup_merges_by_tier_and_keeps_contents_exact(tmp_path):
    _write(tmp_path / "plain", 40, rollup_segments=None)
    _write(tmp_path / "rolled", 40, **ROLLUP)
    assert len(_seg_files(tmp_path / "plain")) == 40
    # 4 singles -> [0,4) ... four 4-group segments -> [0,16); the tail: 32-36, 36-40
    ranges = [(0, 16), (16, 32), (32, 36), (36, 40)]
    assert _seg_files(tmp_path / "rolled") == [segment_name(a, b) for a, b in ranges]
    plain = ArrowReader(str(tmp_path / "plain"), on_corrupt="error")
    rolled = ArrowReader(str(tmp_path / "rolled"), on_corrupt="error")  # CRCs must verify
    assert _plain(rolled.read_table(0, 40)).equals(_plain(plain.read_table(0, 40)))
    assert rolled.read_groups(0, 40) == plain.read_groups(0, 40)
    assert rolled.read_groups(13, 18) == plain.read_groups(13, 18)  # across a merged border
    assert rolled.corrupt() == []
    reopened = ArrowWriter(str(tmp_path / "rolled"), fsync=False, **ROLLUP)
    assert reopened.num_groups() == 40
    assert reopened.append_groups([make_group(40)]) == (40, 41)
    assert open_reader(str(tmp_path / "rolled")).read_groups(40, 41)[0][0].row_id == 160


def test_covering_segment_wins_over_contained_originals(tmp_path):
    path = tmp_path / "buf"
    w = _write(path, 8, rollup_segments=None)
    keep = tmp_path / "originals"
    shutil.copytree(path, keep)
    w.rollup_segments, w.rollup_target_groups = 4, 16
    assert w.rollup() == [segment_name(0, 4), segment_name(4, 8)]
    for a in (1, 2, 5):  # the state a reader can list mid-roll-up: merged + some originals
        shutil.copy(keep / segment_name(a, a + 1), path / segment_name(a, a + 1))
    r = ArrowReader(str(path), on_corrupt="error")
    assert [(s.first, s.end) for s in r.segments()] == [(0, 4), (4, 8)]
    assert [g[0].group_id for g in r.read_groups(0, 8)] == list(range(8))
    w.close()
    ArrowWriter(str(path), fsync=False)  # a restarted writer deletes the leftovers
    assert _seg_files(path) == [segment_name(0, 4), segment_name(4, 8)]


def test_resolve_covering_and_plan_on_plain_ranges():
    segs = [Segment(f"s{a}-{b}", a, b) for a, b in [(0, 4), (1, 2), (4, 6), (5, 7), (6, 8)]]
    live, contained = resolve_covering(segs)
    assert [(s.first, s.end) for s in live] == [(0, 4), (4, 6), (6, 8)]
    assert sorted((s.first, s.end) for s in contained) == [(1, 2), (5, 7)]
    ones = [Segment("", i, i + 1) for i in range(5)]
    mixed = [Segment("", 0, 20), *ones[1:], Segment("", 5, 9), Segment("", 9, 10)]
    # the lowest tier merges first; a barrier or a big segment splits runs
    assert [s.first for s in plan_rollup(ones, 4, 16)] == [0, 1, 2, 3]
    assert plan_rollup(ones, 4, 16, barriers={2}) == []
    assert [s.first for s in plan_rollup(mixed[1:], 4, 16)] == [1, 2, 3, 4]
    assert plan_rollup(mixed[:4], 4, 16) == []  # the 20-group segment is not small


def test_reader_survives_a_rollup_between_list_and_open(tmp_path):
    path = tmp_path / "buf"
    w = _write(path, 3, **ROLLUP)
    r = ArrowReader(str(path), on_corrupt="error")
    before = r.read_groups(0, 2)  # maps segments [0,1) and [1,2)
    w.append_groups([make_group(3, version=0)])  # 4 singles: rolled up into [0,4)
    assert _seg_files(path) == [segment_name(0, 4)]
    # no refresh: the mapped originals still read, the unmapped ones are re-listed
    assert r.read_groups(0, 4) == [*before, *open_reader(str(path)).read_groups(2, 4)]
    assert r.refresh() == 4 and [(s.first, s.end) for s in r.segments()] == [(0, 4)]


def test_corrupt_original_is_not_merged(tmp_path):
    path = tmp_path / "buf"
    w = _write(path, 3, **ROLLUP)
    seg = tmp_path / "buf" / segment_name(1, 2)
    table = pa.ipc.open_file(pa.py_buffer(seg.read_bytes())).read_all()
    bad = table.set_column(
        table.schema.get_field_index("reward"), "reward", pa.array([9.0] * 4, pa.float32())
    )
    with pa.OSFile(str(seg), "wb") as f, pa.ipc.new_file(f, bad.schema) as ipc:
        ipc.write_table(bad)  # same metadata (old CRCs), different rewards
    w.append_groups([make_group(3)])
    for i in range(4, 8):
        w.append_groups([make_group(i)])
    # [1,2) is a barrier: [0,1) stays alone, 2..6 are rolled up, 6 and 7 wait
    names = [segment_name(a, b) for a, b in [(0, 1), (1, 2), (2, 6), (6, 7), (7, 8)]]
    assert _seg_files(path) == names
    r = ArrowReader(str(path))
    assert [g[0].group_id for g in r.read_groups(0, 8)] == [0, 2, 3, 4, 5, 6, 7]
    assert r.corrupt() == [segment_name(1, 2)]


def test_retention_after_rollup(tmp_path):
    path = tmp_path / "buf"
    _write(path, 40, max_groups=20, **ROLLUP)
    r = ArrowReader(str(path), on_corrupt="error")
    assert r.num_groups() == 40
    # >= 20 newest groups kept in whole segments: the merged [0,16) went at 36 groups,
    # the merged [16,32) must stay (deleting it would leave 8 < 20)
    assert [(s.first, s.end) for s in r.segments()] == [(16, 32), (32, 36), (36, 40)]
    assert [g[0].group_id for g in r.read_groups(16, 40)] == list(range(16, 40))
    with pytest.raises(GroupsDeletedError, match=r"groups \[0, 16\) were deleted"):
        r.read_groups(0, 20)


def rollup_writer_worker(path: str, n: int) -> None:
    """Append n single groups with an aggressive roll-up (spawned by the test below)."""
    w = ArrowWriter(path, run_id="mp", rollup_segments=3, rollup_target_groups=9)
    for i in range(n):
        w.append_groups([make_group(i, version=i // 10)])


def test_tail_following_reader_process_sees_each_group_once(tmp_path):
    path, out, n = str(tmp_path / "buf"), str(tmp_path / "seen.txt"), 120
    reader = CTX.Process(target=reader_worker, args=(path, n, out, 60.0))
    writer = CTX.Process(target=rollup_writer_worker, args=(path, n))
    reader.start()
    writer.start()
    writer.join(90)
    reader.join(90)
    assert writer.exitcode == 0 and reader.exitcode == 0
    assert open(out).read().split("\n") == [f"{i}:4:1" for i in range(n)]
    # 3 singles -> 3, three 3s -> 9 (final); 120 = 13 * 9 + 3 -> 13 nines and one 3
    assert len(_seg_files(path)) == 14
