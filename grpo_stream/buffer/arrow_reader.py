"""Arrow backend, reading side: sealed segments memory-mapped, checksums checked on first use.

The segment format and the writer are in arrow_store.py (roll-up in arrow_rollup.py).
A reader lists the directory to number groups, memory-maps local segments (zero copy)
and verifies each column's checksum the first time it touches it. It prefers a
covering segment over the contained originals a roll-up has not deleted yet, keeps
reading originals it has mapped, and re-lists when one vanishes before it opens it.
Corrupt segments are named and skipped (or raise, with on_corrupt="error").

    r = ArrowReader("runs/r1/buffer"); r.refresh()
    groups = r.read_groups(r.first_group(), r.num_groups())
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from grpo_stream.buffer.arrow_rollup import (
    READ_ERRORS,
    Segment,
    bad_column,
    list_segments,
    open_table,
    segment_meta,
)
from grpo_stream.buffer.base import CorruptSegmentError, GroupsDeletedError, ReaderBase
from grpo_stream.buffer.checksums import CHECKSUM_NAMES
from grpo_stream.buffer.columns import table_to_groups
from grpo_stream.buffer.fsutil import open_store_reader
from grpo_stream.buffer.schema import ARROW_SCHEMA, Group, SchemaVersionError

_OPEN_CACHE = 64  # memory-mapped segments kept open per reader
_GONE_TRIES = 8  # re-listings when a listed segment vanished before it was opened


class ArrowReader(ReaderBase):
    """Reads published segments; `refresh()` picks up new ones (and notices deletions)."""

    def __init__(self, path: str, on_corrupt: str = "skip") -> None:
        self._init_corrupt(on_corrupt)
        self.sfs, self.meta = open_store_reader(path, "arrow")
        self.url = self.sfs.url
        self._segs: list[Segment] = []
        self._open: OrderedDict[str, tuple[pa.Table, dict]] = OrderedDict()  # + its meta
        self._verified: set[tuple[str, str]] = set()
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

    def _fail(self, seg: Segment, reason: str) -> None:
        where = self.sfs.join(seg.name)
        self._mark_corrupt({seg.name: reason}, f"corrupt segment {where}: {reason}")

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
        except READ_ERRORS as e:
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
        return table_to_groups(self.read_table(start, stop))

    def close(self) -> None:
        self._open.clear()


class _SegmentGone(Exception):
    """A listed segment file no longer exists (a roll-up or retention removed it)."""


def _slice_groups(table: pa.Table, gid, seg: Segment, start: int, stop: int) -> pa.Table:
    if gid is None:
        raise ValueError("read_table: a partial segment read needs the group_id column")
    lo, hi = np.searchsorted(gid, [max(start, seg.first), stop], side="left")
    return table.slice(int(lo), int(hi - lo))
