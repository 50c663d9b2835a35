"""Generated prompt sources (arithmetic, countdown) and render_prompt."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from grpo_stream.config import TaskConfig
from grpo_stream.tasks import Prompt, TaskError, make_prompt_source, render_prompt
from grpo_stream.tasks import countdown as cd


def take(cfg: TaskConfig, n: int, start: int = 0) -> list[Prompt]:
    return list(itertools.islice(make_prompt_source(cfg, start=start), n))


def test_arithmetic_format_and_answers():
    cfg = TaskConfig(operations=["+", "-", "*"], min_operand=1, max_operand=9, seed=3)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    prompts = take(cfg, 300)
    for p in prompts:
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        assert 1 <= a <= 9 and 1 <= b <= 9
        assert p.text == f"What is {a}{op}{b}? Reply with only the number."
        assert p.answer == str(ops[op](a, b))
    assert {p.meta["op"] for p in prompts} == {"+", "-", "*"}


def test_arithmetic_deterministic_by_seed_and_ids_unique():
    first = take(TaskConfig(seed=7), 200)
    again = take(TaskConfig(seed=7), 200)
    other = take(TaskConfig(seed=8), 200)
    assert first == again
    assert [p.text for p in first] != [p.text for p in other]
    assert len({p.prompt_id for p in first}) == 200
    assert first[0].prompt_id == "arithmetic-s7-0"


def test_num_prompts_caps_and_start_resumes():
    cfg = TaskConfig(num_prompts=5)
    assert len(list(make_prompt_source(cfg))) == 5
    assert take(TaskConfig(), 3, start=2) == take(TaskConfig(), 5)[2:]
    assert [p.prompt_id for p in make_prompt_source(cfg, start=3)] == [
        "arithmetic-s0-3",
        "arithmetic-s0-4",
    ]


def test_countdown_always_solvable():
    cfg = TaskConfig(name="countdown", seed=1)
    assert cfg.resolved_instruction() == "Reply with only the expression."
    prompts = take(cfg, 300)
    assert len({p.prompt_id for p in prompts}) == 300
    for p in prompts:
        spec = json.loads(p.answer)
        numbers, target = spec["numbers"], spec["target"]
        assert 3 <= len(numbers) <= 4 and all(1 <= n <= 20 for n in numbers)
        assert 0 < target <= cfg.countdown_max_target
        parsed = cd.parse(spec["solution"])
        assert parsed is not None and parsed.value == target
        assert sorted(parsed.numbers) == sorted(numbers)
        assert p.text == (
            f"Using the numbers {numbers} each once with + - * /, write an expression "
            f"that equals {target}. Reply with only the expression."
        )
    assert take(cfg, 20) == prompts[:20]


def test_countdown_parse_rejects_code():
    assert cd.parse("__import__('os').system('true')") is None
    assert cd.parse("2**10") is None
    assert cd.parse("-3+5") is None
    assert cd.parse("(1+2") is None
    assert cd.parse("3/(2-2)") == cd.Parsed([3, 2, 2], None)
    assert cd.parse("6 ÷ 3 × 4").value == 8


def test_task_config_validation():
    with pytest.raises(ValueError, match="min_operand"):
        TaskConfig(min_operand=5, max_operand=2)
    with pytest.raises(ValueError, match="operations"):
        TaskConfig(operations=[])
    assert TaskConfig(name="jsonl", path="x.jsonl").resolved_instruction() == ""
    assert TaskConfig(instruction="Think.").resolved_instruction() == "Think."


class FakeTokenizer:
    chat_template = "{{ fake }}"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.calls.append((messages, add_generation_prompt, tokenize))
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens):
        assert add_special_tokens is False
        return SimpleNamespace(input_ids=[ord(c) for c in text])


def test_render_prompt_with_chat_template_and_system_prompt():
    tok = FakeTokenizer()
    prompt = Prompt("p0", "What is 1+2?", "3")
    text, ids = render_prompt(prompt, tok, TaskConfig(system_prompt="Be brief."))
    assert text == "<system>Be brief.<user>What is 1+2?<assistant>"
    assert ids == [ord(c) for c in text]
    assert tok.calls == [
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 1+2?"},
            ],
            True,
            False,
        )
    ]
    text, _ = render_prompt(prompt, tok, TaskConfig())
    assert text == "<user>What is 1+2?<assistant>"


def test_render_prompt_raw_and_missing_template():
    prompt = Prompt("p0", "What is 1+2?", "3")
    text, ids = render_prompt(prompt, FakeTokenizer(), TaskConfig(use_chat_template=False))
    assert (text, ids) == ("What is 1+2?", [ord(c) for c in "What is 1+2?"])
    text, _ = render_prompt(
        prompt, FakeTokenizer(), TaskConfig(use_chat_template=False, system_prompt="S")
    )
    assert text == "S\n\nWhat is 1+2?"
    no_template = FakeTokenizer()
    no_template.chat_template = None
    with pytest.raises(TaskError, match="use_chat_template"):
        render_prompt(prompt, no_template, TaskConfig())
