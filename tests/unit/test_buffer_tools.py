"""Retention/compaction and the `grpo-stream buffer ...` inspection commands."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.synth import make_group, make_groups
from grpo_stream.buffer import GroupCursor, GroupsDeletedError, open_reader, open_writer
from grpo_stream.cli.buffer import run_cli
from grpo_stream.config import BufferConfig


def _arrow_store(path, n=6, per_append=2, **opts):
    w = open_writer(str(path), backend="arrow", run_id="tools", **opts)
    for i in range(0, n, per_append):
        w.append_groups([make_group(i + j, version=(i + j) // 3) for j in range(per_append)])
    return w


def test_writer_retention_deletes_whole_old_segments(tmp_path):
    path = tmp_path / "buf"
    _arrow_store(path, n=10, per_append=2, max_groups=5)
    r = open_reader(str(path))
    assert r.num_groups() == 10  # ids stay global
    assert r.first_group() == 4  # segments [0,2) [2,4) deleted; >= 5 groups kept
    assert [g[0].group_id for g in r.read_groups(4, 10)] == [4, 5, 6, 7, 8, 9]
    with pytest.raises(GroupsDeletedError, match=r"groups \[0, 4\) were deleted"):
        r.read_groups(0, 6)


def test_cursor_behind_retention_skips_forward_and_counts(tmp_path):
    path = tmp_path / "buf"
    w = _arrow_store(path, n=4, per_append=2, max_groups=3)
    cur = GroupCursor(open_reader(str(path)))
    got, _ = cur.next_groups(1, timeout_s=5)
    assert got[0][0].group_id == 0
    for i in range(4, 10, 2):
        w.append_groups(make_groups(2, start=i))
    groups, _ = cur.next_groups(2, timeout_s=5)
    assert [g[0].group_id for g in groups] == [6, 7]
    assert cur.state()["skipped_deleted"] == 5  # groups 1..5 were gone
    assert cur.position == 8


def test_buffer_config_writer_opts():
    cfg = BufferConfig(max_groups=100, fsync=False)
    assert cfg.writer_opts() == {"fsync": False, "max_groups": 100}
    with pytest.raises(ValueError):
        BufferConfig(max_groups=0)


def _chunk_files(path, name):
    d = path / name / "c"
    return sorted(int(p.name) for p in d.iterdir()) if d.is_dir() else []


def _zarr_small(path, **opts):
    # 4 groups of 4 rows per row chunk, ~4 completions per value chunk: retention bites
    return open_writer(str(path), backend="zarr", row_chunk=16, value_chunk=128, **opts)


def test_zarr_retention_by_group_count(tmp_path):
    path = tmp_path / "z"
    w = _zarr_small(path, max_groups=5)
    w.append_groups(make_groups(4))
    r_old = open_reader(str(path), on_corrupt="error")  # saw groups 0..3, before retention
    for i in range(4, 20, 2):
        w.append_groups(make_groups(2, start=i))
    r = open_reader(str(path), on_corrupt="error")
    assert r.num_groups() == 20 and r.first_group() == 15  # ids stay global
    got = r.read_groups(15, 20)
    assert [[s.completion_ids for s in g] for g in got] == [
        [s.completion_ids for s in g] for g in make_groups(5, start=15)
    ]
    with pytest.raises(GroupsDeletedError, match=r"groups \[0, 15\) were deleted"):
        r.read_groups(0, 16)
    # what groups >= 15 need stays on disk; everything wholly before it is gone
    assert _chunk_files(path, "ints") == [3, 4]  # rows 60..79: chunks 3 and 4 (16 rows each)
    assert _chunk_files(path, "group_rows") == [0, 1]  # group 14 (chunk 0) holds 15's start
    kept = _chunk_files(path, "completion_ids")
    assert kept and kept[0] > 0 and kept == list(range(kept[0], kept[-1] + 1))
    # a reader that had not seen the retention gets the same clear error, not "corrupt"
    with pytest.raises(GroupsDeletedError):
        r_old.read_groups(0, 4)
    assert r_old.corrupt() == []


def test_zarr_retention_by_age_and_compact_cli(tmp_path, capsys):
    path = tmp_path / "z"
    w = _zarr_small(path)
    for i in range(12):
        g = make_group(i)
        for s in g:
            s.created_at = 1000.0 + i  # group i created at t = 1000 + i
        w.append_groups([g])
    assert run_cli(["compact", str(path), "--max-age-s", "3.5"]) == 2  # the writer is live
    assert "another writer" in capsys.readouterr().err
    w.max_age_s = 3.5
    w.retain(now=1011.0)  # groups created before t = 1007.5 go: 0..7
    assert open_reader(str(path)).first_group() == 8
    w.close()
    assert run_cli(["compact", str(path), "--keep-groups", "2"]) == 0
    assert "oldest group kept 10" in capsys.readouterr().out
    r = open_reader(str(path), on_corrupt="error")
    assert [g[0].group_id for g in r.read_groups(10, 12)] == [10, 11]
    cur = GroupCursor(r)
    groups, _ = cur.next_groups(1, timeout_s=5)  # a new cursor starts at group 0: skips
    assert groups[0][0].group_id == 10 and cur.state()["skipped_deleted"] == 10


def test_stats_json(tmp_path, capsys):
    run = tmp_path / "run"
    _arrow_store(run / "buffer", n=6)
    assert run_cli(["stats", str(run), "--json"]) == 0  # a run dir resolves to run/buffer
    st = json.loads(capsys.readouterr().out)
    groups = [make_group(i) for i in range(6)]
    rewards = np.float32([s.reward for g in groups for s in g]).astype(np.float64)
    assert st["groups_published"] == 6 and st["rows_readable"] == 24
    assert st["backend"] == "arrow" and st["corrupt"] == []
    assert st["reward"]["mean"] == pytest.approx(rewards.mean())
    assert st["reward"]["max"] == pytest.approx(rewards.max())
    v0 = st["per_version"]["0"]
    lens = [len(s.completion_ids) for g in groups[:3] for s in g]
    assert v0["groups"] == 3 and v0["rows"] == 12
    assert v0["completion_len"]["mean"] == pytest.approx(np.mean(lens))
    assert v0["completion_len"]["max"] == max(lens)


def test_stats_table_lists_corrupt_segments(tmp_path, capsys):
    path = tmp_path / "buf"
    _arrow_store(path, n=4)
    seg = sorted(f for f in os.listdir(path) if f.startswith("seg-"))[0]
    os.truncate(path / seg, 100)
    assert run_cli(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"corrupt: {seg}" in out
    assert "4 published, 2 readable" in out


def test_show_prints_samples(tmp_path, capsys):
    _arrow_store(tmp_path / "buf", n=2)
    assert run_cli(["show", str(tmp_path / "buf"), "-n", "2"]) == 0
    out = capsys.readouterr().out
    s = make_group(0)[1]
    assert "group 0 sample 1 version 0" in out
    assert s.completion_text in out and f"reward {s.reward:.4f}" in out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export(tmp_path, fmt, capsys):
    _arrow_store(tmp_path / "buf", n=4)
    out = tmp_path / f"out.{fmt}"
    assert run_cli(["export", str(tmp_path / "buf"), "--format", fmt, "--out", str(out)]) == 0
    want = [s for i in range(4) for s in make_group(i)]
    if fmt == "parquet":
        rows = pq.read_table(out).to_pylist()
    else:
        rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 16
    assert [r["completion_ids"] for r in rows] == [s.completion_ids for s in want]
    assert rows[3]["group_id"] == 0 and rows[4]["group_id"] == 1


@pytest.mark.parametrize("to", ["zarr", "arrow"])
def test_convert_round_trip(tmp_path, to, capsys):
    src_backend = "arrow" if to == "zarr" else "zarr"
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    open_writer(src, backend=src_backend).append_groups(make_groups(5))
    assert run_cli(["convert", src, "--to", to, "--out", dst, "--groups-per-write", "2"]) == 0
    a, b = open_reader(src), open_reader(dst)
    assert b.meta["backend"] == to
    assert a.read_groups(0, 5) == b.read_groups(0, 5)


def test_compact_cli(tmp_path, capsys):
    path = tmp_path / "buf"
    _arrow_store(path, n=8, rollup_segments=None)  # four 2-group segments
    assert run_cli(["compact", str(path), "--keep-groups", "3"]) == 0
    assert "deleted 2 segment(s)" in capsys.readouterr().out
    r = open_reader(str(path))
    assert r.first_group() == 4 and r.num_groups() == 8
    assert run_cli(["compact", str(path), "--max-age-s", "1e9"]) == 0  # nothing that old
    assert open_reader(str(path)).first_group() == 4


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert run_cli(["stats", str(tmp_path / "nothing")]) == 2
    assert "missing meta.json" in capsys.readouterr().err
    assert run_cli(["compact", str(tmp_path / "nothing")]) == 2
    assert "give --keep-groups and/or --max-age-s" in capsys.readouterr().err
