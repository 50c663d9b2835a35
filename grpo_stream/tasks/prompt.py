"""The prompt record every task yields, and how it becomes model input.

A task (see `sources.py`) yields `Prompt`s: a deterministic unique `prompt_id`, the user
message `text`, the reference `answer` the rewards check against, and free-form `meta`.
`render_prompt` turns one into the exact text and token ids sent to the server:

    text, ids = render_prompt(prompt, tokenizer, cfg.task)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grpo_stream.config import TaskConfig
from grpo_stream.core.errors import UserError


class TaskError(UserError, ValueError):
    """A user error in a task's data or settings; the message names the file/field."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str  # unique within a source, the same for the same config and seed
    text: str  # the user message
    answer: str  # reference answer (countdown: JSON with numbers, target, solution)
    meta: dict[str, Any] = field(default_factory=dict)


QUESTION = "{question}"  # in task.instruction: where the question goes (else it comes first)


def apply_instruction(question: str, instruction: str) -> str:
    """The user message: `instruction` as a template when it holds "{question}"
    ("Solve: {question}\nPut your final answer within \\boxed{}."), else appended."""
    if QUESTION in instruction:
        return instruction.replace(QUESTION, question)  # not str.format: LaTeX has braces
    return f"{question} {instruction}".strip()


def strip_instruction(text: str, instruction: str) -> str:
    """The question inside a message made by `apply_instruction` (or `text` unchanged)."""
    if QUESTION in instruction:
        head, tail = instruction.split(QUESTION, 1)
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head + tail):
            return text[len(head) : len(text) - len(tail)].strip()
        return text.strip()
    return text.removesuffix(instruction).strip() if instruction else text.strip()


def chat_messages(prompt: Prompt, cfg: TaskConfig) -> list[dict[str, str]]:
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": prompt.text})
    return messages


def render_prompt(prompt: Prompt, tokenizer: Any, cfg: TaskConfig) -> tuple[str, list[int]]:
    """The model input for `prompt`: (text, token ids without added special tokens).

    With `cfg.use_chat_template` the tokenizer's chat template is applied with a
    generation prompt (some templates, SmolLM2's among them, add a default system prompt
    when `cfg.system_prompt` is None). Without it the raw text is used, after the system
    prompt if one is set.
    """
    if cfg.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise TaskError(
                "task.use_chat_template is true but the tokenizer has no chat template; "
                "set task.use_chat_template = false"
            )
        text = tokenizer.apply_chat_template(
            chat_messages(prompt, cfg), add_generation_prompt=True, tokenize=False
        )
    elif cfg.system_prompt:
        text = f"{cfg.system_prompt}\n\n{prompt.text}"
    else:
        text = prompt.text
    token_ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    return text, token_ids
