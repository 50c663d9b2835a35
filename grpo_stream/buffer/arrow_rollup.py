"""Arrow segment files: names, listing, sealing, and the roll-up of small segments.

A segment is `seg-F-E.arrow` holding groups F..E-1 (12-digit ids, so names sort by
number); its schema metadata holds the schema version, its group/row range and a
checksum per column (`seal_table`: CRC-32C, or CRC-32 in version-1 stores).
arrow_store.py (the writer) and arrow_reader.py (the reader) build on these.

The writer publishes one segment per append, so a long run makes thousands of tiny
files and every read pays a per-file open. A roll-up merges `min_segments` consecutive
small segments (each < `target_groups` groups) into one `seg-F-E.arrow` covering their
union, published atomically, and only then deletes the originals. Between the publish
and the last delete, a directory listing can hold the merged segment *and* some
originals; `resolve_covering` keeps the covering segment and drops the contained ones.

Merges are size-tiered so each group is rewritten about log_N(target) times, not once
per roll-up: tier(size) = floor(log_N(size)), and the lowest tier with N consecutive
segments (lower tiers may sit inside the window, not at its end, where they are
still filling up their own tier) is merged first. With N=16 and a
target of 256: sixteen 1-group appends make a 16-group segment (tier 1), sixteen of
those a 256-group one, which is never merged again.

    live, contained = resolve_covering(segs)            # segs: objects with .first/.end
    window = plan_rollup(live, min_segments=16, target_groups=256)
    if window: merge window[0].first .. window[-1].end, publish, delete window

Directory listings race with the writer (POSIX leaves entries added or removed during
a scan unspecified), so `stable_listing` lists until a scan holds every name of the
scan before it: the writer publishes the merged segment before deleting any original,
so when nothing vanished between two scans, an original missing from the second was
deleted before it began, after its covering segment was published, and that segment
is in the second scan.
"""

from __future__ import annotations

import json
import mmap
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import pyarrow as pa

from grpo_stream.buffer.base import CorruptSegmentError
from grpo_stream.buffer.checksums import column_crc, table_crcs
from grpo_stream.buffer.columns import fill_optional
from grpo_stream.buffer.fsutil import StoreFS
from grpo_stream.buffer.schema import (
    ARROW_SCHEMA,
    OPTIONAL_COLUMNS,
    SCHEMA_VERSION,
    check_schema_version,
)


class _Span(Protocol):
    first: int
    end: int


S = TypeVar("S", bound=_Span)

