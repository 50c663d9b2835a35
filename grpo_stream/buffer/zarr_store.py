"""Zarr backend: chunked, compressed arrays (layout in zarr_layout), any fsspec path.

Publication protocol: the writer resizes each array and writes the new rows past the
committed tail, then writes the commit pointer (root attributes `num_groups`,
`num_rows` and the value lengths) last. Readers re-open the root on `refresh()` and
read only up to the pointer, so a killed writer's partial append is invisible and the
next writer simply overwrites it. On local disk every store key (chunk or metadata) is
written to a temporary name and renamed, so a reader never sees a torn chunk; chunks
carry a checksum, so a truncated or damaged chunk fails to decode and is reported
by name, and a missing chunk is detected (every chunk is always written).

Chunks are byte-shuffled and LZ4-compressed (Blosc), then CRC-32C-checksummed
(`CHUNK_CODECS`): an append re-encodes each array's partly filled tail chunk, and this
is ~15x faster to encode than zstd level 1 (which stores made before used; their
arrays keep their own codecs) while compressing token ids better (shuffled, their
high bytes are mostly zero).

No consolidated metadata: the store is live.

Retention (`max_groups`, `max_age_s`): group ids never change; the writer moves the
root attribute `first_group` forward, then deletes every chunk that lies wholly before
what the groups from `first_group` on need (the chunk holding the boundary stays), so
the disk holds at most one chunk per array beyond the limit. Readers asking for groups
before `first_group` get `GroupsDeletedError`; one whose chunk vanished under it
re-reads the root and gets the same error instead of a corruption report.

    w = ZarrWriter("memory://buf", run_id="r1"); w.append_groups(groups)
    r = ZarrReader("memory://buf"); r.refresh(); r.read_groups(0, r.num_groups())
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync as zarr_sync

from grpo_stream.buffer.columns import (
    LEARNER_COLUMNS,
    LIST_COLUMNS,
    STRING_COLUMNS,
    RolloutBatch,
    samples_to_table,
    table_to_batch,
    table_to_groups_fast,
)
from grpo_stream.buffer.fsutil import StoreFS, WriterLock, open_or_create_meta, read_meta
from grpo_stream.buffer.schema import ARROW_SCHEMA, SCHEMA_VERSION, Group, check_schema_version
from grpo_stream.buffer.store import CorruptSegmentError, GroupsDeletedError
from grpo_stream.buffer.zarr_io import (
    ChunkError,
    chunk_key,
    open_zarr_store,
    read_slice,
    remove_stray_tmp,
)
from grpo_stream.buffer.zarr_layout import (
    FLOAT_COLUMNS,
    VALUE_ARRAYS,
    array_specs,
    arrays_to_table,
    table_to_arrays,
)

VERSION_ATTR = "grpo_stream_schema_version"
CHUNK_CODECS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec())
_INITIAL_CHUNKS = 16  # a new array's capacity, in chunks: each doubling rewrites its zarr.json


def _commit(attrs: dict) -> dict[str, int]:
    """The commit pointer: groups, rows and each values array's length, and the oldest
    group retention kept."""
    keys = ["num_groups", "num_rows", "first_group", *(f"len_{n}" for n in VALUE_ARRAYS)]
    return {k: int(attrs.get(k, 0)) for k in keys}


_CREATED_AT = FLOAT_COLUMNS.index("created_at")


class ZarrWriter:
    """The single writer of a Zarr store; reopening continues after the commit pointer."""

    def __init__(
        self,
        path: str,
        run_id: str = "",
        fsync: bool = True,
        row_chunk: int = 4096,
        value_chunk: int = 65536,
        max_groups: int | None = None,
        max_age_s: float | None = None,
    ) -> None:
        if max_groups is not None and max_groups < 1:
            raise ValueError("buffer.max_groups: must be >= 1 (or unset)")
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError("buffer.max_age_s: must be > 0 (or unset)")
        self.max_groups, self.max_age_s = max_groups, max_age_s
        self.sfs = StoreFS.open(path)
        self._lock = WriterLock(self.sfs)  # before touching anything: one writer per store
        self.meta = open_or_create_meta(self.sfs, "zarr", run_id)
        self.run_id = run_id or self.meta.get("run_id", "")
        remove_stray_tmp(self.sfs)
        self.store = open_zarr_store(self.sfs, read_only=False, fsync=fsync)
        self.root = self._open_root(row_chunk, value_chunk)
        self.arrays = {name: self.root[name] for name in array_specs(1, 1)}
        self.commit = _commit(dict(self.root.attrs))

    def _open_root(self, row_chunk: int, value_chunk: int) -> zarr.Group:
        try:
            root = zarr.open_group(self.store, mode="r+", use_consolidated=False)
            check_schema_version(root.attrs.get(VERSION_ATTR), self.sfs.join("zarr.json"))
            return root
        except FileNotFoundError:
            pass
        root = zarr.open_group(self.store, mode="a", zarr_format=3)  # "w" would wipe meta.json
        for name, (chunks, dtype) in array_specs(row_chunk, value_chunk).items():
            shape = (_INITIAL_CHUNKS * chunks[0], *chunks[1:])  # capacity; unwritten: no files
            root.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                compressors=CHUNK_CODECS,
                fill_value=0,
                config={"write_empty_chunks": True},
            )
        root.attrs.update({VERSION_ATTR: SCHEMA_VERSION, "run_id": self.run_id, **_commit({})})
        return root

    def num_groups(self) -> int:
        return self.commit["num_groups"]

    def append_groups(self, groups: Sequence[Group]) -> tuple[int, int]:
        """Write the rows past the tail, then move the commit pointer; returns [first, end)."""
        first = self.commit["num_groups"]
        if not groups:
            return first, first
        row = self.commit["num_rows"]
        empty = [gi for gi, group in enumerate(groups) if not group]
        if empty:
            raise ValueError(f"append_groups: group {empty[0]} is empty")
        for gi, group in enumerate(groups):
            for s in group:
                s.group_id, s.row_id = first + gi, row
                row += 1
        table = samples_to_table(groups)
        base = {"rows": self.commit["num_rows"]}
        base.update({n: self.commit[f"len_{n}"] for n in VALUE_ARRAYS})
        parts = table_to_arrays(table, base)
        lengths = {"group_rows": first, **{n: base["rows"] for n in ("ints", "floats")}}
        lengths.update({"list_ends": base["rows"], "text_ends": base["rows"]})
        lengths.update({n: base[n] for n in VALUE_ARRAYS})
        self._write_tails([(self.arrays[n], lengths[n], d) for n, d in parts.items()])
        new = {"num_groups": first + len(groups), "num_rows": row}
        new.update({f"len_{n}": base[n] + len(parts[n]) for n in VALUE_ARRAYS})
        new["first_group"] = self.commit["first_group"]
        self._sync()  # data durable before the pointer that publishes it
        self.root.update_attributes(new)  # the commit: readers see the append from here on
        self._sync()
        self.commit = new
        if self.max_groups is not None or self.max_age_s is not None:
            self.retain()
        return first, first + len(groups)

    def retain(self, now: float | None = None) -> list[str]:
        """Apply max_groups / max_age_s (the newest group always stays): move
        `first_group` forward, then delete the chunks nothing kept needs. Returns them."""
        n, keep = self.commit["num_groups"], self.commit["first_group"]
        if self.max_groups is not None:
            keep = max(keep, n - self.max_groups)
        if self.max_age_s is not None and n > keep:
            keep = self._first_young_group(keep, n, now)
        keep = min(keep, n - 1) if n else 0
        if keep <= self.commit["first_group"]:
            return []
        self.root.update_attributes({"first_group": keep})  # readers stop here first
        self._sync()
        self.commit = {**self.commit, "first_group": keep}
        return self._delete_chunks_before(self._needed_from(keep))

    def _read(self, name: str, lo: int, hi: int) -> np.ndarray:
        return read_slice(self.sfs, name, self.arrays[name], lo, hi)

    def _group_start_row(self, g: int) -> int:
        return int(self._read("group_rows", g - 1, g)[0]) if g > 0 else 0

    def _first_young_group(self, lo: int, hi: int, now: float | None) -> int:
        """The oldest group in [lo, hi) created less than max_age_s ago (groups are
        appended in time order), by bisection over each group's first row."""
        import time

        cutoff = (time.time() if now is None else now) - self.max_age_s
        while lo < hi:
            mid = (lo + hi) // 2
            r = self._group_start_row(mid)
            if self._read("floats", r, r + 1)[0, _CREATED_AT] < cutoff:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _needed_from(self, g: int) -> dict[str, int]:
        """The first index of every array that reading groups >= g touches."""
        r0 = self._group_start_row(g)
        need = {"group_rows": max(g - 1, 0), "ints": r0, "floats": r0}
        need["list_ends"] = need["text_ends"] = max(r0 - 1, 0)
        ends = self._read("list_ends", r0 - 1, r0)[0] if r0 > 0 else None
        text = self._read("text_ends", r0 - 1, r0)[0, -1] if r0 > 0 else 0
        for j, name in enumerate(LIST_COLUMNS):
            need[name] = int(ends[j]) if ends is not None else 0
        need["text"] = int(text)
        return need

    def _delete_chunks_before(self, need: dict[str, int]) -> list[str]:
        deleted = []
        for name, first in need.items():
            arr = self.arrays[name]
            for k in range(first // arr.chunks[0]):  # chunks wholly before `first`
                key = chunk_key(name, k, arr.ndim)
                if self.sfs.exists(key):
                    self.sfs.remove(key)
                    deleted.append(key)
                    if arr.ndim > 1 and self.sfs.local:  # NAME/c/K/0: drop the empty NAME/c/K
                        with contextlib.suppress(OSError):
                            os.rmdir(os.path.dirname(self.sfs.join(key)))
        return deleted

    @staticmethod
    def _write_tails(jobs: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
        """Write rows [lo, lo+len) of every array, concurrently (zarr's event loop).

        Capacity grows geometrically (few metadata writes): the shape is capacity, the
        commit pointer is the length.
        """
        grow = [
            (arr, (max(lo + len(data), 2 * arr.shape[0], arr.chunks[0]), *arr.shape[1:]))
            for arr, lo, data in jobs
            if arr.shape[0] < lo + len(data)
        ]

        async def write_all() -> None:
            await asyncio.gather(*(a._async_array.resize(shape) for a, shape in grow))
            await asyncio.gather(
                *(a._async_array.setitem(slice(lo, lo + len(d)), d) for a, lo, d in jobs)
            )

        zarr_sync(write_all())

    def _sync(self) -> None:
        if hasattr(self.store, "sync"):
            self.store.sync()

    def close(self) -> None:
        self._sync()
        self._lock.release()


class ZarrReader:
    """Reads up to the commit pointer; corrupt chunks are named and their groups skipped."""

    def __init__(self, path: str, on_corrupt: str = "skip") -> None:
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"buffer.on_corrupt: {on_corrupt!r} is not 'skip' or 'error'")
        self.sfs = StoreFS.open(path)
        self.meta = read_meta(self.sfs, expect_backend="zarr")
        self.on_corrupt = on_corrupt
        self.store = open_zarr_store(self.sfs, read_only=True)
        self.commit = _commit({})
        self._corrupt: dict[str, str] = {}  # chunk path -> reason
        self._bad_groups: set[int] = set()
        self.arrays: dict = {}
        self.refresh()

    def refresh(self) -> int:
        where = self.sfs.join("zarr.json")
        try:
            root = zarr.open_group(self.store, mode="r", use_consolidated=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: zarr root missing") from None
        except Exception as e:  # noqa: BLE001 - any decode failure of the root is corruption
            raise CorruptSegmentError(f"corrupt store root {where}: {e}") from None
        check_schema_version(root.attrs.get(VERSION_ATTR), where)
        commit = _commit(dict(root.attrs))
        if commit != self.commit or not self.arrays:
            self.arrays = {name: root[name] for name in array_specs(1, 1)}
            self.commit = commit
        return self.num_groups()

    def num_groups(self) -> int:
        return self.commit["num_groups"]

    def first_group(self) -> int:
        """Oldest group still stored (> 0 once retention deleted older ones)."""
        return self.commit["first_group"]

    def _check_kept(self, start: int, stop: int) -> None:
        if start < stop and start < self.first_group():
            raise GroupsDeletedError(
                f"{self.sfs.url}: groups [{start}, {self.first_group()}) were deleted by "
                f"retention; the oldest group on disk is {self.first_group()}"
            )

    def corrupt(self) -> list[str]:
        return sorted(self._corrupt)

    def corrupt_reasons(self) -> dict[str, str]:
        return dict(self._corrupt)

    def _read(self, name: str, lo: int, hi: int) -> np.ndarray:
        return read_slice(self.sfs, name, self.arrays[name], lo, hi)

    def _rows_table(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        """Rows of groups [start, stop); raises ChunkError naming any unreadable chunk."""
        g = self._read("group_rows", max(start - 1, 0), stop)
        r0 = int(g[0]) if start > 0 else 0
        r1 = int(g[-1]) if len(g) else 0
        parts: dict[str, np.ndarray] = {}
        parts["ints"] = self._read("ints", r0, r1)  # holds group_id: always needed
        if any(c in FLOAT_COLUMNS for c in columns):
            parts["floats"] = self._read("floats", r0, r1)
        value_base: dict[str, int] = {}
        for kind, names in (("list_ends", LIST_COLUMNS), ("text_ends", ["text"])):
            texty = any(c in STRING_COLUMNS for c in columns)
            wanted = [n for n in names if n in columns or (kind == "text_ends" and texty)]
            if not wanted:
                continue
            ends = self._read(kind, max(r0 - 1, 0), r1)
            if r0 == 0:
                ends = np.concatenate([np.zeros((1, ends.shape[1]), np.int64), ends])
            parts[kind] = ends
            for j, name in enumerate(names if kind == "list_ends" else ["text"]):
                if name not in wanted:
                    continue
                lo = int(ends[0, j] if kind == "list_ends" else ends[0, -1])
                hi = int(ends[-1, j] if kind == "list_ends" else ends[-1, -1])
                parts[name], value_base[name] = self._read(name, lo, hi), lo
        return arrays_to_table(parts, value_base, columns)

    def read_table(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of groups [start, stop); groups touching corrupt chunks are skipped (or raise)."""
        stop = min(stop, self.num_groups())
        if start < 0 or start > stop:
            raise ValueError(f"read_groups: bad range [{start}, {stop})")
        self._check_kept(start, stop)
        cols = list(columns) if columns else ARROW_SCHEMA.names
        if "group_id" not in cols:
            cols.append("group_id")
        tables = [self._read_robust(a, b, cols) for a, b in self._good_runs(start, stop)]
        tables = [t for t in tables if t is not None and t.num_rows]
        if not tables:
            return ARROW_SCHEMA.empty_table().select(cols)
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def _good_runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        bad = sorted(g for g in self._bad_groups if start <= g < stop)
        runs, lo = [], start
        for g in bad:
            if g > lo:
                runs.append((lo, g))
            lo = g + 1
        if stop > lo:
            runs.append((lo, stop))
        return runs

    def _read_robust(self, start: int, stop: int, cols: list[str]) -> pa.Table | None:
        """Bisect a failing range down to single groups; skip (or raise on) the bad ones."""
        try:
            return self._rows_table(start, stop, cols)
        except ChunkError as e:
            self.refresh()  # retention may have deleted the chunks under this reader
            self._check_kept(start, stop)
            if stop - start > 1:
                mid = (start + stop) // 2
                parts = [self._read_robust(start, mid, cols), self._read_robust(mid, stop, cols)]
                parts = [p for p in parts if p is not None and p.num_rows]
                return pa.concat_tables(parts) if parts else None
            for name, reason in e.chunks.items():
                self._corrupt[name] = reason
            self._bad_groups.add(start)
            if self.on_corrupt == "error":
                raise CorruptSegmentError(str(e)) from None
            return None

    def read_groups(self, start: int, stop: int) -> list[Group]:
        return table_to_groups_fast(self.read_table(start, stop))

    def read_columns(
        self, start: int, stop: int, columns: Sequence[str] | None = None
    ) -> RolloutBatch:
        cols = list(columns) if columns else None
        return table_to_batch(self.read_table(start, stop, cols or list(LEARNER_COLUMNS)), cols)

    def close(self) -> None:
        pass


__all__ = ["ZarrReader", "ZarrWriter"]
