"""Atomic publication of files and folders: write a temporary name, fsync, `os.replace`.

A reader never sees half a segment, checkpoint or weights folder: the writer fills a
temporary name, fsyncs what it wrote, renames it into place with `os.replace` (atomic
on POSIX), and fsyncs the parent directory so the rename itself survives a crash. This
is the one helper for every file and folder the project publishes (buffer segments and
meta.json, learner checkpoints, disk weight sync, prepared model folders, the progress
files, the run's small records and plots, a JSONL file cut back on resume). It imports
only the standard library, so every layer may use it.

    tmp = fresh_dir(final.with_name(final.name + ".tmp"))   # empty
    model.save_pretrained(tmp)
    publish_dir(tmp, final)              # fsync every file; replace an old `final`

    write_file_atomic(tmp_path, final_path, data)
    link_files(published, tmp / "model")   # share a published folder's files (no bytes written)
    atomic_write(final_path, text_or_bytes)   # the temporary name picked beside it
    with atomic_target(out) as tmp:           # a writer that wants a path (savefig)
        fig.savefig(tmp)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file (or directory) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a directory (a rename into it) durable. Best effort: some
    filesystems refuse to open or fsync a directory, and then there is nothing to do."""
    try:
        fsync_path(path)
    except OSError:
        pass


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file below `folder`, then every directory (deepest first)."""
    for dirpath, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def fresh_dir(path: str | os.PathLike) -> Path:
    """`path` as a new empty folder (a leftover from a killed writer is removed)."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Publish the filled folder `tmp` as `final`, atomically, replacing an old `final`.

    The old folder is first renamed aside (not deleted in place), so a reader finds
    either the old or the new folder at `final`, never a half-deleted one."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def link_files(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Fill the folder `dst` with the files of the flat folder `src` as hard links (one
    inode, no bytes written), copying a file where the file system refuses the link
    (another device, or no hard links). True when every file was linked.

    Sound only because nothing here rewrites a published file in place: every publisher
    writes new files under a temporary name, so a linked file never changes under its
    other name, and deleting one name leaves the other whole."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    linked = True
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        try:
            os.link(f, dst / f.name)
        except OSError:  # EXDEV, EPERM, ENOTSUP: a copy is as good, only slower
            shutil.copy2(f, dst / f.name)
            linked = False
    return linked


def write_file_atomic(
    tmp: str | os.PathLike, final: str | os.PathLike, data: bytes | memoryview, fsync: bool = True
) -> None:
    """Write `data` to `tmp`, then rename it to `final`; `tmp` never outlives a failure.

    With `fsync=False` the rename is still atomic (readers see the old or the whole new
    file) but not durable across a power loss; callers that batch their fsyncs use it."""
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(os.path.dirname(os.fspath(final)) or ".")


def _tmp_beside(final: str | os.PathLike, suffix: str = "") -> Path:
    """A temporary name in `final`'s folder (a rename across filesystems is not atomic),
    hidden, and per process (two processes never write one temporary file)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp{suffix}")


def atomic_write(final: str | os.PathLike, data: str | bytes, fsync: bool = True) -> None:
    """Publish `data` (text is UTF-8 encoded) as the file `final`, atomically."""
    raw = data.encode() if isinstance(data, str) else data
    write_file_atomic(_tmp_beside(final), final, raw, fsync)


@contextmanager
def atomic_target(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path for a writer that wants a file name (matplotlib's savefig, a
    tokenizer); published as `final` when the block ends without an error, removed
    otherwise. `suffix` keeps an extension a writer infers its format from (".png")."""
    tmp = _tmp_beside(final, suffix)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(os.path.dirname(os.fspath(final)) or ".")
