"""Prompt sources and verifiable rewards.

    from grpo_stream.tasks import make_prompt_source, render_prompt, RewardRunner

    source = await asyncio.to_thread(make_prompt_source, cfg.task)   # files are read here
    prompt = next(source)
    text, token_ids = render_prompt(prompt, tokenizer, cfg.task)
    async with RewardRunner(cfg.reward) as rewards:
        results = await rewards.score_group(prompt, completions)      # list[RewardResult]

Tasks: `sources.py` (registry: arithmetic, countdown, jsonl, parquet), `dataset_files.py`,
`countdown.py`. Rewards: `reward_registry.py` (interface, decorators, import paths),
`rewards.py` (built-ins), `runner.py` (scoring a group), `reward_worker.py`
(processes for user functions).
"""

from grpo_stream.tasks.prompt import Prompt, TaskError, render_prompt
from grpo_stream.tasks.reward_registry import REWARDS, group_reward, reward
from grpo_stream.tasks.runner import (
    RewardResult,
    RewardRunner,
    build_reward_fns,
    group_failed,
)
from grpo_stream.tasks.sources import PROMPT_SOURCES, make_prompt_source

__all__ = [
    "PROMPT_SOURCES",
    "REWARDS",
    "Prompt",
    "RewardResult",
    "RewardRunner",
    "TaskError",
    "build_reward_fns",
    "group_failed",
    "group_reward",
    "make_prompt_source",
    "render_prompt",
    "reward",
]
