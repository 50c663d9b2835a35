"""`grpo-stream serve`: prepare the model, start the vLLM servers, block until stopped.

    serve(cfg)                                  # cfg: grpo_stream.config.Config
    serve_cli(["--config", "configs/cpu.toml", "server.num_servers=2"])
    python -m grpo_stream.serving.serve --config configs/cpu.toml     # the same, standalone

Prints one `URL <url>` line per healthy server (other processes can wait for them with
`grpo_stream.serving.client.wait_for_server`), then waits. Ctrl-C or SIGTERM stops every server
cleanly; if a server dies on its own, the others are stopped and the exit code is 1.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from grpo_stream.config import Config, load_config
from grpo_stream.serving.model import resolve_model_path
from grpo_stream.serving.server import check_host, launch_servers, stop_servers


def _log_dir(cfg: Config) -> Path:
    if cfg.server.log_file:
        return Path(cfg.server.log_file).parent
    return Path(cfg.run.run_dir or cfg.run.output_dir) / "logs"


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve(cfg: Config, stop: threading.Event | None = None) -> int:
    """Run `cfg.server.num_servers` local servers until `stop` is set (or a signal arrives)."""
    check_host(cfg.server)
    model_dir = resolve_model_path(cfg.model, cfg.sync.transport)
    log_dir = _log_dir(cfg)
    if stop is None:
        stop = threading.Event()
        _install_stop_handlers(stop)
    print(f"[serve] model {model_dir}; logs in {log_dir}", flush=True)
    servers = launch_servers(cfg.resolved_server(), model_dir, cfg.model.served_name, log_dir)
    code = 0
    try:
        for s in servers:
            print(f"URL {s.url}", flush=True)
        print(f"[serve] {len(servers)} server(s) ready; Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            dead = [s for s in servers if not s.is_alive()]
            if dead:
                for s in dead:
                    print(f"[serve] server {s.url} exited; see {s.log_file}", flush=True)
                code = 1
                break
    finally:
        print("[serve] stopping servers", flush=True)
        stop_servers(servers)
    return code


def serve_cli(argv: list[str] | None = None) -> int:
    """`grpo-stream serve [--config FILE] [section.key=value ...]`."""
    p = argparse.ArgumentParser(prog="grpo-stream serve", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. server.port=8001")
    p.add_argument(
        "--reward-model", action="store_true", help="serve the [reward_model] servers alone"
    )
    args = p.parse_args(argv)
    if args.reward_model:
        from grpo_stream.serving.rm_server import serve_reward_model

        stop = threading.Event()
        _install_stop_handlers(stop)
        return serve_reward_model(load_config(args.config, args.overrides), stop)
    return serve(load_config(args.config, args.overrides))


if __name__ == "__main__":
    raise SystemExit(serve_cli())
