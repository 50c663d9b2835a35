"""The replay buffer: one RolloutStore protocol, Arrow and Zarr backends, a cursor, tools.

    from grpo_stream.buffer import open_writer, open_reader, GroupCursor
    w = open_writer(path, backend="arrow", run_id="r1"); w.append_groups(groups)
    cur = GroupCursor(open_reader(path))
    groups, n_stale = cur.next_groups(8, timeout_s=60, max_staleness=2, current_version=3)

See store.py (the contract), arrow_store.py / zarr_store.py + zarr_reader.py (backends), cursor.py
(tail-follow and resume), columns.py (numpy fast path), tools.py (the CLI).
"""

from grpo_stream.buffer.cursor import GroupCursor, StoreCursor
from grpo_stream.buffer.schema import SCHEMA_VERSION, Group, Sample, SchemaVersionError
from grpo_stream.buffer.store import (
    CorruptSegmentError,
    GroupsDeletedError,
    RolloutReader,
    RolloutWriter,
    open_reader,
    open_writer,
)

__all__ = [
    "SCHEMA_VERSION",
    "CorruptSegmentError",
    "Group",
    "GroupCursor",
    "GroupsDeletedError",
    "RolloutReader",
    "RolloutWriter",
    "Sample",
    "SchemaVersionError",
    "StoreCursor",
    "open_reader",
    "open_writer",
]
