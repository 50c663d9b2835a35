"""`grpo-stream eval`: held-out evaluation of models, checkpoints and runs.

    grpo-stream eval --model runs/a --model smollm2-135m          # trained vs base
    grpo-stream eval --model runs/a/checkpoints/step-12 --config configs/cpu.toml \\
        eval.num_prompts=64 eval.k=8 --json out.json
    grpo-stream eval --url http://127.0.0.1:8000 --config configs/cpu.toml  # a running server
    grpo-stream eval --follow --config RUN/config.toml            # the evaluator of `run`

`--model` takes a run folder (its latest checkpoint; its config.toml when --config is
not given), a checkpoint folder (`step-N/`, or its `model/`), any Hugging Face model
folder, or `smollm2-135m`. Each is served by a vLLM server started for it (the
[server] section; its log goes to --log-dir), or, with --url, the running server(s)
there are evaluated as they are. The prompts, sampling and rewards come from [eval]
(see `grpo_stream/config/evaluation.py`); the held-out prompts are the same as a training run
of that config evaluates. Prints one table row per model; --json writes the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpo_stream.config import Config, ConfigError, ModelConfig, load_config
from grpo_stream.core.atomic import atomic_write
from grpo_stream.core.proc import run_stoppable
from grpo_stream.eval.record import format_table


@dataclass
class Target:
    label: str  # as given on the command line
    weights: Path  # the folder vLLM serves
    tokenizer: Path  # the folder with the tokenizer (a checkpoint has none of its own)
    step: int | None  # a checkpoint's learner step


def _latest_checkpoint(run: Path) -> Path:
    steps = [p for p in (run / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()]
    if not steps:
        raise ConfigError(f"--model {run}: a run folder without checkpoints/step-N")
    return max(steps, key=lambda p: int(p.name.split("-")[1]))


def _base_model(cfg: Config) -> Path:
    from grpo_stream.serving.model import resolve_model_path

    return resolve_model_path(cfg.model)


def resolve_target(spec: str, cfg: Config) -> Target:
    """A run, checkpoint, HF folder or model name -> what to serve and tokenize with."""
    path = Path(spec).expanduser()
    if (path / "checkpoints").is_dir():
        path = _latest_checkpoint(path)
    if (path / "model" / "adapter_config.json").is_file():  # a LoRA checkpoint: the adapter
        raise ConfigError(
            f"--model {spec}: {path.name} holds a LoRA adapter, not a model: merge it first "
            f"(`grpo-stream export {spec} --merge`) and evaluate the folder it prints"
        )
    if (path / "model" / "config.json").is_file():  # a checkpoint folder
        state = (
            json.loads((path / "state.json").read_text()) if (path / "state.json").is_file() else {}
        )
        return Target(spec, path / "model", _base_model(cfg), state.get("step"))
    if path.name == "model" and (path.parent / "state.json").is_file():
        return resolve_target(str(path.parent), cfg)
    from grpo_stream.serving.model import resolve_model_path

    folder = resolve_model_path(ModelConfig(path=spec))
    return Target(spec, folder, folder, None)


def _config_for(args: argparse.Namespace) -> Config:
    config = args.config
    if config is None and args.model:
        first = Path(args.model[0]).expanduser()
        if (first / "config.toml").is_file() and (first / "checkpoints").is_dir():
            config = str(first / "config.toml")  # a run folder: evaluate as it trained
    return load_config(config, args.overrides)


async def _evaluate(cfg: Config, urls: list[str], tokenizer: Path, label: str, step):
    from transformers import AutoTokenizer

    from grpo_stream.eval.evaluate import Evaluator
    from grpo_stream.generator.pool import ServerPool
    from grpo_stream.serving.client import VLLMClient
    from grpo_stream.tasks.heldout import heldout_prompts

    prompts = await asyncio.to_thread(heldout_prompts, cfg)
    evaluator = Evaluator(cfg, AutoTokenizer.from_pretrained(tokenizer), prompts)
    try:
        key = cfg.server.resolved_api_key()  # passed in: never read from os.environ
        async with VLLMClient(cfg.generator.request_timeout_s, api_key=key) as client:
            await client.wait_healthy(urls, cfg.server.startup_timeout_s, need="all")
            pool = ServerPool(urls, client, wait_timeout_s=cfg.server.startup_timeout_s)
            try:
                return await evaluator.evaluate(pool, step=step, model=label)
            finally:
                await pool.close()
    finally:
        await evaluator.aclose()


def _serve_and_evaluate(cfg: Config, target: Target, log_dir: Path):
    from grpo_stream.serving.server import launch_servers

    server = cfg.resolved_server()  # a copy, with the seed and transfer backend derived
    if target.tokenizer != target.weights:
        server.extra_args = [*server.extra_args, "--tokenizer", str(target.tokenizer)]
    print(f"[eval] serving {target.weights}", file=sys.stderr, flush=True)
    servers = launch_servers(server, target.weights, cfg.model.served_name, log_dir)
    try:
        urls = [s.url for s in servers]
        return asyncio.run(_evaluate(cfg, urls, target.tokenizer, target.label, target.step))
    finally:
        for s in servers:
            s.stop()


def run_eval(args: argparse.Namespace) -> list[dict]:
    cfg = _config_for(args)
    rows = []
    if args.url:
        if len(args.model) > 1:
            raise ConfigError("--url evaluates what that server serves: give at most one --model")
        tokenizer = resolve_target(args.model[0], cfg).tokenizer if args.model else _base_model(cfg)
        cfg.server.urls = list(args.url)
        urls = cfg.server.resolved_urls()
        label = args.model[0] if args.model else urls[0]
        rows.append(asyncio.run(_evaluate(cfg, urls, tokenizer, label, None)))
    else:
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="grpo-stream-eval-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        for spec in args.model or [cfg.model.path]:
            rows.append(_serve_and_evaluate(cfg, resolve_target(spec, cfg), log_dir))
    return [r.to_json() for r in rows]


def follow(args: argparse.Namespace) -> int:
    """The in-training evaluator (`grpo-stream run` starts it when eval.every > 0)."""
    cfg = load_config(args.config, args.overrides)
    if not cfg.run.run_dir:
        raise ConfigError("eval --follow: run.run_dir is not set (pass run.run_dir=DIR)")
    from grpo_stream.eval.follow import Follower
    from grpo_stream.serving.model import resolve_model_path

    follower = Follower(cfg, cfg.run.run_dir, str(resolve_model_path(cfg.model)))
    n = run_stoppable(follower)
    print(f"[eval] done: {n} versions evaluated", file=sys.stderr, flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grpo-stream eval", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )  # fmt: skip
    p.add_argument("--model", action="append", default=[], help="run/checkpoint/model (repeat)")
    p.add_argument("--config", default=None, help="TOML config (default: the run's, or defaults)")
    p.add_argument("--url", action="append", default=[], help="evaluate a running server")
    p.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    p.add_argument("--log-dir", default=None, help="folder for the started servers' logs")
    p.add_argument("--follow", action="store_true", help="the evaluator of a training run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_prompts=64")
    return p


def eval_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.follow:
        return follow(args)
    rows = run_eval(args)
    print(format_table(rows))
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=2) + "\n")
        print(f"[eval] wrote {args.json}", file=sys.stderr)
    return 0
