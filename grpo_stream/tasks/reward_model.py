"""The `reward_model` reward: its name, how a (prompt, completion) becomes model input, and
the scorer contract the generator fills in.

A reward model is a server, so it is not scored here: the generator builds a scorer
(`grpo_stream.generator.reward_model.RewardModelScorer`, through the one vLLM client) and
hands it to the runner, `RewardRunner(cfg.reward, external={"reward_model": scorer})`.
A process without one (an evaluator, `doctor`) still resolves the name; scoring there
fails with a reason saying so, never a silent 0.

What is scored is rendered the same way when the reward model is trained
(`grpo-stream rm train`) and when it is served: the conversation (the prompt's messages,
then the completion as the assistant's turn) through the reward model's own chat
template, tokenised by its own tokenizer, one duplicated BOS removed:

    ids = rm_input_ids(rm_tokenizer, rm_messages(chat_messages(prompt, task), completion))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from grpo_stream.tasks.prompt import Prompt
from grpo_stream.tasks.reward_registry import Outcome, group_reward

RM_REWARD = "reward_model"

# (prompt, completions) -> one outcome each: a raw logit, or the reason it failed
GroupScorer = Callable[[Prompt, list[str]], Awaitable[list[Outcome]]]


@group_reward(RM_REWARD, inline=True)
def reward_model(completions: list[str], prompt: Prompt) -> list[float]:
    """Placeholder of a process that has no reward-model scorer (see the module docstring)."""
    raise RuntimeError(
        "scored only by the generator, through the reward-model server; this process "
        "has no reward-model client (give eval.reward rule rewards)"
    )


def rm_messages(prompt_messages: Sequence[dict[str, Any]], completion: str) -> list[dict]:
    """The conversation the reward model scores: the prompt's turns, then the answer."""
    return [*prompt_messages, {"role": "assistant", "content": completion}]


def strip_duplicate_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """A template that writes BOS itself plus a tokenizer that adds one give two: keep one."""
    while bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        ids = ids[1:]
    return ids


def rm_input_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of `messages` for the reward model: its chat template (without a
    generation prompt: the answer is complete), or the turns joined by blank lines when
    it has none; the tokenizer's special tokens added once."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    else:
        text = "\n\n".join(str(m["content"]) for m in messages)
    ids = list(tokenizer(text, add_special_tokens=True).input_ids)
    return strip_duplicate_bos(ids, getattr(tokenizer, "bos_token_id", None))
