"""The learner's clean stop on SIGTERM/SIGINT: finish the step in hand, checkpoint, exit.

    with StopSignals() as stop:
        while more_steps and not stop.requested:
            with stop.interruptible():       # a wait for the buffer ends at once
                batch = source.next(version)
            train(batch)                     # a signal here only sets `requested`
        checkpoint the last completed step

A signal during a step only sets `requested`, so an optimizer step is never left half
done; during an `interruptible` region (waiting for groups, which no one may ever
publish once `run` has stopped the generator) it raises `StopRequested` at once. The
caller restores what the interrupted region may have moved (the buffer cursor).

`run` sends SIGTERM to the learner after the generator; with `enabled=False` (ranks of a
torchrun learner, which must stop together) or off the main thread (tests) the default
handlers stay in place.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """A stop signal arrived while the learner was waiting (not training)."""


class StopSignals:
    """See the module docstring; a context manager that installs and restores handlers."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested: int | None = None  # the signal number, once one arrived
        self._waiting = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _on_signal(self, signum: int, _frame) -> None:
        self.requested = signum
        if self._waiting:
            self._waiting = False  # raise once
            raise StopRequested(signal.Signals(signum).name)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A region a stop signal may cut short (StopRequested)."""
        if self.requested is not None:
            raise StopRequested(signal.Signals(self.requested).name)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
