"""One supervised child process of `run` (generator, learner, evaluator).

    c = Child("learner", argv, RUN/logs/learner.log, echo=True, env={...})
    c.proc.poll()          # None while running
    c = c.restarted(argv)  # a fresh process, same name, log (appended) and environment
    c.stop(timeout)        # SIGTERM, then SIGKILL after `timeout`

Children get PR_SET_PDEATHSIG (`proc.die_with_parent`): a SIGKILLed `run` leaves none.
`echo` children's output also streams to this console (the learner's step lines).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from grpo_stream.core.proc import die_with_parent


class Child:
    def __init__(self, name: str, argv: list[str], log: Path, echo: bool, env: dict | None = None):
        self.name, self.argv, self.log, self.echo, self.env = name, argv, log, echo, env
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if echo else self._fh,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._pump = None
        if echo:
            self._pump = threading.Thread(target=self._echo, daemon=True)
            self._pump.start()

    def _echo(self) -> None:
        for raw in self.proc.stdout:
            self._fh.write(raw)
            self._fh.flush()
            sys.stdout.write(raw.decode(errors="replace"))
            sys.stdout.flush()

    def restarted(self, argv: list[str] | None = None, timeout: float = 60.0) -> Child:
        """This child stopped (if it still runs), and a new one with `argv` (else the same)."""
        self.stop(timeout)
        return Child(self.name, argv or self.argv, self.log, self.echo, self.env)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._pump:
            self._pump.join(5)
        if not self._fh.closed:
            self._fh.close()
        return self.proc.returncode
