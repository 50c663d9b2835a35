"""A failed weight sync, as the learner leaves it for `run`'s supervisor.

When a push raises `WeightSyncError`, the learner (rank 0) checkpoints the step it just
trained, writes `RUN/sync_failure.json` ({"step", "version", "error", "time"}) and exits
with `EXIT_SYNC_FAILED`. `run` then restarts the servers the error names (a server that
failed mid-reload is left paused on half-loaded weights) and resumes the learner, whose
first act is to push its checkpoint's weights to every server.

    write_sync_failure(run_dir, step, version, err)      # learner, before exiting
    failure = take_sync_failure(run_dir)                 # supervisor: read once, removed
    failed_urls(failure["error"], urls)                  # the servers the error names
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from grpo_stream.core.atomic import atomic_write

EXIT_SYNC_FAILED = 75  # EX_TEMPFAIL: the step is checkpointed; restart the server, resume
FILE = "sync_failure.json"


def write_sync_failure(run_dir: str, step: int, version: int, err: BaseException) -> Path:
    path = Path(run_dir) / FILE
    row = {"step": step, "version": version, "error": str(err), "time": time.time()}
    atomic_write(path, json.dumps(row))
    return path


def take_sync_failure(run_dir: str) -> dict | None:
    """The failure the learner left (then removed), or None."""
    path = Path(run_dir) / FILE
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    path.unlink(missing_ok=True)
    return row


def failed_urls(message: str, urls: list[str]) -> list[str]:
    """The server URLs of `urls` a WeightSyncError message names (every error names its
    server; `http://h:800` does not match `http://h:8000`)."""
    return [u for u in urls if re.search(re.escape(u.rstrip("/")) + r"(?![\d])", message)]
