"""`grpo-stream run`: the whole pipeline from one command, supervised.

1. creates the run folder `runs/NAME-YYYYmmdd-HHMMSS/` and writes the resolved
   `config.toml` there (children read it, so every process sees the same config);
2. prepares the model and starts the vLLM server(s), unless `server.urls` names
   running ones (then it only waits for their /health); it does not wait for servers it
   starts before starting the children, so their start-up overlaps the learner's; the
   GPUs are split between the learner and the servers by config (`grpo_stream.config.placement`: server.gpus,
   learner.gpus / learner.device), and a split that cannot work is refused first;
3. starts `grpo-stream generate` and `grpo-stream learn` as child processes; the
   learner's per-step lines stream to this console, the generator logs to
   `RUN/logs/generator.log`;
4. supervises them (`grpo_stream.run.supervise`): a crashed server, generator or learner
   is restarted (a server re-synced to the learner's latest weights, a learner resumed
   from its checkpoint) unless it crashed `run.max_restarts` times within
   `run.restart_window_s`; then the run stops, naming the child, its exit code and log
   tail. Restarts are counted in RUN/supervisor.jsonl and the summary;
5. when the learner finishes, or on SIGINT/SIGTERM, stops the generator (it flushes
   what it scored), then the learner (it checkpoints its last completed step), then
   the servers.
Children get PR_SET_PDEATHSIG, so even a SIGKILL of `run` leaves no orphan behind.
The last line printed is the run folder.

The API key (`server.api_key`, a secret) never reaches RUN/config.toml or argv: the file
names a variable instead (`server.api_key_env`, GRPO_STREAM_API_KEY for a literal key),
and `run` hands every child that variable in its environment (`ServerConfig.key_env`),
explicitly, through `Commands.env`; the child reads the key from it, as a resume does.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from grpo_stream.config import Config
from grpo_stream.config.placement import plan_gpus, visible_devices
from grpo_stream.core.proc import log_tail
from grpo_stream.run.doctor import preflight
from grpo_stream.run.rm_keeper import RewardServerKeeper
from grpo_stream.run.supervise import Child, Commands, Supervisor


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
    """Start the local servers without waiting for them (the children load meanwhile:
    `_wait_servers`); servers in `server.urls` are waited for here."""
    from grpo_stream.serving.client import BlockingClient
    from grpo_stream.serving.model import resolve_model_path
    from grpo_stream.serving.server import check_host, launch_servers

    if cfg.server.urls:
        client = BlockingClient(api_key=cfg.server.resolved_api_key())
        client.wait_healthy(cfg.server.resolved_urls(), cfg.server.startup_timeout_s)
        return []
    check_host(cfg.server)
    model_dir = resolve_model_path(cfg.model, cfg.sync.transport)
    print(f"[run] starting {cfg.server.num_servers} vLLM server(s) on {model_dir}", flush=True)
    return launch_servers(
        cfg.resolved_server(), model_dir, cfg.model.served_name, rd / "logs", wait=False
    )


def _wait_servers(servers, t0: float) -> None:
    """Wait for the started servers' /health (each stopped if one fails to come up)."""
    from grpo_stream.serving.server import wait_servers

    if servers:
        wait_servers(servers)
        urls = ", ".join(s.url for s in servers)
        print(f"[run] server(s) up in {time.perf_counter() - t0:.0f}s: {urls}", flush=True)


def _commands(cfg: Config, config: Path, learner_env: dict, resume: bool) -> Commands:
    """The children's command lines and environment (the API key's variable, for every
    child); the evaluator's (`eval --follow`, held-out rows into RUN/eval.jsonl) only
    when eval.every > 0."""
    evaluator = _cli("eval", config, "--follow") if cfg.eval.every > 0 else None
    return Commands(
        generator=_cli("generate", config),
        learner=lambda again: _learner_argv(cfg, config, *(["--resume"] if again else [])),
        learner_env=learner_env,
        evaluator=evaluator,
        resume=resume,
        env=cfg.server.key_env(),
    )


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
    sup = Supervisor(
        cfg, rd, _commands(cfg, config, visible_devices(gpus.learner), bool(resume_dir))
    )
    code = 1
    keeper = RewardServerKeeper(cfg, rd)  # the reward-model servers: first up, last down
    try:
        t0 = time.perf_counter()
        keeper.start()
        sup.servers = _start_servers(cfg, rd)
        sup.start()  # the learner loads its models while the servers start: it waits for
        _wait_servers(sup.servers, t0)  # their /health before its first push, as the others do
        code = sup.run()
        if code == 0 and sup.evaluator is not None:  # the final version, on the live servers
            sup.generator.stop()  # (it flushes) its requests would only slow the final evaluation
            code = _finish_evaluator(sup.evaluator, cfg.eval.wait_timeout_s)
        if code != 0 and sup.gave_up is None:
            print(f"[run] learner exited with {code}; see {sup.learner.log}", flush=True)
    except KeyboardInterrupt:
        print(f"[run] interrupted (signal {stop['signal']}); stopping", flush=True)
        code = 130
    finally:
        for sig in old:  # a second Ctrl-C must not abort the clean-up half-way (orphans)
            signal.signal(sig, signal.SIG_IGN)
        sup.shutdown()  # generator, learner, evaluator, servers: in that order
        keeper.close()
        for s, h in old.items():
            signal.signal(s, h)
    if restarts := sup.log.summary():
        print(f"[run] {restarts} (RUN/supervisor.jsonl)", flush=True)
    _summary(rd)
    print(rd, flush=True)
    return code


def _summary(rd: Path) -> None:
    from grpo_stream.core import metric_names as M
    from grpo_stream.core.metrics import read_metrics

    try:
        rows = read_metrics(str(rd))
    except FileNotFoundError:
        return
    if len(rows) >= 2:
        k = max(1, len(rows) // 4)
        first = sum(r[M.REWARD_MEAN] for r in rows[:k]) / k
        last = sum(r[M.REWARD_MEAN] for r in rows[-k:]) / k
        print(
            f"[run] {len(rows)} steps; reward mean of first {k}: {first:.3f} -> last {k}: {last:.3f}",
            flush=True,
        )
    from grpo_stream.eval.record import run_summary

    if line := run_summary(str(rd), rows):
        print(f"[run] {line}", flush=True)
    from grpo_stream.run.timing_summary import summary_lines  # where the time went

    for line in summary_lines(str(rd)):
        print(f"[run] {line}", flush=True)
    _ledger_summary(rd)


def _ledger_summary(rd: Path) -> None:
    """The exactly-once ledger's counts (`grpo-stream buffer ledger RUN` lists details)."""
    from grpo_stream.run.ledger import format_ledger, run_ledger

    try:
        led = run_ledger(str(rd))
    except (OSError, ValueError) as err:  # no store yet, or an unreadable one: say so
        print(f"[run] ledger: unavailable ({err})", flush=True)
        return
    for line in format_ledger(led, limit=5).splitlines():
        print(f"[run] {line.strip()}", flush=True)
