"""Crash safety, concurrent processes and corrupt data, for both backends (local disk)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from bench.synth import (
    crash_writer_worker,
    make_group,
    make_groups,
    reader_worker,
    writer_worker,
)
from grpo_stream.buffer import CorruptSegmentError, open_reader, open_writer

BACKENDS = ["arrow", "zarr"]
CTX = mp.get_context("spawn")


def _wait_file(path: str, proc, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        assert proc.is_alive(), f"worker died early (exit code {proc.exitcode})"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_writer_and_reader_processes(tmp_path, backend):
    path, out = str(tmp_path / "buf"), str(tmp_path / "seen.txt")
    reader = CTX.Process(target=reader_worker, args=(path, 50, out, 60.0))
    writer = CTX.Process(target=writer_worker, args=(path, backend, 50, 1, 10))
    reader.start()
    writer.start()
    writer.join(90)
    reader.join(90)
    assert writer.exitcode == 0 and reader.exitcode == 0
    lines = open(out).read().split("\n")
    # every group exactly once, in order, whole (4 samples), content as written
    assert lines == [f"{i}:4:1" for i in range(50)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_append_leaves_only_whole_groups(tmp_path, backend):
    path, flag = str(tmp_path / "buf"), str(tmp_path / "frozen")
    proc = CTX.Process(target=crash_writer_worker, args=(path, backend, 5, flag))
    proc.start()
    _wait_file(flag, proc)  # the writer is now frozen halfway through a 20-group append
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    leftovers = [f for _, _, fs in os.walk(path) for f in fs if f.endswith(".tmp")]
    assert leftovers, "the killed writer should have left a partial temporary file"

    r = open_reader(path, on_corrupt="error")
    assert r.num_groups() == 5
    got = r.read_groups(0, 100)
    assert [g[0].group_id for g in got] == [0, 1, 2, 3, 4]
    assert all(len(g) == 4 for g in got)
    assert r.corrupt() == []

    w = open_writer(path, backend=backend, run_id="crash")  # a new writer continues
    assert w.num_groups() == 5
    assert not [f for _, _, fs in os.walk(path) for f in fs if f.endswith(".tmp")]
    assert w.append_groups([make_group(5), make_group(6)]) == (5, 7)
    r.refresh()
    got = r.read_groups(0, 7)
    assert [g[0].group_id for g in got] == list(range(7))
    assert [s.row_id for g in got for s in g] == list(range(28))
    assert got[6][2].completion_ids == make_group(6)[2].completion_ids


def _arrow_segment(path: str, index: int) -> str:
    segs = sorted(f for f in os.listdir(path) if f.startswith("seg-"))
    return os.path.join(path, segs[index])


def _store_with_three_segments(tmp_path):
    path = str(tmp_path / "buf")
    w = open_writer(path, backend="arrow")
    for i in range(3):
        w.append_groups(make_groups(2, start=2 * i))
    return path


def test_arrow_truncated_segment_is_named_and_skipped(tmp_path):
    path = _store_with_three_segments(tmp_path)
    seg = _arrow_segment(path, 1)
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.truncate(size // 2)
    r = open_reader(path, on_corrupt="skip")
    got = r.read_groups(0, 6)
    assert [g[0].group_id for g in got] == [0, 1, 4, 5]
    assert r.corrupt() == [os.path.basename(seg)]
    with pytest.raises(CorruptSegmentError, match=os.path.basename(seg)):
        open_reader(path, on_corrupt="error").read_groups(0, 6)


def test_arrow_garbage_bytes_fail_the_checksum(tmp_path):
    path = _store_with_three_segments(tmp_path)
    seg = _arrow_segment(path, 2)
    want = open_reader(path).read_groups(4, 6)
    raw = bytearray(open(seg, "rb").read())
    # overwrite token-id bytes inside the data region (found by their value)
    needle = np.asarray(want[1][3].completion_ids[:4], np.int32).tobytes()
    at = raw.find(needle)
    assert at > 0
    raw[at : at + 8] = b"\xde\xad\xbe\xef" * 2
    open(seg, "wb").write(bytes(raw))
    r = open_reader(path)
    got = r.read_groups(0, 6)
    assert [g[0].group_id for g in got] == [0, 1, 2, 3]
    assert r.corrupt() == [os.path.basename(seg)]
    assert "CRC-32" in r.corrupt_reasons()[os.path.basename(seg)]
    with pytest.raises(CorruptSegmentError, match=f"{os.path.basename(seg)}.*completion_ids"):
        open_reader(path, on_corrupt="error").read_groups(4, 6)


def test_arrow_stray_tmp_is_ignored_by_readers(tmp_path):
    path = _store_with_three_segments(tmp_path)
    with open(os.path.join(path, ".seg-000000000006-000000000008.arrow.tmp"), "wb") as f:
        f.write(b"ARROW1 half a file")
    r = open_reader(path, on_corrupt="error")
    assert r.num_groups() == 6
    assert len(r.read_groups(0, 10)) == 6


def _zarr_chunk(path: str, array: str, k: int = 0) -> str:
    return os.path.join(path, array, "c", str(k))


def _zarr_store(tmp_path, n=6):
    path = str(tmp_path / "buf")
    # tiny chunks, so one corrupt chunk touches only some groups
    w = open_writer(path, backend="zarr", row_chunk=8, value_chunk=64)
    w.append_groups(make_groups(n))
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete"])
def test_zarr_corrupt_chunk_is_named_and_its_groups_skipped(tmp_path, damage):
    path = _zarr_store(tmp_path)
    chunk = _zarr_chunk(path, "completion_ids", 2)
    if damage == "garbage":
        raw = bytearray(open(chunk, "rb").read())
        raw[len(raw) // 2 : len(raw) // 2 + 6] = b"\x00\xff" * 3
        open(chunk, "wb").write(bytes(raw))
    elif damage == "truncate":
        os.truncate(chunk, os.path.getsize(chunk) - 7)
    else:
        os.unlink(chunk)
    r = open_reader(path)
    got = r.read_groups(0, 6)
    ids = [g[0].group_id for g in got]
    assert 0 < len(ids) < 6  # only the groups whose completions live in chunk 2 are lost
    assert r.corrupt() == [chunk]
    for g in got:  # what is returned is exact
        assert [s.completion_ids for s in g] == [
            s.completion_ids for s in make_group(g[0].group_id)
        ]
    with pytest.raises(CorruptSegmentError, match="completion_ids/c/2"):
        open_reader(path, on_corrupt="error").read_groups(0, 6)


def test_zarr_corrupt_group_index_chunk(tmp_path):
    path = _zarr_store(tmp_path, n=12)
    chunk = _zarr_chunk(path, "ints", 1) + "/0"
    open(chunk, "wb").write(b"not zstd at all")
    r = open_reader(path)
    got = r.read_groups(0, 12)
    assert 0 < len(got) < 12
    assert r.corrupt() == [chunk]
