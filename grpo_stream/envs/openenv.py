"""OpenEnv environments as grpo-stream episodes.

OpenEnv (Meta and Hugging Face's environment standard) is Gymnasium-like: an
environment's `reset()` gives an `Observation`, `step(action)` gives the next one,
and each carries `done` and `reward`. It never calls the model, so the generator keeps
the episode's tokens (token in, token out) and OpenEnv only sees text turned into its
actions. The adapter takes an environment *factory* (OpenEnv environments hold one
episode's state: each episode gets its own instance), how the model's text becomes an
action, and how an observation becomes the message the model reads:

    from my_env import GuessEnv, GuessAction            # an openenv.core Environment
    env = OpenEnvAdapter(GuessEnv, lambda text: GuessAction(guess=text),
                         lambda obs: obs.message, limits)

In a config, `env.name = "my_module:make"` where `make(limits)` returns such an adapter.
An observation with `done` ends the episode with its `reward` (None: the reward
functions score the last model turn). `reset`/`step` run as `reset_async`/`step_async`
(OpenEnv's default runs the synchronous ones), under the episode's wall time; one that
raises fails the episode with its reason. The adapter imports nothing from OpenEnv: it
follows its documented protocol, and the tests drive real `openenv-core` classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpo_stream.envs.base import Done, EpisodeFailed, EpisodeLimits, Reply
from grpo_stream.tasks.prompt import Prompt


class OpenEnvAdapter:
    tools: list = []

    def __init__(
        self,
        make_env: Callable[[], Any],
        to_action: Callable[[str], Any],
        to_text: Callable[[Any], str],
        limits: EpisodeLimits,
        reset_kwargs: Callable[[Prompt], dict] | None = None,
    ):
        self.make_env, self.to_action, self.to_text = make_env, to_action, to_text
        self.limits = limits
        # default: the prompt's id names the episode (OpenEnv's `episode_id`)
        self.reset_kwargs = reset_kwargs or (lambda p: {"episode_id": p.prompt_id})
        self.env: Any = None
        self.opening: Any = None

    def fresh(self) -> OpenEnvAdapter:
        """This adapter for one new episode, with its own OpenEnv environment."""
        return OpenEnvAdapter(self.make_env, self.to_action, self.to_text, self.limits,
                              self.reset_kwargs)  # fmt: skip

    def start(self, prompt: Prompt) -> list[dict[str, str]]:
        try:
            self.env = self.make_env()
            self.opening = self.env.reset(**self.reset_kwargs(prompt))
        except Exception as e:  # noqa: BLE001 - the environment's failure, with its reason
            raise EpisodeFailed(f"OpenEnv reset raised {type(e).__name__}: {e}") from e
        return [{"role": "user", "content": self._text(self.opening)}]

    def _text(self, obs: Any) -> str:
        text = self.to_text(obs)
        if not isinstance(text, str):
            raise EpisodeFailed(f"OpenEnv observation rendered as {type(text).__name__}, not text")
        return text

    async def respond(self, prompt: Prompt, messages: list[dict], text: str) -> Reply | Done:
        if self.env is None:
            raise EpisodeFailed("OpenEnv adapter: respond before start")
        try:
            action = self.to_action(text)
            obs = await self.env.step_async(action)
        except Exception as e:  # noqa: BLE001 - the environment's failure, with its reason
            raise EpisodeFailed(f"OpenEnv step raised {type(e).__name__}: {e}") from e
        if getattr(obs, "done", False):
            reward = getattr(obs, "reward", None)
            return Done(reward=None if reward is None else float(reward))
        return Reply([{"role": "user", "content": self._text(obs)}])
