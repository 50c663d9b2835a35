"""The `[env]` section: multi-turn episodes with an environment (`grpo_stream.envs`).

Unset `name`: one completion per sample (the default). Set, every sample of a group is
an episode: the model acts, the environment answers (a tool's result) or ends it, and
the limits below bound each episode (`grpo_stream.generator.episodes`).

    [env]
    name = "calculator"
    max_turns = 3
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EnvConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str | None = Field(
        None,
        description="environment of multi-turn episodes (`grpo_stream.envs.ENVIRONMENTS`: "
        '"calculator", or "module:factory"); unset: single-turn samples',
    )
    max_turns: int = Field(4, ge=1, description="model turns per episode at most (count)")
    max_total_tokens: int = Field(
        512,
        ge=2,
        description="prompt + every turn's tokens of an episode at most (tokens); reached: "
        "the episode ends there, scored on what it has",
    )
    wall_time_s: float = Field(
        120.0, gt=0, description="an episode's time limit (seconds); past it the episode fails"
    )
    tool_timeout_s: float = Field(
        5.0, gt=0, description="one tool call's time limit (seconds); past it the episode fails"
    )
    max_tool_chars: int = Field(
        2000, ge=1, description="a tool result longer than this (characters) fails the episode"
    )
    turn_discount: float = Field(
        1.0,
        gt=0,
        le=1,
        description="an episode's reward is multiplied by this once per model turn after "
        "the first (1: no discount; 0.5 with `retry`: right at once 1, at the second try "
        "0.5); the reward components are kept as scored",
    )
