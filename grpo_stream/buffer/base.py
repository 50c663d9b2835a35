"""The RolloutStore contract: its errors, the writer and reader protocols, shared checks.

One writer appends whole groups; any number of readers see only published groups.
Groups are numbered 0, 1, 2, ... in publication order (`group_id`), so a reader's
cursor is one integer: the number of groups it has consumed. Group ids never change:
retention deletes old groups, and reading them raises `GroupsDeletedError`.

Both backends (arrow_store.py; zarr_store.py + zarr_reader.py) import this module and
build on its helpers: `check_writer_options` and `number_groups` for writers,
`ReaderBase` (the on_corrupt policy, the list of corrupt parts, the group-range
checks) for readers. store.py only chooses a backend.

    reader.refresh(); n = reader.num_groups()
    groups = reader.read_groups(reader.first_group(), n)   # list[list[Sample]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import pyarrow as pa

from grpo_stream.buffer.schema import Group, SchemaVersionError
from grpo_stream.core.errors import UserError

ON_CORRUPT = ("skip", "error")


class BufferOptionError(UserError, ValueError):
    """A buffer setting out of range; the message names the `buffer.` field."""


class StoreNotFoundError(UserError, FileNotFoundError):
    """No rollout store at the path (its meta.json is missing)."""


class StoreFormatError(UserError, ValueError):
    """The store's meta.json is unreadable, or holds another backend than asked for."""


class CorruptSegmentError(UserError, RuntimeError):
    """A segment/chunk of the store could not be read; the message names it."""


class GroupsDeletedError(UserError, LookupError):
    """The requested groups were deleted by retention/compaction (ids stay global)."""


class WriterLockedError(UserError, RuntimeError):
    """Another live process already writes this store (a store has one writer)."""


class ChunkError(RuntimeError):
    """Zarr chunks could not be read; `chunks` maps chunk path -> reason. The reader
    narrows it down to single groups and reports them as CorruptSegmentError."""

    def __init__(self, chunks: dict[str, str]) -> None:
        self.chunks = chunks
        super().__init__("; ".join(f"corrupt chunk {k}: {v}" for k, v in chunks.items()))


@runtime_checkable
class RolloutWriter(Protocol):
    def append_groups(self, groups: Sequence[Group]) -> tuple[int, int]:
        """Publish groups atomically; assigns group_id/row_id; returns [first, end) group ids."""

    def num_groups(self) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class RolloutReader(Protocol):
    def refresh(self) -> int:
        """Re-scan published data; returns the number of groups now visible."""

    def num_groups(self) -> int: ...

    def read_groups(self, start: int, stop: int) -> list[Group]:
        """Groups with start <= group_id < stop, each a list of Samples in sample order."""

    def read_table(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        """The rows of groups [start, stop) as one Arrow table (ARROW_SCHEMA columns)."""

    def corrupt(self) -> list[str]:
        """Names of segments/chunks skipped as unreadable (on_corrupt='skip')."""

    def first_group(self) -> int:
        """Oldest group id still stored (> 0 once retention deleted old groups)."""

    def close(self) -> None: ...


def check_writer_options(max_groups: int | None, max_age_s: float | None) -> None:
    """Refuse retention limits that would delete everything (None: no limit)."""
    if max_groups is not None and max_groups < 1:
        raise BufferOptionError(f"buffer.max_groups: must be >= 1 (or unset), got {max_groups}")
    if max_age_s is not None and not max_age_s > 0:
        raise BufferOptionError(f"buffer.max_age_s: must be > 0 (or unset), got {max_age_s}")


def number_groups(groups: Sequence[Group], first: int, first_row: int) -> int:
    """Stamp group_id (from `first`) and row_id (from `first_row`) on every sample, in
    order; returns the next row id. An empty group is refused before anything is stamped."""
    empty = [gi for gi, group in enumerate(groups) if not group]
    if empty:
        raise ValueError(f"append_groups: group {empty[0]} is empty")
    row = first_row
    for gi, group in enumerate(groups):
        for s in group:
            s.group_id, s.row_id = first + gi, row
            row += 1
    return row


class ReaderBase:
    """What both backends' readers share: the `on_corrupt` policy ("skip": record the
    unreadable part by name and go on; "error": raise CorruptSegmentError naming it),
    the record itself, and the range checks against retention."""

    url: str  # the store's path as the user gave it, for messages

    def _init_corrupt(self, on_corrupt: str) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise BufferOptionError(f"buffer.on_corrupt: {on_corrupt!r} is not 'skip' or 'error'")
        self.on_corrupt = on_corrupt
        self._corrupt: dict[str, str] = {}  # segment or chunk name -> reason

    def num_groups(self) -> int:
        raise NotImplementedError

    def first_group(self) -> int:
        raise NotImplementedError

    def corrupt(self) -> list[str]:
        return sorted(self._corrupt)

    def corrupt_reasons(self) -> dict[str, str]:
        return dict(self._corrupt)

    def _mark_corrupt(self, reasons: dict[str, str], message: str) -> None:
        """Record unreadable parts (name -> reason); raise `message` under on_corrupt='error'."""
        self._corrupt.update(reasons)
        if self.on_corrupt == "error":
            raise CorruptSegmentError(message)

    def _check_kept(self, start: int, stop: int) -> None:
        first = self.first_group()
        if start < stop and start < first:
            raise GroupsDeletedError(
                f"{self.url}: groups [{start}, {first}) were deleted by "
                f"retention; the oldest group on disk is {first}"
            )

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        """[start, min(stop, published)); ValueError if inverted, GroupsDeletedError if
        it begins before the oldest group kept."""
        stop = min(stop, self.num_groups())
        if start < 0 or start > stop:
            raise ValueError(f"read_groups: bad range [{start}, {stop})")
        self._check_kept(start, stop)
        return start, stop


__all__ = [
    "BufferOptionError",
    "ChunkError",
    "CorruptSegmentError",
    "GroupsDeletedError",
    "ReaderBase",
    "RolloutReader",
    "RolloutWriter",
    "SchemaVersionError",
    "StoreFormatError",
    "StoreNotFoundError",
    "WriterLockedError",
    "check_writer_options",
    "number_groups",
]
