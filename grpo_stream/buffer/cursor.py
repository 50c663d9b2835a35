"""The learner's cursor over a rollout store: tail-follow, staleness filter, resume.

The cursor is one integer, `position`: the next global group id to consume. Groups
are consumed in publication order, each exactly once; `state()` is a JSON-able dict
the learner saves in its checkpoint, and `load_state()` resumes from it without loss
or duplication.

Groups the cursor cannot deliver are counted, never silently dropped: stale ones
(`current_version - policy_version > max_staleness`) are returned as a count; groups
deleted by retention before the cursor reached them are skipped (the cursor jumps to
the oldest group on disk) and counted in `skipped_deleted`; groups in corrupt
segments/chunks (reader on_corrupt="skip") are counted in `skipped_corrupt`. Given the
learner's `lineage`, groups stamped with another lineage (`skipped_lineage`) and groups
sampled at a version ahead of the learner's (`skipped_ahead`: weights the learner never
had) are refused too. `last_drops` lists the groups the last call dropped, each as
(group, reason) (reasons from grpo_stream.run.ledger), and `last_corrupt` the ids it could not read.

`final_groups` (set by the learner) says how many groups the buffer will ever hold once
the generator finished its work (None while it may write more): a wait for groups that
will not come raises `NoMoreGroups` instead of timing out.

    cur = GroupCursor(open_reader(path))
    groups, n_stale = cur.next_groups(8, timeout_s=600, max_staleness=2, current_version=v)
    ckpt["cursor"] = cur.state()
    ...
    cur = GroupCursor(open_reader(path)); cur.load_state(ckpt["cursor"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from grpo_stream.buffer.base import GroupsDeletedError, RolloutReader
from grpo_stream.buffer.schema import Group

STATE_KEYS = (
    "position",
    "skipped_stale",
    "skipped_deleted",
    "skipped_corrupt",
    "skipped_lineage",
    "skipped_ahead",
)


def is_stale(version: int, current_version: int | None, max_staleness: int | None) -> bool:
    if max_staleness is None or current_version is None:
        return False
    return current_version - version > max_staleness


class NoMoreGroups(Exception):
    """The generator finished its work: fewer groups than asked for will ever come."""


class GroupCursor:
    """Consumes whole groups from a reader in order; see the module docstring."""

    def __init__(self, reader: RolloutReader, position: int = 0, poll_s: float = 0.02) -> None:
        self.reader = reader
        self.position = position
        self.poll_s = poll_s
        self.skipped_stale = 0
        self.skipped_deleted = 0
        self.skipped_corrupt = 0
        self.skipped_lineage = 0
        self.skipped_ahead = 0
        self.final_groups: Callable[[], int | None] | None = None  # see the module docstring
        self.last_drops: list[tuple[Group, str]] = []
        self.last_corrupt: list[int] = []

    def state(self) -> dict[str, Any]:
        return {k: int(getattr(self, k)) for k in STATE_KEYS}

    def load_state(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("position",) if k not in state]
        if missing:
            raise ValueError(f"cursor state: missing field {missing[0]!r}")
        for k in STATE_KEYS:
            setattr(self, k, int(state.get(k, 0)))

    def available(self) -> int:
        """Groups published beyond the cursor (after a refresh)."""
        self.reader.refresh()
        self._skip_deleted()
        return max(self.reader.num_groups() - self.position, 0)

    def _skip_deleted(self) -> None:
        first = self.reader.first_group()
        if self.position < first:
            self.skipped_deleted += first - self.position
            self.position = first

    def wait_for(self, n: int, timeout_s: float) -> None:
        """Block until n groups beyond the cursor are published (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        while (have := self.available()) < n:
            final = self.final_groups() if self.final_groups is not None else None
            if final is not None and self.reader.num_groups() >= final:
                raise NoMoreGroups(
                    f"the generator finished its work with {final} groups in the buffer; "
                    f"{have} left after group {self.position}, fewer than {n}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"buffer: waited {timeout_s:.0f}s for {n} groups after group "
                    f"{self.position}; only {have} published"
                )
            time.sleep(self.poll_s)

    def _take(self, n: int, timeout_s: float) -> tuple[int, list[Group]]:
        """Wait for n groups and read them: (end position, groups); retry if retention races."""
        while True:
            self.wait_for(n, timeout_s)
            start = self.position
            try:
                return start + n, self.reader.read_groups(start, start + n)
            except GroupsDeletedError:
                continue  # wait_for refreshes and jumps past the deleted groups

    def next_groups(
        self,
        n: int,
        timeout_s: float,
        max_staleness: int | None = None,
        current_version: int | None = None,
        lineage: str | None = None,
        refuse_ahead: bool = True,
    ) -> tuple[list[Group], int]:
        """The next n published groups minus refused ones (another `lineage`, a version
        ahead of `current_version` unless `refuse_ahead` is off, stale); returns (groups,
        stale groups dropped)."""
        if n < 1:
            raise ValueError(f"next_groups: n must be >= 1 (got {n})")
        start = self.position
        stop, groups = self._take(n, timeout_s)
        self.skipped_corrupt += n - len(groups)
        seen = {g[0].group_id for g in groups}
        self.last_corrupt = [i for i in range(start, stop) if i not in seen]
        fresh, drops = [], []
        for g in groups:
            reason = refusal(g, current_version, max_staleness, lineage, refuse_ahead)
            (drops.append((g, reason)) if reason else fresh.append(g))
        self.position = stop
        self.last_drops = drops
        stale = sum(r == "stale" for _, r in drops)
        self.skipped_stale += stale
        self.skipped_lineage += sum(r == "lineage" for _, r in drops)
        self.skipped_ahead += sum(r == "ahead" for _, r in drops)
        return fresh, stale


def refusal(
    group: Group,
    current: int | None,
    max_staleness: int | None,
    lineage: str | None,
    refuse_ahead: bool = True,
) -> str:
    """Why the learner must not train on `group` ("lineage", "ahead", "stale"), or "".
    `refuse_ahead=False` where the learner does not version the servers (no weight sync):
    their version numbers are then not the learner's, and none is "ahead" of it."""
    if lineage:
        theirs = group[0].run_id.rpartition("@")[2] if "@" in group[0].run_id else ""
        if theirs and theirs != lineage:  # rows without a lineage predate lineages
            return "lineage"
    if (
        refuse_ahead
        and current is not None
        and max(max(s.policy_version, s.policy_version_end) for s in group) > current
    ):
        return "ahead"
    if is_stale(min(s.policy_version for s in group), current, max_staleness):
        return "stale"
    return ""
