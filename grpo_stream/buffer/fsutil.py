"""Filesystem helpers shared by the buffer backends: fsspec paths, atomic writes, meta.json.

Every store path is a local path or an fsspec URL. `StoreFS` wraps the fsspec filesystem
and the root path inside it, and knows how to publish a file atomically: on local disk
with `grpo_stream.core.atomic` (a temporary name, fsync, `os.replace`); elsewhere by writing
the temporary name and renaming it (atomic on `memory://`, best effort on object stores).
`open_store_writer` / `open_store_reader` do what every backend's writer and reader do
first: take the writer lock and create or check meta.json.

    sfs = StoreFS.open("memory://runs/r1/buffer")
    sfs.write_atomic("meta.json", b"{...}")
    meta = read_meta(sfs)
    handle = open_store_writer(path, "arrow", run_id="r1")   # .sfs .lock .meta .run_id
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from grpo_stream.buffer.base import StoreFormatError, StoreNotFoundError, WriterLockedError
from grpo_stream.buffer.schema import SCHEMA_VERSION, check_schema_version
from grpo_stream.core.atomic import write_file_atomic

META_NAME = "meta.json"
LOCK_NAME = "writer.lock"


@dataclass
class StoreFS:
    fs: Any  # fsspec.AbstractFileSystem
    root: str  # path inside fs, no trailing slash
    url: str  # what the user gave, for messages

    @classmethod
    def open(cls, path: str | os.PathLike) -> StoreFS:
        url = os.fspath(path)
        fs, root = fsspec.core.url_to_fs(url)
        return cls(fs=fs, root=root.rstrip("/") or "/", url=url)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.join(name))

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def listdir(self) -> list[str]:
        """Base names directly under the root (empty if the root does not exist)."""
        try:
            if self.local:  # fsspec's ls stats every entry; a store holds many files
                return os.listdir(self.root)
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.join(name))
        except FileNotFoundError:
            pass

    def write_atomic(self, name: str, data: bytes | memoryview, fsync: bool = True) -> None:
        """Publish `data` under `name` so a reader sees the old file or the whole new one."""
        final, tmp = self.join(name), self.join(f".{name}.tmp")
        if self.local:
            write_file_atomic(tmp, final, data, fsync)
            return
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.join(name))


class WriterLock:
    """An exclusive `flock` on STORE/writer.lock, held while a writer is open.

    Two writers would both number their next groups from the same listing and publish
    over each other's segments/chunks, silently losing data; the second one is refused
    instead, with the holder's pid and host. The kernel drops the lock when the holder
    exits however it exits (SIGKILL included), so no stale lock ever needs clearing.
    Local stores only: fsspec object stores have no such lock (keep to one writer).
    """

    def __init__(self, sfs: StoreFS) -> None:
        self._file = None
        if not sfs.local:
            return
        sfs.makedirs()
        path = sfs.join(LOCK_NAME)
        f = open(path, "a+")  # noqa: SIM115  (held open for the writer's lifetime)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise WriterLockedError(
                f"buffer {sfs.url}: another writer ({holder}) holds {path}; a store has one "
                "writer (stop it, or give this run its own buffer.path)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def resolve_store_path(path: str) -> str:
    """A store root, or a run dir holding one in `buffer/` (used by the CLI)."""
    sfs = StoreFS.open(path)
    if not sfs.exists(META_NAME) and sfs.fs.exists(sfs.join(f"buffer/{META_NAME}")):
        return path.rstrip("/") + "/buffer"
    return path


def write_meta(sfs: StoreFS, backend: str, run_id: str, extra: dict | None = None) -> dict:
    meta = {
        "backend": backend,
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created_at": time.time(),
        **(extra or {}),
    }
    sfs.makedirs()
    sfs.write_atomic(META_NAME, json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta


def read_meta(sfs: StoreFS, expect_backend: str | None = None) -> dict:
    """meta.json of a store, checked: it exists, parses, and has a version we know."""
    where = f"{sfs.url.rstrip('/')}/{META_NAME}"
    try:
        meta = json.loads(sfs.read_bytes(META_NAME))
    except FileNotFoundError:
        raise StoreNotFoundError(f"no rollout store at {sfs.url} (missing {META_NAME})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreFormatError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "backend" not in meta:
        raise StoreFormatError(f"{where}: missing field 'backend'")
    check_schema_version(meta.get("schema_version"), where)
    if expect_backend is not None and meta["backend"] != expect_backend:
        raise StoreFormatError(
            f"{where}: store backend is {meta['backend']!r}, cannot open it as {expect_backend!r}"
        )
    return meta


def open_or_create_meta(sfs: StoreFS, backend: str, run_id: str) -> dict:
    """The writer's view: reuse an existing store's meta (checked) or create a new one."""
    if sfs.exists(META_NAME):
        return read_meta(sfs, expect_backend=backend)
    return write_meta(sfs, backend, run_id)


@dataclass
class WriterHandle:
    """What a backend's writer holds: the store, its lock (until `close`), its meta."""

    sfs: StoreFS
    lock: WriterLock
    meta: dict
    run_id: str


def open_store_writer(path: str, backend: str, run_id: str) -> WriterHandle:
    """Take the store's writer lock (before touching anything: one writer per store),
    then reuse or create its meta.json. An empty `run_id` keeps the store's own."""
    sfs = StoreFS.open(path)
    lock = WriterLock(sfs)
    meta = open_or_create_meta(sfs, backend, run_id)
    return WriterHandle(sfs, lock, meta, run_id or meta.get("run_id", ""))


def open_store_reader(path: str, backend: str) -> tuple[StoreFS, dict]:
    """The store at `path` and its meta.json, checked to be a `backend` store."""
    sfs = StoreFS.open(path)
    return sfs, read_meta(sfs, expect_backend=backend)
