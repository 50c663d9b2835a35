"""Test support: score a group with a `RewardRunner` kept per reward config.

    results = await score_group(prompt, completions, cfg.reward)   # one RewardResult each

The product scores through one `RewardRunner` per process (the generator's, the
evaluator's); tests that score a few groups in separate event loops share a runner per
config instead of starting (and stopping) one each time. Runners left open are closed
at exit.
"""

from __future__ import annotations

import asyncio
import atexit

from grpo_stream.config import RewardConfig
from grpo_stream.tasks import Prompt, RewardResult, RewardRunner

_SHARED: dict[str, RewardRunner] = {}


async def score_group(
    prompt: Prompt, completions: list[str], cfg: RewardConfig
) -> list[RewardResult]:
    """`RewardRunner(cfg).score_group(...)` with the runner kept per config and event loop."""
    key = cfg.model_dump_json()
    runner = _SHARED.get(key)
    if runner is not None and runner.loop not in (None, asyncio.get_running_loop()):
        await runner.aclose()  # its worker queue belongs to a finished loop
        runner = None
    if runner is None:
        runner = _SHARED[key] = RewardRunner(cfg)
    return await runner.score_group(prompt, completions)


@atexit.register
def _close_shared() -> None:
    for runner in _SHARED.values():
        runner.close()
    _SHARED.clear()
