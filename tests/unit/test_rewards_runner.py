"""The reward runner: weights, validation, failures recorded, hangs killed (worker process)."""

from __future__ import annotations

import asyncio
import math
import os
import textwrap

import pytest
from reward_helpers import score_group

from grpo_stream.config import RewardConfig, RewardFunctionConfig
from grpo_stream.tasks import Prompt, RewardRunner, build_reward_fns, group_failed

PROMPT = Prompt("p", "What is 7+12? Reply with only the number.", "19")

USER_REWARDS = """
import asyncio
import time

from grpo_stream.tasks import group_reward


def sleep_forever(completion, prompt):
    while True:
        time.sleep(1)


def boom(completion, prompt):
    return 1 / 0


def length(completion, prompt, scale=1.0):
    return scale * len(completion)


@group_reward()
def rank(completions, prompt):
    return [float(i) for i in range(len(completions))]


async def async_len(completion, prompt):
    await asyncio.sleep(0)
    return float(len(completion))


def not_a_number(completion, prompt):
    return "high"
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(textwrap.dedent(USER_REWARDS))
    return str(path)


def rcfg(*fns: tuple, **kw) -> RewardConfig:
    return RewardConfig(
        functions=[
            RewardFunctionConfig(name=f[0], weight=f[1], kwargs=f[2] if len(f) > 2 else {})
            for f in fns
        ],
        **kw,
    )


async def run_groups(cfg: RewardConfig, groups: list[list[str]], prompt=PROMPT):
    async with RewardRunner(cfg) as runner:
        return [await runner.score_group(prompt, g) for g in groups]


def test_weights_combine():
    cfg = RewardConfig()  # numeric_answer 0.5 + concise_answer 0.5 (decay 0.25)
    [results] = asyncio.run(run_groups(cfg, [["19", "The answer is 19.", "20"]]))
    assert [r.total for r in results] == pytest.approx([1.0, 0.5 + 0.5 / 1.75, 0.0])
    assert results[1].components == pytest.approx(
        {"numeric_answer": 1.0, "concise_answer": 1 / 1.75}
    )
    assert not group_failed(results)
    custom = rcfg(("numeric_answer", 2.0), ("length_penalty", 0.5, {"target": 5, "limit": 15}))
    [results] = asyncio.run(run_groups(custom, [["19", "The answer is 19."]]))
    assert [r.total for r in results] == pytest.approx([2.0, 2.0 - 0.5])


def test_duplicate_names_get_distinct_keys_and_labels():
    cfg = rcfg(("format_regex", 1.0, {"pattern": r"\d+"}), ("format_regex", 1.0, {"pattern": "x"}))
    assert [f.key for f in build_reward_fns(cfg)] == ["format_regex", "format_regex_2"]
    cfg.functions[1].label = "has_x"
    assert [f.key for f in build_reward_fns(cfg)] == ["format_regex", "has_x"]


def test_builtin_failure_is_recorded_not_zero():
    bad = Prompt("p", "?", "nineteen")
    [results] = asyncio.run(
        run_groups(rcfg(("numeric_answer", 1.0), ("exact_answer", 1.0)), [["19"]], bad)
    )
    r = results[0]
    assert math.isnan(r.total) and math.isnan(r.components["numeric_answer"])
    assert r.components["exact_answer"] == 0.0
    assert r.error == "numeric_answer: ValueError: answer 'nineteen' is not a number"
    assert group_failed(results)


@pytest.mark.parametrize(
    ("functions", "message"),
    [
        (
            [("numeric_answer", 1.0), ("foo", 1.0)],
            "reward.functions[1].name: unknown reward 'foo' (choose from",
        ),
        (
            [("length_penalty", 1.0, {"target": 5})],
            "reward.functions[0].kwargs: missing a required argument: 'limit'",
        ),
        (
            [("length_penalty", 1.0, {"target": 5, "limit": 2})],
            "reward.functions[0].kwargs: target (5) must be below limit (2)",
        ),
        (
            [("format_regex", 1.0, {"pattern": "("})],
            "reward.functions[0].kwargs: pattern '(' is not a valid regex",
        ),
        (
            [("concise_answer", 1.0, {"k": 1})],
            "reward.functions[0].kwargs: got an unexpected keyword argument 'k'",
        ),
        (
            [("/no/such/file.py:fn", 1.0)],
            "reward.functions[0].name: reward file not found: /no/such/file.py",
        ),
    ],
)
def test_build_validation_names_the_field(functions, message):
    with pytest.raises(ValueError) as err:
        build_reward_fns(rcfg(*functions))
    assert message in str(err.value)
    if "unknown reward" in message:
        assert "numeric_answer" in str(err.value) and "concise_answer" in str(err.value)


def test_user_functions_run_in_worker(user_file):
    cfg = rcfg(
        (f"{user_file}:length", 2.0, {"scale": 0.5}),
        (f"{user_file}:rank", 1.0),
        (f"{user_file}:async_len", 0.1),
        (f"{user_file}:not_a_number", 0.0),
        num_workers=1,
    )
    [results] = asyncio.run(run_groups(cfg, [["ab", "abcd"]]))
    assert [r.components["length"] for r in results] == [1.0, 2.0]
    assert [r.components["rank"] for r in results] == [0.0, 1.0]
    assert [r.components["async_len"] for r in results] == [2.0, 4.0]
    assert results[0].error == "not_a_number: returned 'high' (expected a number)"
    assert all(math.isnan(r.total) for r in results)


def test_unloadable_user_function_fails_at_start(user_file):
    cfg = rcfg(("numeric_answer", 1.0), (f"{user_file}:missing_fn", 1.0), num_workers=1)
    with pytest.raises(
        ValueError, match=r"reward.functions\[1\].name: cannot load .*AttributeError"
    ):
        asyncio.run(run_groups(cfg, [["19"]]))


def test_raise_and_hang_are_recorded_and_next_group_scored(user_file):
    cfg = rcfg(
        ("numeric_answer", 1.0),
        (f"{user_file}:boom", 1.0),
        (f"{user_file}:sleep_forever", 1.0),
        (f"{user_file}:length", 1.0),
        timeout_s=1.0,
        num_workers=1,
    )

    async def scenario():
        async with RewardRunner(cfg) as runner:
            hung_pid = runner._pool._workers[0].proc.pid  # runs boom, then hangs
            first = await runner.score_group(PROMPT, ["19", "20"])
            second = await runner.score_group(PROMPT, ["abc"])
            return first, hung_pid, second

    first, hung_pid, second = asyncio.run(scenario())
    for r in first:
        assert math.isnan(r.total)
        assert "boom: ZeroDivisionError: division by zero" in r.error
        assert "sleep_forever: timed out after 1s" in r.error
        assert math.isnan(r.components["sleep_forever"])
    assert [r.components["numeric_answer"] for r in first] == [1.0, 0.0]
    # the hung worker was killed and reaped; a fresh one scored the next group
    with pytest.raises(ProcessLookupError):
        os.kill(hung_pid, 0)
    assert second[0].components["length"] == 3.0
    assert second[0].components["numeric_answer"] == 0.0


def test_cancel_during_hang_kills_worker(user_file):
    cfg = rcfg(
        (f"{user_file}:sleep_forever", 1.0),
        (f"{user_file}:length", 1.0),
        timeout_s=60.0,
        num_workers=1,
    )

    async def scenario():
        async with RewardRunner(cfg) as runner:
            task = asyncio.ensure_future(runner.score_group(PROMPT, ["x"]))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            worker = runner._pool._workers[0]
            worker.proc.join(5.0)
            assert not worker.alive
            return await runner._pool.call(f"{user_file}:length", ["abcd"], PROMPT, {}, 5.0)

    assert asyncio.run(scenario()) == [4.0]


def test_module_level_score_group_reuses_runner():
    cfg = RewardConfig()

    async def twice():
        a = await score_group(PROMPT, ["19"], cfg)
        b = await score_group(PROMPT, ["19 is it"], cfg)
        return a, b

    a, b = asyncio.run(twice())
    assert a[0].total == 1.0
    assert b[0].total == pytest.approx(0.5 + 0.5 / 1.5)
    assert asyncio.run(score_group(PROMPT, [], cfg)) == []
