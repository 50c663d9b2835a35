"""Built-in rewards on hand-written completions, with exact expected values."""

from __future__ import annotations

import json

import pytest

from grpo_stream.tasks import REWARDS, Prompt
from grpo_stream.tasks.rewards import answer_number, last_number

COMPLETIONS = ["19", "19.", "The answer is 19.", "7+12=19, so 19", "20", ""]
PROMPT = Prompt("p", "What is 7+12? Reply with only the number.", "19")


def scores(name: str, prompt: Prompt = PROMPT, completions=COMPLETIONS, **kwargs) -> list[float]:
    fn = REWARDS[name].fn
    return [fn(c, prompt, **kwargs) for c in completions]


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("exact_answer", {}, [1, 0, 0, 0, 0, 0]),
        ("numeric_answer", {}, [1, 1, 1, 1, 0, 0]),
        ("answer_only", {}, [1, 1, 0, 0, 0, 0]),
        ("concise_answer", {"decay": 0.25}, [1, 1, 1 / 1.75, 1 / 1.5, 0, 0]),
        ("concise_answer", {"decay": 1.0}, [1, 1, 1 / 4, 1 / 3, 0, 0]),
        ("format_regex", {"pattern": r"\d+\.?"}, [1, 1, 0, 0, 1, 0]),
        ("format_regex", {"pattern": "answer is", "mode": "search"}, [0, 0, 1, 0, 0, 0]),
        ("length_penalty", {"target": 5, "limit": 15}, [0, 0, -1, -0.9, 0, 0]),
        ("length_penalty", {"target": 1, "limit": 5, "unit": "words"}, [0, 0, -0.75, -0.5, 0, 0]),
    ],
)
def test_builtin_values(name, kwargs, expected):
    assert scores(name, **kwargs) == pytest.approx(expected, abs=1e-12)


def test_builtins_are_registered_inline():
    for name in ("exact_answer", "numeric_answer", "answer_only", "concise_answer"):
        assert REWARDS[name].inline and REWARDS[name].kind == "sample"


def test_numbers_signs_commas_and_gsm8k_answers():
    assert last_number("3-5=-2") == -2
    assert last_number("The result is -2.") == -2
    assert last_number("7-12") == 12  # a binary minus is not a sign
    assert last_number("1,000 apples") == 1000
    assert last_number("half is 0.5.") == 0.5
    assert last_number("no digits") is None
    assert answer_number("Natalia sold 48 + 24 = 72 clips.\n#### 72") == 72
    assert answer_number("-3") == -3
    with pytest.raises(ValueError, match="'nineteen' is not a number"):
        answer_number("nineteen")
    neg = Prompt("p", "What is 3-5?", "-2")
    assert scores("numeric_answer", neg, ["3-5=-2", "-2", "2"]) == [1, 1, 0]
    assert scores("answer_only", neg, ["-2.", " -2 ", "2"]) == [1, 1, 0]


COUNTDOWN = Prompt(
    "c", "Using the numbers [3, 5, 2] ...", json.dumps({"numbers": [3, 5, 2], "target": 16})
)


def test_countdown_reward():
    completions = [
        "(3+5)*2",
        "(3 + 5) * 2 = 16",
        "Answer: 2*(3+5).",
        "3*5+2",  # uses the numbers, misses the target: format credit
        "(3+5)*2*2",  # a number used twice
        "16",
        "__import__('os').system('echo hi')",
        "",
        "I tried 3*5+2 = 17, then (3+5)*2 = 16",
    ]
    assert scores("countdown", COUNTDOWN, completions) == [1, 1, 1, 0.1, 0, 0, 0, 0, 1]
    assert scores("countdown", COUNTDOWN, ["3*5+2"], format_score=0.0) == [0]
