"""The learner's batch source: the next batch of groups from the buffer, all ranks alike.

    source = BatchSource(cursor, cfg.learner, versions_servers=True)
    source.on_advance = publish_progress          # rank 0: the generator's gate follows
    batch = source.next(version)                   # Batch(groups, info, drops)

Rank 0 reads with its cursor; every rank gets the batch by broadcast, so ranks never
disagree on it and a time-out cannot strike one rank alone. The cursor refuses groups
of another lineage, sampled ahead of the learner, or stale; their drop rows (for the
ledger) come back in `Batch.drops`.

**Dynamic sampling** (`learner.dynamic_sampling`, DAPO): a group whose rewards are all
equal has zero advantage under GRPO, so it adds no gradient, only tokens to the
denominators. With it on, such groups are dropped too (reason "zero_variance") and the
source reads on until the batch holds `batch_groups` groups with variance. Every group
it passes is consumed, and `on_advance` publishes the new position, so the generator's
staleness gate lets it sample replacements (the refill). The read is bounded by
`learner.max_refill_batches` batches' worth of groups: at the bound the step trains on
what it found, and says so; a bound reached with no group with variance at all raises
`NoGroupWithVariance` (the task gives the model nothing to learn from), after the drops
are in `Batch.drops` for the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from grpo_stream.buffer.cursor import GroupCursor, NoMoreGroups
from grpo_stream.buffer.schema import Group
from grpo_stream.config import LearnerConfig
from grpo_stream.core import metric_names as M
from grpo_stream.core import run_records
from grpo_stream.core.errors import UserError
from grpo_stream.learner.distributed import broadcast_object, print0

REWARD_TOLERANCE = 1e-6  # rewards closer than this count as equal


class NoGroupWithVariance(UserError):
    """Dynamic sampling read its whole bound and found no group whose rewards differ."""


@dataclass
class Batch:
    """The groups of one step as the cursor delivered them (refused ones dropped)."""

    groups: list[Group]
    info: dict  # CURSOR_START, CURSOR_END, STALE_GROUPS_DROPPED, WAIT_S, ...
    drops: list[dict] = field(default_factory=list)  # refused groups (run_records rows)
    error: str = ""  # NoGroupWithVariance's message, raised once the drops are recorded


def has_variance(group: Group) -> bool:
    """Do the group's rewards differ? A failed reward (not finite) is not judged here:
    the step drops such groups as reward_failed."""
    rewards = [s.reward for s in group]
    if not all(r == r and abs(r) != float("inf") for r in rewards):
        return True
    return max(rewards) - min(rewards) > REWARD_TOLERANCE


def zero_variance_drops(groups: list[Group]) -> list[dict]:
    return [{"group_id": g[0].group_id, "prompt_id": g[0].prompt_id,
             "reason": run_records.ZERO_VARIANCE,
             "detail": f"reward {g[0].reward:g} for all {len(g)}"} for g in groups]  # fmt: skip


class BatchSource:
    """See the module docstring."""

    def __init__(
        self, cursor: GroupCursor | None, cfg: LearnerConfig, versions_servers: bool = True
    ):
        self.cursor, self.cfg = cursor, cfg
        self.lineage = ""  # groups stamped with another lineage are refused
        # without weight sync the servers' versions are not the learner's (it never
        # pushes), so no sample's version is "ahead" (the transport's `versions_servers`)
        self.refuse_ahead = versions_servers
        self.on_advance: Callable[[], None] = lambda: None

    @property
    def position(self) -> int:
        return self.cursor.position if self.cursor is not None else 0

    def state(self) -> dict:
        return self.cursor.state() if self.cursor is not None else {}

    def next(self, version: int) -> Batch:
        """The next batch; NoMoreGroups on every rank once the generator's work is done."""
        got: Batch | NoMoreGroups | None = None
        if self.cursor is not None:
            try:
                got = self._read(version)
            except NoMoreGroups as e:  # told to every rank: none may wait for a batch
                got = e
        got = broadcast_object(got)
        if isinstance(got, NoMoreGroups):
            raise got
        return got

    def _read(self, version: int) -> Batch:
        lc, t0, start = self.cfg, time.perf_counter(), self.cursor.position
        if start == 0 and self.cursor.available() < lc.batch_groups:
            print0(f"[learn] waiting for the first {lc.batch_groups} groups in the buffer ...")
        bound = lc.batch_groups * (lc.max_refill_batches if lc.dynamic_sampling else 1)
        groups, drops, stale, flat = [], [], 0, []
        before = self.cursor.state()
        while len(groups) < lc.batch_groups and self.cursor.position - start < bound:
            n = min(lc.batch_groups - len(groups), bound - (self.cursor.position - start))
            try:
                fresh, n_stale = self._take(n, version, drops)
            except NoMoreGroups:  # a refill past the generator's end: the part read stays
                self.cursor.load_state(before)  # in the buffer, as a short last batch does
                raise
            stale += n_stale
            if lc.dynamic_sampling:
                flat += [g for g in fresh if not has_variance(g)]
                fresh = [g for g in fresh if has_variance(g)]
            groups += fresh
            if len(groups) < lc.batch_groups and self.cursor.position - start < bound:
                self.on_advance()  # the consumed groups make room for the refill
        drops += zero_variance_drops(flat)
        info = {M.CURSOR_START: start, M.CURSOR_END: self.cursor.position,
                M.STALE_GROUPS_DROPPED: stale, M.WAIT_S: time.perf_counter() - t0,
                M.ZERO_VARIANCE_GROUPS_DROPPED: len(flat)}  # fmt: skip
        info[M.LINEAGE_GROUPS_DROPPED] = sum(r["reason"] == run_records.LINEAGE for r in drops)
        info[M.AHEAD_GROUPS_DROPPED] = sum(r["reason"] == run_records.AHEAD for r in drops)
        return Batch(groups, info, drops, self._shortfall(groups, flat, bound))

    def _take(self, n: int, version: int, drops: list[dict]) -> tuple[list[Group], int]:
        """n more groups from the cursor, refused ones appended to `drops` (printed)."""
        fresh, stale = self.cursor.next_groups(
            n, self.cfg.wait_timeout_s, self.cfg.max_staleness, current_version=version,
            lineage=self.lineage, refuse_ahead=self.refuse_ahead,
        )  # fmt: skip
        new = [r for g, why in self.cursor.last_drops for r in run_records.group_drops([g], why)]
        new += [{"group_id": i, "reason": run_records.CORRUPT, "detail": "unreadable"}
                for i in self.cursor.last_corrupt]  # fmt: skip
        for r in new:
            if r["reason"] in (run_records.LINEAGE, run_records.AHEAD):
                print0(f"[learn] refused group {r['group_id']} ({r['prompt_id']}): "
                       f"{r['reason']}, {r['detail']}")  # fmt: skip
        drops += new
        return fresh, stale

    def _shortfall(self, groups: list[Group], flat: list[Group], bound: int) -> str:
        """Say when dynamic sampling hit its bound; the error text when nothing was found."""
        lc = self.cfg
        if not lc.dynamic_sampling or len(groups) >= lc.batch_groups or not flat:
            return ""
        if groups:
            print0(f"[learn] dynamic sampling: {len(groups)} of {lc.batch_groups} groups with "
                   f"reward variance after reading {bound} groups (learner.max_refill_batches "
                   f"= {lc.max_refill_batches}); training on those")  # fmt: skip
            return ""
        return (f"dynamic sampling: none of {bound} groups in a row had rewards that differ "
                f"({len(flat)} had one reward for every completion; learner.max_refill_batches"
                f" = {lc.max_refill_batches}): the task is too easy or too hard for this model, "
                "or the reward is constant. Check the reward, or set "
                "learner.dynamic_sampling = false")  # fmt: skip

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.reader.close()
