"""Prompt sources: `make_prompt_source(cfg)` picks one from a registry by `cfg.name`.

Generated tasks (`arithmetic`, `countdown`) are seeded by `cfg.seed` and endless unless
`cfg.num_prompts` caps them; the same config always yields the same prompts with the
same ids. File tasks (`jsonl`, `parquet`, see `dataset_files.py`) read the file when the
source is made, so a bad path or column fails at startup; make it off the event loop:

    source = await asyncio.to_thread(make_prompt_source, cfg.task)
    prompt = next(source)  # cheap: no I/O after construction

`start` skips that many prompts (resuming a run without repeating its prompts).
"""

from __future__ import annotations

import itertools
import json
import operator
import random
from collections.abc import Callable, Iterator

from grpo_stream.config import TaskConfig
from grpo_stream.tasks import countdown
from grpo_stream.tasks.dataset_files import dataset_prompts
from grpo_stream.tasks.prompt import Prompt, apply_instruction, strip_instruction

_ARITHMETIC_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}


def _question(question: str, instruction: str) -> str:
    return apply_instruction(question, instruction)


def arithmetic_prompts(cfg: TaskConfig) -> Iterator[Prompt]:
    """'What is 7+12? Reply with only the number.' with answer '19'."""
    rng = random.Random(cfg.seed)
    for i in itertools.count():
        a = rng.randint(cfg.min_operand, cfg.max_operand)
        b = rng.randint(cfg.min_operand, cfg.max_operand)
        op = rng.choice(cfg.operations)
        yield Prompt(
            prompt_id=f"arithmetic-s{cfg.seed}-{i}",
            text=_question(f"What is {a}{op}{b}?", cfg.resolved_instruction()),
            answer=str(_ARITHMETIC_OPS[op](a, b)),
            meta={"a": a, "b": b, "op": op},
        )


def countdown_prompts(cfg: TaskConfig) -> Iterator[Prompt]:
    """Reach a target with 3-4 numbers; the answer is JSON {numbers, target, solution}."""
    rng = random.Random(cfg.seed)
    for i in itertools.count():
        count = rng.randint(cfg.countdown_min_numbers, cfg.countdown_max_numbers)
        problem = countdown.make_problem(
            rng, count, cfg.min_operand, cfg.max_operand, cfg.countdown_max_target
        )
        question = (
            f"Using the numbers {problem.numbers} each once with + - * /, "
            f"write an expression that equals {problem.target}."
        )
        answer = {
            "numbers": problem.numbers,
            "target": problem.target,
            "solution": problem.solution,
        }
        yield Prompt(
            prompt_id=f"countdown-s{cfg.seed}-{i}",
            text=_question(question, cfg.resolved_instruction()),
            answer=json.dumps(answer),
            meta={"numbers": problem.numbers, "target": problem.target},
        )


PROMPT_SOURCES: dict[str, Callable[[TaskConfig], Iterator[Prompt]]] = {
    "arithmetic": arithmetic_prompts,
    "countdown": countdown_prompts,
    "jsonl": lambda cfg: dataset_prompts(cfg, "json"),
    "parquet": lambda cfg: dataset_prompts(cfg, "parquet"),
}


def make_prompt_source(
    cfg: TaskConfig, start: int = 0, exclude: frozenset[str] = frozenset()
) -> Iterator[Prompt]:
    """The prompts of task `cfg.name`, skipping the first `start`, at most `cfg.num_prompts`.

    Prompts whose question (`question_key`) is in `exclude` are left out before counting:
    the held-out eval prompts (`grpo_stream.tasks.heldout`) never reach training.
    """
    try:
        factory = PROMPT_SOURCES[cfg.name]
    except KeyError:
        raise ValueError(
            f"task.name: unknown task {cfg.name!r} (choose from {sorted(PROMPT_SOURCES)})"
        ) from None
    source = factory(cfg)
    if exclude:
        source = (p for p in source if question_key(p, cfg) not in exclude)
    return itertools.islice(source, start, cfg.num_prompts)


def question_key(prompt: Prompt, cfg: TaskConfig) -> str:
    """The question without the task's instruction: how held-out prompts are compared."""
    return strip_instruction(prompt.text, cfg.resolved_instruction())
