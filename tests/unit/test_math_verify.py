"""The math rewards: math_verify on a table of answers, through the real runner (worker
process, time limits), and boxed_format."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from grpo_stream.config import RewardConfig, RewardFunctionConfig
from grpo_stream.tasks import Prompt, RewardRunner
from grpo_stream.tasks.math_verify import (
    boxed_format,
    last_boxed,
    reference_text,
    verify_answer,
)

# (completion, reference, expected score); references in the forms users hold them
TABLE = [
    ("So the answer is \\boxed{72}.", "72", 1.0),
    ("The probability is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", 1.0),
    ("The probability is 0.5", "\\frac{1}{2}", 1.0),
    ("We get $\\dfrac{\\sqrt{3}}{2}$.", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("Expanding, \\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("She has 72 stickers left.\n#### 72", "She gave away 18.\n90 - 18 = 72\n#### 72", 1.0),
    ("The farm sold 1,000 eggs.", "#### 1,000", 1.0),
    (
        "Hence \\boxed{3/4}",
        "Adding gives $\\frac{3}{4}$, so the answer is $\\boxed{\\frac34}$.",
        1.0,
    ),
    ("So the answer is \\boxed{71}.", "72", 0.0),
    ("The probability is \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("I am not sure how to solve this.", "72", 0.0),  # no answer: wrong, not failed
]


@pytest.mark.parametrize(("completion", "answer", "expected"), TABLE)
def test_verify_answer_table(completion, answer, expected):
    assert verify_answer(completion, answer) == expected


def test_reference_forms():
    assert reference_text("Step.\n#### 1,234") == "$1234$"
    assert reference_text("\\text{(A)}") == "$\\text{(A)}$"
    assert reference_text("\\frac{3}{4}") == "$\\frac{3}{4}$"
    assert reference_text("so $\\boxed{5}$") == "so $\\boxed{5}$"


def test_unparsable_reference_fails_with_reason():
    for answer in ("", "#### unknown", "no number here at all"):
        with pytest.raises(ValueError, match="found no answer"):
            verify_answer("\\boxed{4}", answer)


def test_pathological_input_times_out_instead_of_hanging():
    # 9^(9^(9^9)) has ~10^(3.7e8) digits: without the time limit the comparison never ends
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 1s"):
        verify_answer("\\boxed{9^{9^{9^{9}}}}", "72", timeout_s=1)
    assert time.monotonic() - t0 < 10


def run_group(completions: list[str], answer: str, limit_s: float = 30.0, **kwargs):
    cfg = RewardConfig(
        functions=[
            RewardFunctionConfig(name="math_verify", weight=1.0, kwargs=kwargs),
            RewardFunctionConfig(name="boxed_format", weight=0.1),
        ],
        timeout_s=limit_s,
        num_workers=1,
    )

    async def main():
        async with RewardRunner(cfg) as runner:
            return await runner.score_group(Prompt("p", "q", answer), completions)

    return asyncio.run(main())


def test_runner_records_timeouts_and_bad_references_as_failures():
    results = run_group(
        ["\\boxed{72}", "72 apples", "\\boxed{9^{9^{9^{9}}}}", "no idea"],
        "#### 72",
        limit_s=30,
        timeout_s=1,
    )
    ok, plain, slow, none = results
    assert ok.total == pytest.approx(1.1) and ok.components == {
        "math_verify": 1.0,
        "boxed_format": 1.0,
    }
    assert plain.total == pytest.approx(1.0) and not plain.failed
    assert slow.failed and math.isnan(slow.total)
    assert "math_verify: TimeoutError: math_verify: comparison timed out after 1s" in slow.error
    assert slow.components["boxed_format"] == 1.0  # the other function still scored
    assert none.total == 0.0 and not none.failed
    bad = run_group(["\\boxed{4}"], "no number here")
    assert bad[0].failed and "found no answer" in bad[0].error


def test_runner_kills_a_hang_the_alarm_cannot_reach():
    # reward.timeout_s (1.5 s) is below math-verify's own alarm (20 s): the runner kills
    # the worker process, as it does for a hang inside C code, and says so
    t0 = time.monotonic()
    (result,) = run_group(["\\boxed{9^{9^{9^{9}}}}"], "72", limit_s=1.5, timeout_s=20)
    assert time.monotonic() - t0 < 15
    assert result.failed and "math_verify: timed out after 1.5s" in result.error


def test_boxed_format():
    p = Prompt("p", "q", "1")
    assert boxed_format("so \\boxed{\\frac{1}{2}} done", p) == 1.0
    assert boxed_format("\\boxed{}", p) == 0.0
    assert boxed_format("\\boxed{\\frac{1}{2}", p) == 0.0  # unbalanced
    assert boxed_format("the answer is 3", p) == 0.0
    assert last_boxed("\\boxed{1} then \\boxed{x^{2}}") == "x^{2}"
