"""Built-in verifiable rewards, registered by name (see `reward_registry.py`).

Per-sample functions `fn(completion, prompt, **kwargs) -> float`, all pure and fast, so
they run inline in a thread (user functions run in a worker process):

- `exact_answer`: 1.0 if the stripped completion equals the stripped answer.
- `numeric_answer`: 1.0 if the LAST number in the completion equals the answer.
- `answer_only`: 1.0 if the completion, stripped of whitespace and one trailing period,
  is exactly the (right) number: the requested format.
- `concise_answer(decay)`: 1/(1 + decay*extra_words) when the last number is right, else
  0; "19" scores 1.0, "The answer is 19." 1/(1+3*decay). A smooth path from chatty right
  answers to the bare number, for small models that rarely answer tersely at first.
- `format_regex(pattern, mode)`: 1.0 if the stripped completion matches the pattern.
- `length_penalty(target, limit, unit)`: 0 up to `target` chars (or words), falling
  linearly to -1 at `limit`.
- `countdown(format_score)`: 1.0 if the last expression that uses each given number once
  equals the target; `format_score` if it uses the numbers but misses. Parsed with `ast`
  against a whitelist, never `eval`.

- `math_verify`, `boxed_format`: math answers checked by Hugging Face's math-verify
  (time-limited, in a worker process) and the `\\boxed{}` format (`math_verify.py`).

Numeric answers may be "19", "-2", "1,000", "0.5" or GSM8K-style "... #### 19"; an
answer that is not a number raises (recorded as a failed reward, never a silent 0).
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from grpo_stream.tasks import countdown as countdown_puzzle
from grpo_stream.tasks.prompt import Prompt
from grpo_stream.tasks.reward_registry import REWARDS, group_reward, reward

__all__ = ["REWARDS", "group_reward", "reward", "last_number", "answer_number"]

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# a minus is a sign only where it cannot be a binary minus ("7-12" ends in 12, not -12)
_NUMBER = re.compile(r"(?:(?<![\w.)])-)?" + _DIGITS)
_BARE_NUMBER = re.compile(r"-?" + _DIGITS)


def _to_float(text: str) -> float:
    return float(text.replace(",", ""))


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def last_number(text: str) -> float | None:
    """The value of the last number in `text`, or None."""
    matches = _NUMBER.findall(text)
    return _to_float(matches[-1]) if matches else None


def answer_number(answer: str) -> float:
    text = answer.split("####")[-1].strip()
    if not _BARE_NUMBER.fullmatch(text):
        raise ValueError(f"answer {answer!r} is not a number")
    return _to_float(text)


def _right_number(completion: str, prompt: Prompt) -> bool:
    expected = answer_number(prompt.answer)
    found = last_number(completion)
    return found is not None and _same(found, expected)


@reward("exact_answer", inline=True)
def exact_answer(completion: str, prompt: Prompt) -> float:
    return float(completion.strip() == prompt.answer.strip())


@reward("numeric_answer", inline=True)
def numeric_answer(completion: str, prompt: Prompt) -> float:
    return float(_right_number(completion, prompt))


@reward("answer_only", inline=True)
def answer_only(completion: str, prompt: Prompt) -> float:
    expected = answer_number(prompt.answer)
    text = completion.strip().removesuffix(".").strip()
    return float(bool(_BARE_NUMBER.fullmatch(text)) and _same(_to_float(text), expected))


def _check_decay(kwargs: dict[str, Any]) -> None:
    if kwargs.get("decay", 0.0) < 0:
        raise ValueError(f"decay must be >= 0 (got {kwargs['decay']})")


@reward("concise_answer", inline=True, validate=_check_decay)
def concise_answer(completion: str, prompt: Prompt, *, decay: float = 0.25) -> float:
    if not _right_number(completion, prompt):
        return 0.0
    extra_words = max(len(completion.split()) - 1, 0)
    return 1.0 / (1.0 + decay * extra_words)


_REGEX_MODES = {"fullmatch": re.fullmatch, "search": re.search}


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


def _check_regex(kwargs: dict[str, Any]) -> None:
    if kwargs.get("mode", "fullmatch") not in _REGEX_MODES:
        raise ValueError(f"mode must be one of {sorted(_REGEX_MODES)} (got {kwargs['mode']!r})")
    try:
        _compiled(kwargs.get("pattern", ""))
    except re.error as e:
        raise ValueError(f"pattern {kwargs.get('pattern')!r} is not a valid regex: {e}") from None


@reward("format_regex", inline=True, validate=_check_regex)
def format_regex(
    completion: str, prompt: Prompt, *, pattern: str, mode: str = "fullmatch"
) -> float:
    match = _REGEX_MODES[mode]
    return float(match(_compiled(pattern), completion.strip()) is not None)


_LENGTH_UNITS = {"chars": len, "words": lambda text: len(text.split())}


def _check_length(kwargs: dict[str, Any]) -> None:
    if kwargs.get("unit", "chars") not in _LENGTH_UNITS:
        raise ValueError(f"unit must be one of {sorted(_LENGTH_UNITS)} (got {kwargs['unit']!r})")
    if "target" in kwargs and "limit" in kwargs and not kwargs["target"] < kwargs["limit"]:
        raise ValueError(f"target ({kwargs['target']}) must be below limit ({kwargs['limit']})")


@reward("length_penalty", inline=True, validate=_check_length)
def length_penalty(
    completion: str, prompt: Prompt, *, target: int, limit: int, unit: str = "chars"
) -> float:
    size = _LENGTH_UNITS[unit](completion)
    if size <= target:
        return 0.0
    return -min(1.0, (size - target) / (limit - target))


@reward("countdown", inline=True)
def countdown(completion: str, prompt: Prompt, *, format_score: float = 0.1) -> float:
    spec = json.loads(prompt.answer)
    numbers, target = sorted(spec["numbers"]), spec["target"]
    used = [
        p for p in countdown_puzzle.find_expressions(completion) if sorted(p.numbers) == numbers
    ]
    if not used:
        return 0.0
    return 1.0 if used[-1].value == target else format_score


# registered here so that every user of the built-ins sees them (math-verify loads lazily)
from grpo_stream.tasks import math_verify as _math_verify  # noqa: E402, F401
