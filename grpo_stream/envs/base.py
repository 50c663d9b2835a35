"""The environment protocol of multi-turn episodes, and the records it answers with.

An episode starts from a task's `Prompt`: `Environment.start` gives the opening
messages (system, user), the model acts, and `Environment.respond` sees the model's
turn (its decoded text) and answers with a `Reply` (messages to append: a tool's
result, a user turn) or a `Done` (the episode is over; `reward` None: the configured
reward functions score the model's last turn, as for a single-turn sample). A tool
that raises, hangs past its deadline or returns garbage raises `EpisodeFailed`: the
episode ends with that reason and no reward.

    class Echo:
        tools = []
        def start(self, prompt): return [{"role": "user", "content": prompt.text}]
        async def respond(self, prompt, messages, text): return Done()

An environment that keeps one episode's state (an OpenEnv one: `envs.openenv`) also
has `fresh()`, which returns an instance for one new episode; the generator calls it
once per episode. The generator (`grpo_stream.generator.episodes`) runs the turns, token in, token out,
under the `EpisodeLimits` of `[env]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from grpo_stream.tasks.prompt import Prompt


class EpisodeFailed(RuntimeError):
    """The environment cannot go on (a tool raised, hung or returned garbage; a limit
    that fails the episode); the message is the reason stored with the episode."""


@dataclass(frozen=True)
class Reply:
    """The environment's turn: chat messages appended after the model's turn."""

    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Done:
    """The episode is over; `reward` None: the reward functions score the last turn."""

    reward: float | None = None
    components: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EpisodeLimits:
    """Per episode: model turns, prompt + all turns' tokens, wall time; per tool call:
    its deadline and the longest result accepted (`[env]`)."""

    max_turns: int = 4
    max_total_tokens: int = 512
    wall_time_s: float = 120.0
    tool_timeout_s: float = 5.0
    max_tool_chars: int = 2000

    @classmethod
    def from_config(cls, cfg: Any) -> EpisodeLimits:
        """From an `EnvConfig` (`grpo_stream.config.episodes`)."""
        names = ("max_turns", "max_total_tokens", "wall_time_s", "tool_timeout_s")
        return cls(**{n: getattr(cfg, n) for n in (*names, "max_tool_chars")})


@runtime_checkable
class Environment(Protocol):
    """What an episode talks to. `tools`: `envs.tools.Tool`s offered to the model."""

    tools: list

    def start(self, prompt: Prompt) -> list[dict[str, str]]:
        """The opening messages of an episode on `prompt`."""
        ...

    async def respond(self, prompt: Prompt, messages: list[dict], text: str) -> Reply | Done:
        """The answer to the model's turn `text` (`messages`: the episode so far, the
        model's turn last); raises `EpisodeFailed` when the episode cannot go on."""
        ...
