"""Fast columnar conversions between Samples, Arrow tables and numpy arrays.

Both backends go through one Arrow table per append (`samples_to_table`), so a group
reads back identically whichever backend stored it. The learner's fast path is
`RolloutBatch`: flat numpy values plus int64 offsets per ragged column, zero-copy
where the storage allows, instead of one Python object per token.

    table = samples_to_table(groups)                 # Sample lists -> pa.Table (ARROW_SCHEMA)
    batch = table_to_batch(table, LEARNER_COLUMNS)   # -> RolloutBatch (numpy)
    batch.ragged("completion_ids")                   # list of per-sample int32 arrays
    groups = table_to_groups_fast(table)             # -> list[list[Sample]]
"""

from __future__ import annotations

import array
import functools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import google_crc32c
import numpy as np
import pyarrow as pa

from grpo_stream.buffer.schema import _ARROW_TYPES, ARROW_SCHEMA, SCHEMA_VERSION, Group, Sample

LIST_COLUMNS = [n for n, t in _ARROW_TYPES.items() if pa.types.is_large_list(t)]
STRING_COLUMNS = [n for n, t in _ARROW_TYPES.items() if pa.types.is_string(t)]
SCALAR_COLUMNS = [n for n in _ARROW_TYPES if n not in LIST_COLUMNS and n not in STRING_COLUMNS]
# What a learner step needs; strings (texts, ids) stay on disk unless asked for.
LEARNER_COLUMNS = [
    "group_id",
    "row_id",
    "sample_index",
    "policy_version",
    "policy_version_end",
    "prompt_ids",
    "completion_ids",
    "behaviour_logprobs",
    "reward",
]


def _np_dtype(name: str) -> np.dtype:
    typ = _ARROW_TYPES[name]
    if pa.types.is_large_list(typ):
        typ = typ.value_type
    return np.dtype(typ.to_pandas_dtype())


@functools.cache
def _typecode(dtype: np.dtype) -> str:
    """The `array.array` typecode holding numbers of `dtype` (same kind and size)."""
    codes = "fd" if dtype.kind == "f" else "bhilq"
    return next(c for c in codes if array.array(c).itemsize == dtype.itemsize)


