"""Weight sync and checkpoints off the learner's path (`sync.background`): one worker thread.

After a step the learner copies what its push and checkpoint need (`snapshot`: the
weights, and on a checkpoint step trainer.pt's content, into buffers kept between steps),
hands a `StepJob` to the `StepWriter` and trains the next step meanwhile. The worker runs
each job's parts in order: the held-out evaluation wait of the version it replaces, the
push, then the progress publication, then the checkpoint. The learner joins the job
before the next push, before any checkpoint of its own and at the end:

    writer = StepWriter(records.progress)
    writer.publish(position, version, step)        # the one way progress is written
    writer.submit(StepJob(step, version, position, eval_wait=..., push=..., checkpoint=...))
    waits, metrics = writer.join()                 # re-raises the job's error here
    writer.close()                                 # joins; says an error nobody joined

Progress (what the generator's staleness gate and the evaluator read) is published from
the worker once the push returned (also after a failed one, as the synchronous path
does), so the published version is never one the servers do not serve yet; a
publication the learner asks for meanwhile (dynamic sampling's refill) is merged into
it (positions and steps never go back). `join` returns the learner's waits for the
three parts (`eval_wait_s`, `sync_s`, `checkpoint_s`: what it actually waited) and the
worker's own seconds (`eval_wait_bg_s`, `sync_bg_s`, `checkpoint_bg_s`) with the push's
metrics. Only one job is in flight: `submit` refuses a second before a join.
`python -m bench.sync_overlap` measures the learner's waits with and without it, side by
side (bench/results/sync_overlap.json).
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from grpo_stream.core import metric_names as M


def snapshot(tree, kept: dict, key: str = "", seen: dict | None = None):
    """A copy of `tree` (nested dicts/lists/tuples; tensors land on the CPU) whose tensors
    are `kept[key path]`, allocated once and refilled on later calls (a fresh 650 MB
    allocation costs page faults every step). Tensors sharing memory (tied weights) share
    their copy. Whoever read the previous copy must be done with it (joined)."""
    seen = {} if seen is None else seen
    if isinstance(tree, torch.Tensor):
        tag = (tree.data_ptr(), tuple(tree.shape), tuple(tree.stride()), tree.dtype)
        if tag in seen:
            return seen[tag]
        buf = kept.get(key)
        if buf is None or buf.shape != tree.shape or buf.dtype != tree.dtype:
            buf = kept[key] = torch.empty(tree.shape, dtype=tree.dtype)
        seen[tag] = buf.copy_(tree.detach())
        return buf
    if isinstance(tree, dict):
        return {k: snapshot(v, kept, f"{key}/{k}", seen) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(snapshot(v, kept, f"{key}/{i}", seen) for i, v in enumerate(tree))
    return copy.deepcopy(tree)


@dataclass
class StepJob:
    """One step's background work; each part is None when not due."""

    step: int
    version: int  # the version the push makes the servers serve (and progress says)
    position: int  # the cursor position after the step (progress's consumed_groups)
    eval_wait: Callable[[], dict] | None = None  # {"eval_wait_s": s} or {}
    push: Callable[[], dict] | None = None  # the transport's metrics
    checkpoint: Callable[[], None] | None = None
    evaluated: threading.Event = field(default_factory=threading.Event)
    pushed: threading.Event = field(default_factory=threading.Event)


class StepWriter:
    """See the module docstring. `write_progress(position, version, step, finished)`."""

    def __init__(self, write_progress: Callable[..., None]) -> None:
        self._write = write_progress
        self._lock = threading.Lock()
        self._pending: list | None = None  # [position, version, step] while a push runs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-writer")
        self._job: StepJob | None = None
        self._future: Future | None = None

    def publish(self, position: int, version: int, step: int, finished: bool = False) -> None:
        """Write the learner's progress now, or, while a push is in flight, when it ends
        (at that push's version)."""
        with self._lock:
            if self._pending is not None:
                p = self._pending
                p[0], p[2] = max(p[0], position), max(p[2], step)
                return
            self._write(position, version, step, finished)

    def submit(self, job: StepJob) -> None:
        if self._future is not None:
            raise RuntimeError("StepWriter.submit: the previous job was not joined")
        with self._lock:
            self._pending = [job.position, job.version, job.step]
        self._job, self._future = job, self._pool.submit(self._work, job)

    def in_flight(self) -> bool:
        return self._future is not None

    def _work(self, job: StepJob) -> dict:
        out: dict = {}
        error = None
        try:
            self._push_part(job, out)
        except Exception as e:  # the step is still checkpointed when due (as when synchronous)
            error = e
        if job.checkpoint is not None:
            t0 = time.perf_counter()
            try:
                job.checkpoint()
            except Exception:
                if error is None:
                    raise
                raise error from None  # the push failed first: its error is the one to act on
            out[M.CHECKPOINT_BG_S] = time.perf_counter() - t0
        if error is not None:
            raise error
        return out

    def _push_part(self, job: StepJob, out: dict) -> None:
        try:
            try:
                if job.eval_wait is not None:
                    out[M.EVAL_WAIT_BG_S] = job.eval_wait().get(M.EVAL_WAIT_S, 0.0)
            finally:
                job.evaluated.set()
            if job.push is not None:
                t0 = time.perf_counter()
                pushed = dict(job.push() or {})
                pushed.pop(M.SYNC_S, None)  # the transport's own; SYNC_BG_S is the whole
                out |= pushed | {M.SYNC_BG_S: time.perf_counter() - t0}
        finally:  # published after a failed push too: the step is trained
            self._end_push()
            job.pushed.set()

    def _end_push(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._write(pending[0], pending[1], pending[2], False)

    def join(self) -> tuple[dict, dict]:
        """Wait for the job in hand: ({eval_wait_s, sync_s, checkpoint_s}: the waits,
        the worker's metrics); ({}, {}) when none. Its error is raised here."""
        job, future = self._job, self._future
        if job is None or future is None:
            return {}, {}
        t0 = time.perf_counter()
        job.evaluated.wait()
        t1 = time.perf_counter()
        job.pushed.wait()
        t2 = time.perf_counter()
        self._job = self._future = None
        metrics = future.result()  # raises the job's error
        t3 = time.perf_counter()
        return {M.EVAL_WAIT_S: t1 - t0, M.SYNC_S: t2 - t1, M.CHECKPOINT_S: t3 - t2}, metrics

    def close(self) -> None:
        """Wait for the worker; an error no join raised (the learner failed otherwise
        first) is said on stderr."""
        future, self._job, self._future = self._future, None, None
        self._pool.shutdown(wait=True)
        if future is not None and future.exception() is not None:
            print(f"[learn] the background sync/checkpoint of the last step also failed: "
                  f"{future.exception()}", file=sys.stderr, flush=True)  # fmt: skip


def merge_metrics(a: dict, b: dict) -> dict:
    """Two joins' metrics in one row (a last step joins the previous job and its own):
    seconds add up, the longest pause stays, the pause lists join."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif k == M.SYNC_PAUSES:
            out[k] = list(out[k]) + list(v)
        elif k == M.SYNC_PAUSE_S:
            out[k] = max(out[k], v)
        elif isinstance(v, int | float):
            out[k] = out[k] + v
        else:
            out[k] = v
    return out
