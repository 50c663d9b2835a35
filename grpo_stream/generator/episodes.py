"""Multi-turn episodes, token in, token out: the G episodes of a prompt as one group.

    runner = EpisodeRunner(env, tokenizer, cfg)          # env: grpo_stream.envs
    group = await runner.group(pool, prompt, run_id, rewards)
    ep = await runner.episode(pool, prompt, sampling)    # one, other sampling (eval)
    [result] = await runner.score(prompt, [ep], rewards)
    reward, components, error = runner.outcome(ep, result)

Each episode is one token sequence. The prompt (the environment's opening messages,
its tools presented by the chat template: `envs.render`) is tokenized once; each model
turn is sampled by vLLM from the token ids so far (`sampler.request_group`, n=1: the
one client, retries, weight versions) and appended as vLLM returned it, with its
behaviour log-probs; each environment turn's text is tokenized once and appended with
policy mask 0 and no log-prob (stored 0.0). No earlier turn is ever re-tokenized.

An episode ends when the environment says `Done`, after `env.max_turns` model turns,
or when `env.max_total_tokens` leaves no room for another turn; the reward functions
then score its last model turn (unless `Done` carries a reward), times
`env.turn_discount` per model turn after the first. The held-out evaluation runs and
scores its episodes with the same `episode`, `score` and `outcome`. A tool that raises,
hangs or returns garbage, an environment that raises, or an episode past
`env.wall_time_s`, fails the episode: its
sample keeps the tokens so far, reward NaN and the reason in `reward_error`, so the
learner drops the group as a failed reward and the ledger counts it (the run goes on).
A server that keeps failing fails the prompt (`PromptFailed`), as for single-turn groups.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from grpo_stream.buffer.schema import Group, Sample
from grpo_stream.core.errors import ConfigError
from grpo_stream.envs import Done, Environment, EpisodeFailed, EpisodeLimits, Reply
from grpo_stream.envs.render import env_turn_text, opening_text
from grpo_stream.generator.sampler import PromptFailed, SampleRequest, request_group
from grpo_stream.serving.adapters import request_model

FAILED = "env_failed"  # finish_reason of a failed episode


@dataclass
class EpisodeTokens:
    """One episode's tokens: the prompt, then the turns, with the policy mask and the
    behaviour log-probs of every completion token (0.0 on environment tokens)."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def add_model(self, ids: list[int], logprobs: list[float]) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"a model turn of {len(ids)} tokens with {len(logprobs)} log-probs")
        self.completion_ids += ids
        self.policy_mask += [1] * len(ids)
        self.logprobs += logprobs

    def add_env(self, ids: list[int]) -> None:
        self.completion_ids += ids
        self.policy_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class Episode:
    tokens: EpisodeTokens
    prompt_text: str
    last_text: str = ""  # the model's last turn (what the reward functions score)
    turns: int = 0
    tool_calls: int = 0  # environment turns that answered with a "tool" message
    finish_reason: str = ""  # done | max_turns | max_tokens | env_failed
    error: str = ""  # a failed episode's reason
    done: Done | None = None
    versions: tuple[int, int] = (-1, -1)  # first turn's start, last turn's end
    latency_s: float = 0.0
    url: str = ""