def _list_array(values: Sequence, name: str) -> pa.Array:
    """Per-sample lists (or 1-D arrays) -> LargeListArray: flat values + int64 offsets."""
    dtype = _np_dtype(name)
    try:
        flat, lengths = _flat_values(values, dtype)
    except (TypeError, OverflowError, ValueError) as e:
        raise ValueError(
            f"Sample.{name}: expected a flat list of {dtype} per sample ({e})"
        ) from None
    offsets = np.zeros(len(values) + 1, dtype=np.int64)  # [rows+1]
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _flat_values(values: Sequence, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(all values concatenated [total], per-sample lengths [rows]).

    The generator hands Python lists (parsed from vLLM's JSON), and converting them is
    most of a write: `array.array.fromlist` is a C loop (~20 ns a number, vs ~30 for
    np.fromiter over a chain). A list shared by several samples (a group's prompt) is
    converted once. numpy arrays are accepted too, and copied whole.
    """
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    ids = list(map(id, values))  # `values` keeps every object alive: ids are unique
    if len(set(ids)) == len(ids):
        buf = array.array(_typecode(dtype))
        for v in values:
            _extend(buf, v, dtype)
        flat = _as_numpy(buf, dtype)
    else:
        once: dict[int, np.ndarray] = {}
        for key, v in zip(ids, values, strict=True):
            if key not in once:
                _extend(buf := array.array(_typecode(dtype)), v, dtype)
                once[key] = _as_numpy(buf, dtype)
        flat = np.concatenate([once[key] for key in ids])
    if flat.size != lengths.sum():
        raise ValueError("nested sequences")
    return flat, lengths


def _extend(buf: array.array, v: Sequence | np.ndarray, dtype: np.dtype) -> None:
    if type(v) is list:
        buf.fromlist(v)
    elif isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise ValueError(f"a {v.ndim}-D array")
        buf.frombytes(memoryview(np.ascontiguousarray(v, dtype=dtype)).cast("B"))
    else:
        buf.fromlist(list(v))


def _as_numpy(buf: array.array, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype) if len(buf) else np.zeros(0, dtype)


def take_ranges(
    data: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1], data[starts[0]:ends[0]] + data[starts[1]:ends[1]] + ...): one
    vectorised gather; a view when the ranges are already contiguous."""
    lens = ends - starts
    offs = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    if len(lens) and np.all(starts[1:] == ends[:-1]):
        return offs, data[starts[0] : ends[-1]]
    idx = np.repeat(starts - offs[:-1], lens) + np.arange(offs[-1])
    return offs, data[idx]


def _json_column(dicts: Sequence[dict]) -> list[str]:
    """reward_components as JSON text (sorted keys); repeated dicts are encoded once."""
    memo: dict[tuple, str] = {}
    out = []
    for d in dicts:
        key = tuple(d.items())  # insertion order: equal dicts usually share it
        text = memo.get(key)
        if text is None:
            text = memo[key] = json.dumps(d, sort_keys=True)
        out.append(text)
    return out


def samples_to_table(groups: Iterable[Group]) -> pa.Table:
    """Groups of Samples -> one Arrow table (ARROW_SCHEMA), built column by column."""
    samples = [s for g in groups for s in g]
    arrays = []
    for name, typ in _ARROW_TYPES.items():
        vals = list(map(attrgetter(name), samples))
        if name in LIST_COLUMNS:
            arrays.append(_list_array(vals, name))
        elif name == "reward_components":
            arrays.append(pa.array(_json_column(vals), typ))
        else:
            arrays.append(pa.array(vals, typ))
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)


def table_to_groups_fast(table: pa.Table) -> list[Group]:
    """Rows (ordered by row_id) -> groups split on group_id, one to_pylist per column."""
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    cols["reward_components"] = [json.loads(v or "{}") for v in cols["reward_components"]]
    names = list(_ARROW_TYPES)
    groups: list[Group] = []
    gids = cols["group_id"]
    for i in range(n):
        s = Sample(**{k: cols[k][i] for k in names})
        if groups and groups[-1][-1].group_id == gids[i]:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def column_views(arr: pa.Array) -> list[np.ndarray]:
    """The logical buffers of one chunk as numpy views: [values] or [offsets, values].

    Used both to read columns zero-copy and to checksum them, so the checksum covers
    exactly the bytes a reader consumes (not allocation padding).
    """
    odt, vdt, vbuf = _layout(arr.type)
    off, n = arr.offset, len(arr)
    bufs = arr.buffers()
    if odt is None:
        if n == 0:
            return [np.zeros(0, dtype=vdt)]
        return [np.frombuffer(bufs[1], dtype=vdt, count=n, offset=off * vdt.itemsize)]
    if n == 0:
        return [np.zeros(1, dtype=odt), np.zeros(0, dtype=vdt)]
    offsets = np.frombuffer(bufs[1], dtype=odt, count=n + 1, offset=off * odt.itemsize)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return [offsets, np.zeros(0, dtype=vdt)]
    return [offsets, np.frombuffer(bufs[vbuf], dtype=vdt, count=hi - lo, offset=lo * vdt.itemsize)]


@functools.cache
def _layout(typ: pa.DataType) -> tuple[np.dtype | None, np.dtype, int]:
    """(offsets dtype or None if fixed-width, values dtype, index of the values buffer)."""
    if pa.types.is_large_list(typ):
        return np.dtype(np.int64), _np_dtype_of(typ.value_type), 3
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        odt = np.int64 if pa.types.is_large_string(typ) else np.int32
        return np.dtype(odt), np.dtype(np.uint8), 2
    return None, _np_dtype_of(typ), 1


def _np_dtype_of(typ: pa.DataType) -> np.dtype:
    return np.dtype(typ.to_pandas_dtype())


def _crc32c(data: np.ndarray | pa.Buffer, crc: int = 0) -> int:
    return google_crc32c.extend(crc, data)


# Column checksums by store format version (schema.SCHEMA_VERSION): version 1 used
# zlib's CRC-32; version 2 uses CRC-32C, which the CPU computes in hardware (~20 GB/s
# vs ~3.6 GB/s on the bench machine): checking it is most of what a reader adds to
# memory-mapping a segment, and a writer checksums every byte it publishes.
CHECKSUMS: dict[int, Callable[[np.ndarray | pa.Buffer, int], int]] = {1: zlib.crc32, 2: _crc32c}
CHECKSUM_NAMES = {1: "CRC-32", 2: "CRC-32C"}


def column_crc(col: pa.ChunkedArray | pa.Array, version: int = SCHEMA_VERSION) -> int:
    """Checksum over a column's logical bytes (relative offsets, so slices agree)."""
    checksum = CHECKSUMS[version]
    crc = 0
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        for part in _checksummed(chunk):
            crc = checksum(part, crc)
    return crc


def _checksummed(arr: pa.Array) -> list:
    """What a checksum covers, as buffers: [values] or [offsets - offsets[0], values].

    Like `column_views`, but values stay Arrow buffer slices: this runs for every
    column of every segment a reader opens, so it makes few Python calls."""
    odt, vdt, vbuf = _layout(arr.type)
    n, off, bufs = len(arr), arr.offset, arr.buffers()
    if odt is None:
        return [bufs[1].slice(off * vdt.itemsize, n * vdt.itemsize)] if n else []
    if n == 0:
        return [np.zeros(1, dtype=odt)]
    offsets = np.frombuffer(bufs[1], dtype=odt, count=n + 1, offset=off * odt.itemsize)
    lo, hi = int(offsets[0]), int(offsets[-1])
    parts = [offsets - lo if lo else offsets]
    if hi > lo:
        parts.append(bufs[vbuf].slice(lo * vdt.itemsize, (hi - lo) * vdt.itemsize))
    return parts


def table_crcs(table: pa.Table, version: int = SCHEMA_VERSION) -> dict[str, int]:
    return {name: column_crc(table.column(name), version) for name in table.column_names}


Parts = list[tuple[np.ndarray, np.ndarray]]  # per segment: (offsets [r+1] from 0, values)


class _JoinedOnUse(MutableMapping):
    """name -> one flat array of a list column, joined from its per-segment parts on
    first access (then kept). A read spanning several segments keeps each segment's
    zero-copy views until somebody asks for one flat array; `RolloutBatch.ragged`
    slices the parts directly and never pays for the copy."""

    def __init__(self, join: Callable[[Parts], np.ndarray], parts: dict[str, Parts]) -> None:
        self._join, self._parts, self._done = join, parts, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._done:
            self._done[name] = self._join(self._parts[name])  # KeyError if unknown
        return self._done[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._done[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self._done and name not in self._parts:
            raise KeyError(name)
        self._done.pop(name, None)
        self._parts.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._parts, *self._done]))

    def __len__(self) -> int:
        return len(set(self._parts) | set(self._done))

    def parts(self, name: str) -> Parts | None:
        """The per-segment parts while `name` has not been joined (or replaced)."""
        return None if name in self._done else self._parts.get(name)


def _join_values(parts: Parts) -> np.ndarray:
    return np.concatenate([v for _, v in parts])  # [total]


def _join_offsets(parts: Parts) -> np.ndarray:
    lens = np.concatenate([np.diff(o) for o, _ in parts])  # [rows]
    out = np.zeros(len(lens) + 1, np.int64)  # [rows+1]
    np.cumsum(lens, out=out[1:])
    return out


@dataclass
class RolloutBatch:
    """A columnar slice of the store: numpy arrays, rows ordered by row_id.

    `scalars[name]`: [rows]; `values[name]`: [total] and `offsets[name]`: [rows+1] (int64,
    starting at 0) for list columns; `strings[name]`: list[str]; `group_offsets`:
    [groups+1] row offsets of each group. List columns read from several segments are
    joined into one flat array only when `values`/`offsets` are indexed; `ragged` gives
    per-sample views without joining.
    """

    group_ids: np.ndarray  # [groups] int64
    group_offsets: np.ndarray  # [groups+1] int64
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    values: MutableMapping[str, np.ndarray] = field(default_factory=dict)
    offsets: MutableMapping[str, np.ndarray] = field(default_factory=dict)
    strings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.group_offsets[-1]) if len(self.group_offsets) else 0

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    def ragged(self, name: str) -> list[np.ndarray]:
        """Per-sample views of a list column (no copy)."""
        parts = self.values.parts(name) if isinstance(self.values, _JoinedOnUse) else None
        if parts is None:
            parts = [(self.offsets[name], self.values[name])]
        out: list[np.ndarray] = []
        for offs, vals in parts:
            o = offs.tolist()
            out += [vals[a:b] for a, b in zip(o[:-1], o[1:], strict=True)]
        return out


