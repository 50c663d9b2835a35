"""The exactly-once ledger: where every prompt the generator started ended up.

Every started prompt ends in exactly one state: trained in step N; dropped by the
learner (stale, reward failed, another lineage, a version ahead of the learner's, an
unreadable segment), with the reason; dropped because generation failed after retries,
with the reason; or still in the buffer. The facts live in four places, and this module
joins them by prompt id:

  BUFFER                    one group per sampled prompt (prompt_id, run_id = NAME@LINEAGE)
  RUN/trained_batches.jsonl the group ids each learner step was given
  RUN/dropped_groups.jsonl  the learner's drops: {group_id, reason, detail}  (FILE_DROPS)
  RUN/generator_failures.jsonl  prompts whose generation failed: {prompt_id, reason}

A group listed in a step's batch and dropped there for a failed reward counts once, as
dropped. A prompt with no state at a position before the newest started one was lost.

    led = compute_ledger(run_dir); print(format_ledger(led)); led.ok
    started = started_prompts(buffer_path, run_dir)           # generator restart:
    prompts = continue_prompts(make_prompt_source(...), started)  # gaps first, no repeats

The record files, their reasons and lineage stamps are defined in
`grpo_stream.core.run_records` (the roles write them); the generator's restart walk is
`grpo_stream.generator.resume`. This module only reads and joins.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from grpo_stream.core import jsonl
from grpo_stream.core.run_records import (
    FILE_DROPS,
    FILE_FAILURES,
    FILE_TRAINED,
    GENERATION_FAILED,
    REWARD_FAILED,
    STATES,
)
from grpo_stream.generator.resume import continue_prompts, started_prompts

# --- the ledger -------------------------------------------------------------------------


@dataclass
class Ledger:
    counts: dict[str, int]  # state -> prompts
    multi: dict[str, list[str]]  # prompt id -> its states (two or more)
    none: list[str]  # prompts started (before the newest started one) with no state
    duplicated_groups: int  # groups beyond the first of a prompt
    unreadable_groups: list[int] = field(default_factory=list)  # in records, not readable
    prompts: int = 0

    @property
    def ok(self) -> bool:
        return not self.multi and not self.none and not self.duplicated_groups


def _buffer_groups(buffer_path: str) -> dict[int, str]:
    """group id -> prompt id, for every readable group."""
    from grpo_stream.buffer.store import open_reader

    try:
        reader = open_reader(buffer_path)
    except FileNotFoundError:
        return {}
    try:
        t = reader.read_table(reader.first_group(), reader.num_groups(), ["group_id", "prompt_id"])
        return dict(
            zip(t.column("group_id").to_pylist(), t.column("prompt_id").to_pylist(), strict=True)
        )
    finally:
        reader.close()


def _group_states(run_dir: str) -> dict[int, list[str]]:
    """group id -> the states the learner's records give it."""
    states: dict[int, list[str]] = defaultdict(list)
    drops = {}
    for r in jsonl.read(os.path.join(run_dir, FILE_DROPS)):
        drops.setdefault(r["group_id"], []).append(r)
    for row in jsonl.read(os.path.join(run_dir, FILE_TRAINED)):
        for gid in row.get("group_ids", []):
            if any(d["reason"] == REWARD_FAILED for d in drops.get(gid, [])):
                continue  # given to the step, dropped there: the drop row says it
            states[gid].append(f"trained:{row['step']}")
    for gid, rows in drops.items():
        states[gid].extend(f"{d['reason']}:{d.get('detail', '')}" for d in rows)
    return states


def compute_ledger(run_dir: str, buffer_path: str | None = None, source=None) -> Ledger:
    """Join the buffer, the learner's records and the generator's failures by prompt.
    `source` (prompts in stream order) finds prompts started but in no state."""
    if buffer_path is None:
        from grpo_stream.config import load_run_config

        buffer_path = load_run_config(run_dir, role="generate").buffer_path(run_dir)
    groups = _buffer_groups(buffer_path)
    gstates = _group_states(run_dir)
    by_prompt: dict[str, list[str]] = defaultdict(list)
    per_prompt_groups: dict[str, int] = defaultdict(int)
    for gid, pid in groups.items():
        per_prompt_groups[pid] += 1
        by_prompt[pid].extend(gstates.get(gid) or ["in_buffer:"])
    for r in jsonl.read(os.path.join(run_dir, FILE_FAILURES)):
        by_prompt[r["prompt_id"]].append(f"{GENERATION_FAILED}:{r.get('reason', '')}")
    counts = dict.fromkeys(STATES, 0)
    multi = {}
    for pid, sts in by_prompt.items():
        if len(sts) > 1:
            multi[pid] = sts
        counts[sts[0].split(":", 1)[0]] += 1
    none = _missing(source, set(by_prompt)) if source is not None else []
    return Ledger(
        counts=counts,
        multi=multi,
        none=none,
        duplicated_groups=sum(n - 1 for n in per_prompt_groups.values()),
        unreadable_groups=sorted(set(gstates) - set(groups)),
        prompts=len(by_prompt),
    )


def _missing(source: Iterator, known: set[str]) -> list[str]:
    """Prompts before the last known one (in stream order) that are not known. Ids the
    source never yields (another task config) end the walk after a bounded look."""
    missing: list[tuple[int, str]] = []
    left, last = set(known), -1
    bound = 2 * len(known) + 10_000
    for i, p in enumerate(source):
        if not left or i > bound:
            break
        if p.prompt_id in left:
            left.discard(p.prompt_id)
            last = i
        else:
            missing.append((i, p.prompt_id))
    return [pid for i, pid in missing if i < last]


def run_ledger(run_dir: str) -> Ledger:
    """The ledger of a run folder, with the run's own prompt source (for gaps)."""
    from grpo_stream.config import load_run_config
    from grpo_stream.tasks import make_prompt_source
    from grpo_stream.tasks.heldout import training_exclusion

    cfg = load_run_config(run_dir, role="generate")
    buffer_path = cfg.buffer_path(run_dir)
    _, oldest = started_prompts(buffer_path, run_dir)
    source = make_prompt_source(cfg.task, exclude=training_exclusion(cfg))
    if oldest is not None:  # retention deleted older groups: no gaps before the oldest kept
        source = continue_prompts(source, set(), oldest)
    return compute_ledger(run_dir, buffer_path, source)


def format_ledger(led: Ledger, limit: int = 20) -> str:
    parts = [f"{k} {v}" for k, v in led.counts.items() if v or k in ("trained", "in_buffer")]
    lines = [f"ledger: {led.prompts} prompts: " + ", ".join(parts)]
    lines.append(
        f"  in two states: {len(led.multi)}; in none: {len(led.none)}; "
        f"duplicated groups: {led.duplicated_groups}"
    )
    for pid, sts in list(led.multi.items())[:limit]:
        lines.append(f"  two states: {pid}: {' | '.join(sts)}")
    for pid in led.none[:limit]:
        lines.append(f"  no state: {pid}")
    if led.unreadable_groups:
        shown = ", ".join(map(str, led.unreadable_groups[:limit]))
        lines.append(f"  groups in the learner's records but unreadable: {shown}")
    return "\n".join(lines)