class EpisodeRunner:
    """Runs episodes of `env` against the servers of a `ServerPool`."""

    def __init__(self, env: Environment, tokenizer: Any, cfg):
        self.env, self.tok, self.cfg = env, tokenizer, cfg
        self.limits = EpisodeLimits.from_config(cfg.env)
        if self.limits.max_total_tokens > cfg.server.max_model_len:
            raise ConfigError(
                f"env.max_total_tokens = {self.limits.max_total_tokens} exceeds "
                f"server.max_model_len = {cfg.server.max_model_len}"
            )
        self.tools = [t.schema() for t in env.tools]
        g = cfg.generator
        self.sampling = {"max_tokens": g.max_tokens, "temperature": g.temperature,
                         "top_p": g.top_p, "top_k": g.top_k, **({"stop": g.stop} if g.stop else {})}  # fmt: skip
        self.model = request_model(cfg)  # the version's adapter name under the LoRA sync
        self.discount = cfg.env.turn_discount

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    async def _turn(self, pool, prompt, ids: list[int], sampling: dict):
        g, req = self.cfg.generator, SampleRequest(prompt, "", ids)
        return await request_group(
            pool, self.model, req, 1, sampling, g.max_retries, g.retry_budget_s
        )

    async def episode(self, pool, prompt, sampling: dict | None = None) -> Episode:
        """One episode on `prompt`, each turn sampled with `sampling` (vLLM's fields;
        `max_tokens` per turn; default: [generator]'s); a failed one is returned with
        its reason."""
        ep = Episode(EpisodeTokens([]), "")
        # a stateful environment (an OpenEnv one) gives each episode its own instance
        env = self.env.fresh() if hasattr(self.env, "fresh") else self.env
        try:
            async with asyncio.timeout(self.limits.wall_time_s):
                messages = env.start(prompt)
                ep.prompt_text = opening_text(self.tok, messages, self.tools)
                ep.tokens.prompt_ids = self._encode(ep.prompt_text)
                await self._turns(pool, env, prompt, messages, ep, sampling or self.sampling)
        except EpisodeFailed as e:
            ep.finish_reason, ep.error = FAILED, str(e)
        except TimeoutError:
            ep.finish_reason = FAILED
            ep.error = f"episode ran past {self.limits.wall_time_s:g} s (env.wall_time_s)"
        except PromptFailed:
            raise  # the server's failure: the prompt's, not the episode's
        except Exception as e:  # noqa: BLE001 - a broken environment fails its episode only
            ep.finish_reason, ep.error = FAILED, f"environment raised {type(e).__name__}: {e}"
        return ep

    async def _turns(self, pool, env, prompt, messages: list, ep: Episode, sampling) -> None:
        lim, tok, eos = self.limits, ep.tokens, self.tok.eos_token_id
        t0 = time.perf_counter()
        while True:
            room = lim.max_total_tokens - len(tok)
            if room < 1:
                ep.finish_reason = "max_tokens"
                return
            turn = {**sampling, "max_tokens": min(sampling["max_tokens"], room)}
            outs, v0, v1, _, ep.url = await self._turn(pool, prompt, tok.ids(), turn)
            c = outs[0]
            tok.add_model(c.token_ids, c.logprobs)
            ep.turns += 1
            ep.versions = (v0 if ep.turns == 1 else ep.versions[0], v1)
            ep.latency_s = time.perf_counter() - t0
            ep.last_text = c.text
            messages.append({"role": "assistant", "content": c.text})
            answer = await env.respond(prompt, messages, c.text)
            if isinstance(answer, Done):
                ep.finish_reason, ep.done = "done", answer
                return
            if not isinstance(answer, Reply):
                raise EpisodeFailed(f"the environment answered {type(answer).__name__}")
            if ep.turns >= lim.max_turns:
                ep.finish_reason = "max_turns"
                return
            sampled_eos = bool(c.token_ids) and c.token_ids[-1] == eos
            env_ids = self._encode(env_turn_text(self.tok, answer.messages, sampled_eos))
            if len(tok) + len(env_ids) >= lim.max_total_tokens:
                ep.finish_reason = "max_tokens"  # no room left for the model to answer
                return
            tok.add_env(env_ids)
            messages.extend(answer.messages)
            ep.tool_calls += any(m.get("role") == "tool" for m in answer.messages)

    async def group(self, pool, prompt, run_id: str, rewards) -> Group:
        """The G episodes of `prompt`, scored (`rewards`: a `tasks.RewardRunner`)."""
        eps = await self.episodes(pool, prompt, self.cfg.generator.group_size)
        results = await self.score(prompt, eps, rewards)
        pairs = enumerate(zip(eps, results, strict=True))
        return [self.sample(run_id, prompt, i, e, r) for i, (e, r) in pairs]

    async def episodes(self, pool, prompt, n: int, sampling: dict | None = None) -> list:
        """`n` episodes of `prompt` at once (`episode`); raises `PromptFailed` when the
        server keeps failing, which stops the prompt's other episodes too."""
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.episode(pool, prompt, sampling)) for _ in range(n)]
        except* PromptFailed as group_err:
            raise group_err.exceptions[0] from None
        return [t.result() for t in tasks]

    async def score(self, prompt, eps: list[Episode], rewards) -> list:
        """Each episode's RewardResult from `rewards` (a `tasks.RewardRunner`) on its last
        model turn, scored as one group; None for a failed episode or one whose
        environment gave the reward."""
        scored = [e for e in eps if not e.error and (e.done is None or e.done.reward is None)]
        results = await rewards.score_group(prompt, [e.last_text for e in scored])
        by_id = {id(e): r for e, r in zip(scored, results, strict=True)}
        return [by_id.get(id(e)) for e in eps]

    def outcome(self, ep: Episode, result) -> tuple[float, dict[str, float], str]:
        """(reward, components, error) of an episode (`result`: from `score`): NaN and
        the reason when it failed; the reward times `env.turn_discount` per model turn
        after the first."""
        if ep.error:
            return float("nan"), {}, ep.error
        if result is None:  # the environment's own reward
            reward, components, error = float(ep.done.reward), dict(ep.done.components), ""
        else:
            reward, components, error = float(result.total), dict(result.components), result.error
        return reward * self.discount ** max(ep.turns - 1, 0), components, error

    def sample(self, run_id: str, prompt, index: int, ep: Episode, result) -> Sample:
        """The buffer record of one episode (`result`: its RewardResult, or None)."""
        reward, components, error = self.outcome(ep, result)
        t = ep.tokens
        return Sample(
            run_id=run_id, prompt_id=prompt.prompt_id, sample_index=index,
            policy_version=ep.versions[0], policy_version_end=ep.versions[1],
            prompt_ids=t.prompt_ids, completion_ids=t.completion_ids,
            behaviour_logprobs=t.logprobs, policy_mask=t.policy_mask, reward=reward,
            prompt_text=ep.prompt_text, completion_text=self.tok.decode(t.completion_ids),
            answer=str(prompt.answer), reward_components=components, reward_error=error,
            finish_reason=ep.finish_reason, gen_latency_s=ep.latency_s, server_url=ep.url,
            created_at=time.time(),
        )  # fmt: skip


def episode_runner(cfg, tokenizer) -> EpisodeRunner | None:
    """The runner of `[env]`'s environment, or None when `env.name` is unset."""
    from grpo_stream.envs import make_environment

    env = make_environment(cfg.env)
    return None if env is None else EpisodeRunner(env, tokenizer, cfg)
