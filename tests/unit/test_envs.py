"""Environments and tools: calls parsed from the model's text, tools run under their
deadline with their results checked, the calculator, rendering through SmolLM2's chat
template, and the environment registry.

Fault cases (a tool that raises, hangs, returns garbage) end the episode with a reason
(`EpisodeFailed`); the model's own mistakes (a malformed call, an unknown tool, wrong
arguments) are told to the model and the episode goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from grpo_stream.config import Config
from grpo_stream.core.errors import ConfigError
from grpo_stream.envs import (
    Done,
    EpisodeFailed,
    EpisodeLimits,
    Reply,
    Tool,
    ToolCall,
    ToolCallError,
    make_environment,
    parse_tool_call,
    run_tool,
)
from grpo_stream.envs.render import env_turn_text, opening_text
from grpo_stream.envs.toolenv import CALCULATOR, ToolEnv, calculate
from grpo_stream.tasks import Prompt

NO_ARGS = {"type": "object", "properties": {}}
PROMPT = Prompt("p0", "What is 347*89?", "30883")


def _tool(fn, name="t"):
    return Tool(name, "a tool", NO_ARGS, fn)


def _run(tool, timeout_s=1.0, max_chars=100):
    return asyncio.run(run_tool(tool, {}, timeout_s, max_chars))


def test_tool_calls_are_parsed_from_the_model_text():
    text = 'Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}'
    assert parse_tool_call(text + "</tool_call> done") == ToolCall(
        "calculator", {"expression": "2*3"}
    )
    assert parse_tool_call(text) == ToolCall("calculator", {"expression": "2*3"})  # unclosed
    assert parse_tool_call("The answer is 6.") is None
    with pytest.raises(ToolCallError, match="not JSON"):
        parse_tool_call("<tool_call>{name: calculator}</tool_call>")
    with pytest.raises(ToolCallError, match="arguments must be a JSON object"):
        parse_tool_call('<tool_call>{"name": "c", "arguments": [1]}</tool_call>')


def test_the_calculator():
    assert calculate("347*89") == "30883"
    assert calculate("(12 + 30) / 4") == "10.5"
    assert calculate("-3 - -5") == "2"
    assert calculate("1/0") == "error: division by zero"
    assert calculate("__import__('os')").startswith("error: only numbers")
    assert calculate("2 +").startswith("error:")
    assert CALCULATOR.schema()["function"]["parameters"]["required"] == ["expression"]


def test_a_tool_that_raises_fails_the_episode_with_its_reason():
    def broken():
        raise KeyError("no such row")

    with pytest.raises(EpisodeFailed, match=r"tool 't' raised KeyError: 'no such row'"):
        _run(_tool(broken))


def test_a_tool_that_hangs_fails_the_episode_at_its_deadline():
    release = threading.Event()

    def hangs():
        release.wait(60)  # a stuck tool: only the test lets it go
        return "late"

    t0 = time.monotonic()
    with pytest.raises(EpisodeFailed, match=r"tool 't' hung: no result in 0.3 s"):
        _run(_tool(hangs), timeout_s=0.3)
    assert time.monotonic() - t0 < 30  # it did not wait for the tool
    release.set()

    async def hangs_async():
        await asyncio.sleep(60)

    with pytest.raises(EpisodeFailed, match="hung"):
        _run(_tool(hangs_async), timeout_s=0.2)


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (object(), "object is not text or JSON"),
        (float("nan"), "float is not text or JSON"),
        ("x" * 101, "101 characters"),
        ("ok\x00\x07", "unprintable"),
    ],
)
def test_a_tool_that_returns_garbage_fails_the_episode(result, why):
    with pytest.raises(EpisodeFailed, match=f"tool 't' returned garbage: .*{why}"):
        _run(_tool(lambda: result))


def test_tool_results_as_text():
    assert _run(_tool(lambda: "42")) == "42"
    assert _run(_tool(lambda: {"value": 42})) == '{"value": 42}'


def test_the_tool_environment_answers_calls_and_tells_the_model_its_mistakes():
    env = ToolEnv([CALCULATOR], EpisodeLimits())
    assert env.start(PROMPT) == [{"role": "user", "content": PROMPT.text}]

    def respond(text):
        return asyncio.run(env.respond(PROMPT, [], text))

    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "347*89"}}</tool_call>'
    assert respond(call) == Reply([{"role": "tool", "content": "30883"}])
    assert respond("30883") == Done()
    assert (
        "unknown tool 'calc'"
        in respond('<tool_call>{"name": "calc"}</tool_call>').messages[0]["content"]
    )
    wrong = respond('<tool_call>{"name": "calculator", "arguments": {"x": 1}}</tool_call>')
    assert wrong.messages[0]["content"] == (
        "invalid call of calculator: unknown arguments ['x'], missing ['expression']"
    )
    assert "not JSON" in respond("<tool_call>{oops</tool_call>").messages[0]["content"]


def test_rendering_through_a_template_without_tool_support(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "user", "content": PROMPT.text}]
    text = opening_text(tok, msgs, [CALCULATOR.schema()])
    # SmolLM2's template ignores tools=: they go into the system message
    assert text.startswith("<|im_start|>system\nYou may call these tools.")
    assert '"name": "calculator"' in text and text.endswith("<|im_start|>assistant\n")
    result = [{"role": "tool", "content": "30883"}]
    after_eos = "\n<|im_start|>tool\n30883<|im_end|>\n<|im_start|>assistant\n"
    assert env_turn_text(tok, result, model_sampled_eos=True) == after_eos
    assert env_turn_text(tok, result, model_sampled_eos=False) == "<|im_end|>" + after_eos


def test_environments_by_name():
    cfg = Config().env
    assert make_environment(cfg) is None
    cfg.name = "calculator"
    assert [t.name for t in make_environment(cfg).tools] == ["calculator"]
    cfg.name = "retry"
    assert make_environment(cfg).tools == []
    cfg.name = "chess"
    with pytest.raises(ConfigError, match="env.name: unknown environment 'chess'"):
        make_environment(cfg)
    cfg.name = "grpo_stream.envs.toolenv:nothing"
    with pytest.raises(ConfigError, match="env.name: cannot load"):
        make_environment(cfg)


def test_a_raising_environment_and_the_token_limit_end_episodes_before_a_turn(smollm2_dir):
    import math

    from transformers import AutoTokenizer

    from grpo_stream.generator.episodes import EpisodeRunner

    class Broken:
        tools: list = []

        def start(self, prompt):
            raise RuntimeError("no board for this game")

        async def respond(self, prompt, messages, text):  # pragma: no cover - never reached
            return Done()

    cfg = Config()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    runner = EpisodeRunner(Broken(), tok, cfg)
    ep = asyncio.run(runner.episode(None, PROMPT))  # fails before any request
    assert ep.finish_reason == "env_failed"
    assert ep.error == "environment raised RuntimeError: no board for this game"
    s = runner.sample("r", PROMPT, 0, ep, None)
    assert math.isnan(s.reward) and s.reward_error == ep.error and s.completion_ids == []
    # env.max_total_tokens: a prompt that leaves no room ends the episode before a turn
    cfg.env.max_total_tokens = 8
    short = EpisodeRunner(ToolEnv([CALCULATOR], EpisodeLimits()), tok, cfg)
    ep = asyncio.run(short.episode(None, PROMPT))  # no room: no request is made
    assert (ep.finish_reason, ep.turns, ep.error) == ("max_tokens", 0, "")
    assert len(ep.tokens.prompt_ids) > 8 and ep.tokens.completion_ids == []
    cfg.env.max_total_tokens = cfg.server.max_model_len + 1
    with pytest.raises(ConfigError, match="env.max_total_tokens = .* exceeds server.max_model_len"):
        EpisodeRunner(Broken(), None, cfg)
