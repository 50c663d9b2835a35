"""The evaluator's published progress, and the learner's wait for it.

The evaluator (`grpo_stream/eval/follow.py`) writes `BUFFER/consumers/eval.json` ({"version", "time"})
atomically after each evaluation. Before a weight sync replaces a version that is due
for evaluation (`eval_due`: version 0 and every `eval.every`-th), the learner waits until
the file says that version is done, at most `eval.wait_timeout_s`: so each due version
is evaluated exactly at its weights, and the learner stalls only for the part of an
evaluation that did not fit in its own next step. Works on any fsspec path, like
`grpo_stream.core.progress`, whose consumer-file helpers it uses (and
`core.metric_names` for `eval_wait_s`; nothing else of the project).

    waited = wait_for_eval(buffer_path, cfg.eval, version)   # learner, before a sync
    write_eval_progress(buffer_path, version)                # evaluator, after a row
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import fsspec

from grpo_stream.core import metric_names as M
from grpo_stream.core.progress import consumer_file, write_json_atomic

POLL_S = 0.2


def eval_due(every: int, version: int) -> bool:
    """Is `version` due for evaluation (version 0 and every `every`-th; the final version
    is the evaluator's to catch, since no sync follows it)?"""
    return every > 0 and version % every == 0


def _path(buffer_path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return consumer_file(buffer_path, "eval.json")


def write_eval_progress(buffer_path: str, version: int) -> None:
    write_json_atomic(*_path(buffer_path), {"version": version, "time": time.time()})


def read_eval_progress(buffer_path: str) -> int:
    """The last version evaluated (-1 before the first)."""
    fs, path = _path(buffer_path)
    try:
        with fs.open(path, "r") as f:
            return int(json.load(f)["version"])
    except FileNotFoundError:
        return -1
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable eval progress ({e})") from None


def wait_for_eval(buffer_path: str, eval_cfg: Any, version: int) -> dict[str, float]:
    """Block until `version` is evaluated when it is due; {M.EVAL_WAIT_S: seconds} (or {})."""
    if not eval_due(eval_cfg.every, version):
        return {}
    t0 = time.monotonic()
    while read_eval_progress(buffer_path) < version:
        if time.monotonic() - t0 > eval_cfg.wait_timeout_s:
            print(
                f"[learn] no evaluation of version {version} after "
                f"{eval_cfg.wait_timeout_s:g} s (eval.wait_timeout_s): syncing past it",
                file=sys.stderr,
                flush=True,
            )
            break
        time.sleep(POLL_S)
    return {M.EVAL_WAIT_S: time.monotonic() - t0}
