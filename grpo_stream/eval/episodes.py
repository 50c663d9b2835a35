"""Held-out evaluation of multi-turn episodes: what `eval.evaluate.Evaluator` runs when
`[env]` is set.

    episodes = EpisodeEval(cfg, tokenizer, rewards, correct_key, threshold)
    scored, versions = await episodes.run(pool, prompt, n, sampling)   # n episodes

Each held-out prompt is played as episodes through the training environment, by the
generator's own runner (`generator.episodes.EpisodeRunner`: the same turns, limits and
token accounting), with the evaluator's sampling (greedy: temperature 0, one episode;
sampled: `eval.k` episodes at `eval.temperature`). They are scored as training scores
an episode (`EpisodeRunner.score` and `outcome`: the eval reward functions on the last
model turn, `env.turn_discount` applied to the reward), so the held-out reward means
what training's reward means. An episode is correct when the `eval.correct_reward`
component of its last turn reaches `eval.correct_threshold` (an environment's own
reward without that component: the reward itself); a failed episode is not correct,
and its reward is NaN (counted as failed).
"""

from __future__ import annotations

import math
from typing import Any

from grpo_stream.eval.record import Scored
from grpo_stream.generator.episodes import Episode, episode_runner


class EpisodeEval:
    """Runs and scores held-out episodes of `[env]`'s environment."""

    def __init__(self, cfg: Any, tokenizer: Any, rewards: Any, correct_key: str, threshold: float):
        self.runner = episode_runner(cfg, tokenizer)
        if self.runner is None:
            raise ValueError("eval: episodes need [env] name set")
        self.rewards, self.correct_key, self.threshold = rewards, correct_key, threshold

    async def run(
        self, pool: Any, prompt: Any, n: int, sampling: dict
    ) -> tuple[list[Scored], set[int]]:
        """`n` episodes of `prompt`, scored (`eval.evaluate.Scored`), and the policy
        versions their turns saw; raises `PromptFailed` when the server keeps failing."""
        eps = await self.runner.episodes(pool, prompt, n, sampling)
        results = await self.runner.score(prompt, eps, self.rewards)
        scored = [self._scored(e, r) for e, r in zip(eps, results, strict=True)]
        versions = {v for e in eps for v in e.versions if v >= 0}
        return scored, versions

    def _scored(self, ep: Episode, result: Any) -> Scored:
        reward, components, error = self.runner.outcome(ep, result)
        own = result is None and not error  # the environment gave the reward
        value = components.get(self.correct_key, reward if own else math.nan)
        ok = not error and math.isfinite(value) and value >= self.threshold
        tokens = sum(ep.tokens.policy_mask)  # the model's tokens over every turn
        truncated = ep.finish_reason == "max_tokens"
        return Scored(ok, reward, components, tokens, truncated, ep.turns, ep.tool_calls)
