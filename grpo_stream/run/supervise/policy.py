"""When `run` restarts a crashed child, and the record of what it did (RUN/supervisor.jsonl).

    window = CrashWindow(max_restarts=3, window_s=600)      # run.max_restarts, restart_window_s
    if window.may_restart("generator", now):                # records the crash either way
        ...restart...
    log = SupervisorLog(run_dir)
    log.event("restart", "generator", exit_code=-9, restart_s=4.2)
    log.restarts                                            # {"generator": 1}

`may_restart` is a pure function of the earlier crash times: a child may be restarted
while fewer than `max_restarts` of its crashes fall inside the last `window_s` seconds;
the crash after that stops the run.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from grpo_stream.core import jsonl


def may_restart(earlier: list[float], now: float, max_restarts: int, window_s: float) -> bool:
    """Whether a crash at `now` may be restarted, given the times of the child's earlier
    crashes (each of which was restarted): fewer than `max_restarts` in (now - window_s, now]."""
    recent = [t for t in earlier if now - window_s < t <= now]
    return len(recent) < max_restarts


@dataclass
class CrashWindow:
    """`may_restart` with each child's crash times kept."""

    max_restarts: int
    window_s: float
    crashes: dict[str, list[float]] = field(default_factory=dict)

    def may_restart(self, child: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        earlier = self.crashes.setdefault(child, [])
        ok = may_restart(earlier, now, self.max_restarts, self.window_s)
        earlier.append(now)
        return ok

    def recent(self, child: str, now: float | None = None) -> int:
        """Crashes of `child` inside the window (this one included)."""
        now = time.monotonic() if now is None else now
        return sum(1 for t in self.crashes.get(child, []) if now - self.window_s < t <= now)


class SupervisorLog:
    """RUN/supervisor.jsonl: one row per restart, give-up, stall, sync failure, or a
    generator that finished its work (`generator_done`)."""

    def __init__(self, run_dir: str | Path | None):
        self.path = Path(run_dir) / "supervisor.jsonl" if run_dir else None
        self.restarts: Counter[str] = Counter()

    def event(self, event: str, child: str, **info) -> None:
        if event == "restart":
            self.restarts[child] += 1
            info["restarts"] = self.restarts[child]
        if self.path is None:
            return
        row = {"time": time.time(), "event": event, "child": child, **info}
        jsonl.append(self.path, row)

    def summary(self) -> str:
        """`restarts/<child>` counts for the run's last lines ("" when none)."""
        return ", ".join(f"restarts/{c} {n}" for c, n in sorted(self.restarts.items()))
