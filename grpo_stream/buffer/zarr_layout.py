"""How rollout rows are laid out as Zarr arrays (flat values + int64 end offsets).

Zarr has nothing ragged built in, and every array touched by an append costs a
metadata write and a tail-chunk rewrite, so columns are packed by kind into few arrays:

    group_rows     int64   [groups]        end row of each group (exclusive)
    ints           int64   [rows, 5]       INT_COLUMNS
    floats         float64 [rows, 3]       FLOAT_COLUMNS (float32 ones pre-rounded)
    list_ends      int64   [rows, 3]       end offset of each row in its values array
    prompt_ids     int32   [n]             flat values of each list column
    completion_ids int32   [n]
    behaviour_logprobs float32 [n]
    text_ends      int64   [rows, 7]       end offsets into `text`, row-major over STRING_COLUMNS
    text           uint8   [bytes]         UTF-8 of all string columns
    policy_mask_ends int64 [rows]          OPTIONAL_LISTS: an array of ends each, so a
    policy_mask    int8    [n]             store without the column just lacks both

A store without an optional list's arrays reads that column as empty lists (its
default); a writer opening such a store adds them (fill 0: the old rows stay empty).

The root group's attributes hold the schema version (`VERSION_ATTR`) and the commit
pointer (`commit_pointer`): what the writer has published, and the oldest group kept.

`table_to_arrays` packs one append's Arrow table; `arrays_to_table` rebuilds the exact
Arrow table (ARROW_SCHEMA) from slices, so both backends read back identically.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from grpo_stream.buffer.columns import (
    LIST_COLUMNS,
    STRING_COLUMNS,
    column_views,
    one_chunk,
    take_ranges,
)
from grpo_stream.buffer.schema import _ARROW_TYPES, ARROW_SCHEMA, OPTIONAL_COLUMNS

INT_COLUMNS = [n for n, t in _ARROW_TYPES.items() if pa.types.is_integer(t)]
FLOAT_COLUMNS = [n for n, t in _ARROW_TYPES.items() if pa.types.is_floating(t)]
PACKED_LISTS = [n for n in LIST_COLUMNS if n not in OPTIONAL_COLUMNS]  # ends in list_ends
OPTIONAL_LISTS = [n for n in LIST_COLUMNS if n in OPTIONAL_COLUMNS]  # ends in NAME_ends
OPTIONAL_ARRAYS = [a for n in OPTIONAL_LISTS for a in (f"{n}_ends", n)]
ROW_ARRAYS = ["ints", "floats", "list_ends", "text_ends"]
VALUE_ARRAYS = [*LIST_COLUMNS, "text"]
VERSION_ATTR = "grpo_stream_schema_version"


def commit_pointer(attrs: dict) -> dict[str, int]:
    """The commit pointer in the root's attributes: groups, rows and each values
    array's length, and the oldest group retention kept (0 for each one missing)."""
    keys = ["num_groups", "num_rows", "first_group", *(f"len_{n}" for n in VALUE_ARRAYS)]
    return {k: int(attrs.get(k, 0)) for k in keys}


