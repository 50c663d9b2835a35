"""Multi-turn environments: the protocol, tools, rendering, and the shipped ones.

    from grpo_stream.envs import make_environment
    env = make_environment(cfg.env)          # None when [env] name is unset
    messages = env.start(prompt)
    answer = await env.respond(prompt, messages, model_text)   # Reply | Done

`ENVIRONMENTS` names the shipped ones (`toolenv`); `env.name = "module:factory"` (or
"file.py:factory") imports a user's factory, called with the `EpisodeLimits`.
The generator runs episodes with them: `grpo_stream.generator.episodes`.
"""

from __future__ import annotations

from collections.abc import Callable

from grpo_stream.core.errors import ConfigError
from grpo_stream.envs.base import Done, Environment, EpisodeFailed, EpisodeLimits, Reply
from grpo_stream.envs.toolenv import calculator, retry
from grpo_stream.envs.tools import Tool, ToolCall, ToolCallError, parse_tool_call, run_tool

ENVIRONMENTS: dict[str, Callable[[EpisodeLimits], Environment]] = {
    "calculator": calculator,
    "retry": retry,
}


def make_environment(cfg) -> Environment | None:
    """The environment `cfg` (an `EnvConfig`) names, or None (single-turn samples)."""
    if cfg.name is None:
        return None
    limits = EpisodeLimits.from_config(cfg)
    if cfg.name in ENVIRONMENTS:
        return ENVIRONMENTS[cfg.name](limits)
    if ":" not in cfg.name:
        raise ConfigError(
            f"env.name: unknown environment {cfg.name!r}; known: {sorted(ENVIRONMENTS)} "
            "or 'module:factory'"
        )
    from grpo_stream.tasks.reward_registry import load_function

    try:
        env = load_function(cfg.name)(limits)
    except (ImportError, AttributeError, FileNotFoundError, TypeError, ValueError) as e:
        raise ConfigError(f"env.name: cannot load {cfg.name!r}: {e}") from e
    if not isinstance(env, Environment):
        raise ConfigError(f"env.name: {cfg.name!r} made no Environment (start, respond, tools)")
    return env


__all__ = [
    "ENVIRONMENTS",
    "Done",
    "EpisodeFailed",
    "EpisodeLimits",
    "Environment",
    "Reply",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "make_environment",
    "parse_tool_call",
    "run_tool",
]
