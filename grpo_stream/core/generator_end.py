"""Why the generator stopped: `BUFFER/consumers/generator.json`, beside the learner's progress.

A generator that exits 0 writes one `GeneratorEnd` record: the reason and the number of
groups in the buffer then. `run`'s supervisor reads it to tell a generator that finished
its work (no restart) from one that stopped because the learner finished; a learner
waiting for groups reads it to know that no more will come (it then ends cleanly after
the whole batches the buffer holds). A generator clears the record as it starts, and
`run` before it starts any child, so a record from an earlier generator does not end a
resumed run (a learner started by hand well before its generator could still read one).

    clear_generator_end(buffer_path)                       # generator start
    write_generator_end(buffer_path, EXHAUSTED, groups=40)  # generator exit 0
    end = read_generator_end(buffer_path)                  # None: running, or never ran
    if end is not None and end.work_done: ...              # no more groups will come
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass

from grpo_stream.core.progress import consumer_file, write_json_atomic

LEARNER_FINISHED = "learner_finished"  # the learner reached its end; no room will come
EXHAUSTED = "exhausted"  # the prompt source has no prompt left (task.passes over a file)
STOP_AFTER_GROUPS = "stop_after_groups"  # the buffer holds generator.stop_after_groups
STOPPED = "stopped"  # a signal (SIGTERM/SIGINT) asked it to stop
WORK_DONE = (EXHAUSTED, STOP_AFTER_GROUPS)  # the generator's own work is finished
REASONS = (LEARNER_FINISHED, *WORK_DONE, STOPPED)
FILE = "generator.json"


@dataclass
class GeneratorEnd:
    reason: str  # one of REASONS
    groups: int  # groups in the buffer when it stopped (ids 0..groups-1, deleted ones too)
    time: float = 0.0
    pid: int = 0
    host: str = ""

    @property
    def work_done(self) -> bool:
        """No more groups will come from this run's generator."""
        return self.reason in WORK_DONE


def write_generator_end(buffer_path: str, reason: str, groups: int) -> None:
    if reason not in REASONS:
        raise ValueError(f"generator end: unknown reason {reason!r} (one of {REASONS})")
    end = GeneratorEnd(reason, groups, time.time(), os.getpid(), socket.gethostname())
    write_json_atomic(*consumer_file(buffer_path, FILE), asdict(end))


def read_generator_end(buffer_path: str) -> GeneratorEnd | None:
    """The record a stopped generator left, or None (none, or an unreadable one)."""
    fs, path = consumer_file(buffer_path, FILE)
    try:
        with fs.open(path, "r") as f:
            data = json.load(f)
        return GeneratorEnd(str(data["reason"]), int(data["groups"]), float(data["time"]),
                            int(data.get("pid", 0)), str(data.get("host", "")))  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def clear_generator_end(buffer_path: str) -> None:
    fs, path = consumer_file(buffer_path, FILE)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
