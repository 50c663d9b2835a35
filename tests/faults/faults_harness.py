"""The fault suite's harness: the real pipeline (the CLI's `generate` and `learn` as child
processes, the session's real vLLM CPU server on the tiny model), killed or starved on
purpose, then checked through the exactly-once ledger.

    run = Run(tmp_path, server.url, tiny_model_dir, "learner.max_steps=3")
    gen, learn = run.start("generate"), run.start("learn")
    run.wait(learn); run.wait(gen)
    led = run.ledger(); record("case", "outcome", led)

Every case records one row (case, outcome, prompts lost, groups duplicated); tests/conftest.py
prints them as a table and writes tests/faults/RESULTS.md when the session ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from grpo_stream.core.jsonl import read as read_jsonl
from grpo_stream.run.ledger import Ledger, run_ledger

RESULTS: list[tuple[str, str, int, int]] = []  # case, outcome, lost, duplicated

G = 2


def record(case: str, outcome: str, led: Ledger | None) -> None:
    lost = len(led.none) if led else 0
    dup = (led.duplicated_groups + len(led.multi)) if led else 0
    RESULTS.append((case, outcome, lost, dup))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_stream.cli", *args]


def split_flags(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(--flags with their values, dotted overrides): flags go before the overrides."""
    flags, overrides, take = [], [], False
    for a in args:
        if take or a.startswith("--"):
            flags.append(a)
            take = a == "--config"
        else:
            overrides.append(a)
    return flags, overrides


class Run:
    """One run folder and the overrides every process of it gets."""

    def __init__(self, root: Path, url: str, model: Path, *extra: str, name: str = "run"):
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.overrides = [
            f"run.run_dir={self.dir}",
            f'server.urls=["{url}"]',
            f"model.path={model}",
            "server.startup_timeout_s=120",
            f"generator.group_size={G}",
            "generator.max_tokens=6",
            "generator.max_in_flight=2",
            "generator.request_timeout_s=60",
            "generator.max_ahead_batches=1",
            "learner.batch_groups=2",
            "learner.max_steps=3",
            "learner.micro_batch_size=4",
            "learner.checkpoint_every=1",
            "learner.max_staleness=1000",
            "learner.wait_timeout_s=180",
            "learner.lr=1e-4",
            "buffer.poll_s=0.05",
            "task.use_chat_template=false",
            "reward.functions=[{name='length_penalty', kwargs={target=3, limit=20}}]",
            "reward.num_workers=1",
            *extra,
        ]
        self._n = 0

    def start(self, role: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
        self._n += 1
        log = open(self.dir / "logs" / f"{role}.{self._n}.log", "wb")
        flags, more = split_flags(extra)
        proc = subprocess.Popen(
            cli(role, *flags, *self.overrides, *more),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = 300) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"timed out; log tail:\n{log_tail(proc)}") from None

    def run(self, role: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
        flags, more = split_flags(extra)
        argv = cli(role, *flags, *self.overrides, *more)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def ledger(self) -> Ledger:
        return run_ledger(str(self.dir))

    def trained(self) -> list[list[int]]:
        return [r["group_ids"] for r in read_jsonl(str(self.dir / "trained_batches.jsonl"))]

    def metrics(self) -> list[dict]:
        return read_jsonl(str(self.dir / "metrics.jsonl"))

    def drops(self) -> list[dict]:
        return read_jsonl(str(self.dir / "dropped_groups.jsonl"))

    @property
    def buffer(self) -> str:
        return str(self.dir / "buffer")


def log_tail(proc: subprocess.Popen, n: int = 3000) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]


def wait_until(pred, timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max((r["step"] for r in rows), default=0)
