"""Columnar conversions between Samples and Arrow tables, and numpy views of columns.

Both backends go through one Arrow table per append (`samples_to_table`), so a group
reads back identically whichever backend stored it, and both turn the rows they read
back into groups with `table_to_groups` (one `to_pylist` per column, then Samples: the
learner collates Python lists). `column_views` gives a column chunk's logical buffers
as numpy views (the Zarr layout packs and unpacks with them; checksums.py covers the
same bytes).

    table = samples_to_table(groups)                 # Sample lists -> pa.Table (ARROW_SCHEMA)
    groups = table_to_groups(table)                  # -> list[list[Sample]]
    offsets, values = column_views(one_chunk(table.column("completion_ids")))
"""

from __future__ import annotations

import array
import functools
import json
from collections.abc import Iterable, Sequence
from operator import attrgetter

import numpy as np
import pyarrow as pa

from grpo_stream.buffer.schema import _ARROW_TYPES, ARROW_SCHEMA, OPTIONAL_COLUMNS, Group, Sample

LIST_COLUMNS = [n for n, t in _ARROW_TYPES.items() if pa.types.is_large_list(t)]
STRING_COLUMNS = [n for n, t in _ARROW_TYPES.items() if pa.types.is_string(t)]


def _np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a column's values (of its items, for a list column)."""
    typ = _ARROW_TYPES[name]
    return _np_dtype_of(typ.value_type if pa.types.is_large_list(typ) else typ)


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


def table_to_groups(table: pa.Table) -> list[Group]:
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


def fill_optional(table: pa.Table) -> pa.Table:
    """`table` with each missing OPTIONAL_COLUMNS column added as its default (empty
    lists), in schema order: a segment written before the column existed reads the same."""
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            empty = pa.array([[]] * table.num_rows, _ARROW_TYPES[name])
            at = list(_ARROW_TYPES).index(name)
            table = table.add_column(min(at, table.num_columns), ARROW_SCHEMA.field(name), empty)
    return table


def column_views(arr: pa.Array) -> list[np.ndarray]:
    """The logical buffers of one chunk as numpy views: [values] or [offsets, values].

    Offsets are the chunk's own (not shifted to start at 0); values start at the first
    offset, so only the bytes the chunk uses are seen (not allocation padding).
    """
    odt, vdt, vbuf = value_layout(arr.type)
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
def value_layout(typ: pa.DataType) -> tuple[np.dtype | None, np.dtype, int]:
    """(offsets dtype or None if fixed-width, values dtype, index of the values buffer)."""
    if pa.types.is_large_list(typ):
        return np.dtype(np.int64), _np_dtype_of(typ.value_type), 3
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        odt = np.int64 if pa.types.is_large_string(typ) else np.int32
        return np.dtype(odt), np.dtype(np.uint8), 2
    return None, _np_dtype_of(typ), 1


def _np_dtype_of(typ: pa.DataType) -> np.dtype:
    return np.dtype(typ.to_pandas_dtype())


def one_chunk(col: pa.ChunkedArray) -> pa.Array:
    """A column as one array: zero-copy for one chunk, else one C++ concatenation."""
    if col.num_chunks == 1:
        return col.chunk(0)
    if col.num_chunks == 0:
        return pa.array([], col.type)
    return pa.concat_arrays(col.chunks)
