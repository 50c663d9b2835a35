"""Arrow backend, writing side: one sealed Arrow IPC segment file per `append_groups` call.

An IPC file cannot be read before it is closed, so the writer serialises the append,
writes `.seg-F-E.arrow.tmp`, fsyncs, and renames it to `seg-F-E.arrow`, where F..E-1
are the global group ids inside (12-digit, so names sort by number). The name carries
the group range, so readers number groups, skip corrupt segments and survive deleted
ones by listing the directory alone. Each segment's schema metadata holds the schema
version, its group/row range and a checksum per column (CRC-32C; CRC-32 in stores of
schema version 1, which a writer keeps extending in their own format).

Retention (`compact`, after every append when `max_groups`/`max_age_s` is set) deletes
whole old segments; group ids never change, so a reader asking for deleted groups gets
`GroupsDeletedError` (the cursor skips forward and counts them).

Roll-up (arrow_rollup.py): once `rollup_segments` consecutive small segments (each <
`rollup_target_groups` groups) of the same size tier exist, the writer verifies their
checksums, merges them into one `seg-F-E.arrow` over their union (tmp, fsync,
os.replace), then deletes them. With the default 4, appends of 16 groups become
segments of 64, then 256: a store of N groups is read from about N/256 + 6 files, for
each group written about 3 times in all.

    w = ArrowWriter("runs/r1/buffer", run_id="r1", max_groups=10_000, rollup_segments=4)
    first, end = w.append_groups(groups)

The reading side is arrow_reader.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence

import pyarrow as pa

from grpo_stream.buffer.arrow_rollup import (
    READ_ERRORS,
    SEG_META_KEY,
    Segment,
    ipc_bytes,
    list_segments,
    merge_window,
    open_table,
    plan_rollup,
    resolve_covering,
    scan_segments,
    seal_table,
    segment_meta,
    segment_name,
)
from grpo_stream.buffer.base import (
    BufferOptionError,
    CorruptSegmentError,
    check_writer_options,
    number_groups,
)
from grpo_stream.buffer.columns import samples_to_table
from grpo_stream.buffer.fsutil import StoreFS, open_store_writer
from grpo_stream.buffer.schema import Group


class ArrowWriter:
    """The single writer of an Arrow store; reopening a store continues its numbering."""

    def __init__(
        self,
        path: str,
        run_id: str = "",
        fsync: bool = True,
        max_groups: int | None = None,
        max_age_s: float | None = None,
        rollup_segments: int | None = 4,
        rollup_target_groups: int = 256,
    ) -> None:
        check_writer_options(max_groups, max_age_s)
        if rollup_segments is not None and rollup_segments < 2:
            raise BufferOptionError("buffer.rollup_segments: must be >= 2 (or unset: no roll-up)")
        if rollup_target_groups < 2:
            raise BufferOptionError("buffer.rollup_target_groups: must be >= 2")
        h = open_store_writer(path, "arrow", run_id)  # the lock first: one writer per store
        self.sfs, self._lock, self.meta, self.run_id = h.sfs, h.lock, h.meta, h.run_id
        self.version = int(self.meta["schema_version"])  # an older store keeps its format
        self.fsync, self.max_groups, self.max_age_s = fsync, max_groups, max_age_s
        self.rollup_segments, self.rollup_target_groups = rollup_segments, rollup_target_groups
        self._barriers: set[int] = set()  # first ids of segments a roll-up could not read
        for name in self.sfs.listdir():  # a killed writer's half-written segments
            if name.startswith(".seg-") and name.endswith(".tmp"):
                self.sfs.remove(name)
        for seg in resolve_covering(scan_segments(self.sfs, stable=False))[1]:
            self.sfs.remove(seg.name)  # originals a killed roll-up had merged already
        self._next_group, self._next_row = self._resume_point()

    def _resume_point(self) -> tuple[int, int]:
        segs = list_segments(self.sfs)
        if not segs:
            return 0, 0
        for seg in reversed(segs):  # rows continue after the newest readable segment
            try:
                table = open_table(self.sfs, seg)
                meta = segment_meta(table, self.sfs.join(seg.name), seg)
                return segs[-1].end, meta["first_row"] + meta["num_rows"]
            except (*READ_ERRORS, CorruptSegmentError):
                continue
        return segs[-1].end, 0

    def num_groups(self) -> int:
        return self._next_group

    def append_groups(self, groups: Sequence[Group]) -> tuple[int, int]:
        """Publish `groups` as one sealed segment; returns [first, end) group ids."""
        if not groups:
            return self._next_group, self._next_group
        first = self._next_group
        row = number_groups(groups, first, self._next_row)
        end = first + len(groups)
        rows = samples_to_table(groups)
        table = seal_table(rows, first, end, self._next_row, self.run_id, time.time(), self.version)
        data = ipc_bytes(table)
        _fault_hook(self.sfs, segment_name(first, end), first, data)
        self._publish(segment_name(first, end), data)
        self._next_group, self._next_row = end, row
        if self.max_groups is not None or self.max_age_s is not None:
            compact(self.sfs.url, keep_groups=self.max_groups, max_age_s=self.max_age_s)
        if self.rollup_segments is not None:
            self.rollup()
        return first, end

    def rollup(self) -> list[str]:
        """Merge windows of small segments until none is left; returns the new names."""
        made = []
        while True:
            live, _ = resolve_covering(scan_segments(self.sfs, stable=False))
            window = plan_rollup(
                live, self.rollup_segments or 0, self.rollup_target_groups, self._barriers
            )
            if not window:
                return made
            merged, bad = merge_window(self.sfs, window, self.run_id, self.version)
            if merged is None:
                self._barriers.add(bad.first)  # never merged; plan again around it
                continue
            name = segment_name(window[0].first, window[-1].end)
            self._publish(name, ipc_bytes(merged))  # covering segment first ...
            for seg in window:  # ... then the originals (readers skip contained ones)
                self.sfs.remove(seg.name)
            made.append(name)

    def _publish(self, name: str, data: pa.Buffer) -> None:
        self.sfs.write_atomic(name, memoryview(data), self.fsync)  # no copy on local disk

    def close(self) -> None:
        self._lock.release()


FAULT_ENV = "GRPO_STREAM_FAULT"  # fault injection only (tests/faults): "append:kill@N"


def _fault_hook(sfs: StoreFS, name: str, first: int, data: pa.Buffer) -> None:
    """FAULT INJECTION, for tests/faults only: with GRPO_STREAM_FAULT=append:kill@N, the
    append of group N writes half its temporary segment file and SIGKILLs this process,
    as a crash in the middle of an append would. Read nowhere else."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault != f"append:kill@{first}":
        return
    with open(sfs.join(f".{name}.tmp"), "wb") as f:
        f.write(memoryview(data)[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def compact(
    path: str,
    keep_groups: int | None = None,
    max_age_s: float | None = None,
    now: float | None = None,
) -> list[str]:
    """Delete whole old segments: keep >= `keep_groups` newest groups and/or segments
    younger than `max_age_s`. The newest segment is never deleted. Returns deleted names."""
    sfs = StoreFS.open(path)
    segs = list_segments(sfs)
    if not segs:
        return []
    total, now = segs[-1].end, time.time() if now is None else now
    deleted = []
    for seg in segs[:-1]:
        too_many = keep_groups is not None and seg.end <= total - keep_groups
        too_old = max_age_s is not None and now - _segment_time(sfs, seg) > max_age_s
        if not (too_many or too_old):
            break  # segments are in time order: the rest are newer
        sfs.remove(seg.name)
        deleted.append(seg.name)
    return deleted


def _segment_time(sfs: StoreFS, seg: Segment) -> float:
    try:
        table = open_table(sfs, seg)
        return float(json.loads(table.schema.metadata[SEG_META_KEY])["created_at"])
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError):
        info = sfs.fs.info(sfs.join(seg.name))
        t = info.get("mtime") or info.get("created") or 0.0
        return t.timestamp() if hasattr(t, "timestamp") else float(t)
