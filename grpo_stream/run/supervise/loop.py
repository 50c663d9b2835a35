"""`run`'s supervisor: watch the children, restart the crashed ones, stop in order.

    sup = Supervisor(cfg, run_dir, Commands(generator=argv, learner=fn, evaluator=argv))
    sup.servers = launched_servers           # VLLMServer objects (empty: server.urls)
    sup.start()                              # generator, learner (and evaluator)
    code = sup.run()                         # until the learner finishes or a child gives up
    sup.shutdown()                           # generator, then learner, evaluator, servers

What a child's exit means (polled every `POLL_S`):
- learner 0: the run is done. `EXIT_SYNC_FAILED`: its trained step is checkpointed and
  a weight sync failed; the servers the error names (RUN/sync_failure.json) are
  restarted, then the learner resumes (`learn --resume`), pushing its checkpoint's
  weights to every server. Anything else: a crash; resumed from its last checkpoint.
- generator 0: why is in its record (`grpo_stream.core.generator_end`). It finished its
  work (its prompts ran out, or the buffer holds `generator.stop_after_groups`): it is
  not restarted, and the learner trains the whole batches left, then exits 0. It stopped
  because the learner finished: the learner's exit ends the run. Anything else (no
  record): restarted like a crash.
- generator, another code: restarted with the same arguments (it continues the prompt
  stream from what the buffer holds).
- a vLLM server: restarted on its port and re-synced (`supervise.servers`); meanwhile
  the generator's server pool routes around it. Under NCCL sync the learner is
  restarted too (its transfer group died with the server).
- the evaluator: a failure stops the run (it is not restarted).
Each restart is allowed by `CrashWindow` (run.max_restarts within run.restart_window_s)
(a server that dies again while it restarts is one crash more, and started again) and written to RUN/supervisor.jsonl; one crash more stops the run with the child's name,
exit code and log tail. A learner whose progress file has not moved for
learner.stall_timeout_s is reported (once per stall).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpo_stream.config import Config
from grpo_stream.config.transports import transport_traits
from grpo_stream.core.errors import UserError
from grpo_stream.core.proc import log_tail
from grpo_stream.run.supervise.child import Child
from grpo_stream.run.supervise.policy import CrashWindow, SupervisorLog
from grpo_stream.sync.failure import EXIT_SYNC_FAILED, failed_urls, take_sync_failure

POLL_S = 0.5
STALL_CHECK_S = 5.0
GENERATOR_DONE_GRACE_S = 60.0  # a generator that exited 0 waits this long for the learner
GENERATOR_STOP_S = 120.0  # in-flight requests finish, scored groups are flushed
LEARNER_STOP_S = 300.0  # the step in hand finishes and is checkpointed


@dataclass
class Commands:
    generator: list[str]
    learner: Callable[[bool], list[str]]  # resume -> argv
    learner_env: dict | None = None
    evaluator: list[str] | None = None
    resume: bool = False  # `run --resume`: the first learner resumes too
    env: dict | None = None  # every child's (the API key's variable: ServerConfig.key_env)


class Supervisor:
    """See the module docstring."""

    def __init__(self, cfg: Config, run_dir: str | Path | None, cmds: Commands | None = None):
        self.cfg, self.cmds = cfg, cmds
        self.rd = Path(run_dir) if run_dir is not None else None  # None: nothing written
        self.window = CrashWindow(cfg.run.max_restarts, cfg.run.restart_window_s)
        self.log = SupervisorLog(run_dir)
        self.servers: list = []
        self.generator: Child | None = None
        self.learner: Child | None = None
        self.evaluator: Child | None = None
        self.gave_up: tuple[str, int | None] | None = None  # (child, exit code)
        self._restarted_at: dict[int, float] = {}  # server index -> wall time it was back
        self._learner_since = time.time()
        self._stall_seen: float | None = None
        self._next_stall_check = 0.0
        self.generator_done = False  # it finished its work: never restarted again

    # -- starting and stopping -------------------------------------------------------
    def start(self) -> None:
        logs, c = self.rd / "logs", self.cmds
        take_sync_failure(str(self.rd))  # one left by an earlier run (run --resume) is old
        from grpo_stream.core.generator_end import clear_generator_end

        clear_generator_end(self.cfg.buffer_path(str(self.rd)))  # so is a generator's end
        env = c.env or {}
        self.generator = Child("generator", c.generator, logs / "generator.log", echo=False,
                               env=env)  # fmt: skip
        self.learner = Child("learner", c.learner(c.resume), logs / "learner.log", echo=True,
                             env={**env, **(c.learner_env or {})})  # fmt: skip
        self._learner_since = time.time()
        if c.evaluator:  # echoed: its line per evaluated version sits beside the step lines
            self.evaluator = Child("evaluator", c.evaluator, logs / "eval.log", echo=True,
                                   env=env)  # fmt: skip

    def shutdown(self) -> None:
        """Generator first (it flushes scored groups), then the learner (it checkpoints its
        last completed step), the evaluator, the servers; nothing is left running."""
        for child, timeout in ((self.generator, GENERATOR_STOP_S),
                               (self.learner, LEARNER_STOP_S), (self.evaluator, 60.0)):  # fmt: skip
            if child is not None:
                child.stop(timeout)
        for s in self.servers:
            s.stop()

    # -- the watch -------------------------------------------------------------------
    def run(self) -> int:
        while True:
            code = self.poll()
            if code is not None:
                return code
            time.sleep(POLL_S)

    def poll(self) -> int | None:
        """One look at every child; the run's exit code once it is over, else None."""
        code = self.learner.proc.poll()
        if code is not None and (done := self._learner_exited(code)) is not None:
            return done
        ev = self.evaluator
        if ev is not None and ev.proc.poll() not in (None, 0):
            self._give_up("evaluator", ev.proc.returncode, ev.log, "it is not restarted")
            return 1
        code = None if self.generator_done else self.generator.proc.poll()
        if code is not None and not self._generator_exited(code):
            return 1
        for i, s in enumerate(self.servers):
            if not s.is_alive() and not self._restart_server(i, s.proc.returncode, "exited"):
                return 1
        self._check_stall()
        return None

    def _learner_exited(self, code: int) -> int | None:
        if code == 0:
            return 0
        # under torchrun the exit code is torchrun's: the file says the sync failed
        failure = take_sync_failure(str(self.rd)) if self.rd is not None else None
        if code == EXIT_SYNC_FAILED or failure is not None:
            print("[run] the learner's weight sync failed (its step is checkpointed)", flush=True)
            if not self._after_sync_failure(failure):
                return 1
        if self._restart_child("learner", code):
            return None
        return 1

    def _after_sync_failure(self, failure: dict | None) -> bool:
        """Restart the servers the learner's failed sync names, except those that came
        back after it failed (it failed on the dead one); False when one may not be."""
        failure = failure or {"error": "", "time": 0.0, "step": None}
        self.log.event("sync_failed", "learner", step=failure["step"], error=failure["error"])
        named = failed_urls(failure["error"], [s.url for s in self.servers])
        for i, s in enumerate(self.servers):
            if s.url in named and self._restarted_at.get(i, 0.0) < failure["time"]:
                if not self._restart_server(i, None, "failed its weight sync"):
                    return False
        return True

    def _generator_exited(self, code: int) -> bool:
        end = self._generator_end() if code == 0 else None
        if end is not None and end.work_done:
            self.generator_done = True
            print(f"[run] the generator finished its work ({end.reason}, {end.groups} groups "
                  "in the buffer); the learner trains what is there", flush=True)  # fmt: skip
            self.log.event("generator_done", "generator", reason=end.reason, groups=end.groups)
            return True
        if code == 0:  # it stops by itself once the learner finished: wait for that
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.learner.proc.wait(GENERATOR_DONE_GRACE_S)
                return True  # the next poll sees the learner's exit
        return self._restart_child("generator", code)

    def _generator_end(self):
        """The record the exited generator left (None without a run folder, or none)."""
        if self.rd is None:
            return None
        from grpo_stream.core.generator_end import read_generator_end

        return read_generator_end(self.cfg.buffer_path(str(self.rd)))

    # -- restarts --------------------------------------------------------------------
    def _restart_child(self, name: str, code: int) -> bool:
        old: Child = getattr(self, name)
        if not self.window.may_restart(name):
            self._give_up(name, code, old.log)
            return False
        t0 = time.monotonic()
        argv = self.cmds.learner(True) if name == "learner" else None  # resumes
        print(f"[run] {name} exited with code {code}; restarting it "
              f"({self._count(name)})", flush=True)  # fmt: skip
        setattr(self, name, old.restarted(argv, LEARNER_STOP_S))
        if name == "learner":
            self._learner_since, self._stall_seen = time.time(), None
        self.log.event("restart", name, exit_code=code, restart_s=time.monotonic() - t0)
        return True

    def _restart_server(self, i: int, code: int | None, why: str) -> bool:
        from grpo_stream.run.supervise.servers import restart_server
        from grpo_stream.serving.server import ServerStartError

        name, old = f"vllm-{i}", self.servers[i]
        if not self.window.may_restart(name):
            self._give_up(name, code, old.log_file, f"{old.url} {why}")
            return False
        print(f"[run] vLLM server {old.url} {why} (code {code}); restarting it "
              f"({self._count(name)})", flush=True)  # fmt: skip
        t0 = time.monotonic()
        while True:
            try:
                new, version = restart_server(self.servers[i], self.cfg, self.rd,
                                              on_started=lambda s: self.servers.__setitem__(i, s))  # fmt: skip
                break
            except ServerStartError as err:  # it died while starting: one crash more
                if not self.window.may_restart(name):
                    self._give_up(name, code, old.log_file, f"its restart failed: {err}")
                    return False
                print(f"[run] vLLM server {old.url} exited while restarting; restarting it "
                      f"again ({self._count(name)})", flush=True)  # fmt: skip
                self.log.event("restart", name, exit_code=None, why="exited while starting")
            except UserError as err:  # did not come back in time, or could not be re-synced
                self._give_up(name, code, old.log_file, f"its restart failed: {err}")
                return False
        dt, self._restarted_at[i] = time.monotonic() - t0, time.time()
        print(f"[run] vLLM server {new.url} back in {dt:.1f}s, serving version {version}",
              flush=True)  # fmt: skip
        self.log.event("restart", name, exit_code=code, restart_s=dt, version=version, why=why)
        in_group = transport_traits(self.cfg.sync.transport).nccl_group
        if in_group and self.learner.proc.poll() is None:
            return self._restart_child("learner", None)  # its NCCL group died with the server
        return True

    def _count(self, name: str) -> str:
        n, cfg = self.window.recent(name), self.cfg.run
        return f"crash {n} of at most {cfg.max_restarts} within {cfg.restart_window_s:g}s"

    def _give_up(self, name: str, code: int | None, log: Path, why: str = "") -> None:
        cfg = self.cfg.run
        why = why or (f"{self.window.recent(name)} crashes within {cfg.restart_window_s:g}s "
                      f"(run.max_restarts = {cfg.max_restarts})")  # fmt: skip
        self.gave_up = (name, code)
        self.log.event("gave_up", name, exit_code=code, why=why)
        print(f"[run] stopping the run: {name} exited with code {code}; {why}. Last lines "
              f"of {log}:\n{log_tail(log)}", flush=True)  # fmt: skip

    # -- stalls ----------------------------------------------------------------------
    def _check_stall(self) -> None:
        now = time.monotonic()
        if now < self._next_stall_check or self.rd is None:
            return
        self._next_stall_check = now + STALL_CHECK_S
        from grpo_stream.core.progress import read_progress

        try:
            p = read_progress(self.cfg.buffer_path(str(self.rd)))
        except (ValueError, OSError):
            return
        last = max(p.time, self._learner_since)
        idle, limit = time.time() - last, self.cfg.learner.stall_timeout_s
        if idle < limit or self._stall_seen == last:
            return
        self._stall_seen = last
        self.log.event("stall", "learner", idle_s=round(idle, 1), step=p.step)
        print(f"[run] the learner has made no progress for {idle:.0f}s (step {p.step}; "
              f"learner.stall_timeout_s = {limit:g}); last lines of {self.learner.log}:\n"
              f"{log_tail(self.learner.log, 10)}", flush=True)  # fmt: skip
