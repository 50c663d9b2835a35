"""Math rewards: `math_verify` (Hugging Face's math-verify package) and `boxed_format`.

    [[reward.functions]]
    name = "math_verify"              # 1.0 when the completion's answer equals the reference
    kwargs = { timeout_s = 3 }
    [[reward.functions]]
    name = "boxed_format"             # 1.0 when the completion puts an answer in \\boxed{}
    weight = 0.1

`math_verify` extracts the completion's final answer (`\\boxed{...}` first, then LaTeX,
then plain numbers and expressions, GSM8K's `#### 72` included) and compares it with
the reference symbolically (fractions, `\\frac{1}{2}` = 0.5, `1,000` = 1000, sets,
intervals, equations). The reference may be a bare answer ("72", "\\frac{3}{4}"), a
solution with a `\\boxed{}` (MATH) or one ending in `#### 72` (GSM8K).

Scores and failures (a failure is NaN with the reason, never a silent 0; see
`runner.py`): a completion with no answer in it scores 0.0 (a wrong answer the model
must learn to avoid; truncated completions end up here); a reference with no answer in
it, a parser error, or a parse or comparison that runs past `timeout_s` is a failed
reward ("TimeoutError: math_verify: comparison timed out after 3s"). Symbolic
comparison can hang (`\\boxed{9^{9^{9^{9}}}}`), so every stage has math-verify's own
`timeout_s` (SIGALRM, which needs the main thread: the function is registered as not
inline, so it runs in a reward worker process), and the runner's `reward.timeout_s`
kills the worker if a hang escapes the alarm (inside C code). math-verify and sympy
are imported on first use, so importing this module is cheap.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from grpo_stream.tasks.prompt import Prompt
from grpo_stream.tasks.reward_registry import reward

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    t = kwargs.get("timeout_s", 3)
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise ValueError(f"timeout_s must be a whole number of seconds >= 1 (got {t!r})")


def _timeout_error(stage: str, timeout_s: int) -> TimeoutError:
    return TimeoutError(f"math_verify: {stage} timed out after {timeout_s}s")


def _parse(text: str, timeout_s: int) -> list:
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return parse(text, parsing_timeout=timeout_s, raise_on_error=True)
    except TimeoutException:  # a BaseException: would escape the reward call
        raise _timeout_error("parsing", timeout_s) from None


_LATEX_WORDS = re.compile(r"\\text\{[^}]*\}|\\[A-Za-z]+")


def _is_prose(text: str) -> bool:
    """Words outside LaTeX commands: read as text, since in `$...$` "unknown" would
    parse as the product of its letters."""
    return re.search(r"[A-Za-z]{3,}", _LATEX_WORDS.sub(" ", text)) is not None


def reference_text(answer: str) -> str:
    """The part of a reference answer to parse: after GSM8K's last `####`, with its
    thousands commas removed; a MATH solution (with a \\boxed{}) or prose as is; a bare
    answer in `$...$`, so that LaTeX without delimiters ("\\frac{3}{4}") is read."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if _BOXED.search(answer) or "$" in answer or _is_prose(answer):
        return answer
    return f"${answer.strip()}$"


@functools.lru_cache(maxsize=4096)
def parse_reference(answer: str, timeout_s: int = 3) -> tuple:
    """The parsed reference (cached: a group's G completions share one); ValueError
    when there is no answer in it."""
    gold = _parse(reference_text(answer), timeout_s)
    if not gold:
        raise ValueError(f"reference answer {answer!r}: math_verify found no answer in it")
    return tuple(gold)


def verify_answer(completion: str, answer: str, timeout_s: int = 3) -> float:
    """1.0 if the completion's final answer equals the reference, else 0.0 (see module)."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    gold = list(parse_reference(answer, timeout_s))
    found = _parse(completion, timeout_s)
    if not found:
        return 0.0
    try:
        same = verify(gold, found, timeout_seconds=timeout_s, raise_on_error=True)
    except TimeoutException:
        raise _timeout_error("comparison", timeout_s) from None
    return float(same)


@reward("math_verify", validate=_check_kwargs)
def math_verify(completion: str, prompt: Prompt, *, timeout_s: int = 3) -> float:
    return verify_answer(completion, prompt.answer, timeout_s)


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


@reward("boxed_format", inline=True)
def boxed_format(completion: str, prompt: Prompt) -> float:
    """1.0 when the completion has a complete, non-empty `\\boxed{...}`."""
    content = last_boxed(completion)
    return float(content is not None and bool(content.strip()))