STABLE_TRIES = 20  # listings before we accept an unstable one (a writer that never pauses)
SEG_RE = re.compile(r"^seg-(\d{12})-(\d{12})\.arrow$")
SEG_META_KEY = b"grpo_stream_segment"
VERSION_KEY = b"grpo_stream_schema_version"
GAP_TRIES = 3  # re-listings when segments are not contiguous (a listing raced a roll-up)
READ_ERRORS = (OSError, pa.ArrowException, ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class Segment:
    name: str
    first: int  # first group id inside
    end: int  # one past the last group id


def segment_name(first: int, end: int) -> str:
    return f"seg-{first:012d}-{end:012d}.arrow"


def scan_segments(sfs: StoreFS, stable: bool = True) -> list[Segment]:
    """Every sealed segment file, covering and contained alike; `.tmp` files ignored."""
    names = stable_listing(sfs.listdir) if stable else sfs.listdir()
    segs = []
    for name in names:
        m = SEG_RE.match(name)
        if m:
            segs.append(Segment(name, int(m.group(1)), int(m.group(2))))
    return sorted(segs, key=lambda s: (s.first, -s.end))


def list_segments(sfs: StoreFS) -> list[Segment]:
    """Live sealed segments sorted by first group id, no overlaps: originals that a
    roll-up already covers are dropped. Re-lists a few times while the ids have gaps
    (a listing that raced a roll-up's publish and deletes)."""
    for _ in range(GAP_TRIES):
        live, _ = resolve_covering(scan_segments(sfs))
        if all(a.end == b.first for a, b in zip(live, live[1:], strict=False)):
            break
        time.sleep(0.002)
    return live


def ipc_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def open_table(sfs: StoreFS, seg: Segment) -> pa.Table:
    """Memory-map (local) or fetch (remote) a sealed segment; raises on unreadable files."""
    path = sfs.join(seg.name)
    if sfs.local:  # a Python mmap opens ~30% faster than pa.memory_map; zero copy alike
        with open(path, "rb") as f:
            source = pa.py_buffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    else:
        source = pa.BufferReader(pa.py_buffer(sfs.fs.cat_file(path)))
    return fill_optional(pa.ipc.open_file(source).read_all())  # older segments: defaults


def seal_table(
    table: pa.Table,
    first: int,
    end: int,
    first_row: int,
    run_id: str,
    created: float,
    version: int = SCHEMA_VERSION,
) -> pa.Table:
    """`table` with the segment metadata (schema version, range, per-column checksum
    of that version: CRC-32C from version 2, CRC-32 before)."""
    seg_meta = {
        "first_group": first,
        "end_group": end,
        "first_row": first_row,
        "num_rows": table.num_rows,
        "run_id": run_id,
        "created_at": created,
        "crc": table_crcs(table, version),
    }
    return table.replace_schema_metadata(
        {VERSION_KEY: str(version).encode(), SEG_META_KEY: json.dumps(seg_meta).encode()}
    )


def bad_column(table: pa.Table, columns: Sequence[str], meta: dict) -> str | None:
    """The first of `columns` whose checksum differs from the segment metadata
    (`meta`, from `segment_meta`), or None."""
    crcs, version = meta["crc"], meta["schema_version"]
    for name in columns:
        if name not in crcs and name in OPTIONAL_COLUMNS:  # filled in by open_table
            continue
        if column_crc(table.column(name), version) != crcs[name]:
            return name
    return None


def segment_meta(table: pa.Table, where: str, seg: Segment) -> dict:
    """The segment's metadata, checked against its name and the schema; the dict also
    holds the file's `schema_version` (which says how its checksums were computed)."""
    schema = table.schema
    md = schema.metadata or {}
    version = check_schema_version(md.get(VERSION_KEY), where)
    if not schema.equals(ARROW_SCHEMA, check_metadata=False):
        raise CorruptSegmentError("columns do not match the rollout schema")
    meta = json.loads(md[SEG_META_KEY])
    if (meta["first_group"], meta["end_group"]) != (seg.first, seg.end):
        raise CorruptSegmentError("group range in the file does not match its name")
    if meta["num_rows"] != table.num_rows:
        raise CorruptSegmentError(f"{table.num_rows} rows, metadata says {meta['num_rows']}")
    meta["schema_version"] = version
    return meta


def resolve_covering(segs: Sequence[S]) -> tuple[list[S], list[S]]:
    """Split segments into (live, contained): a segment whose range lies inside another
    (a roll-up's original whose delete is pending) is contained. `live` is sorted by
    first group id and has no overlaps."""
    live: list[S] = []
    contained: list[S] = []
    for seg in sorted(segs, key=lambda s: (s.first, -s.end)):
        if live and seg.first >= live[-1].first and seg.end <= live[-1].end:
            contained.append(seg)
        elif live and seg.first < live[-1].end:
            # a partial overlap cannot come from a roll-up (it merges whole segments);
            # keep the earlier file so no group is read twice
            contained.append(seg)
        else:
            live.append(seg)
    return live, contained


def tier(size: int, n: int) -> int:
    """floor(log_n(size)) for size >= 1, in integers (no float rounding at n**k)."""
    t = 0
    while size >= n:
        size //= n
        t += 1
    return t


def plan_rollup(
    live: Sequence[S],
    min_segments: int,
    target_groups: int,
    barriers: frozenset[int] | set[int] = frozenset(),
) -> list[S]:
    """The next window of `min_segments` consecutive small segments to merge, or [].

    `live` comes from `resolve_covering`. A segment is small if it holds fewer than
    `target_groups` groups; segments whose `first` is in `barriers` (unreadable ones)
    and gaps in the id range split runs, so a merge never spans them."""
    if min_segments < 2:
        return []
    run: list[S] = []
    runs: list[list[S]] = []
    for seg in live:
        small = seg.end - seg.first < target_groups and seg.first not in barriers
        if run and (not small or seg.first != run[-1].end):
            runs.append(run)
            run = []
        if small:
            run.append(seg)
    runs.append(run)
    for run in runs:
        if len(run) >= min_segments:
            window = _lowest_tier_window(run, min_segments)
            if window:
                return window
    return []


def _lowest_tier_window(run: Sequence[S], n: int) -> list[S]:
    tiers = [tier(s.end - s.first, n) for s in run]
    for t in sorted(set(tiers)):
        count = 0
        for i, ti in enumerate(tiers):
            count = count + 1 if ti <= t else 0
            if count >= n and ti == t:  # not ending in lower tiers that are still filling
                return list(run[i - count + 1 : i + 1])  # the whole stretch
    return []


def stable_listing(list_names: Callable[[], list[str]], pause_s: float = 0.001) -> list[str]:
    """`list_names()` repeated until no name vanished between two consecutive scans
    (appends only add names, so a busy writer does not keep this looping)."""
    prev = set(list_names())
    for _ in range(STABLE_TRIES):
        cur = set(list_names())
        if prev <= cur:
            return sorted(cur)
        prev = cur
        time.sleep(pause_s)
    return sorted(prev)


def merge_window(
    sfs: StoreFS, window: Sequence[Segment], run_id: str, version: int = SCHEMA_VERSION
) -> tuple[pa.Table | None, Segment | None]:
    """(sealed table of the window's rows as one record batch, None), or (None, the
    original that fails its checks): a merge must not launder corruption into a fresh
    checksum, so every column of every original is verified first."""
    tables, metas = [], []
    for seg in window:
        try:
            table = open_table(sfs, seg)
            metas.append(segment_meta(table, sfs.join(seg.name), seg))
            if bad_column(table, table.column_names, metas[-1]) is not None:
                raise CorruptSegmentError("checksum mismatch")
        except (*READ_ERRORS, CorruptSegmentError):
            return None, seg
        tables.append(table.replace_schema_metadata(None))
    merged = pa.concat_tables(tables).combine_chunks()  # [sum rows], one chunk per column
    created = max(m["created_at"] for m in metas)  # age retention keeps its newest group
    first, end = window[0].first, window[-1].end
    return seal_table(merged, first, end, metas[0]["first_row"], run_id, created, version), None
