"""Where the time goes: phase timers for the learner step, busy clocks for the generator.

Every run records, with no setting to turn on:

- per learner step (`metrics.jsonl`): `wait_s` (waiting for and reading the batch),
  `proximal_s` (proximal and reference log-probs), `train_s`, `gather_s` (full weights /
  optimizer state gathered for a sync or checkpoint), `sync_s`, `checkpoint_s` and
  `eval_wait_s` (`STEP_PHASES`); together they make up `step_s`;
- per generator (`generator_metrics.jsonl`, every report): time gated by staleness,
  reward time, the time-averaged requests in flight, and per server the seconds with at
  least one of its requests in flight (`GeneratorClocks.snapshot`);
- per sync: when each server was paused and resumed (`sync_pauses` in the learner's row,
  wall-clock seconds), from which `grpo_stream.run.timing_summary` derives paused time.

    timer = PhaseTimer()
    with timer.phase(M.CHECKPOINT_S):
        save(...)
    row |= timer.take()                     # {"checkpoint_s": 0.42}

    clock = BusyClock()                      # one key per server
    clock.start(url); ...; clock.stop(url)
    clock.busy_s(url), clock.mean_in_flight()

Clocks take an optional `now` so a simulation (bench/simulate.py) can drive them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from grpo_stream.core import metric_names as M

# the phases of one learner step, in the order they happen; their sum is ~ step_s
STEP_PHASES = (
    M.WAIT_S,
    M.PROXIMAL_S,
    M.TRAIN_S,
    M.GATHER_S,
    M.EVAL_WAIT_S,
    M.SYNC_S,
    M.CHECKPOINT_S,
)


class PhaseTimer:
    """Seconds per named phase, summed until `take()`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The phases timed since the last `take()`; starts afresh."""
        out, self.seconds = self.seconds, {}
        return out


class Stopwatch:
    """Accumulates the time a condition holds (`set(True)` ... `set(False)`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.total = 0.0
        self._since: float | None = None

    def set(self, on: bool) -> None:
        now = self.clock()
        if on and self._since is None:
            self._since = now
        elif not on and self._since is not None:
            self.total += now - self._since
            self._since = None

    def seconds(self) -> float:
        """Total so far, including a running interval."""
        running = self.clock() - self._since if self._since is not None else 0.0
        return self.total + running


class BusyClock:
    """Counts work in flight per key and integrates it over time.

    `busy_s(key)`: seconds with at least one item of `key` in flight; `idle_s()`: seconds
    with nothing in flight at all; `mean_in_flight()`: the time-average of the total."""

    def __init__(self, keys: list[str] | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.t0 = clock()
        self.count: dict[str, int] = {k: 0 for k in keys or []}
        self.busy: dict[str, float] = {k: 0.0 for k in keys or []}
        self._since: dict[str, float] = {}
        self._last = self.t0
        self._area = 0.0  # integral of the total in flight
        self._idle = 0.0

    def _advance(self, now: float) -> None:
        total = sum(self.count.values())
        dt = max(now - self._last, 0.0)
        self._area += total * dt
        if total == 0:
            self._idle += dt
        self._last = max(now, self._last)

    def start(self, key: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self._advance(now)
        self.count.setdefault(key, 0)
        self.busy.setdefault(key, 0.0)
        if self.count[key] == 0:
            self._since[key] = now
        self.count[key] += 1

    def stop(self, key: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self._advance(now)
        self.count[key] -= 1
        if self.count[key] == 0:
            self.busy[key] += now - self._since.pop(key)

    @contextlib.contextmanager
    def held(self, key: str) -> Iterator[None]:
        self.start(key)
        try:
            yield
        finally:
            self.stop(key)

    def elapsed(self, now: float | None = None) -> float:
        return (self.clock() if now is None else now) - self.t0

    def busy_s(self, key: str, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        running = now - self._since[key] if key in self._since else 0.0
        return self.busy.get(key, 0.0) + running

    def idle_s(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        self._advance(now)
        return self._idle

    def mean_in_flight(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        self._advance(now)
        return self._area / max(now - self.t0, 1e-9)


class GeneratorClocks:
    """The generator's time records: requests per server, staleness gate, rewards."""

    def __init__(self, urls: list[str]) -> None:
        self.requests = BusyClock(list(urls))
        self.gated = Stopwatch()
        self.reward_s = 0.0  # summed over groups (scoring runs concurrently)
        self.wall_start = time.time()

    @contextlib.contextmanager
    def rewarding(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.reward_s += time.perf_counter() - t0

    def snapshot(self) -> dict:
        """The fields `generator_metrics.jsonl` carries (see `timing_summary`)."""
        r = self.requests
        return {
            "wall_start": self.wall_start,
            "elapsed_s": r.elapsed(),
            "gated_s": self.gated.seconds(),
            "reward_s": self.reward_s,
            "in_flight_mean": r.mean_in_flight(),
            "no_request_s": r.idle_s(),
            "server_busy_s": {u: r.busy_s(u) for u in r.count},
        }


def step_phase_sum(row: dict) -> float:
    """The sum of a metrics row's phases (missing ones count 0)."""
    return sum(float(row.get(k) or 0.0) for k in STEP_PHASES)
