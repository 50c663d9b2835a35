"""Low-level Zarr I/O for the buffer: an atomic local store and checked slice reads.

`AtomicLocalStore` writes every key (chunk or zarr.json) to a temporary name, fsyncs,
and renames it, so a concurrent reader or a killed writer never leaves a torn chunk.
`read_slice` reads rows [lo, hi) of one array and turns a missing or undecodable chunk
into `base.ChunkError`, which names the chunk file(s).

    store = open_zarr_store(StoreFS.open(path), read_only=True)
    rows = read_slice(sfs, "ints", array, 0, 100)
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from zarr.storage import FsspecStore, LocalStore

from grpo_stream.buffer.base import ChunkError
from grpo_stream.buffer.fsutil import StoreFS
from grpo_stream.core.atomic import fsync_dir, fsync_path, write_file_atomic


def _put_atomic(path: Path, data: memoryview) -> None:
    """Write one key atomically; fsync comes later, batched (AtomicLocalStore.sync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    write_file_atomic(tmp, path, data, fsync=False)


class AtomicLocalStore(LocalStore):
    """LocalStore whose writes are atomic (tmp + rename), with batched fsync.

    With fsync=True, written keys are remembered and `sync()` fsyncs them (and their
    directories) in parallel; the writer calls it before and after the commit pointer,
    so the data is durable before the pointer that publishes it.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False, fsync: bool = True) -> None:
        super().__init__(root, read_only=read_only)
        self.fsync = fsync
        self._pending: list[Path] = []

    def with_read_only(self, read_only: bool = False) -> AtomicLocalStore:
        return type(self)(self.root, read_only=read_only, fsync=self.fsync)

    async def set(self, key: str, value) -> None:  # value: zarr Buffer
        await self._atomic_set(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value) -> None:
        await self._atomic_set(key, value, exclusive=True)

    async def _atomic_set(self, key: str, value, exclusive: bool) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        path = self.root / key
        if exclusive and path.exists():
            return
        data = memoryview(np.ascontiguousarray(value.as_numpy_array())).cast("B")
        await asyncio.to_thread(_put_atomic, path, data)
        if self.fsync:
            self._pending.append(path)

    def sync(self) -> None:
        """fsync every key written since the last sync, and the directories holding them."""
        if not self._pending:
            return
        files = {str(p) for p in self._pending}
        dirs = {str(p.parent) for p in self._pending}
        self._pending = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(fsync_path, sorted(files)))
            list(pool.map(fsync_dir, sorted(dirs)))


def open_zarr_store(sfs: StoreFS, read_only: bool, fsync: bool = True):
    """A zarr store over the same path as meta.json: atomic local, or fsspec elsewhere."""
    if sfs.local:
        if not read_only:
            os.makedirs(sfs.root, exist_ok=True)
        return AtomicLocalStore(sfs.root, read_only=read_only, fsync=fsync)
    return FsspecStore.from_url(sfs.url, read_only=read_only)


def remove_stray_tmp(sfs: StoreFS) -> list[str]:
    """Delete temporary files a killed writer left (local stores only); returns them."""
    if not sfs.local:
        return []
    removed = []
    for dirpath, _dirs, files in os.walk(sfs.root):
        for f in files:
            if f.startswith(".") and (f.endswith(".tmp") or f.endswith(".partial")):
                os.unlink(os.path.join(dirpath, f))
                removed.append(os.path.join(dirpath, f))
    return removed


def chunk_key(name: str, k: int, ndim: int) -> str:
    return f"{name}/c/{k}" + "/0" * (ndim - 1)


def chunk_ranges_for(arr, lo: int, hi: int) -> list[int]:
    """Indices of the chunks (along axis 0) that hold rows [lo, hi)."""
    c = arr.chunks[0]
    return list(range(lo // c, (hi - 1) // c + 1)) if hi > lo else []


def read_slice(sfs: StoreFS, name: str, arr, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of array `name`; ChunkError names any missing/undecodable chunk."""
    if hi <= lo:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    ks = chunk_ranges_for(arr, lo, hi)
    missing = {}
    for k in ks:
        path = sfs.join(chunk_key(name, k, arr.ndim))
        found = os.path.isfile(path) if sfs.local else sfs.fs.exists(path)
        if not found:
            missing[path] = "chunk file is missing"
    if missing:
        raise ChunkError(missing)
    try:
        return np.asarray(arr[lo:hi])
    except Exception as first:  # noqa: BLE001 - codec errors have no common type
        bad = _probe_chunks(sfs, name, arr, ks)
        if not bad:
            raise
        raise ChunkError(bad) from first


def _probe_chunks(sfs: StoreFS, name: str, arr, ks: list[int]) -> dict[str, str]:
    c, n = arr.chunks[0], arr.shape[0]
    bad = {}
    for k in ks:
        try:
            arr[k * c : min((k + 1) * c, n)]
        except Exception as e:  # noqa: BLE001
            bad[sfs.join(chunk_key(name, k, arr.ndim))] = f"{type(e).__name__}: {e}"
    return bad
