"""The run folder's record files, which the roles append and the run-level ledger joins.

The learner and the generator each leave facts about every prompt in the run folder;
`grpo_stream.run.ledger` joins them into the exactly-once ledger. This module holds
only what the writers need, so that the roles never import the run layer:

  RUN/trained_batches.jsonl     the group ids each learner step was given (FILE_TRAINED)
  RUN/dropped_groups.jsonl      the learner's drops: {group_id, reason, detail} (FILE_DROPS)
  RUN/generator_failures.jsonl  prompts whose generation failed: {prompt_id, reason}
  RUN/lineage                   the learner lineage id (FILE_LINEAGE)

Lineage: a fresh learner makes a lineage id, pushes its weights as version 0 to every
server and publishes the id in its progress; the generator stamps `run_id =
"NAME@LINEAGE"` on each sample (`stamp`), and the learner refuses groups of another
lineage (`lineage_of`; rows without "@" predate lineages and are accepted).

    record_failure(run_dir, prompt_id, "HTTP 500 after 3 tries")
    rows = group_drops(groups, REWARD_FAILED); jsonl.append(path, rows)

The files are JSONL, written and read through `grpo_stream.core.jsonl`: appends are
fsynced, a line torn by a kill is skipped on read and cut before the next append.
"""

from __future__ import annotations

import math
import os
import uuid

from grpo_stream.core import jsonl
from grpo_stream.core.atomic import atomic_write

FILE_DROPS = "dropped_groups.jsonl"
FILE_FAILURES = "generator_failures.jsonl"
FILE_TRAINED = "trained_batches.jsonl"
FILE_LINEAGE = "lineage"

STALE, REWARD_FAILED, LINEAGE, AHEAD, CORRUPT = (
    "stale",
    "reward_failed",
    "lineage",
    "ahead",
    "corrupt",
)
GENERATION_FAILED = "generation_failed"
ZERO_VARIANCE = "zero_variance"  # dynamic sampling: every completion got the same reward
STATES = ("trained", STALE, REWARD_FAILED, GENERATION_FAILED, LINEAGE, AHEAD, CORRUPT,
          ZERO_VARIANCE, "in_buffer")  # fmt: skip


# --- records ------------------------------------------------------------------------


def truncate_drops(run_dir: str, position: int) -> None:
    """Keep the drops of groups before `position` (a resumed learner's cursor): the
    groups after it are read again and decided again."""
    jsonl.truncate(os.path.join(run_dir, FILE_DROPS), lambda r: r.get("group_id", 0) < position)


def record_failure(run_dir: str, prompt_id: str, reason: str) -> None:
    """The generator gave up on a prompt: RUN/generator_failures.jsonl (fsynced)."""
    row = {"prompt_id": prompt_id, "reason": reason[:500], "time": _now()}
    jsonl.append(os.path.join(run_dir, FILE_FAILURES), [row])


def _now() -> float:
    import time

    return time.time()


# --- lineage --------------------------------------------------------------------------


def stamp(run_name: str, lineage: str) -> str:
    """A sample's run_id: NAME@LINEAGE (NAME alone while no lineage is known)."""
    return f"{run_name}@{lineage}" if lineage else run_name


def lineage_of(run_id: str) -> str:
    """The lineage in a sample's run_id; "" for rows written before lineages."""
    return run_id.rpartition("@")[2] if "@" in run_id else ""


def new_lineage(run_dir: str) -> str:
    """A fresh learner's lineage id, also written to RUN/lineage."""
    lineage = uuid.uuid4().hex[:12]
    atomic_write(os.path.join(run_dir, FILE_LINEAGE), lineage + "\n")
    return lineage


def read_lineage(run_dir: str) -> str:
    path = os.path.join(run_dir, FILE_LINEAGE)
    return open(path).read().strip() if os.path.exists(path) else ""


def group_drops(groups, reason: str) -> list[dict]:
    """Drop rows for groups the learner refused, each with a detail naming why."""
    rows = []
    for g in groups:
        s = g[0]
        if reason == REWARD_FAILED:
            bad = next((x for x in g if x.reward_error or not math.isfinite(x.reward)), s)
            detail = bad.reward_error or f"reward {bad.reward}"
        elif reason == LINEAGE:
            detail = f"run_id {s.run_id}"
        else:
            detail = f"policy_version {max(x.policy_version for x in g)}"
        rows.append({"group_id": s.group_id, "prompt_id": s.prompt_id, "reason": reason,
                     "detail": detail})  # fmt: skip
    return rows
