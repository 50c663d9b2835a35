"""The learner process: buffer → the one learner step → checkpoint → weight sync.

    Learner(cfg, run_dir, model_dir, resume=False).run()

`setup_learner` (learner/setup.py) prepares seeds, device, models, optimizer, cursor and
resume. Each step then takes the next `learner.batch_groups` groups from the buffer
(groups older than `learner.max_staleness` versions are dropped and counted), runs
`train_step` (the same function `replay` calls), records the batch, pushes the weights
into the vLLM servers every `sync.every` steps (the servers then stamp new samples with
the new version), writes a checkpoint when due and logs the metrics row. Policy version
N means "the weights after N learner steps"; it is what the servers report in
/weight_info. With `sync.background` (one process, disk or no sync) the step's push and
checkpoint run from a copy of its state on one worker thread while the next step trains
(`learner/background.py`); the learner joins that job before the next push, so a row's
`sync_s`/`checkpoint_s` are what it waited, and a push that failed there is raised at the
join (after the newest step is checkpointed), as a synchronous one would be.

The learner publishes its progress (groups consumed, version) for the generator's
staleness gate whenever its cursor moves (through its `StepWriter`: while a background
push runs, at that push's end), also when every group of a batch was dropped:
otherwise a generator held at `generator.max_ahead_batches` would wait for a learner
that waits for it. Under torchrun, rank 0 alone reads the buffer (and broadcasts each
batch) and writes the run's files; every rank trains on its shard.
"""

from __future__ import annotations

import contextlib
import math
import time

