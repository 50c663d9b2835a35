"""What the learner writes for a run (rank 0 only): metrics, trained batches, progress,
checkpoints.

    records = RunRecords(cfg, run_dir, resumed_step) if dist.is_rank0 else NoRecords()
    records.batch(step, group_ids, info)     # RUN/trained_batches.jsonl (replay reads it)
    records.dropped(rows)                    # RUN/dropped_groups.jsonl (grpo_stream.run.ledger)
    records.log(row)                         # RUN/metrics.jsonl, TensorBoard, console line
    records.progress(position, version, step, finished)  # BUFFER/consumers/learner.json
    records.checkpoint(step, model, opt, sched, state, weights, opt_state, model_files,
                       with_optimizer)          # RUN/checkpoints/step-N
    records.prune()                          # then all but learner.keep_checkpoints go
    records.close()

The other ranks get `NoRecords`, whose methods do nothing, so the learner's loop has no
rank checks. A resumed run cuts both logs back to the checkpoint's step (and the drops back to its cursor
position), so they follow the checkpoint's lineage. `lineage` (set by the learner) is
published with the progress.
"""

from __future__ import annotations

import os

from grpo_stream.config import Config
from grpo_stream.core import jsonl, run_records
from grpo_stream.core import metric_names as M
from grpo_stream.core.metrics import MetricsWriter
from grpo_stream.core.progress import LearnerProgress, write_progress
from grpo_stream.learner.checkpoint import prune_checkpoints, save_checkpoint


def truncate_log(path: str, step: int) -> None:
    """Keep the JSONL rows with row["step"] <= step (atomically); a line torn by the
    killed learner is dropped (grpo_stream.core.jsonl)."""
    jsonl.truncate(path, lambda row: row[M.STEP] <= step)


class RunRecords:
    """Rank 0's run files; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: str, resumed_step: int | None = None,
                 resumed_position: int = 0):  # fmt: skip
        self.run_dir, self.lineage = run_dir, ""
        self.buffer_path = cfg.buffer_path(run_dir)
        self.eval_cfg = cfg.eval
        self.keep_checkpoints = cfg.learner.keep_checkpoints
        self.trained_batches = os.path.join(run_dir, "trained_batches.jsonl")
        self.metrics = MetricsWriter(run_dir)
        if resumed_step is not None:
            truncate_log(self.trained_batches, resumed_step)
            truncate_log(self.metrics.path, resumed_step)
            run_records.truncate_drops(run_dir, resumed_position)

    def batch(self, step: int, group_ids: list[int], info: dict) -> None:
        """The groups step `step` was given, in order, and where the cursor found them."""
        row = {M.STEP: step, "group_ids": group_ids}
        row |= {k: info[k] for k in (M.CURSOR_START, M.CURSOR_END, M.STALE_GROUPS_DROPPED)}
        jsonl.append(self.trained_batches, row)  # fsynced: replay and the ledger read it

    def dropped(self, rows: list[dict]) -> None:
        """Groups the learner refused, each with its reason (grpo_stream.run.ledger)."""
        jsonl.append(os.path.join(self.run_dir, run_records.FILE_DROPS), rows)

    def log(self, row: dict) -> None:
        self.metrics.log(row)

    def progress(self, consumed_groups: int, version: int, step: int, finished=False) -> None:
        """`finished` (at learner.max_steps) tells a waiting generator to stop."""
        progress = LearnerProgress(consumed_groups, version, step, finished=finished,
                                   lineage=self.lineage)  # fmt: skip
        write_progress(self.buffer_path, progress)

    def wait_for_eval(self, version: int) -> dict:
        """Before a sync replaces `version`: wait for its held-out evaluation when due
        (grpo_stream.core.eval_progress); {"eval_wait_s": seconds} or {}."""
        from grpo_stream.core.eval_progress import wait_for_eval

        return wait_for_eval(self.buffer_path, self.eval_cfg, version)

    def checkpoint(self, step, model, opt, sched, state, weights=None, opt_state=None,
                   model_files=None, with_optimizer=True, trainer=None,
                   extra=None) -> None:  # fmt: skip
        """`model_files`: the published weights folder of this step, shared by hard link;
        `trainer`: trainer.pt's content from a snapshot (`save_checkpoint`); `extra`:
        more to write into the folder (the critic)."""
        save_checkpoint(self.run_dir, step, model, opt, sched, state, keep=None,
                        state_dict=weights, optimizer_state=opt_state,
                        model_files=model_files, with_optimizer=with_optimizer,
                        trainer=trainer, extra=extra)  # fmt: skip

    def prune(self) -> None:
        """Delete the checkpoints beyond learner.keep_checkpoints; the learner calls it
        after the step's metrics row is written, so that a kill right after a checkpoint
        is published is not made more likely to lose that row by the deletion."""
        prune_checkpoints(self.run_dir, self.keep_checkpoints)

    def close(self) -> None:
        self.metrics.close()


class NoRecords:
    """The records of a rank other than 0: nothing is written."""

    lineage = ""

    def batch(self, step: int, group_ids: list[int], info: dict) -> None:
        pass

    def dropped(self, rows: list[dict]) -> None:
        pass

    def log(self, row: dict) -> None:
        pass

    def progress(self, consumed_groups: int, version: int, step: int, finished=False) -> None:
        pass

    def wait_for_eval(self, version: int) -> dict:
        return {}

    def checkpoint(self, step, model, opt, sched, state, weights=None, opt_state=None,
                   model_files=None, with_optimizer=True, trainer=None,
                   extra=None) -> None:  # fmt: skip
        pass

    def prune(self) -> None:
        pass

    def close(self) -> None:
        pass
