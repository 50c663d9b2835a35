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

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import pyarrow as pa

from grpo_stream.buffer.schema import _ARROW_TYPES, ARROW_SCHEMA, Group, Sample

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


def _list_array(values: Sequence, name: str) -> pa.Array:
    """Per-sample lists (or 1-D arrays) -> LargeListArray; a list object shared by
    several samples (the prompt of a group) is converted once."""
    dtype = _np_dtype(name)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if values and all(isinstance(v, np.ndarray) for v in values):
        flat = np.concatenate(values).astype(dtype, copy=False) if values else np.zeros(0, dtype)
    elif len({id(v) for v in values}) < len(values):
        seen: dict[int, np.ndarray] = {}
        parts = [
            seen.get(id(v)) if id(v) in seen else seen.setdefault(id(v), _flat(v, dtype))
            for v in values
        ]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
    else:
        flat = np.fromiter(chain.from_iterable(values), dtype=dtype, count=int(offsets[-1]))
    if flat.size != offsets[-1] or flat.ndim != 1:
        raise ValueError(f"Sample.{name}: expected a flat list of numbers per sample")
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _flat(v: Sequence, dtype: np.dtype) -> np.ndarray:
    return np.fromiter(v, dtype=dtype, count=len(v))


def _json_column(dicts: Sequence[dict]) -> list[str]:
    """reward_components as JSON text; repeated component values are encoded once."""
    memo: dict[tuple, str] = {}
    out = []
    for d in dicts:
        key = tuple(sorted(d.items()))
        text = memo.get(key)
        if text is None:
            text = memo[key] = json.dumps(dict(key))
        out.append(text)
    return out


def samples_to_table(groups: Iterable[Group]) -> pa.Table:
    """Groups of Samples -> one Arrow table (ARROW_SCHEMA), built column by column."""
    samples = [s for g in groups for s in g]
    arrays = []
    for name, typ in _ARROW_TYPES.items():
        vals = [getattr(s, name) for s in samples]
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
    typ = arr.type
    off, n = arr.offset, len(arr)
    bufs = arr.buffers()
    if pa.types.is_large_list(typ) or pa.types.is_string(typ):
        odt = np.int64 if pa.types.is_large_list(typ) else np.int32
        offsets = np.frombuffer(bufs[1], dtype=odt, count=n + 1, offset=off * odt().itemsize)
        vdt = np.uint8 if pa.types.is_string(typ) else _np_dtype_of(typ.value_type)
        lo, hi = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
        vbuf = bufs[2] if pa.types.is_string(typ) else bufs[3]
        if hi == lo:
            return [offsets, np.zeros(0, dtype=vdt)]
        values = np.frombuffer(vbuf, dtype=vdt, count=hi - lo, offset=lo * np.dtype(vdt).itemsize)
        return [offsets, values]
    dt = _np_dtype_of(typ)
    if n == 0:
        return [np.zeros(0, dtype=dt)]
    return [np.frombuffer(bufs[1], dtype=dt, count=n, offset=off * np.dtype(dt).itemsize)]


def _np_dtype_of(typ: pa.DataType) -> np.dtype:
    return np.dtype(typ.to_pandas_dtype())


def column_crc(col: pa.ChunkedArray | pa.Array) -> int:
    """CRC-32 over a column's logical bytes (relative offsets, so slices agree)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    crc = 0
    for chunk in chunks:
        views = column_views(chunk)
        if len(views) == 2:
            crc = zlib.crc32((views[0] - views[0][:1]).tobytes() if len(views[0]) else b"", crc)
        crc = zlib.crc32(memoryview(np.ascontiguousarray(views[-1])).cast("B"), crc)
    return crc


def table_crcs(table: pa.Table) -> dict[str, int]:
    return {name: column_crc(table.column(name)) for name in table.column_names}


@dataclass
class RolloutBatch:
    """A columnar slice of the store: flat numpy arrays, rows ordered by row_id.

    `scalars[name]`: [rows]; `values[name]`: [total] and `offsets[name]`: [rows+1] (int64,
    starting at 0) for list columns; `strings[name]`: list[str]; `group_offsets`:
    [groups+1] row offsets of each group.
    """

    group_ids: np.ndarray  # [groups] int64
    group_offsets: np.ndarray  # [groups+1] int64
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    offsets: dict[str, np.ndarray] = field(default_factory=dict)
    strings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.group_offsets[-1]) if len(self.group_offsets) else 0

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    def ragged(self, name: str) -> list[np.ndarray]:
        """Per-sample views of a list column (no copy)."""
        vals, offs = self.values[name], self.offsets[name].tolist()
        return [vals[a:b] for a, b in zip(offs[:-1], offs[1:], strict=True)]


def _concat(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)


def table_to_batch(table: pa.Table, columns: Sequence[str] | None = None) -> RolloutBatch:
    """Arrow table (rows ordered by row_id, whole groups) -> RolloutBatch."""
    cols = list(columns or LEARNER_COLUMNS)
    if "group_id" not in cols:
        cols.append("group_id")
    batch = RolloutBatch(group_ids=np.zeros(0, np.int64), group_offsets=np.zeros(1, np.int64))
    for name in cols:
        chunks = table.column(name).chunks
        if name in STRING_COLUMNS:
            batch.strings[name] = table.column(name).to_pylist()
        elif name in LIST_COLUMNS:
            offs, vals, base = [], [], 0
            for ch in chunks:
                o, v = column_views(ch)
                offs.append((o[1:] if offs else o) - o[0] + base)
                vals.append(v)
                base += int(o[-1] - o[0])
            batch.offsets[name] = _concat(offs, np.dtype(np.int64)).astype(np.int64, copy=False)
            batch.values[name] = _concat(vals, _np_dtype(name))
        else:
            batch.scalars[name] = _concat([column_views(c)[0] for c in chunks], _np_dtype(name))
    gid = batch.scalars["group_id"]
    starts = np.flatnonzero(np.diff(gid)) + 1 if len(gid) else np.zeros(0, np.int64)
    batch.group_offsets = np.concatenate([[0], starts, [len(gid)]]).astype(np.int64)
    if not len(gid):
        batch.group_offsets = np.zeros(1, np.int64)
    batch.group_ids = gid[batch.group_offsets[:-1]]
    return batch