from grpo_stream.buffer.cursor import NoMoreGroups
from grpo_stream.config import Config
from grpo_stream.core import metric_names as M
from grpo_stream.core import run_records
from grpo_stream.core.timing import PhaseTimer
from grpo_stream.learner.background import StepJob, StepWriter, merge_metrics, snapshot
from grpo_stream.learner.checkpoint import checkpoint_write_error, trainer_state
from grpo_stream.learner.distributed import (
    broadcast_object,
    print0,
    unwrap,
)
from grpo_stream.learner.gather import gathered_optimizer_state, gathered_state_dict
from grpo_stream.learner.lora import saved_state_dict
from grpo_stream.learner.models_info import resident_models, write_models
from grpo_stream.learner.records import NoRecords, RunRecords
from grpo_stream.learner.setup import setup_learner
from grpo_stream.learner.shutdown import StopRequested, StopSignals
from grpo_stream.learner.source import BatchSource, NoGroupWithVariance
from grpo_stream.learner.step import train_step, version_after
from grpo_stream.sync import WeightSyncError, make_weight_sync


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
        self.saved_step = s.step  # the last checkpointed step (a resume's own)
        self.stop = StopSignals(enabled=s.dist.world_size == 1)  # torchrun: default handlers
        self.t_train, self.out_of_time = time.monotonic(), False  # learner.max_wall_s
        self.source = BatchSource(s.cursor, cfg.learner)
        self.source.on_advance = self._publish_progress  # dynamic sampling's refill
        self.records: RunRecords | NoRecords = NoRecords()
        self.sync, self.writer, self._kept = None, None, {}  # _kept: the snapshots' buffers
        try:
            if s.dist.is_rank0:
                # --resume with no checkpoint yet starts over: its logs are cut to step 0
                resumed = s.step if (s.resumed_from is not None or resume) else None
                self.records = RunRecords(cfg, run_dir, resumed, s.cursor.position)
                write_models(run_dir, resident_models(cfg, s.model, s.runner.ref, s.runner.critic))
                # a resumed learner keeps its lineage (RUN/lineage); a fresh one makes one
                self.source.lineage = (resume and run_records.read_lineage(run_dir)) or (
                    run_records.new_lineage(run_dir))  # fmt: skip
            self.sync = make_weight_sync(cfg, run_dir)  # every rank: each knows its part
            self.source.refuse_ahead = self.sync.versions_servers
            self.writer = StepWriter(self.records.progress)  # every progress publication
            # sync.background: the push reads a snapshot (NCCL streams the live weights;
            # FSDP ranks gather together), so one process with disk or no sync
            reads_copy = self.sync.needs_state_dict or not self.sync.versions_servers
            # and no critic: its checkpoint writes the live value model, which the next
            # step trains while a background job would still be writing it
            self.background = (cfg.sync.background and s.dist.world_size == 1 and reads_copy
                               and s.runner.critic is None)  # fmt: skip
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Wait for the background writer; close the metrics, the weight sync, the reader."""
        for part in (self.writer, self.records, self.sync, self.source):
            close = getattr(part, "close", None)
            if close is not None:
                close()

    def run(self) -> None:
        """Train to learner.max_steps; on SIGTERM/SIGINT stop after the step in hand with
        a checkpoint of the last completed step (`self.stop.requested` says which)."""
        try:
            with self.stop:
                self._run()
        finally:
            self.close()

    def _run(self) -> None:
        # the learner owns the truth: a resumed one's servers may hold newer (discarded)
        # weights, a fresh one's another run's (a reused server), so they get its own,
        # and only then is its lineage published (the generator samples after that)
        self._wait_for_servers()
        needed = self.sync.needs_state_dict
        self._push(gathered_state_dict(self.s.model) if needed else None)
        self.records.lineage = self.source.lineage
        self._publish_progress()
        print0(f"[learn] training from step {self.step} to {self.cfg.learner.max_steps}")
        self.t_train = time.monotonic()
        try:
            with contextlib.suppress(StopRequested):
                while self.step < self.cfg.learner.max_steps and not self.out_of_time:
                    if self.stop.requested:
                        break
                    self.train_one()
        except NoMoreGroups as e:  # a finite dataset or stop_after_groups: a clean end
            print0(f"[learn] {e}: no whole batch left, so the learner ends here")
            self._join()
            if self.step > self.saved_step:
                self._checkpoint(None, None)
        self._join()  # a stop or an empty buffer left the last step's job in flight
        if self.stop.requested:
            self._stopped()
            return
        self._publish_progress(finished=True)  # a generator started by hand stops
        last = f"step-{self.saved_step}" if self.saved_step else "none"
        print0(f"[learn] finished at step {self.step} (last checkpoint: {last})")

    def _wait_for_servers(self) -> None:
        """`run` starts its servers and the learner together, so the first push waits for
        every server's /health (`server.startup_timeout_s`) on rank 0, which talks to them."""
        if not (self.sync.versions_servers and self.s.dist.is_rank0):
            return
        from grpo_stream.serving.client import BlockingClient

        server = self.cfg.server
        BlockingClient(api_key=server.resolved_api_key()).wait_healthy(
            server.resolved_urls(), server.startup_timeout_s
        )

    def _stopped(self) -> None:
        """After a stop signal: checkpoint the last completed step (if not yet)."""
        if self.step > self.saved_step:
            self._checkpoint(None, None)
            self.records.prune()
        self._publish_progress()
        print0(f"[learn] stopped by signal {self.stop.requested} after step {self.step} "
               f"(checkpoint step-{self.step}; learn --resume continues)")  # fmt: skip

    def train_one(self) -> dict | None:
        """Read a batch and train on it; the metrics row, or None when every group was
        stale or had a failed reward (no step is taken, but the cursor moved on)."""
        t0 = time.perf_counter()
        before = self.source.state()
        try:
            with self.stop.interruptible():  # SIGTERM while waiting for groups: stop now
                batch = self.source.next(self.version)
        except StopRequested:
            if self.source.cursor is not None:  # nothing of a cut-short read is kept
                self.source.cursor.load_state(before)
            raise
        failed = [g for g in batch.groups if not all(math.isfinite(x.reward) for x in g)]
        self.records.dropped(
            batch.drops + run_records.group_drops(failed, run_records.REWARD_FAILED)
        )
        if batch.error:  # dynamic sampling found nothing to learn from (its drops recorded)
            self._publish_progress()
            raise NoGroupWithVariance(batch.error)
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
        try:
            row |= self._after_step()
        except WeightSyncError:  # the step is checkpointed; its row is kept with it
            self.records.log(row | {M.STEP: self.step, M.POLICY_VERSION: self.version})
            self.records.prune()
            raise
        row |= {M.STEP: self.step, M.POLICY_VERSION: self.version}
        row[M.STEP_S] = time.perf_counter() - t0
        row[M.PEAK_MEMORY_MB] = peak_memory_mb(self.s.dist.device)
        self.records.log(row)
        self.records.prune()  # old checkpoints go once this step's row is written
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
        self.writer.publish(self.source.position, self.version, self.step, finished)

    def _after_step(self) -> dict:
        """Sync and checkpoint when due; publishes progress. Returns the sync's metrics."""
        cfg, s = self.cfg, self.s
        every = cfg.learner.checkpoint_every
        due_ckpt = (every and self.step % every == 0) or self.step == cfg.learner.max_steps
        due_ckpt = due_ckpt or self.out_of_time
        due_sync = self.step % cfg.sync.every == 0
        if self.background:
            return self._after_step_background(due_sync, due_ckpt)
        gather = due_ckpt or (due_sync and self.sync.needs_state_dict)
        timer = PhaseTimer()  # the step's phases after training (grpo_stream.core.timing)
        with timer.phase(M.GATHER_S):
            weights = gathered_state_dict(s.model) if gather else None
            opt_state = gathered_optimizer_state(s.model, s.opt) if due_ckpt else None
        # the held-out evaluation of the version these weights replace comes first (eval.every)
        pushes = due_sync and self.sync.versions_servers
        with timer.phase(M.EVAL_WAIT_S):
            evaluated = self.records.wait_for_eval(self.version) if pushes else {}
        self.version = version_after(self.step, cfg)
        with timer.phase(M.SYNC_S):  # the push and the progress the generator waits for
            try:
                m = evaluated | (self._push(weights) if due_sync else {})
            except WeightSyncError:  # keep the trained step (one process; FSDP: the last)
                self._publish_progress()
                if s.dist.world_size == 1:
                    self._checkpoint(weights, opt_state)
                raise
            self._publish_progress()
        with timer.phase(M.CHECKPOINT_S):
            if due_ckpt:
                self._checkpoint(weights, opt_state)
        return m | timer.take()  # measured around the whole phase (the transport's own
        # sync_s leaves out its setup)

    def _checkpoint(self, weights, opt_state) -> None:
        """Checkpoint the current step (weights/opt_state: gathered under FSDP, else None)."""
        state = {"version": self.version, "cursor": self.source.state()}
        self._save(self.step, self.version, state, weights, opt_state)

    def _save(self, step, version, state, weights, opt_state=None, trainer=None) -> None:
        """Write checkpoint step-`step` (`trainer`: trainer.pt's content from a snapshot)."""
        s, lc = self.s, self.cfg.learner
        # the weights just pushed are this step's when the push was of this step
        files = self.sync.published(version) if version == step else None
        with_opt = lc.keep_final_optimizer or step < lc.max_steps
        weights = dict(weights) if weights is not None else None  # save_pretrained pops
        critic = s.runner.critic  # gathered on every rank (FSDP), written by rank 0
        extra = critic.writer(with_opt) if critic is not None else None
        try:
            self.records.checkpoint(step, unwrap(s.model), s.opt, s.sched, state, weights,
                                    opt_state, files, with_opt, trainer=trainer,
                                    extra=extra)  # fmt: skip
        except (OSError, RuntimeError) as err:  # a full disk (torch.save says RuntimeError)
            raise checkpoint_write_error(s.run_dir, step, err) from err
        self.saved_step = step

    def _join(self) -> tuple[dict, dict]:
        """Wait for the background job in hand (`StepWriter.join`). After its failed push
        the newest trained step is checkpointed, then the error goes on (as when the push
        was synchronous: `run` restarts the server and resumes from it)."""
        try:
            return self.writer.join()
        except WeightSyncError:
            if self.step > self.saved_step:
                self._checkpoint(None, None)
            raise

    def _after_step_background(self, due_sync: bool, due_ckpt: bool) -> dict:
        """sync.background: join the previous step's job (the row gets its waits and
        metrics), then hand this step's to the writer; the last step joins its own too."""
        prev, self.version = self.version, version_after(self.step, self.cfg)
        waits, m = self._join()
        timer = PhaseTimer()
        with timer.phase(M.GATHER_S):  # the copies the job reads
            job = self._step_job(prev, due_sync, due_ckpt)
        self.writer.submit(job)
        if self.step >= self.cfg.learner.max_steps or self.out_of_time or self.stop.requested:
            w2, m2 = self._join()
            waits, m = merge_metrics(waits, w2), merge_metrics(m, m2)
        # every row names its waits, 0.0 when nothing was joined (the first step's)
        waits = {M.SYNC_S: 0.0, M.EVAL_WAIT_S: 0.0, M.CHECKPOINT_S: 0.0} | waits
        return m | waits | timer.take()

    def _step_job(self, prev: int, due_sync: bool, due_ckpt: bool) -> StepJob:
        """This step's push and checkpoint, on copies of what they read (the next step
        changes the weights, the optimizer, the RNG and the cursor meanwhile)."""
        s, step, version = self.s, self.step, self.version
        model = unwrap(s.model)
        job = StepJob(step, version, self.source.position)
        weights = None
        if due_ckpt or (due_sync and self.sync.needs_state_dict):
            # LoRA: the adapter alone (the frozen base is never written)
            weights = snapshot(saved_state_dict(model), self._kept, "model")
        if due_sync and self.sync.versions_servers:  # the version it replaces, first
            job.eval_wait = lambda: self.records.wait_for_eval(prev)
        if due_sync:
            sd = dict(weights) if weights is not None else None
            job.push = lambda: self.sync.push(model, version, state_dict=sd) or {}
        if due_ckpt:
            lc = self.cfg.learner
            with_opt = lc.keep_final_optimizer or step < lc.max_steps
            trainer = snapshot(trainer_state(s.opt, s.sched, None, with_opt), self._kept, "t")
            state = {"version": version, "cursor": self.source.state()}
            job.checkpoint = lambda: self._save(step, version, state, weights, trainer=trainer)
        return job
