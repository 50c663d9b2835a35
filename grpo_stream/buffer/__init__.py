"""The replay buffer: one RolloutStore contract, Arrow and Zarr backends, a cursor.

    from grpo_stream.buffer import open_writer, open_reader, GroupCursor
    w = open_writer(path, backend="arrow", run_id="r1"); w.append_groups(groups)
    cur = GroupCursor(open_reader(path))
    groups, n_stale = cur.next_groups(8, timeout_s=60, max_staleness=2, current_version=3)

The layers, bottom up: schema.py (the row), base.py (errors, protocols, the checks
both backends share), columns.py + checksums.py (Samples <-> Arrow, column CRCs),
fsutil.py (paths, meta.json, the writer lock); the backends arrow_store.py /
arrow_reader.py (+ arrow_rollup.py) and zarr_store.py / zarr_reader.py (+ zarr_layout,
zarr_io, zarr_retention); store.py (open_writer / open_reader pick a backend);
cursor.py (tail-follow and resume). The `grpo-stream buffer` CLI is `grpo_stream.cli.buffer`.
"""

from grpo_stream.buffer.base import (
    CorruptSegmentError,
    GroupsDeletedError,
    RolloutReader,
    RolloutWriter,
    WriterLockedError,
)
from grpo_stream.buffer.cursor import GroupCursor
from grpo_stream.buffer.schema import SCHEMA_VERSION, Group, Sample, SchemaVersionError
from grpo_stream.buffer.store import open_reader, open_writer

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
    "WriterLockedError",
    "open_reader",
    "open_writer",
]
