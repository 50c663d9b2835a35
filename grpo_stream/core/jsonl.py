"""The one JSONL module: every record file a run appends to (metrics, trained batches,
drops, failures, eval rows, the supervisor's log) is written and read through it.

    jsonl.append(path, row)                  # or a list of rows: one write, fsynced
    rows = jsonl.read(path)                  # [] when the file does not exist
    jsonl.truncate(path, lambda r: r["step"] <= 4)   # a resume cuts a log back, atomically
    rows = jsonl.read(path, complete=True)   # a finished file (a user's dataset)

The torn-line policy, the same for every file:
- `append` writes all its rows in one `write` under an exclusive `flock`, then fsyncs,
  so a crash tears at most the last line. Bytes after the last newline (a fragment a
  killed writer left) are cut before the new rows are written: a fragment never glues
  onto the next row. (Starting the append with a newline instead would keep the fragment
  as a line in the middle, which `read` must refuse.)
- `read` skips the last line when it has no newline or does not parse (its writer may be
  mid-write, or was killed there); any other line that does not parse raises
  `JSONLError` naming the file and the line number. Blank lines are skipped.
- `read(..., complete=True)` is for files no one is writing: the last line may lack its
  newline, and every line must parse.
Each line must hold a JSON object (a dict).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Callable, Iterable

from grpo_stream.core.atomic import atomic_write
from grpo_stream.core.errors import UserError

_CHUNK = 1 << 16


class JSONLError(UserError, ValueError):
    """A line in the middle of a JSONL file is not a JSON object; names file:line."""


def append(path: str | os.PathLike, rows: dict | Iterable[dict], fsync: bool = True) -> None:
    """Append one row (a dict) or several as JSON lines: one write, flushed and fsynced."""
    rows = [rows] if isinstance(rows, dict) else list(rows)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if not data:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two appenders never interleave or cut each other
        _cut_torn_tail(fd, path)
        view = memoryview(data)
        while view:  # one write for a regular file; the loop only guards a short write
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def _cut_torn_tail(fd: int, path) -> None:
    """Truncate the file back to just after its last newline (nothing to do when it
    ends with one, or is empty)."""
    end = os.fstat(fd).st_size
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return
    keep, pos = 0, end
    while pos > 0:
        start = max(0, pos - _CHUNK)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i >= 0:
            keep = start + i + 1
            break
        pos = start
    os.ftruncate(fd, keep)
    print(f"[jsonl] {os.fspath(path)}: cut a torn last line ({end - keep} bytes) left by a "
          "killed writer", file=sys.stderr, flush=True)  # fmt: skip


def read(path: str | os.PathLike, complete: bool = False) -> list[dict]:
    """The rows of a JSONL file ([] when it does not exist); see the module docstring."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    if complete and tail.strip():
        numbered.append((len(lines) + 1, tail))
    # the last line may be torn only when no unterminated tail follows it
    may_tear = not complete and not tail.strip()
    rows = []
    for i, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            if may_tear and i == len(numbered) - 1:
                break
            raise JSONLError(f"{os.fspath(path)}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            if may_tear and i == len(numbered) - 1:
                break
            raise JSONLError(f"{os.fspath(path)}:{n}: not a JSON object: {line[:80]!r}")
        rows.append(row)
    return rows


def truncate(path: str | os.PathLike, keep: Callable[[dict], bool]) -> int:
    """Keep the rows for which `keep(row)` holds (a torn last line goes too), replacing
    the file atomically; the number of rows kept. A missing file stays missing. Only
    while nothing appends to it (a resuming process, before its first append)."""
    if not os.path.exists(path):
        return 0
    rows = [r for r in read(path) if keep(r)]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
