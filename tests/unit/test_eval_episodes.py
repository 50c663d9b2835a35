"""Held-out evaluation of multi-turn episodes against a scripted server (`fake_vllm`).

The `retry` environment on "What is 2 + 3?": the server answers "4" (wrong: the
environment says try again) and then "5". The evaluator plays the held-out prompt as
an episode (not one completion), greedy at every turn, token-exact across turns, and
scores it on its last turn as training's `EpisodeRunner.group` scores the same script:
right at the second turn, times `env.turn_discount`.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_vllm import CannedServer

from grpo_stream.config import load_config
from grpo_stream.envs.toolenv import RetryEnv
from grpo_stream.eval.evaluate import Evaluator
from grpo_stream.generator.episodes import EpisodeRunner
from grpo_stream.generator.pool import ServerPool
from grpo_stream.serving.client import VLLMClient
from grpo_stream.tasks import Prompt, RewardRunner

PROMPT = Prompt("p0", "What is 2 + 3? Reply with only the number.", "5")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _reply(tok, text: str) -> tuple[int, str]:
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": "stop",
              "logprobs": {"token_logprobs": [-0.5] * len(ids),
                           "tokens": [f"token_id:{t}" for t in ids]}}  # fmt: skip
    return 200, json.dumps({"choices": [choice]})


def _cfg(url: str, *extra: str):
    return load_config(None, [
        f'server.urls=["{url}"]', "env.name=retry", "env.max_turns=3", "env.turn_discount=0.5",
        "generator.group_size=2", "eval.k=0", "eval.num_prompts=1", *extra,
    ])  # fmt: skip


def _script(srv: CannedServer, tok, *texts: str) -> None:
    srv.script["/weight_info"] = [(200, '{"weight_version": "3"}')]
    srv.script["/v1/completions"] = [_reply(tok, t) for t in texts]


def test_a_two_turn_heldout_episode_is_scored_on_its_last_turn(tok):
    async def main():
        async with CannedServer() as srv, VLLMClient(timeout_s=10) as client:
            _script(srv, tok, "4", "5")
            cfg = _cfg(srv.url)
            evaluator = Evaluator(cfg, tok, [PROMPT])
            try:
                row = await evaluator.evaluate(ServerPool([srv.url], client))
            finally:
                await evaluator.aclose()
            return row, [r for r in srv.requests if "prompt" in r]

    row, sent = asyncio.run(main())
    assert len(sent) == 2  # one episode of two model turns, not one completion
    assert [r["temperature"] for r in sent] == [0.0, 0.0] and [r["n"] for r in sent] == [1, 1]
    again = tok(RetryEnv.AGAIN, add_special_tokens=False)["input_ids"]
    first_turn = tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    grown = sent[1]["prompt"][len(sent[0]["prompt"]) :]
    assert sent[1]["prompt"][: len(sent[0]["prompt"])] == sent[0]["prompt"]  # never re-tokenized
    assert grown[: len(first_turn)] == first_turn
    assert any(grown[i : i + len(again)] == again for i in range(len(grown)))
    assert row.greedy_pass_at_1 == 1.0  # the last turn's "5", not the first turn's "4"
    assert row.greedy_reward_mean == pytest.approx(0.5)  # 1.0 right at turn 2, times 0.5
    assert row.reward_components == {"numeric_answer": 1.0, "concise_answer": 1.0}
    assert row.turns_mean == 2.0 and row.tool_calls_mean == 0.0
    assert row.policy_version == 3 and row.prompts == 1 and row.failed_prompts == 0


def test_training_scores_the_same_episode_the_same_way(tok):
    async def main():
        async with CannedServer() as srv, VLLMClient(timeout_s=10) as client:
            _script(srv, tok, "4", "4", "5")  # both episodes' first turns, then "5"
            cfg = _cfg(srv.url, "sync.transport=lora", "lora.enabled=true")
            runner = EpisodeRunner(RetryEnv(None), tok, cfg)
            async with RewardRunner(cfg.reward) as rewards:
                group = await runner.group(ServerPool([srv.url], client), PROMPT, "r", rewards)
            return group, [r for r in srv.requests if "prompt" in r]

    group, sent = asyncio.run(main())
    assert [s.reward for s in group] == [0.5, 0.5]
    assert [s.reward_components["numeric_answer"] for s in group] == [1.0, 1.0]
    assert [s.finish_reason for s in group] == ["done", "done"]
    assert [r["temperature"] for r in sent] == [1.0] * 4  # [generator]'s, not eval's
    # under the LoRA sync an episode's turns ask for the served version's adapter
    assert {r["model"] for r in sent} == {"policy-v3"}
