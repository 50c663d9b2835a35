"""The reward-model servers of `grpo-stream run`: started first, restarted on a crash,
stopped last.

    keeper = RewardServerKeeper(cfg, run_dir)   # nothing unless reward.functions names
    keeper.start()                              # reward_model and reward_model.urls is empty
    ...                                         # the supervised run
    keeper.close()                              # after the generator and learner stopped

A watcher thread polls the servers' processes every `poll_s`; a dead one is restarted
on its port (the same model, log and settings), at most `run.max_restarts` times within
`run.restart_window_s`, each restart and give-up written to RUN/supervisor.jsonl as the
supervisor writes its own. While a reward server is down the generator keeps going:
its groups get failed `reward_model` rewards with the reason, counted in the ledger, and
scoring resumes once the server is back. After a give-up the server stays down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpo_stream.config import Config
from grpo_stream.run.supervise.policy import CrashWindow, SupervisorLog

REWARD_SERVERS_FILE = "reward_servers.json"  # peak memory of the reward servers


def _uses_local_servers(cfg: Config) -> bool:
    named = any(f.name == "reward_model" for f in cfg.reward.functions)
    return named and not cfg.reward_model.urls


class RewardServerKeeper:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        poll_s: float = 2.0,
        make: Callable[[Config, Path], list[Any]] | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.poll_s = cfg, Path(run_dir), poll_s
        self._make = make  # tests inject crashing children; default: make_rm_servers
        self.servers: list[Any] = []
        self.window = CrashWindow(cfg.run.max_restarts, cfg.run.restart_window_s)
        self.log = SupervisorLog(run_dir)
        self.gave_up: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> list[Any]:
        """Start the servers and wait for them (stopping all on a failure), then watch."""
        if not _uses_local_servers(self.cfg):
            return []
        from grpo_stream.serving.rm_server import make_rm_servers

        make = self._make or make_rm_servers
        self.servers = make(self.cfg, self.run_dir / "logs")
        print(f"[run] starting {len(self.servers)} reward-model server(s) on "
              f"{self.cfg.reward_model.path}", flush=True)  # fmt: skip
        try:
            for s in self.servers:
                s.start()
            for s in self.servers:
                s.wait_healthy()
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._watch, name="rm-keeper", daemon=True)
        self._thread.start()
        return self.servers

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for i, s in enumerate(self.servers):
                if self._stop.is_set() or self.gave_up is not None or s.is_alive():
                    continue
                self._restart(i, s)

    def _restart(self, i: int, old: Any) -> None:
        name = f"reward_server{i}"
        code = old.proc.poll() if getattr(old, "proc", None) is not None else None
        if not self.window.may_restart(name):
            self.gave_up = name
            self.log.event("give_up", name, exit_code=code)
            print(f"[run] {name} crashed again; not restarted (run.max_restarts)", flush=True)
            return
        print(f"[run] {name} exited ({code}); restarting it", flush=True)
        old.stop()
        new = type(old)(old.model_dir, old.served_name, old.port, old.cfg, old.log_file)
        self.servers[i] = new
        try:
            new.start()
            new.wait_healthy()
        except Exception as e:  # a failed restart counts as the next crash
            print(f"[run] {name} restart failed: {e}", flush=True)
            return
        self.log.event("restart", name, exit_code=code)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.server.startup_timeout_s + 60)
        if self.servers:  # what the reward model cost in memory (`grpo-stream compare`)
            record_peak_memory(self.run_dir, self.servers)
        for s in self.servers:
            s.stop()


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (MB) of process `pid` and its descendants (Linux VmHWM,
    summed: vLLM's engine core is a child); None when it cannot be read."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += float(line.split()[1]) / 1024  # kB
    return total or None


def record_peak_memory(run_dir: Path, servers: list[Any]) -> None:
    """RUN/reward_servers.json: each reward server's peak resident memory (CPU MB; on a
    GPU its device share is set by reward_model's gpu_memory_utilization)."""
    import json

    from grpo_stream.core.atomic import atomic_write

    peaks = [peak_rss_mb(s.proc.pid) if getattr(s, "proc", None) else None for s in servers]
    atomic_write(run_dir / REWARD_SERVERS_FILE, json.dumps({"peak_rss_mb": peaks}) + "\n")
