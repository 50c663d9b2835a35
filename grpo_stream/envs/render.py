"""Text of an episode's turns through the tokenizer's chat template.

    text = opening_text(tokenizer, messages, tools)          # the prompt, tools presented
    text = env_turn_text(tokenizer, new_messages, ended_eos)  # appended after a model turn

`opening_text` passes the tools' OpenAI schemas to `apply_chat_template(tools=...)`; a
template that ignores them (SmolLM2's) gets them in the system message instead, with
the `<tool_call>` format (`envs.tools`). `env_turn_text` is the text of the environment's
messages *after* the model's own tokens: the template's closing of the assistant turn
(its end-of-turn token when the model did not sample it), the new messages, and the
next assistant header. It renders a two-message stand-in conversation, never the
episode, so the tokens of earlier turns are never re-tokenized.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_SYSTEM = (
    "You may call these tools. To call one, reply with only\n"
    '<tool_call>{{"name": NAME, "arguments": {{...}}}}</tool_call>\n'
    "and its result comes back in the next message. Tools:\n{tools}"
)
_STAND_IN = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "\x01"}]


def _render(tokenizer, messages: list[dict], tools=None, generation: bool = True) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation, tokenize=False
    )


def with_tool_system(messages: list[dict], tools: list[dict]) -> list[dict]:
    """`messages` with the tools described in the system message (first, or a new one)."""
    text = TOOLS_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def opening_text(tokenizer: Any, messages: list[dict], tools: list[dict]) -> str:
    """The episode's prompt text: the opening messages, the tools, the assistant header."""
    if not tools:
        return _render(tokenizer, messages)
    text = _render(tokenizer, messages, tools)
    if text == _render(tokenizer, messages):  # the template ignores `tools`
        text = _render(tokenizer, with_tool_system(messages, tools))
    return text


def env_turn_text(tokenizer: Any, new_messages: list[dict], model_sampled_eos: bool) -> str:
    """The text after a model turn: end of that turn, `new_messages`, next header."""
    before = _render(tokenizer, _STAND_IN, generation=False)
    after = _render(tokenizer, [*_STAND_IN, *new_messages])
    if not after.startswith(before) or "\x01" not in before:
        raise ValueError(
            "the chat template does not render a conversation as a prefix of its continuation"
        )
    closing = before[before.rindex("\x01") + 1 :]  # e.g. "<|im_end|>\n"
    eos = tokenizer.eos_token or ""
    if model_sampled_eos and eos and closing.startswith(eos):
        closing = closing[len(eos) :]  # the model's own last token closed its turn
    return closing + after[len(before) :]
