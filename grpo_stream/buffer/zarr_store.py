"""Zarr backend, writing side: chunked, compressed arrays (layout in zarr_layout), any fsspec path.

Publication protocol: the writer resizes each array and writes the new rows past the
committed tail, then writes the commit pointer (root attributes `num_groups`,
`num_rows` and the value lengths) last. Readers re-open the root on `refresh()` and
read only up to the pointer, so a killed writer's partial append is invisible and the
next writer simply overwrites it. On local disk every store key (chunk or metadata) is
written to a temporary name and renamed, so a reader never sees a torn chunk; chunks
carry a checksum, so a truncated or damaged chunk fails to decode and is reported
by name, and a missing chunk is detected (every chunk is always written).

Chunks are byte-shuffled and LZ4-compressed (Blosc), then CRC-32C-checksummed
(`CHUNK_CODECS`): an append re-encodes each array's partly filled tail chunk, so the
encode speed is what counts, and LZ4 encodes much faster than zstd level 1 while
compressing token ids better (shuffled, their high bytes are mostly zero; `bench.choices`,
bench/RESULTS.md). The codecs are stored in each array's metadata, so an array made
with other codecs (zstd) is read and extended with its own.

No consolidated metadata: the store is live.

Retention (`max_groups`, `max_age_s`, see zarr_retention): group ids never change;
readers asking for groups before the root's `first_group` get `GroupsDeletedError`,
also when a chunk vanished under them (they re-read the root rather than report it).

    w = ZarrWriter("memory://buf", run_id="r1"); w.append_groups(groups)

The reading side is zarr_reader.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync as zarr_sync

from grpo_stream.buffer.base import check_writer_options, number_groups
from grpo_stream.buffer.columns import samples_to_table
from grpo_stream.buffer.fsutil import open_store_writer
from grpo_stream.buffer.schema import SCHEMA_VERSION, Group, check_schema_version
from grpo_stream.buffer.zarr_io import open_zarr_store, read_slice, remove_stray_tmp
from grpo_stream.buffer.zarr_layout import (
    OPTIONAL_ARRAYS,
    OPTIONAL_LISTS,
    VALUE_ARRAYS,
    VERSION_ATTR,
    array_specs,
    commit_pointer,
    table_to_arrays,
)
from grpo_stream.buffer.zarr_retention import ChunkSweeper, first_kept_group, needed_from

CHUNK_CODECS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec())
_INITIAL_CHUNKS = 16  # a new array's capacity, in chunks: each doubling rewrites its zarr.json


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
        check_writer_options(max_groups, max_age_s)
        self.max_groups, self.max_age_s = max_groups, max_age_s
        h = open_store_writer(path, "zarr", run_id)  # the lock first: one writer per store
        self.sfs, self._lock, self.meta, self.run_id = h.sfs, h.lock, h.meta, h.run_id
        remove_stray_tmp(self.sfs)
        self.store = open_zarr_store(self.sfs, read_only=False, fsync=fsync)
        self.root = self._open_root(row_chunk, value_chunk)
        # write_empty_chunks is not stored with an array: a chunk of zeros (the fill
        # value; e.g. the ends of empty policy masks) must still get its file
        self.arrays = {
            n: self.root[n].with_config({"write_empty_chunks": True}) for n in array_specs(1, 1)
        }
        self.commit = commit_pointer(dict(self.root.attrs))
        self._sweeper = ChunkSweeper(self.sfs, self.arrays)

    def _open_root(self, row_chunk: int, value_chunk: int) -> zarr.Group:
        specs = array_specs(row_chunk, value_chunk)
        try:
            root = zarr.open_group(self.store, mode="r+", use_consolidated=False)
            check_schema_version(root.attrs.get(VERSION_ATTR), self.sfs.join("zarr.json"))
            # a store made before an optional column: its arrays now (fill 0: old rows empty)
            missing = {n: specs[n] for n in OPTIONAL_ARRAYS if n not in root}
            _create_arrays(root, missing, rows=int(root.attrs.get("num_rows", 0)))
            return root
        except FileNotFoundError:
            pass
        root = zarr.open_group(self.store, mode="a", zarr_format=3)  # "w" would wipe meta.json
        _create_arrays(root, specs)
        root.attrs.update(
            {VERSION_ATTR: SCHEMA_VERSION, "run_id": self.run_id, **commit_pointer({})}
        )
        return root

    def num_groups(self) -> int:
        return self.commit["num_groups"]

    def append_groups(self, groups: Sequence[Group]) -> tuple[int, int]:
        """Write the rows past the tail, then move the commit pointer; returns [first, end)."""
        first = self.commit["num_groups"]
        if not groups:
            return first, first
        row = number_groups(groups, first, self.commit["num_rows"])
        table = samples_to_table(groups)
        base = {"rows": self.commit["num_rows"]}
        base.update({n: self.commit[f"len_{n}"] for n in VALUE_ARRAYS})
        parts = table_to_arrays(table, base)
        lengths = {"group_rows": first, **{n: base["rows"] for n in ("ints", "floats")}}
        lengths.update({"list_ends": base["rows"], "text_ends": base["rows"]})
        lengths.update({f"{n}_ends": base["rows"] for n in OPTIONAL_LISTS})
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
        """Apply max_groups / max_age_s (zarr_retention): move `first_group` forward,
        then delete the chunks nothing kept needs. Returns the deleted chunk keys."""
        c = self.commit
        keep = first_kept_group(
            self._read, c["num_groups"], c["first_group"], self.max_groups, self.max_age_s, now
        )
        if keep <= c["first_group"]:
            return []
        self.root.update_attributes({"first_group": keep})  # readers stop here first
        self._sync()
        self.commit = {**c, "first_group": keep}
        return self._sweeper.delete_before(needed_from(self._read, keep))

    def _read(self, name: str, lo: int, hi: int) -> np.ndarray:
        return read_slice(self.sfs, name, self.arrays[name], lo, hi)

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


__all__ = ["CHUNK_CODECS", "ZarrWriter"]


def _create_arrays(
    root: zarr.Group, specs: dict[str, tuple[tuple[int, ...], str]], rows: int = 0
) -> None:
    """The arrays of `specs`; in a store that already has `rows` rows, each per-row one
    (NAME_ends) written with zeros for them: empty lists, and chunks a reader finds."""
    for name, (chunks, dtype) in specs.items():
        n = max(rows, 1) if name.endswith("_ends") else 1
        capacity = -(-n // chunks[0]) * chunks[0]
        shape = (max(_INITIAL_CHUNKS * chunks[0], capacity), *chunks[1:])  # unwritten: no files
        arr = root.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressors=CHUNK_CODECS,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        if rows and name.endswith("_ends"):
            arr[:rows] = np.zeros(rows, dtype)
