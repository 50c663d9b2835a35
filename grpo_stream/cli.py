"""`grpo-stream`: the one entry point.

    grpo-stream run      [--config F] [k=v ...]   whole pipeline: servers + generator + learner
    grpo-stream serve    [--config F] [k=v ...]   vLLM server(s) only
    grpo-stream generate --config F [k=v ...]     generator only (needs run.run_dir or buffer.path)
    grpo-stream learn    --config F [--resume]    learner only
    grpo-stream replay   RUN_DIR [...]            learner steps on stored rollouts, no server
    grpo-stream buffer   stats|show|export|convert|compact PATH
    grpo-stream model    prepare|tiny
    grpo-stream plot     RUN_DIR

Configs are parsed and validated before torch or vLLM is imported, so `--help` and
config errors are instant. A user error exits with status 2 and one clear message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from grpo_stream.config import Config, ConfigError, load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5")


def _load(args) -> Config:
    return load_config(args.config, args.overrides)


def _run_dir(cfg: Config) -> str:
    if cfg.run.run_dir:
        os.makedirs(cfg.run.run_dir, exist_ok=True)
        return cfg.run.run_dir
    if cfg.buffer.path:
        return os.path.dirname(cfg.buffer.path.rstrip("/")) or "."
    raise ConfigError("run.run_dir is not set: pass run.run_dir=DIR (or buffer.path=...)")


def cmd_generate(args) -> int:
    cfg = _load(args)
    run_dir = _run_dir(cfg)
    from grpo_stream.generator.loop import Generator
    from services.model import resolve_model_path

    gen = Generator(cfg, run_dir, str(resolve_model_path(cfg.model)))

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gen.request_stop)
        return await gen.run()

    n = asyncio.run(main())
    print(f"[generate] done: {n} groups in the buffer", file=sys.stderr)
    return 0


def cmd_learn(args) -> int:
    cfg = _load(args)
    run_dir = _run_dir(cfg)
    from grpo_stream.learner.distributed import shutdown_distributed
    from grpo_stream.learner.loop import Learner
    from services.model import resolve_model_path

    Learner(cfg, run_dir, str(resolve_model_path(cfg.model)), resume=args.resume).run()
    shutdown_distributed()  # only after a clean run: a failed rank must not wait here
    return 0


def cmd_run(args) -> int:
    from grpo_stream.orchestrate import run_pipeline

    if args.resume and args.config is None:  # continue with the run's own resolved config
        args.config = os.path.join(args.resume, "config.toml")
    return run_pipeline(_load(args), resume_dir=args.resume)


def cmd_serve(args) -> int:
    from services.serve import serve

    return serve(_load(args))


def _passthrough(module: str, func: str):
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(args.rest)

    return run


def is_user_error(e: BaseException) -> bool:
    """Errors that are the user's to fix: shown as one message, not a traceback."""
    if isinstance(e, ConfigError):
        return True
    names = {
        "ServerUnavailable",
        "ServerStartError",
        "TaskError",
        "ModelPrepError",
        "SchemaVersionError",
        "NoServerAvailable",
        "GeneratorError",
    }
    return type(e).__name__ in names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-stream", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in [
        ("run", cmd_run, "start servers, generator and learner; supervise them"),
        ("serve", cmd_serve, "start vLLM server(s) and block"),
        ("generate", cmd_generate, "run the generator alone"),
        ("learn", cmd_learn, "run the learner alone"),
    ]:
        sp = sub.add_parser(name, help=helptext)
        _config_args(sp)
        sp.set_defaults(fn=fn)
        if name == "learn":
            sp.add_argument(
                "--resume", action="store_true", help="continue from the last checkpoint"
            )
        if name == "run":
            sp.add_argument(
                "--resume", default=None, metavar="RUN_DIR", help="continue a killed run"
            )
    for name, module, func in [
        ("buffer", "grpo_stream.buffer.tools", "run_cli"),
        ("model", "services.model", "model_cli"),
        ("replay", "grpo_stream.learner.replay", "replay_cli"),
        ("plot", "grpo_stream.plot", "plot_cli"),
    ]:
        sp = sub.add_parser(name, help=f"see `grpo-stream {name} --help`", add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=_passthrough(module, func))
    return p


PASSTHROUGH = {"buffer", "model", "replay", "plot"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:  # their own argparse sees every flag, --help too
        args = build_parser().parse_args([argv[0]])
        args.rest = argv[1:]
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"grpo-stream {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
