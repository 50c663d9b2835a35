"""The learner process: buffer → the one learner step → checkpoint → weight sync.

    Learner(cfg, run_dir, model_dir, resume=False).run()

`setup_learner` (learner/setup.py) prepares seeds, device, models, optimizer, cursor and
resume. Each step then takes the next `learner.batch_groups` groups from the buffer
(groups older than `learner.max_staleness` versions are dropped and counted), runs
`train_step` (the same function `replay` calls), records the batch, pushes the weights
into the vLLM servers every `sync.every` steps (the servers then stamp new samples with
the new version), writes a checkpoint when due and logs the metrics row. Policy version
N means "the weights after N learner steps"; it is what the servers report in
/weight_info.

The learner publishes its progress (groups consumed, version) for the generator's
staleness gate whenever its cursor moves, also when every group of a batch was dropped:
otherwise a generator held at `generator.max_ahead_batches` would wait for a learner
that waits for it. Under torchrun, rank 0 alone reads the buffer (and broadcasts each
batch) and writes the run's files; every rank trains on its shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from grpo_stream import metric_names as M
from grpo_stream.buffer.cursor import GroupCursor
from grpo_stream.buffer.schema import Group
from grpo_stream.config import Config, LearnerConfig
from grpo_stream.learner.distributed import (
    broadcast_object,
    gathered_optimizer_state,
    gathered_state_dict,
    print0,
    unwrap,
)
from grpo_stream.learner.records import NoRecords, RunRecords
from grpo_stream.learner.setup import setup_learner
from grpo_stream.learner.step import train_step, version_after
from grpo_stream.sync import make_weight_sync


@dataclass
class Batch:
    """The groups of one step as the cursor delivered them (stale ones dropped)."""

    groups: list[Group]
    info: dict  # CURSOR_START, CURSOR_END, STALE_GROUPS_DROPPED, WAIT_S


class BatchSource:
    """Rank 0 reads the next batch with its cursor; every rank gets it by broadcast
    (ranks never disagree on the batch, and a time-out cannot strike one rank alone)."""

    def __init__(self, cursor: GroupCursor | None, cfg: LearnerConfig):
        self.cursor, self.cfg = cursor, cfg

    @property
    def position(self) -> int:
        return self.cursor.position if self.cursor is not None else 0

    def state(self) -> dict:
        return self.cursor.state() if self.cursor is not None else {}

    def next(self, version: int) -> Batch:
        return broadcast_object(self._read(version) if self.cursor is not None else None)

    def _read(self, version: int) -> Batch:
        lc, t0, start = self.cfg, time.perf_counter(), self.cursor.position
        if start == 0 and self.cursor.available() < lc.batch_groups:
            print0(f"[learn] waiting for the first {lc.batch_groups} groups in the buffer ...")
        groups, stale = self.cursor.next_groups(
            lc.batch_groups, lc.wait_timeout_s, lc.max_staleness, current_version=version
        )
        info = {M.CURSOR_START: start, M.CURSOR_END: self.cursor.position,
                M.STALE_GROUPS_DROPPED: stale, M.WAIT_S: time.perf_counter() - t0}  # fmt: skip
        return Batch(groups, info)

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.reader.close()


def peak_memory_mb(device) -> float:
    """This process's peak memory so far (MB): CUDA max allocated on a GPU, else peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Learner:
    """One learner process; under torchrun, one rank of an FSDP2 data-parallel learner."""

    def __init__(self, cfg: Config, run_dir: str, model_dir: str, resume: bool = False):
        s = setup_learner(cfg, run_dir, model_dir, resume)
        self.cfg, self.s = cfg, s
        self.step, self.version = s.step, s.version
        self.t_train, self.out_of_time = time.monotonic(), False  # learner.max_wall_s
        self.source = BatchSource(s.cursor, cfg.learner)
        self.records: RunRecords | NoRecords = NoRecords()
        self.sync = None
        try:
            if s.dist.is_rank0:
                resumed = s.step if s.resumed_from is not None else None
                self.records = RunRecords(cfg, run_dir, resumed)
            self.sync = make_weight_sync(cfg, run_dir)  # every rank: each knows its part
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the metrics writer, the weight sync and the buffer reader."""
        for part in (self.records, self.sync, self.source):
            close = getattr(part, "close", None)
            if close is not None:
                close()

    def run(self) -> None:
        try:
            if self.step > 0:
                # a resumed learner owns the truth: the servers may hold newer (discarded)
                # weights, so they get the checkpoint's
                needed = self.sync.needs_state_dict
                self._push(gathered_state_dict(self.s.model) if needed else None)
            self._publish_progress()
            print0(f"[learn] training from step {self.step} to {self.cfg.learner.max_steps}")
            self.t_train = time.monotonic()
            while self.step < self.cfg.learner.max_steps and not self.out_of_time:
                self.train_one()
            self._publish_progress(finished=True)  # a generator started by hand stops
        finally:
            self.close()

    def train_one(self) -> dict | None:
        """Read a batch and train on it; the metrics row, or None when every group was
        stale or had a failed reward (no step is taken, but the cursor moved on)."""
        t0 = time.perf_counter()
        batch = self.source.next(self.version)
        row = train_step(self.s.runner, batch.groups, self.version, batch.info)
        if row is None:
            self._publish_progress()
            print0(f"[learn] step {self.step + 1}: every group was stale or had a failed "
                   f"reward (cursor {batch.info[M.CURSOR_START]}..{batch.info[M.CURSOR_END]})"
                   "; skipped")  # fmt: skip
            return None
        self.step += 1
        self.out_of_time = self._wall_spent()  # then this step is the last (checkpointed)
        self.records.batch(self.step, [g[0].group_id for g in batch.groups], batch.info)
        row |= self._after_step()
        row |= {M.STEP: self.step, M.POLICY_VERSION: self.version}
        row[M.STEP_S] = time.perf_counter() - t0
        row[M.PEAK_MEMORY_MB] = peak_memory_mb(self.s.dist.device)
        self.records.log(row)
        return row

    def _wall_spent(self) -> bool:
        """`learner.max_wall_s` of training (from the start of `run`) spent; rank 0's
        clock decides for every rank."""
        limit = self.cfg.learner.max_wall_s
        if limit is None:
            return False
        return bool(broadcast_object(time.monotonic() - self.t_train >= limit))

    def _push(self, weights) -> dict:
        if self.sync is None:
            return {}
        return self.sync.push(unwrap(self.s.model), self.version, state_dict=weights) or {}

    def _publish_progress(self, finished: bool = False) -> None:
        self.records.progress(self.source.position, self.version, self.step, finished)

    def _after_step(self) -> dict:
        """Sync and checkpoint when due; publishes progress. Returns the sync's metrics."""
        cfg, s = self.cfg, self.s
        every = cfg.learner.checkpoint_every
        due_ckpt = (every and self.step % every == 0) or self.step == cfg.learner.max_steps
        due_ckpt = due_ckpt or self.out_of_time
        due_sync = self.step % cfg.sync.every == 0
        gather = due_ckpt or (due_sync and self.sync.needs_state_dict)
        weights = gathered_state_dict(s.model) if gather else None
        opt_state = gathered_optimizer_state(s.model, s.opt) if due_ckpt else None
        # the held-out evaluation of the version these weights replace comes first (eval.every)
        pushes = due_sync and cfg.sync.transport != "none"
        evaluated = self.records.wait_for_eval(self.version) if pushes else {}
        self.version = version_after(self.step, cfg)
        m = evaluated | (self._push(weights) if due_sync else {})
        self._publish_progress()
        if due_ckpt:
            state = {"version": self.version, "cursor": self.source.state()}
            self.records.checkpoint(self.step, unwrap(s.model), s.opt, s.sched, state,
                                    weights, opt_state)  # fmt: skip
        return m
