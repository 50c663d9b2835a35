"""Preflight: check a config before a run, one printed line per check.

    grpo-stream doctor --config configs/cpu.toml [k=v ...]

    ok    config             configs/cpu.toml: valid
    ok    security           servers on loopback only
    ok    model              /root/.cache/grpo-stream/smollm2-135m: config.json, tokenizer
    ok    chat template      in tokenizer_config.json (task.use_chat_template = true)
    ok    tied embeddings    untied: lm_head is its own tensor
    ok    buffer.path        runs/buffer: writable; 41.2 GiB free, the run needs ~6.1 MiB ...
    FAIL  reward.functions   reward.functions[0].name: ModuleNotFoundError: No module named 'x'
    ok    task               arithmetic: generated prompts

`server.urls` (servers running elsewhere) also get one line each: /health within a
short deadline, dev mode (GET /weight_info), the API key, and the served model name.
Exit status 0 when every check passes, 1 otherwise. Nothing is started and nothing is
written except a probe file, removed at once, in the buffer's folder.

`preflight(cfg, role)` runs the checks that concern `run`, `generate` or `learn` at their
start (`ROLE_CHECKS`) and raises `PreflightError`, a `UserError` (one line, exit 2),
naming every failed check: a reward import path that does not exist or an unwritable
buffer path fails in seconds, before any wait for a server or for the buffer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable

from grpo_stream.config import Config, ConfigError, load_config
from grpo_stream.config.transports import transport_traits
from grpo_stream.core.errors import UserError
from grpo_stream.run.doctor_checks import Check, check_buffer, check_model, check_security
from grpo_stream.run.doctor_rm import check_reward_model

SERVER_DEADLINE_S = 3.0


class PreflightError(UserError):
    """A preflight check failed; the message names each failed check and its field."""


# ---------------------------------------------------------------- servers (server.urls)
async def _probe_server(client, url: str, served_name: str) -> tuple[bool, str]:
    """(ok, detail) for one running server: health, API key, dev mode, served model."""
    from grpo_stream.serving.client import ServerConnectionError, endpoint

    reason = await client.health_reason(url, SERVER_DEADLINE_S)
    if reason is not None:
        return False, f"{url}: no /health within {SERVER_DEADLINE_S:g}s ({reason})"
    try:
        models, body = await client.raw("GET", endpoint(url, "/v1/models"), SERVER_DEADLINE_S)
        dev, _ = await client.raw("GET", endpoint(url, "/weight_info"), SERVER_DEADLINE_S)
    except ServerConnectionError as e:
        return False, str(e)
    if 401 in (models, dev):
        return False, f"{url}: answers 401: server.api_key is missing or not the server's key"
    if dev != 200:
        return False, (
            f"{url}: not in dev mode (GET /weight_info: HTTP {dev}); weight sync "
            "needs a server started with VLLM_SERVER_DEV_MODE=1 (grpo-stream serve)"
        )
    served = _model_ids(body) if models == 200 else []
    if served_name not in served:
        return False, f"{url}: serves {served}, not model.served_name = {served_name!r}"
    return True, f"{url}: healthy, dev mode, serves {served_name!r}"


def _model_ids(body: str) -> list:
    """The ids in a /v1/models answer ([] when it is not the OpenAI shape)."""
    try:
        data = json.loads(body).get("data") or []
        return [m.get("id") for m in data if isinstance(m, dict)]
    except (ValueError, AttributeError):
        return []


def check_servers(cfg: Config) -> list[Check]:
    """Only `server.urls` (running servers): the ones `run` launches are not up yet."""
    from grpo_stream.serving.client import VLLMClient

    urls = cfg.server.resolved_urls() if cfg.server.urls else []
    if not urls:
        return []
    needs_dev = transport_traits(cfg.sync.transport).versions_servers  # the RL routes

    async def main() -> list[tuple[bool, str]]:
        key = cfg.server.resolved_api_key()
        async with VLLMClient(SERVER_DEADLINE_S, retries=0, api_key=key) as client:
            return await asyncio.gather(
                *(_probe_server(client, u, cfg.model.served_name) for u in urls)
            )

    out = []
    for i, (ok, detail) in enumerate(asyncio.run(main())):
        if not ok and not needs_dev and "not in dev mode" in detail:
            ok, detail = True, detail.split(";")[0] + " (fine: sync.transport = 'none')"
        out.append(Check(f"server.urls[{i}]", ok, detail))
    return out


# ---------------------------------------------------------------- rewards and dataset
def check_rewards(cfg: Config) -> list[Check]:
    """Names and kwargs resolve; import paths load in one real worker process (bounded by
    reward.startup_timeout_s), exactly as the generator's workers will load them."""
    from grpo_stream.tasks.runner import RewardRunner

    try:
        runner = RewardRunner(cfg.reward.model_copy(update={"num_workers": 1}))
    except ValueError as e:
        return [Check("reward.functions", False, str(e))]
    refs = [f.name for f in runner.fns if f.ref is not None and ":" in f.name]
    try:
        asyncio.run(runner.start())
    except ValueError as e:
        return [Check("reward.functions", False, str(e))]
    finally:
        runner.close()
    names = ", ".join(f.key for f in runner.fns)
    loaded = f"; imported {', '.join(refs)}" if refs else ""
    return [Check("reward.functions", True, f"{names}{loaded}")]


