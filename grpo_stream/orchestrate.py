"""`grpo-stream run`: the whole pipeline from one command, supervised.

1. creates the run folder `runs/NAME-YYYYmmdd-HHMMSS/` and writes the resolved
   `config.toml` there (children read it, so every process sees the same config);
2. prepares the model and starts the vLLM server(s), unless `server.urls` names
   running ones (then it only waits for their /health); the GPUs are split between the
   learner and the servers by config (`grpo_stream.placement`: server.gpus,
   learner.gpus / learner.device), and a split that cannot work is refused first;
3. starts `grpo-stream generate` and `grpo-stream learn` as child processes; the
   learner's per-step lines stream to this console, the generator logs to
   `RUN/logs/generator.log`;
4. when the learner finishes, stops the generator (it flushes what it scored), then
   the servers. If any child dies, the others are stopped and its log tail shown.
Children get PR_SET_PDEATHSIG, so even a SIGKILL of `run` leaves no orphan behind.
The last line printed is the run folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from grpo_stream.config import Config
from grpo_stream.doctor import preflight
from grpo_stream.placement import plan_gpus, visible_devices
from grpo_stream.proc import die_with_parent, log_tail


def make_run_dir(cfg: Config) -> Path:
    if cfg.run.run_dir:
        rd = Path(cfg.run.run_dir)
    else:
        rd = Path(cfg.run.output_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "logs").mkdir(exist_ok=True)
    cfg.run.run_dir = str(rd.resolve())
    (rd / "config.toml").write_text(cfg.to_toml())
    return rd


class Child:
    def __init__(self, name: str, argv: list[str], log: Path, echo: bool, env: dict | None = None):
        self.name, self.log = name, log
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
        self._fh.close()
        return self.proc.returncode


def _cli(sub: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grpo_stream.cli", sub, "--config", str(config), *extra]


def _learner_argv(cfg: Config, config: Path, *extra: str) -> list[str]:
    """`grpo-stream learn`, under torchrun (one node, a free rendezvous port) when
    learner.num_processes > 1. torchrun forwards SIGTERM to its ranks."""
    argv = _cli("learn", config, *extra)
    n = cfg.learner.num_processes
    if n == 1:
        return argv
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(n)]  # fmt: skip
    return [*torchrun, *argv[1:]]  # drop the interpreter: torchrun runs `-m grpo_stream.cli`


def _start_servers(cfg: Config, rd: Path):
    from grpo_stream.vllm_client import BlockingClient
    from services.model import resolve_model_path
    from services.vllm_server import check_host, launch_servers

    if cfg.server.urls:
        BlockingClient().wait_healthy(cfg.server.resolved_urls(), cfg.server.startup_timeout_s)
        return []
    check_host(cfg.server)
    model_dir = resolve_model_path(cfg.model)
    print(f"[run] starting {cfg.server.num_servers} vLLM server(s) on {model_dir}", flush=True)
    t0 = time.perf_counter()
    servers = launch_servers(cfg.server, model_dir, cfg.model.served_name, rd / "logs")
    print(
        f"[run] server(s) up in {time.perf_counter() - t0:.0f}s: "
        f"{', '.join(s.url for s in servers)}",
        flush=True,
    )
    return servers


def _start_evaluator(cfg: Config, config: Path, rd: Path) -> Child | None:
    """`grpo-stream eval --follow` when eval.every > 0 (held-out rows into RUN/eval.jsonl)."""
    if cfg.eval.every <= 0:
        return None
    return Child("evaluator", _cli("eval", config, "--follow"), rd / "logs" / "eval.log", False)


def _finish_evaluator(evaluator: Child, timeout_s: float) -> int:
    """After the learner: let the evaluator score the final version and exit."""
    try:
        code = evaluator.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"[run] no final evaluation within {timeout_s:g}s (eval.wait_timeout_s)", flush=True)
        return 0
    if code != 0:
        print(f"[run] evaluator exited with {code}; log tail:\n{log_tail(evaluator.log)}")
    return 1 if code else 0


GENERATOR_DONE_GRACE_S = 60.0  # a generator that exited 0 waits this long for the learner


def _supervise(learner: Child, generator: Child, servers, evaluator: Child | None = None) -> int:
    while True:
        code = learner.proc.poll()
        if code is not None:
            return code
        if evaluator is not None and evaluator.proc.poll() not in (None, 0):
            print(f"[run] evaluator exited; log tail:\n{log_tail(evaluator.log)}", flush=True)
            return 1
        if generator.proc.poll() is not None:
            if generator.proc.returncode == 0:  # it stops by itself once the learner finished
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return learner.proc.wait(GENERATOR_DONE_GRACE_S)
            print(
                f"[run] generator exited with {generator.proc.returncode}; log tail:\n"
                f"{log_tail(generator.log)}",
                flush=True,
            )
            return 1
        dead = [s for s in servers if not s.is_alive()]
        if dead:
            print(f"[run] vLLM server {dead[0].url} died; log tail:\n{log_tail(dead[0].log_file)}")
            return 1
        time.sleep(0.5)


def run_pipeline(cfg: Config, resume_dir: str | None = None) -> int:
    if resume_dir:
        cfg.run.run_dir = resume_dir
    gpus = plan_gpus(cfg)  # a bad learner/server GPU split fails before anything starts
    checks = preflight(cfg, "run")  # `grpo-stream doctor`'s checks: seconds, nothing started
    print(f"[run] preflight ok: {', '.join(c.name for c in checks)}", flush=True)
    rd = make_run_dir(cfg)
    config = rd / "config.toml"
    print(f"[run] run folder {rd}", flush=True)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    servers, children = [], []
    code = 1
    try:
        servers = _start_servers(cfg, rd)
        gen = Child(
            "generator", _cli("generate", config), rd / "logs" / "generator.log", echo=False
        )
        learn_extra = ["--resume"] if resume_dir else []
        learner = Child(
            "learner",
            _learner_argv(cfg, config, *learn_extra),
            rd / "logs" / "learner.log",
            echo=True,
            env=visible_devices(gpus.learner),
        )
        evaluator = _start_evaluator(cfg, config, rd)
        children = [learner, gen] + ([evaluator] if evaluator else [])
        code = _supervise(learner, gen, servers, evaluator)
        if code == 0 and evaluator is not None:  # the final version, on the live servers
            gen.stop()  # (it flushes) its requests would only slow the final evaluation
            code = _finish_evaluator(evaluator, cfg.eval.wait_timeout_s)
        if code != 0:
            print(f"[run] learner exited with {code}; see {learner.log}", flush=True)
    except KeyboardInterrupt:
        print(f"[run] interrupted (signal {stop['signal']}); stopping", flush=True)
        code = 130
    finally:
        for sig in old:  # a second Ctrl-C must not abort the clean-up half-way (orphans)
            signal.signal(sig, signal.SIG_IGN)
        for c in reversed(children):  # generator first: it flushes scored groups
            c.stop()
        for s in servers:
            s.stop()
        for s, h in old.items():
            signal.signal(s, h)
    _summary(rd)
    print(rd, flush=True)
    return code


def _summary(rd: Path) -> None:
    from grpo_stream.metrics import read_metrics

    try:
        rows = read_metrics(str(rd))
    except FileNotFoundError:
        return
    if len(rows) >= 2:
        k = max(1, len(rows) // 4)
        first = sum(r["reward_mean"] for r in rows[:k]) / k
        last = sum(r["reward_mean"] for r in rows[-k:]) / k
        print(
            f"[run] {len(rows)} steps; reward mean of first {k}: {first:.3f} -> last {k}: {last:.3f}",
            flush=True,
        )
    from grpo_stream.eval.record import run_summary

    if line := run_summary(str(rd), rows):
        print(f"[run] {line}", flush=True)