def _column_parts(col: pa.ChunkedArray) -> Parts:
    """(offsets from 0 [r+1], values) per chunk of a list column, zero-copy."""
    parts = []
    for chunk in col.chunks or [pa.array([], col.type)]:
        offsets, values = column_views(chunk)
        parts.append((offsets - offsets[0] if offsets[0] else offsets, values))
    return parts


def one_chunk(col: pa.ChunkedArray) -> pa.Array:
    """A column as one array: zero-copy for one chunk, else one C++ concatenation."""
    if col.num_chunks == 1:
        return col.chunk(0)
    if col.num_chunks == 0:
        return pa.array([], col.type)
    return pa.concat_arrays(col.chunks)


def table_to_batch(table: pa.Table, columns: Sequence[str] | None = None) -> RolloutBatch:
    """Arrow table (rows ordered by row_id, whole groups) -> RolloutBatch."""
    cols = list(columns or LEARNER_COLUMNS)
    if "group_id" not in cols:
        cols.append("group_id")
    batch = RolloutBatch(group_ids=np.zeros(0, np.int64), group_offsets=np.zeros(1, np.int64))
    parts: dict[str, Parts] = {}
    for name in cols:
        if name in STRING_COLUMNS:
            batch.strings[name] = table.column(name).to_pylist()
        elif name in LIST_COLUMNS:
            parts[name] = _column_parts(table.column(name))  # per segment, zero-copy
        else:
            batch.scalars[name] = column_views(one_chunk(table.column(name)))[0]  # [rows]
    batch.values = _JoinedOnUse(_join_values, parts)
    batch.offsets = _JoinedOnUse(_join_offsets, parts)
    for name, p in parts.items():
        if len(p) == 1:  # one segment: the views are the flat arrays already
            batch.offsets[name], batch.values[name] = p[0]
    gid = batch.scalars["group_id"]
    starts = np.flatnonzero(np.diff(gid)) + 1 if len(gid) else np.zeros(0, np.int64)
    batch.group_offsets = np.concatenate([[0], starts, [len(gid)]]).astype(np.int64)
    if not len(gid):
        batch.group_offsets = np.zeros(1, np.int64)
    batch.group_ids = gid[batch.group_offsets[:-1]]
    return batch
