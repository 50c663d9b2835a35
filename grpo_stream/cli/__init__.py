"""`grpo-stream`: the one entry point.

    grpo-stream run      [--config F] [--sync] [k=v ...]   whole pipeline (--sync: synchronous)
    grpo-stream serve    [--config F] [k=v ...]   vLLM server(s) only
    grpo-stream generate --config F [k=v ...]     generator only (needs run.run_dir or buffer.path)
    grpo-stream learn    --config F [--resume]    learner only
    grpo-stream replay   RUN_DIR [...]            learner steps on stored rollouts, no server
    grpo-stream buffer   stats|show|export|convert|compact|ledger PATH
    grpo-stream model    prepare|tiny
    grpo-stream plot     RUN_DIR
    grpo-stream sweep    SWEEP.toml [--dry-run]   one run per point of a grid, one after another
    grpo-stream compare  RUN_DIR... [--out DIR]   curves and a table across runs
    grpo-stream eval     [--model RUN|CKPT|DIR ...] [--url U] [--json F]   held-out accuracy
    grpo-stream doctor   [--config F] [k=v ...]   preflight: one line per check, before a run
    grpo-stream config   show [--config F] [k=v ...]   the resolved config, described
    grpo-stream rm       train|eval ...           reward models: Bradley-Terry on pairs
    grpo-stream export   RUN [--merge] [--out D]  a checkpoint as a folder (LoRA: adapter, or merged)

Configs are parsed and validated before torch or vLLM is imported, so `--help` and
config errors are instant. A user error (`grpo_stream.core.errors.UserError`) exits with
status 2 and one clear message. `generate` and `learn` write the config they run with
into the run folder (`config.write_run_config`). Output into a closed pipe
(`grpo-stream buffer stats RUN | head -1`) ends quietly with status 141, as Unix tools do.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from grpo_stream.config import (
    Config,
    ConfigError,
    load_config,
    load_run_config,
    write_run_config,
)
from grpo_stream.core.errors import UserError
from grpo_stream.core.proc import run_stoppable
from grpo_stream.run.doctor import preflight


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5")


def _load(args) -> Config:
    return _check_api_key(load_config(args.config, args.overrides))


def _check_api_key(cfg: Config) -> Config:
    """Fail now, naming `server.api_key_env`, when the key's variable is missing. The key
    stays in `cfg` (never in os.environ): each client is handed `resolved_api_key()`."""
    cfg.server.resolved_api_key()
    return cfg


def _run_dir(cfg: Config) -> str:
    if cfg.run.run_dir:
        os.makedirs(cfg.run.run_dir, exist_ok=True)
        return cfg.run.run_dir
    if cfg.buffer.path:
        return os.path.dirname(cfg.buffer.path.rstrip("/")) or "."
    raise ConfigError("run.run_dir is not set: pass run.run_dir=DIR (or buffer.path=...)")


def _prepare_run_dir(cfg: Config, role: str) -> str:
    """The run folder, with the config this process runs with written into it (one
    writer per role: rank 0 of a torchrun learner)."""
    run_dir = _run_dir(cfg)
    if cfg.run.run_dir is None:
        cfg.run.run_dir = run_dir
    if os.environ.get("RANK", "0") == "0":
        write_run_config(cfg, run_dir, role)
    return run_dir


def cmd_generate(args) -> int:
    cfg = _load(args)
    preflight(cfg, "generate")  # reward imports, buffer path: seconds, before any server wait
    run_dir = _prepare_run_dir(cfg, "generate")
    from grpo_stream.generator.loop import Generator
    from grpo_stream.serving.model import resolve_model_path

    gen = Generator(cfg, run_dir, str(resolve_model_path(cfg.model, cfg.sync.transport)))
    n = run_stoppable(gen)
    print(f"[generate] done ({gen.stop_reason()}): {n} groups in the buffer", file=sys.stderr)
    return 0


def cmd_learn(args) -> int:
    cfg = _load(args)
    preflight(cfg, "learn")  # the buffer path, before waiting learner.wait_timeout_s for it
    run_dir = _prepare_run_dir(cfg, "learn")
    from grpo_stream.learner.distributed import shutdown_distributed
    from grpo_stream.learner.loop import Learner
    from grpo_stream.serving.model import resolve_model_path
    from grpo_stream.sync import WeightSyncError

    model_dir = str(resolve_model_path(cfg.model, cfg.sync.transport))
    learner = Learner(cfg, run_dir, model_dir, resume=args.resume)
    try:
        learner.run()
    except WeightSyncError as err:  # the trained step is checkpointed (learner/loop.py)
        return _sync_failed(run_dir, learner, err)
    code = 128 + learner.stop.requested if learner.stop.requested else 0
    return shutdown_distributed(code)  # after a clean run only: a failed rank must not wait


def _sync_failed(run_dir: str, learner, err: Exception) -> int:
    """One line, RUN/sync_failure.json for `run`'s supervisor, EXIT_SYNC_FAILED."""
    from grpo_stream.sync.failure import EXIT_SYNC_FAILED, write_sync_failure

    if os.environ.get("RANK", "0") == "0":
        write_sync_failure(run_dir, learner.step, learner.version, err)
    print(f"[learn] weight sync failed after step {learner.step} (checkpoint step-"
          f"{learner.saved_step}; learn --resume continues from it): {err}",
          file=sys.stderr, flush=True)  # fmt: skip
    return EXIT_SYNC_FAILED


