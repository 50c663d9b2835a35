"""Arrow backend: one sealed Arrow IPC segment file per `append_groups` call.

An IPC file cannot be read before it is closed, so the writer serialises the append,
writes `.seg-F-E.arrow.tmp`, fsyncs, and renames it to `seg-F-E.arrow`, where F..E-1
are the global group ids inside (12-digit, so names sort by number). The name carries
the group range, so readers number groups, skip corrupt segments and survive deleted
ones by listing the directory alone. Each segment's schema metadata holds the schema
version, its group/row range and a checksum per column (CRC-32C; CRC-32 in stores of
schema version 1, which a writer keeps extending in their own format); readers
memory-map local segments (zero copy) and verify each column's checksum the first
time they touch it.

Retention deletes whole old segments; group ids never change, so a reader asking for
deleted groups gets `GroupsDeletedError` (the cursor skips forward and counts them).

Roll-up (arrow_rollup.py): once `rollup_segments` consecutive small segments (each <
`rollup_target_groups` groups) of the same size tier exist, the writer verifies their
checksums, merges them into one `seg-F-E.arrow` over their union (tmp, fsync,
os.replace), then deletes them. With the default 4, appends of 16 groups become
segments of 64, then 256: a store of N groups is read from about N/256 + 6 files, for
each group written about 3 times in all.
Readers prefer a covering segment over the contained originals still listed, keep
reading originals they have mapped, and re-list when one vanishes before they open it.

    w = ArrowWriter("runs/r1/buffer", run_id="r1", max_groups=10_000, rollup_segments=4)
    first, end = w.append_groups(groups)
    r = ArrowReader("runs/r1/buffer"); r.refresh()
    batch = r.read_columns(first, end)       # numpy, for the learner
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Sequence

import pyarrow as pa

from grpo_stream.buffer.arrow_rollup import (  # noqa: F401  (re-exported names)
    READ_ERRORS,
    SEG_META_KEY,
    SEG_RE,
    VERSION_KEY,
    Segment,
    bad_column,
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
from grpo_stream.buffer.columns import (
    CHECKSUM_NAMES,
    LEARNER_COLUMNS,
    RolloutBatch,
    samples_to_table,
    table_to_batch,
    table_to_groups_fast,
)
from grpo_stream.buffer.fsutil import (
    StoreFS,
    WriterLock,
    open_or_create_meta,
    read_meta,
    write_local_atomic,
)
from grpo_stream.buffer.schema import ARROW_SCHEMA, Group, SchemaVersionError
from grpo_stream.buffer.store import CorruptSegmentError, GroupsDeletedError

_OPEN_CACHE = 64  # memory-mapped segments kept open per reader
_GONE_TRIES = 8  # re-listings when a listed segment vanished before it was opened


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
        if max_groups is not None and max_groups < 1:
            raise ValueError("buffer.max_groups: must be >= 1 (or unset)")
        if rollup_segments is not None and rollup_segments < 2:
            raise ValueError("buffer.rollup_segments: must be >= 2 (or unset: no roll-up)")
        if rollup_target_groups < 2:
            raise ValueError("buffer.rollup_target_groups: must be >= 2")
        self.sfs = StoreFS.open(path)
        self._lock = WriterLock(self.sfs)  # before touching anything: one writer per store
        self.meta = open_or_create_meta(self.sfs, "arrow", run_id)
        self.run_id = run_id or self.meta.get("run_id", "")
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
        first, row = self._next_group, self._next_row
        empty = [gi for gi, group in enumerate(groups) if not group]
        if empty:
            raise ValueError(f"append_groups: group {empty[0]} is empty")
        for gi, group in enumerate(groups):
            for s in group:
                s.group_id, s.row_id = first + gi, row
                row += 1
        end = first + len(groups)
        rows = samples_to_table(groups)
        table = seal_table(rows, first, end, self._next_row, self.run_id, time.time(), self.version)
        self._publish(segment_name(first, end), ipc_bytes(table))
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
        if self.sfs.local:
            tmp = self.sfs.join(f".{name}.tmp")
            write_local_atomic(tmp, self.sfs.join(name), memoryview(data), self.fsync)
        else:
            self.sfs.write_atomic(name, data.to_pybytes(), self.fsync)

    def close(self) -> None:
        self._lock.release()


class ArrowReader:
    """Reads published segments; `refresh()` picks up new ones (and notices deletions)."""

    def __init__(self, path: str, on_corrupt: str = "skip") -> None:
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"buffer.on_corrupt: {on_corrupt!r} is not 'skip' or 'error'")
        self.sfs = StoreFS.open(path)
        self.meta = read_meta(self.sfs, expect_backend="arrow")
        self.on_corrupt = on_corrupt
        self._segs: list[Segment] = []
        self._open: OrderedDict[str, tuple[pa.Table, dict]] = OrderedDict()  # + its meta
        self._verified: set[tuple[str, str]] = set()
        self._corrupt: dict[str, str] = {}  # name -> reason
        self.refresh()

    def refresh(self) -> int:
        self._segs = list_segments(self.sfs)
        live = {s.name for s in self._segs}
        for name in [n for n in self._open if n not in live]:
            del self._open[name]
        return self.num_groups()

    def num_groups(self) -> int:
        """Groups ever published (ids are global: deleted/corrupt ones still count)."""
        return self._segs[-1].end if self._segs else 0

    def first_group(self) -> int:
        """Oldest group id still on disk (retention deletes older ones)."""
        return self._segs[0].first if self._segs else 0

    def segments(self) -> list[Segment]:
        return list(self._segs)

    def corrupt(self) -> list[str]:
        return sorted(self._corrupt)

    def corrupt_reasons(self) -> dict[str, str]:
        return dict(self._corrupt)

    def _fail(self, seg: Segment, reason: str) -> None:
        where = self.sfs.join(seg.name)
        self._corrupt[seg.name] = reason
        if self.on_corrupt == "error":
            raise CorruptSegmentError(f"corrupt segment {where}: {reason}")

    def _load(self, seg: Segment, columns: Sequence[str]) -> pa.Table | None:
        """The segment's table with `columns` verified, or None if corrupt (skip mode)."""
        where = self.sfs.join(seg.name)
        if seg.name in self._corrupt:
            self._fail(seg, self._corrupt[seg.name])
            return None
        try:
            opened = self._open.get(seg.name)
            if opened is None:
                table = open_table(self.sfs, seg)
                opened = self._open[seg.name] = (table, segment_meta(table, where, seg))
                while len(self._open) > _OPEN_CACHE:
                    self._open.popitem(last=False)
            self._verify(seg, *opened, columns)
            return opened[0]
        except FileNotFoundError:
            raise _SegmentGone(where) from None
        except SchemaVersionError:
            raise
        except CorruptSegmentError as e:
            reason = str(e)
        except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as e:
            reason = f"{type(e).__name__}: {e}"
        self._open.pop(seg.name, None)
        self._fail(seg, reason)
        return None

    def _verify(self, seg: Segment, table: pa.Table, meta: dict, columns: Sequence[str]) -> None:
        todo = [c for c in columns if (seg.name, c) not in self._verified]
        bad = bad_column(table, todo, meta)
        if bad is not None:
            check = CHECKSUM_NAMES[meta["schema_version"]]
            raise CorruptSegmentError(f"column {bad!r} fails its {check} check")
        self._verified.update((seg.name, c) for c in todo)

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        stop = min(stop, self.num_groups())
        if start < 0 or start > stop:
            raise ValueError(f"read_groups: bad range [{start}, {stop})")
        if start < stop and start < self.first_group():
            raise GroupsDeletedError(
                f"{self.sfs.url}: groups [{start}, {self.first_group()}) were deleted by "
                f"retention; the oldest group on disk is {self.first_group()}"
            )
        return start, stop

    def read_table(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of groups [start, stop) as one (chunked, zero-copy) table; corrupt ones skipped.

        A segment that vanished between listing and opening (merged by a roll-up, or
        deleted by retention) makes it re-list and retry; groups retention deleted
        raise GroupsDeletedError."""
        for _ in range(_GONE_TRIES):
            try:
                return self._read_listed(start, stop, columns)
            except _SegmentGone:
                self.refresh()
        try:
            return self._read_listed(start, stop, columns)
        except _SegmentGone as e:
            raise GroupsDeletedError(f"{e} was deleted while reading") from None

    def _read_listed(self, start: int, stop: int, columns: Sequence[str] | None) -> pa.Table:
        start, stop = self._check_range(start, stop)
        cols = list(columns) if columns else ARROW_SCHEMA.names
        parts = []
        for seg in self._segs:
            if seg.end <= start or seg.first >= stop:
                continue
            table = self._load(seg, cols)
            if table is None:
                continue
            table = table.select(cols)
            if seg.first < start or seg.end > stop:
                gid = table.column("group_id").to_numpy() if "group_id" in cols else None
                table = _slice_groups(table, gid, seg, start, stop)
            parts.append(table)
        if not parts:
            return ARROW_SCHEMA.empty_table().select(cols)
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def read_groups(self, start: int, stop: int) -> list[Group]:
        return table_to_groups_fast(self.read_table(start, stop))

    def read_columns(
        self, start: int, stop: int, columns: Sequence[str] | None = None
    ) -> RolloutBatch:
        """Groups [start, stop) as numpy columns (default: LEARNER_COLUMNS, no strings)."""
        cols = list(dict.fromkeys([*(columns or LEARNER_COLUMNS), "group_id"]))
        return table_to_batch(self.read_table(start, stop, cols), cols)

    def close(self) -> None:
        self._open.clear()


class _SegmentGone(Exception):
    """A listed segment file no longer exists (a roll-up or retention removed it)."""


def _slice_groups(table: pa.Table, gid, seg: Segment, start: int, stop: int) -> pa.Table:
    import numpy as np

    if gid is None:
        raise ValueError("read_table: a partial segment read needs the group_id column")
    lo, hi = np.searchsorted(gid, [max(start, seg.first), stop], side="left")
    return table.slice(int(lo), int(hi - lo))


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
