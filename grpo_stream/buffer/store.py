"""The RolloutStore protocol: the contract between generator and learner.

One writer appends whole groups; any number of readers see only published groups.
Groups are numbered 0, 1, 2, ... in publication order (`group_id`), so a reader's
cursor is one integer: the number of groups it has consumed.

    writer = open_writer(path, backend="arrow", run_id="r1")
    writer.append_groups([group])          # atomically published when this returns
    reader = open_reader(path)
    reader.refresh(); n = reader.num_groups()
    groups = reader.read_groups(0, n)      # list[list[Sample]]

`path` is a local path or any fsspec URL (`memory://`, `s3://`). The backend is
recorded in the store's `meta.json`, so readers need only the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from grpo_stream.buffer.schema import Group


class CorruptSegmentError(RuntimeError):
    """A segment/chunk of the store could not be read; the message names it."""


class GroupsDeletedError(LookupError):
    """The requested groups were deleted by retention/compaction (ids stay global)."""


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

    def corrupt(self) -> list[str]:
        """Names of segments/chunks skipped as unreadable (on_corrupt='skip')."""

    def first_group(self) -> int:
        """Oldest group id still stored (> 0 once retention deleted old groups)."""

    def close(self) -> None: ...


def detect_backend(path: str) -> str:
    """The backend recorded in PATH/meta.json (schema version checked)."""
    from grpo_stream.buffer.fsutil import StoreFS, read_meta

    return read_meta(StoreFS.open(path))["backend"]


def open_writer(path: str, backend: str = "arrow", run_id: str = "", **opts) -> RolloutWriter:
    """The store's single writer. opts: fsync=True, max_groups=None (retention),
    max_age_s=None; arrow also roll-up, zarr chunk sizes (see their modules).

    On local disk it holds STORE/writer.lock until `close()` (or its process ends): a
    second writer is refused with `WriterLockedError` naming the holder."""
    if backend == "arrow":
        from grpo_stream.buffer.arrow_store import ArrowWriter

        return ArrowWriter(path, run_id=run_id, **opts)
    if backend == "zarr":
        from grpo_stream.buffer.zarr_store import ZarrWriter

        return ZarrWriter(path, run_id=run_id, **opts)
    raise ValueError(f"buffer.backend: unknown backend {backend!r} (arrow | zarr)")


def open_reader(path: str, on_corrupt: str = "skip") -> RolloutReader:
    """A reader for the store at `path`; the backend comes from its meta.json."""
    backend = detect_backend(path)
    if backend == "arrow":
        from grpo_stream.buffer.arrow_store import ArrowReader

        return ArrowReader(path, on_corrupt=on_corrupt)
    if backend == "zarr":
        from grpo_stream.buffer.zarr_reader import ZarrReader

        return ZarrReader(path, on_corrupt=on_corrupt)
    raise ValueError(f"{path}/meta.json: unknown backend {backend!r}")