def cmd_run(args) -> int:
    from grpo_stream.run.orchestrate import run_pipeline

    if args.resume and args.config is None:  # continue with the run's own resolved config
        cfg = _check_api_key(load_run_config(args.resume, args.overrides))
    else:
        cfg = _load(args)
    if getattr(args, "sync", False):  # synchronous GRPO on the same processes (sync_mode.py)
        from grpo_stream.config.sync_mode import apply_sync_mode

        apply_sync_mode(cfg)
    return run_pipeline(cfg, resume_dir=args.resume)


def cmd_serve(args) -> int:
    from grpo_stream.serving.serve import serve

    if args.reward_model:  # the [reward_model] servers alone
        from grpo_stream.serving.serve import serve_cli

        return serve_cli(["--reward-model", *(["--config", args.config] if args.config else []),
                          *args.overrides])  # fmt: skip
    return serve(_load(args))


def _passthrough(module: str, func: str):
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(args.rest)

    return run


def cmd_config_show(args) -> int:
    from grpo_stream.config.show import render_config

    sys.stdout.write(render_config(_load(args), args.config or "defaults"))
    return 0


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
        if name == "serve":
            sp.add_argument(
                "--reward-model", action="store_true", help="the [reward_model] servers alone"
            )
        if name == "run":
            sp.add_argument(
                "--resume", default=None, metavar="RUN_DIR", help="continue a killed run"
            )
            sp.add_argument(
                "--sync",
                action="store_true",
                help="synchronous GRPO (generate a batch, train, sync, repeat): "
                "max_ahead_batches=0, max_staleness=0, sync.every=1 (grpo_stream/config/sync_mode.py)",
            )
    for name, module, func in [
        ("buffer", "grpo_stream.cli.buffer", "run_cli"),
        ("model", "grpo_stream.serving.model", "model_cli"),
        ("replay", "grpo_stream.learner.replay", "replay_cli"),
        ("plot", "grpo_stream.analysis.plot_cli", "plot_cli"),
        ("doctor", "grpo_stream.run.doctor", "doctor_cli"),
        ("eval", "grpo_stream.eval.cli", "eval_cli"),
        ("sweep", "grpo_stream.analysis.sweep", "sweep_cli"),
        ("compare", "grpo_stream.analysis.compare_cli", "compare_cli"),
        ("rm", "grpo_stream.rm.cli", "rm_cli"),
        ("export", "grpo_stream.learner.export", "export_cli"),
    ]:
        sp = sub.add_parser(name, help=f"see `grpo-stream {name} --help`", add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=_passthrough(module, func))
    sp = sub.add_parser("config", help="show the resolved config").add_subparsers(
        dest="action", required=True
    )
    show = sp.add_parser("show", help="print the resolved config as TOML, fields described")
    _config_args(show)
    show.set_defaults(fn=cmd_config_show)
    return p


PASSTHROUGH = {"buffer", "model", "replay", "plot", "doctor", "eval", "sweep", "compare", "rm",
               "export"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # (also on SystemExit after --help) a closed pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        _silence_stdout()
        return 128 + signal.SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (captured in tests)
        pass


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:  # their own argparse sees every flag, --help too
        args = build_parser().parse_args([argv[0]])
        args.rest = argv[1:]
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except UserError as e:  # the user's to fix: one message, no traceback
        print(f"grpo-stream {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
