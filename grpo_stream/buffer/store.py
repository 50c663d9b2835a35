"""Open a rollout store: choose its backend. The contract itself is in base.py.

    writer = open_writer(path, backend="arrow", run_id="r1")
    writer.append_groups([group])          # atomically published when this returns
    reader = open_reader(path)             # the backend comes from the store's meta.json
    reader.refresh(); n = reader.num_groups()
    groups = reader.read_groups(0, n)      # list[list[Sample]]

`path` is a local path or any fsspec URL (`memory://`, `s3://`). The backends
(arrow_store.py + arrow_reader.py, zarr_store.py + zarr_reader.py) import base.py and
never this module; the errors and protocols of base.py are re-exported here, so a
caller of the store finds them beside `open_reader`.
"""

from __future__ import annotations

import importlib

from grpo_stream.buffer.base import (  # noqa: F401  (re-exported)
    BufferOptionError,
    CorruptSegmentError,
    GroupsDeletedError,
    RolloutReader,
    RolloutWriter,
    StoreFormatError,
    WriterLockedError,
)
from grpo_stream.buffer.fsutil import StoreFS, read_meta

# backend -> (writer, reader), as "module:class"; imported on use (zarr only when used)
BACKENDS = {
    "arrow": ("arrow_store:ArrowWriter", "arrow_reader:ArrowReader"),
    "zarr": ("zarr_store:ZarrWriter", "zarr_reader:ZarrReader"),
}


def _load(ref: str) -> type:
    module, name = ref.split(":")
    return getattr(importlib.import_module(f"grpo_stream.buffer.{module}"), name)


def detect_backend(path: str) -> str:
    """The backend recorded in PATH/meta.json (schema version checked)."""
    return read_meta(StoreFS.open(path))["backend"]


def open_writer(path: str, backend: str = "arrow", run_id: str = "", **opts) -> RolloutWriter:
    """The store's single writer. opts: fsync=True, max_groups=None, max_age_s=None
    (retention); arrow also rollup_segments and rollup_target_groups, zarr chunk sizes
    (see their modules).

    On local disk it holds STORE/writer.lock until `close()` (or its process ends): a
    second writer is refused with `WriterLockedError` naming the holder."""
    if backend not in BACKENDS:
        raise BufferOptionError(f"buffer.backend: unknown backend {backend!r} (arrow | zarr)")
    return _load(BACKENDS[backend][0])(path, run_id=run_id, **opts)


def open_reader(path: str, on_corrupt: str = "skip") -> RolloutReader:
    """A reader for the store at `path`; the backend comes from its meta.json."""
    backend = detect_backend(path)
    if backend not in BACKENDS:
        raise StoreFormatError(f"{path}/meta.json: unknown backend {backend!r}")
    return _load(BACKENDS[backend][1])(path, on_corrupt=on_corrupt)
