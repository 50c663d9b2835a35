"""Zarr backend, reading side: up to the commit pointer, corrupt chunks named and skipped.

The layout and the writer's publication protocol are in zarr_store.py (and retention in
zarr_retention.py). A reader re-opens the root on `refresh()`, never reads past the
commit pointer nor before `first_group`, and bisects a failing range down to single
groups so one damaged chunk costs only the groups that touch it.

    r = ZarrReader("memory://buf"); r.refresh(); r.read_groups(0, r.num_groups())
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import zarr

from grpo_stream.buffer.base import ChunkError, CorruptSegmentError, ReaderBase, StoreNotFoundError
from grpo_stream.buffer.columns import STRING_COLUMNS, table_to_groups
from grpo_stream.buffer.fsutil import open_store_reader
from grpo_stream.buffer.schema import ARROW_SCHEMA, Group, check_schema_version
from grpo_stream.buffer.zarr_io import open_zarr_store, read_slice
from grpo_stream.buffer.zarr_layout import (
    FLOAT_COLUMNS,
    OPTIONAL_ARRAYS,
    OPTIONAL_LISTS,
    PACKED_LISTS,
    VERSION_ATTR,
    array_specs,
    arrays_to_table,
    commit_pointer,
)


class ZarrReader(ReaderBase):
    """Reads up to the commit pointer; corrupt chunks are named and their groups skipped."""

    def __init__(self, path: str, on_corrupt: str = "skip") -> None:
        self._init_corrupt(on_corrupt)  # names: chunk paths
        self.sfs, self.meta = open_store_reader(path, "zarr")
        self.url = self.sfs.url
        self.store = open_zarr_store(self.sfs, read_only=True)
        self.commit = commit_pointer({})
        self._bad_groups: set[int] = set()
        self.arrays: dict = {}
        self.refresh()

    def refresh(self) -> int:
        where = self.sfs.join("zarr.json")
        try:
            root = zarr.open_group(self.store, mode="r", use_consolidated=False)
        except FileNotFoundError:
            raise StoreNotFoundError(f"{where}: zarr root missing") from None
        except Exception as e:  # noqa: BLE001 - any decode failure of the root is corruption
            raise CorruptSegmentError(f"corrupt store root {where}: {e}") from None
        check_schema_version(root.attrs.get(VERSION_ATTR), where)
        commit = commit_pointer(dict(root.attrs))
        if commit != self.commit or not self.arrays:
            names = [n for n in array_specs(1, 1) if n not in OPTIONAL_ARRAYS or n in root]
            self.arrays = {name: root[name] for name in names}
            self.commit = commit
        return self.num_groups()

    def num_groups(self) -> int:
        return self.commit["num_groups"]

    def first_group(self) -> int:
        """Oldest group still stored (> 0 once retention deleted older ones)."""
        return self.commit["first_group"]

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
        for name in OPTIONAL_LISTS:
            if name in columns and name in self.arrays:  # else: the default, empty lists
                ends = self._read(f"{name}_ends", max(r0 - 1, 0), r1)
                ends = np.concatenate([np.zeros(1, np.int64), ends]) if r0 == 0 else ends
                parts[f"{name}_ends"] = ends
                parts[name], value_base[name] = self._read(name, int(ends[0]), int(ends[-1])), 0
        for kind, names in (("list_ends", PACKED_LISTS), ("text_ends", ["text"])):
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
        start, stop = self._check_range(start, stop)
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
            self._bad_groups.add(start)
            self._mark_corrupt(e.chunks, str(e))
            return None

    def read_groups(self, start: int, stop: int) -> list[Group]:
        return table_to_groups(self.read_table(start, stop))

    def close(self) -> None:
        pass
