"""The generator's staleness gate: how far it may run ahead of the learner, and when to stop.

The learner publishes its progress in the buffer (`grpo_stream.core.progress`). The gate lets
the generator hold at most `consumed_groups + allowance` groups (allowance =
`learner.batch_groups * (1 + generator.max_ahead_batches)`), so it pauses rather than
produce groups the learner would drop as stale. While it waits it watches two more
things in the same file:

- the learner has **finished** (`finished = true`, written at `learner.max_steps`): no
  room will ever come, so the gate answers False and the generator stops cleanly. Only a
  finish written after the generator started counts: a flag left by an earlier learner
  (a run about to be resumed) does not stop a new generator;
- the learner **died** (its pid is gone on this host, without `finished`): the gate says
  so once, and keeps waiting for a restarted learner (`learn --resume`, or `run`'s
  supervision). The servers are watched too (`watch`, the pool's health check every
  `WATCH_S`): a server that died meanwhile is said once and taken out of the pool;
- the learner's **lineage**: published once its own weights are on the servers (a reused
  server may hold another run's). `wait_for_lineage` holds the generator until then
  (`generator.wait_for_learner`), and `lineage` (kept current on every read) is stamped
  on each sample, so the learner can refuse groups of another lineage.

    gate = StalenessGate(buffer_path, allowance)
    await gate.start()                         # remembers the progress seen at start
    if not await gate.wait_for_room(reserved, stop_event):
        ...                                    # learner finished, or stop was requested
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpo_stream.core.progress import LearnerProgress, read_progress


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


WATCH_S = 10.0  # how often a held generator checks the servers' health


class StalenessGate:
    """See the module docstring."""

    def __init__(
        self, buffer_path: str, allowance: int, poll_s: float = 0.5, status: Any = None
    ) -> None:
        self.buffer_path, self.allowance, self.poll_s = buffer_path, allowance, poll_s
        self.initial: LearnerProgress | None = None
        self._status = status  # an object whose `gated` shows "(waiting for learner)"
        self.finished_step: int | None = None  # set when the learner's finish stopped us
        self._said_dead: tuple[str, int] | None = None
        # while held, every WATCH_S: async () -> servers found down (ServerPool.check)
        self.watch: Callable[[], Awaitable[list[str]]] | None = None
        self._next_watch = 0.0
        self.learner_version = 0  # the policy version in the learner's last progress read
        self.gated = False
        self.lineage = ""  # the newest learner lineage seen in its progress

    def _hold(self, value: bool) -> None:
        """Mark the generator held (or released) here and on the status object."""
        self.gated = value  # waiting right now
        if self._status is not None:
            self._status.gated = value

    async def _read(self) -> LearnerProgress:
        p = await asyncio.to_thread(read_progress, self.buffer_path)
        self.learner_version = p.version
        if p.lineage and self._current(p):
            self.lineage = p.lineage
        return p

    def _current(self, p: LearnerProgress) -> bool:
        """`p` is from a learner that is (or may be) running: written since `start()`,
        or by a live process (on another host: cannot tell, so yes)."""
        if p.finished:
            return False
        if p != self.initial or not p.pid or p.host != socket.gethostname():
            return True
        return pid_alive(p.pid)

    async def wait_for_lineage(self, stop: asyncio.Event) -> str:
        """Wait until a running learner has pushed its weights and published its lineage;
        the lineage ("" when `stop` was set, or the learner finished, first)."""
        if self.initial is None:
            await self.start()
        told = False
        while not stop.is_set():
            p = await self._read()
            if self.lineage:
                return self.lineage
            if self.learner_finished(p):
                self.finished_step = p.step
                return ""
            if not told:
                print("[generate] waiting for the learner to push its weights to the servers "
                      "(generator.wait_for_learner)", file=sys.stderr, flush=True)  # fmt: skip
                told = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)
        return ""

    async def start(self) -> None:
        """Remember the progress as it is now: a finish already there is not ours."""
        self.initial = await self._read()

    def learner_finished(self, p: LearnerProgress) -> bool:
        """A finish written after `start()` (a new record, not the one seen then)."""
        return p.finished and p != self.initial

    async def wait_for_room(self, reserved: int, stop: asyncio.Event) -> bool:
        """Wait until `reserved + 1` groups may exist; True then. False when the learner
        finished (no room will come) or `stop` was set."""
        if self.initial is None:
            await self.start()
        while not stop.is_set():
            p = await self._read()
            if reserved < p.consumed_groups + self.allowance:
                self._hold(False)
                return True
            if self.learner_finished(p):
                self._hold(False)
                self.finished_step = p.step
                print(f"[generate] the learner finished (step {p.step}, {p.consumed_groups} "
                      "groups consumed); stopping", file=sys.stderr, flush=True)  # fmt: skip
                return False
            self._say_if_dead(p)
            await self._watch_servers()
            self._hold(True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)  # progress is a file
        self._hold(False)
        return False

    async def _watch_servers(self) -> None:
        """While held, the servers are still watched: one line per server that went down
        (it is taken out of the pool until it answers /health again)."""
        if self.watch is None or time.monotonic() < self._next_watch:
            return
        self._next_watch = time.monotonic() + WATCH_S
        for url in await self.watch():
            print(f"[generate] vLLM server {url} does not answer /health (noticed while "
                  "waiting for the learner); taken out until it answers again",
                  file=sys.stderr, flush=True)  # fmt: skip

    def _say_if_dead(self, p: LearnerProgress) -> None:
        """One line when the learner that wrote `p` is gone (same host only)."""
        if p.finished or not p.pid or p.host != socket.gethostname() or pid_alive(p.pid):
            return
        if self._said_dead == (p.host, p.pid):
            return
        self._said_dead = (p.host, p.pid)
        print(f"[generate] the learner (pid {p.pid} on {p.host}, step {p.step}) is gone "
              "without finishing; waiting for a restarted learner (grpo-stream learn "
              "--resume)", file=sys.stderr, flush=True)  # fmt: skip
