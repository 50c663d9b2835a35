"""Multi-turn episodes against the real vLLM CPU server (the session's `tiny_server`).

Three-turn episodes of the `retry` environment (the random tiny model never answers
right, so every turn gets "Try again" until `env.max_turns`): the stored sequence is
vLLM's sampled tokens and the environment's tokens, each environment turn exactly
the tokenizer's ids of its rendered text; the learner's recomputed log-probs match
vLLM's on every policy token of every turn (the drift check) and the environment
tokens carry none; the held-out evaluation plays the prompt as the same 3-turn episode. Then the fault cases on the same server: a tool that raises, hangs
or returns garbage, and an episode past its wall time, each give a failed episode with
its reason, which the learner drops as a failed group with that reason for the ledger.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from grpo_stream.config import load_config
from grpo_stream.core import run_records
from grpo_stream.envs import Reply, Tool, run_tool
from grpo_stream.envs.render import env_turn_text
from grpo_stream.envs.toolenv import RetryEnv
from grpo_stream.generator.episodes import EpisodeRunner
from grpo_stream.generator.pool import ServerPool
from grpo_stream.learner.drift import sequence_drift
from grpo_stream.learner.step import usable_groups
from grpo_stream.serving.client import VLLMClient
from grpo_stream.tasks import Prompt, RewardRunner

PROMPT = Prompt("p0", "What is 123456 * 654321? Reply with only the number.", "80779853376")


def _cfg(tmp_path, url, model_dir, *extra):
    return load_config(None, [
        f"run.run_dir={tmp_path}", f'server.urls=["{url}"]', f"model.path={model_dir}",
        "generator.group_size=2", "generator.max_tokens=6", "generator.temperature=1.0",
        "env.max_turns=3", "env.max_total_tokens=200", "reward.functions=[{name='numeric_answer'}]",
        *extra,
    ])  # fmt: skip


def _group(cfg, url, env, tokenizer):
    async def go():
        async with VLLMClient(60.0) as client, RewardRunner(cfg.reward) as rewards:
            pool = ServerPool([url], client)
            try:
                return await EpisodeRunner(env, tokenizer, cfg).group(pool, PROMPT, "r", rewards)
            finally:
                await pool.close()

    return asyncio.run(go())


def _evaluate(cfg, url, tokenizer):
    from grpo_stream.eval.evaluate import Evaluator

    async def go():
        evaluator = Evaluator(cfg, tokenizer, [PROMPT])
        async with VLLMClient(60.0) as client:
            pool = ServerPool([url], client)
            try:
                return await evaluator.evaluate(pool)
            finally:
                await pool.close()
                await evaluator.aclose()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """(value, length) runs of the mask."""
    out: list[tuple[int, int]] = []
    for v in mask:
        out[-1:] = [(v, out[-1][1] + 1)] if out and out[-1][0] == v else [*out[-1:], (v, 1)]
    return out


def test_three_turn_episodes_are_token_exact_and_match_the_learner(
    tmp_path, tiny_server, tiny_model_dir, tokenizer
):
    from grpo_stream.learner.policy import load_causal_lm

    cfg = _cfg(tmp_path, tiny_server.url, tiny_model_dir)
    group = _group(cfg, tiny_server.url, RetryEnv(None), tokenizer)
    assert len(group) == 2
    again = tokenizer(
        env_turn_text(tokenizer, [{"role": "user", "content": RetryEnv.AGAIN}], True),
        add_special_tokens=False,
    )["input_ids"]
    for s in group:
        assert s.finish_reason == "max_turns" and s.reward == 0.0 and s.reward_error == ""
        runs = _runs(s.policy_mask)
        assert [v for v, _ in runs] == [1, 0, 1, 0, 1]  # model, env, model, env, model
        assert len(s.policy_mask) == len(s.completion_ids) == len(s.behaviour_logprobs)
        pos = 0
        for v, n in runs:
            lps = s.behaviour_logprobs[pos : pos + n]
            if v == 0:  # the environment's turn: its text's ids, no log-prob
                eos = s.completion_ids[pos - 1] == tokenizer.eos_token_id
                want = (
                    again
                    if eos
                    else tokenizer(
                        env_turn_text(
                            tokenizer, [{"role": "user", "content": RetryEnv.AGAIN}], False
                        ),
                        add_special_tokens=False,
                    )["input_ids"]
                )
                assert s.completion_ids[pos : pos + n] == want
                assert lps == [0.0] * n
            else:
                assert all(lp < 0.0 for lp in lps) and n <= cfg.generator.max_tokens
            pos += n
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"))
    records = sequence_drift(model, group, cfg, tokenizer.eos_token_id, torch.device("cpu"))
    for s, rec in zip(group, records, strict=True):
        assert rec["tokens"] == sum(s.policy_mask)  # the env tokens are not compared
        assert rec["max_abs"] < 2e-3, rec  # the learner's log-probs are vLLM's, every turn
    cfg = _cfg(tmp_path, tiny_server.url, tiny_model_dir, "env.name=retry", "eval.k=1")
    row = _evaluate(cfg, tiny_server.url, tokenizer)  # greedy and one sampled episode
    assert (row.turns_mean, row.greedy_pass_at_1, row.prompts, row.tool_calls_mean) == (
        3.0, 0.0, 1, 0.0)  # fmt: skip


class _AlwaysCalls:
    """An environment that runs its tool on every model turn (a game engine's move)."""

    def __init__(self, fn, limits, pause_s: float = 0.0):
        self.tools = [Tool("engine", "the game engine", {"type": "object", "properties": {}}, fn)]
        self.limits, self.pause_s = limits, pause_s

    def start(self, prompt):
        return [{"role": "user", "content": prompt.text}]

    async def respond(self, prompt, messages, text):
        await asyncio.sleep(self.pause_s)
        lim = self.limits
        out = await run_tool(self.tools[0], {}, lim.tool_timeout_s, lim.max_tool_chars)
        return Reply([{"role": "tool", "content": out}])


def _hang():
    import threading

    threading.Event().wait(30)


FAULTS = {
    "raises": (lambda: 1 / 0, 0.0, "tool 'engine' raised ZeroDivisionError: division by zero"),
    "hangs": (_hang, 0.0, "tool 'engine' hung: no result in 0.5 s (env.tool_timeout_s)"),
    "garbage": (lambda: {1, 2}, 0.0, "tool 'engine' returned garbage: set is not text or JSON"),
    "wall_time": (lambda: "ok", 5.0, "episode ran past 2 s (env.wall_time_s)"),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_a_failing_environment_fails_the_episode_and_the_group(
    tmp_path, tiny_server, tiny_model_dir, tokenizer, case
):
    from grpo_stream.envs import EpisodeLimits

    fn, pause_s, reason = FAULTS[case]
    cfg = _cfg(tmp_path, tiny_server.url, tiny_model_dir, "env.tool_timeout_s=0.5",
               "env.wall_time_s=2")  # fmt: skip
    env = _AlwaysCalls(fn, EpisodeLimits.from_config(cfg.env), pause_s)
    group = _group(cfg, tiny_server.url, env, tokenizer)
    for s in group:
        assert s.finish_reason == "env_failed"
        assert s.reward_error.startswith(reason), s.reward_error
        assert s.reward != s.reward  # NaN: no reward
        assert s.completion_ids and sum(s.policy_mask) == len(s.completion_ids)  # one turn
    kept, failed = usable_groups([group])
    assert kept == [] and failed == 1  # the learner drops it and goes on
    [drop] = run_records.group_drops([group], run_records.REWARD_FAILED)
    assert drop["reason"] == run_records.REWARD_FAILED and drop["detail"].startswith(reason)