def array_specs(row_chunk: int, value_chunk: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (chunk shape, dtype) for every array of the store."""
    specs = {
        "group_rows": ((row_chunk,), "int64"),
        "ints": ((row_chunk, len(INT_COLUMNS)), "int64"),
        "floats": ((row_chunk, len(FLOAT_COLUMNS)), "float64"),
        "list_ends": ((row_chunk, len(PACKED_LISTS)), "int64"),
        "text_ends": ((row_chunk, len(STRING_COLUMNS)), "int64"),
        "text": ((value_chunk * 4,), "uint8"),
    }
    for name in OPTIONAL_LISTS:
        specs[f"{name}_ends"] = ((row_chunk,), "int64")
    for name in LIST_COLUMNS:
        specs[name] = (
            (value_chunk,),
            np.dtype(_ARROW_TYPES[name].value_type.to_pandas_dtype()).name,
        )
    return specs


def _col(table: pa.Table, name: str) -> list[np.ndarray]:
    return column_views(one_chunk(table.column(name)))


def table_to_arrays(table: pa.Table, base: dict[str, int]) -> dict[str, np.ndarray]:
    """One append's rows -> the slices to append to each array.

    `base` holds the committed lengths (`rows`, and one per VALUE_ARRAYS name) so end
    offsets continue from the store's current tail.
    """
    out: dict[str, np.ndarray] = {}
    gid = _col(table, "group_id")[0]
    ends = np.flatnonzero(np.diff(gid)) + 1
    out["group_rows"] = np.concatenate([ends, [len(gid)]]).astype(np.int64) + base["rows"]
    out["ints"] = np.stack([_col(table, n)[0].astype(np.int64) for n in INT_COLUMNS], axis=1)
    out["floats"] = np.stack([_col(table, n)[0].astype(np.float64) for n in FLOAT_COLUMNS], 1)
    list_ends = []
    for name in LIST_COLUMNS:
        offs, vals = _col(table, name)
        out[name] = vals
        ends = offs[1:] - offs[0] + base[name]
        if name in OPTIONAL_LISTS:
            out[f"{name}_ends"] = ends.astype(np.int64)
        else:
            list_ends.append(ends)
    out["list_ends"] = np.stack(list_ends, axis=1).astype(np.int64)
    out["text_ends"], out["text"] = _pack_text(table, base["text"])
    return out


def _pack_text(table: pa.Table, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave the string columns row-major: row0 col0, row0 col1, ..., row1 col0.

    One Arrow `take` over the columns laid end to end (column-major) copies every
    string once, in C++; returns (end offsets [rows, k] + base, UTF-8 bytes [total]).
    """
    n, k = table.num_rows, len(STRING_COLUMNS)
    chunks = [c for name in STRING_COLUMNS for c in table.column(name).chunks]
    if sum(c.nbytes for c in chunks) >= 2**31:  # too big for int32 offsets
        chunks = [c.cast(pa.large_string()) for c in chunks]
    column_major = pa.concat_arrays(chunks)  # [k*n]
    row_major = np.arange(n)[:, None] + np.arange(k)[None, :] * n  # [n, k] -> column-major index
    offs, text = column_views(column_major.take(row_major.reshape(-1)))
    return (offs[1:] - offs[0]).astype(np.int64).reshape(n, k) + base, text


def arrays_to_table(
    parts: dict[str, np.ndarray], value_base: dict[str, int], columns: list[str]
) -> pa.Table:
    """Slices read back -> Arrow table with `columns` (ARROW_SCHEMA types, same order).

    `parts["list_ends"]`/`parts["text_ends"]` carry one extra leading row (the previous
    row's ends, or zeros), and each values slice starts at `value_base[name]`.
    """
    arrays = []
    n = len(parts["ints"]) if "ints" in parts else len(parts["floats"])
    for name in columns:
        typ = _ARROW_TYPES[name]
        if name in INT_COLUMNS:
            col = parts["ints"][:, INT_COLUMNS.index(name)].astype(typ.to_pandas_dtype())
            arrays.append(pa.array(col, typ))
        elif name in FLOAT_COLUMNS:
            col = parts["floats"][:, FLOAT_COLUMNS.index(name)].astype(typ.to_pandas_dtype())
            arrays.append(pa.array(col, typ))
        elif name in OPTIONAL_LISTS and f"{name}_ends" not in parts:  # a store without it
            arrays.append(pa.array([[]] * n, typ))
        elif name in LIST_COLUMNS:
            if name in OPTIONAL_LISTS:
                ends = parts[f"{name}_ends"]
            else:
                ends = parts["list_ends"][:, PACKED_LISTS.index(name)]
            offs = (ends - ends[0]).astype(np.int64)
            vals = parts[name][: offs[-1]] if n else parts[name][:0]
            arrays.append(pa.LargeListArray.from_arrays(pa.array(offs), pa.array(vals)))
        else:
            arrays.append(_string_array(parts, value_base, name, n))
    schema = pa.schema([ARROW_SCHEMA.field(c) for c in columns])
    return pa.Table.from_arrays(arrays, schema=schema)


def _string_array(parts: dict, value_base: dict, name: str, n: int) -> pa.Array:
    flat = parts["text_ends"].reshape(-1)[len(STRING_COLUMNS) - 1 :]  # prev row's last end
    j = STRING_COLUMNS.index(name)
    ends = flat[1 + j :: len(STRING_COLUMNS)][:n]
    starts = flat[j :: len(STRING_COLUMNS)][:n]
    offs, data = take_ranges(parts["text"], starts - value_base["text"], ends - value_base["text"])
    if offs[-1] >= 2**31:
        raise ValueError(f"column {name!r}: more than 2 GiB of text in one read")
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offs.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(data))
    )