def check_dataset(cfg: Config) -> list[Check]:
    t = cfg.task
    if t.name not in ("jsonl", "parquet"):
        return [Check("task", True, f"{t.name}: generated prompts")]
    from grpo_stream.tasks import make_prompt_source

    try:
        make_prompt_source(t)  # reads the file and checks both columns
    except UserError as e:
        return [Check("task.path", False, str(e))]
    return [Check("task.path", True, f"{t.path}: columns {t.prompt_column!r} "
                  f"(task.prompt_column) and {t.answer_column!r} (task.answer_column)")]  # fmt: skip


# ---------------------------------------------------------------- roles and the CLI
CHECKS: dict[str, Callable[[Config], list[Check]]] = {
    "security": check_security,
    "model": check_model,
    "servers": check_servers,
    "buffer": check_buffer,
    "rewards": check_rewards,
    "dataset": check_dataset,
    "reward_model": check_reward_model,  # only when reward.functions names it
}
# `run` waits for server.urls itself (server.startup_timeout_s), so a server still
# starting is no failure there; `doctor` probes them with a short deadline.
ROLE_CHECKS: dict[str, tuple[str, ...]] = {
    "doctor": tuple(CHECKS),
    "run": ("security", "model", "buffer", "rewards", "dataset", "reward_model"),
    "generate": (
        "security",
        "buffer",
        "rewards",
        "reward_model",
    ),  # its prompt source reads the dataset
    "learn": ("security", "buffer"),
}


def run_checks(cfg: Config, role: str = "doctor") -> list[Check]:
    return [c for name in ROLE_CHECKS[role] for c in CHECKS[name](cfg)]


def preflight(cfg: Config, role: str) -> list[Check]:
    """The checks of `role`; raises PreflightError naming every failure (one line)."""
    checks = run_checks(cfg, role)
    failed = [c for c in checks if not c.ok]
    if failed:
        why = [c.detail if c.detail.startswith(c.name) else f"{c.name}: {c.detail}" for c in failed]
        raise PreflightError("preflight: " + "; ".join(why))
    return checks


def doctor_cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="grpo-stream doctor", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="TOML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. buffer.path=/data/b")
    args = p.parse_args(argv)
    source = args.config or "defaults"
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(Check("config", False, " ".join(str(e).split())).line(), flush=True)
        return 1
    n = len(args.overrides)
    checks = [Check("config", True, f"{source}{f' + {n} overrides' if n else ''}: valid")]
    print(checks[0].line(), flush=True)
    for name in ROLE_CHECKS["doctor"]:
        for c in CHECKS[name](cfg):
            print(c.line(), flush=True)
            checks.append(c)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} ok, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0
