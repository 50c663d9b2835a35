"""The learner's published progress, read by the generator's staleness gate.

The learner writes `BUFFER/consumers/learner.json` ({"consumed_groups", "version",
"step", "time", "finished", "pid", "host", "lineage"}) atomically after every step. The
generator, possibly on another machine, reads it to keep the buffer at most the learner's
next batch and `max_ahead_batches` more ahead of what it has consumed: it pauses rather than produce
data the learner would discard as stale. A learner that reaches `learner.max_steps`
writes `finished = true` last, so a generator started by hand stops instead of waiting
forever; `pid`/`host` let a generator on the same host notice a learner that died.
Works on any fsspec path.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, fields

import fsspec
from fsspec.implementations.local import LocalFileSystem

from grpo_stream.core.atomic import atomic_write


@dataclass
class LearnerProgress:
    consumed_groups: int = 0
    version: int = 0
    step: int = 0
    time: float = 0.0
    finished: bool = False  # the learner reached learner.max_steps: no more room will come
    pid: int = 0  # the writing process (rank 0), stamped by write_progress
    host: str = ""
    lineage: str = ""  # the learner's lineage id, published once its weights are on the servers


def consumer_file(buffer_path: str, name: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `BUFFER/consumers/NAME` (also `eval_progress`'s file)."""
    fs, root = fsspec.core.url_to_fs(buffer_path)
    return fs, f"{root.rstrip('/')}/consumers/{name}"


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, data: dict) -> None:
    """Write `data` as JSON to `path` through a `.tmp` file and a rename."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if isinstance(fs, LocalFileSystem):  # the project's one helper: fsynced, per-process tmp
        atomic_write(path, json.dumps(data))
        return
    with fs.open(path + ".tmp", "w") as f:  # another fsspec filesystem: its own move
        json.dump(data, f)
    fs.mv(path + ".tmp", path)


def _path(buffer_path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return consumer_file(buffer_path, "learner.json")


def write_progress(buffer_path: str, progress: LearnerProgress) -> None:
    progress.time = time.time()
    progress.pid, progress.host = os.getpid(), socket.gethostname()
    write_json_atomic(*_path(buffer_path), asdict(progress))


def read_progress(buffer_path: str) -> LearnerProgress:
    fs, path = _path(buffer_path)
    if not fs.exists(path):
        return LearnerProgress()
    try:
        with fs.open(path, "r") as f:
            data = json.load(f)
        known = {fl.name for fl in fields(LearnerProgress)}  # a newer writer may add fields
        return LearnerProgress(**{k: v for k, v in data.items() if k in known})
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable learner progress ({e})") from None
