"""`grpo-stream run`: the whole pipeline from one command, supervised.

1. creates the run folder `runs/NAME-YYYYmmdd-HHMMSS/` and writes the resolved
   `config.toml` there (children read it, so every process sees the same config);
2. prepares the model and starts the vLLM server(s), unless `server.urls` names
   running ones (then it only waits for their /health);
3. starts `grpo-stream generate` and `grpo-stream learn` as child processes; the
   learner's per-step lines stream to this console, the generator logs to
   `RUN/logs/generator.log`;
4. when the learner finishes, stops the generator (it flushes what it scored), then
   the servers. If any child dies, the others are stopped and its log tail shown.
Children get PR_SET_PDEATHSIG, so even a SIGKILL of `run` leaves no orphan behind.
The last line printed is the run folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from grpo_stream.config import Config


def _die_with_parent() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return f"<no log at {path}>"


class Child:
    def __init__(self, name: str, argv: list[str], log: Path, echo: bool):
        self.name, self.log = name, log
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if echo else self._fh,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
    from services.model import resolve_model_path
    from services.vllm_server import check_host, launch_servers, wait_for_server

    if cfg.server.urls:
        for u in cfg.server.resolved_urls():
            wait_for_server(u, cfg.server.startup_timeout_s)
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


def _supervise(learner: Child, generator: Child, servers) -> int:
    while True:
        code = learner.proc.poll()
        if code is not None:
            return code
        if generator.proc.poll() is not None:
            print(
                f"[run] generator exited with {generator.proc.returncode}; log tail:\n"
                f"{_tail(generator.log)}",
                flush=True,
            )
            return 1
        dead = [s for s in servers if not s.is_alive()]
        if dead:
            print(f"[run] vLLM server {dead[0].url} died; log tail:\n{_tail(dead[0].log_file)}")
            return 1
        time.sleep(0.5)


def run_pipeline(cfg: Config, resume_dir: str | None = None) -> int:
    if resume_dir:
        cfg.run.run_dir = resume_dir
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
        )
        children = [learner, gen]
        code = _supervise(learner, gen, servers)
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
