"""OpenEnv environments as episodes, on real `openenv-core` classes (the `openenv`
extra, which `make env` installs).

A number-guessing game written the OpenEnv way (an `Environment` with `reset`, `step`
and `state`, pydantic `Action`/`Observation`) is driven through `OpenEnvAdapter`:
its observations become the model's messages, an observation with `done` ends the
episode with its reward, each episode gets its own environment, and an environment
that raises fails the episode with its reason.
"""

from __future__ import annotations

import asyncio

import openenv.core.env_server.interfaces as oe_interfaces
import openenv.core.env_server.types as oe_types
import pytest

from grpo_stream.envs import Done, EpisodeFailed, EpisodeLimits, Reply
from grpo_stream.envs.openenv import OpenEnvAdapter
from grpo_stream.tasks import Prompt


class GuessAction(oe_types.Action):
    guess: str


class GuessObservation(oe_types.Observation):
    message: str


class GuessEnv(oe_interfaces.Environment):
    """Guess the secret 1..9 in at most 3 tries; reward 1 for a hit, 0 after 3 misses."""

    def __init__(self, secret: int = 6):
        super().__init__()
        self.secret, self.tries, self._state = secret, 0, oe_types.State()

    def reset(self, seed=None, episode_id=None, **kwargs):
        self.tries, self._state = 0, oe_types.State(episode_id=episode_id, step_count=0)
        return GuessObservation(message="Guess my number, 1 to 9.")

    def step(self, action, timeout_s=None, **kwargs):
        self.tries += 1
        self._state.step_count = self.tries
        n = int(action.guess.strip())  # a non-number raises: the episode fails
        if n == self.secret:
            return GuessObservation(message="Right!", done=True, reward=1.0)
        if self.tries >= 3:
            return GuessObservation(message="Out of tries.", done=True, reward=0.0)
        return GuessObservation(message="Higher." if n < self.secret else "Lower.")

    @property
    def state(self):
        return self._state


PROMPT = Prompt("g0", "play", "")


def _adapter():
    return OpenEnvAdapter(GuessEnv, lambda text: GuessAction(guess=text),
                          lambda obs: obs.message, EpisodeLimits())  # fmt: skip


def _play(env, *turns):
    messages = env.start(PROMPT)
    answers = [asyncio.run(env.respond(PROMPT, messages, t)) for t in turns]
    return messages, answers


def test_an_openenv_game_is_played_turn_by_turn():
    env = _adapter().fresh()
    messages, answers = _play(env, "3", "8", "6")
    assert messages == [{"role": "user", "content": "Guess my number, 1 to 9."}]
    assert answers[:2] == [Reply([{"role": "user", "content": "Higher."}]),
                           Reply([{"role": "user", "content": "Lower."}])]  # fmt: skip
    assert answers[2] == Done(reward=1.0)
    assert env.env.state.episode_id == "g0" and env.env.state.step_count == 3
    _, lost = _play(_adapter().fresh(), "1", "2", "3")
    assert lost[-1] == Done(reward=0.0)


def test_each_episode_gets_its_own_environment():
    base = _adapter()
    a, b = base.fresh(), base.fresh()
    a.start(PROMPT)
    asyncio.run(a.respond(PROMPT, [], "1"))
    b.start(PROMPT)
    assert a.env is not b.env and a.env.tries == 1 and b.env.tries == 0


def test_an_openenv_environment_that_raises_fails_the_episode():
    env = _adapter().fresh()
    env.start(PROMPT)
    with pytest.raises(EpisodeFailed, match="OpenEnv step raised ValueError: invalid literal"):
        asyncio.run(env.respond(PROMPT, [], "six"))

    def broken():
        raise ConnectionError("env server gone")

    bad = OpenEnvAdapter(broken, GuessAction, str, EpisodeLimits()).fresh()
    with pytest.raises(
        EpisodeFailed, match="OpenEnv reset raised ConnectionError: env server gone"
    ):
        bad.start(PROMPT)
