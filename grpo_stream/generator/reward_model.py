"""Scoring completions with a reward model served by vLLM (the `reward_model` reward).

    scorers = reward_model_scorers(cfg)          # {} unless reward.functions names it
    runner = RewardRunner(cfg.reward, external=scorers)
    async with VLLMClient(...) as client:
        for scorer in scorers.values():
            scorer.bind(client)                  # the process's one client
        results = await runner.score_group(prompt, completions)

One group is one request: each completion is rendered as the conversation (the
prompt's messages, then the completion) with the reward model's own tokenizer and chat
template (`grpo_stream.tasks.reward_model.rm_input_ids`) and sent as token ids.
`reward_model.max_concurrency` groups are scored at once; each has the deadline
`reward_model.timeout_s` and retries a transient error `reward_model.retries` times, on
the next server. A failure (the deadline, a dead server, a refused input) fails that
group's `reward_model` component with its reason, as a rule reward's failure does: the
generator goes on, and the ledger counts the group as failed.

What vLLM 0.32 serves, read from its sources (vllm/entrypoints/pooling/):
- a "*ForSequenceClassification" architecture resolves to "--runner pooling
  --convert classify" (config/model.py "_SUFFIX_TO_DEFAULTS"); Llama's is built by
  "as_seq_cls_model" (a "score" linear on the last token's hidden state);
- "POST /classify" (classify/api_router.py, no /v1 prefix) takes
  "ClassificationCompletionRequest": "model", "input" (token ids: list[list[int]]),
  "add_special_tokens" (default true), "use_activation" (bool | None);
- the activation (sigmoid for one label) is applied unless "use_activation" is false
  (layers/pooler/seqwise/heads.py); "normalize" is refused ("removed; use
  "use_activation""), and any other unknown field ("activation", "softmax") is only
  logged and ignored (OpenAIBaseModel has extra="allow"), so the name matters;
- the answer is "data[i].probs" (the logits when the activation is off), one per label.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from grpo_stream.config import Config, RewardModelConfig, TaskConfig
from grpo_stream.serving.client import Backoff, VLLMClient, VLLMError, is_transient
from grpo_stream.tasks.prompt import Prompt, chat_messages
from grpo_stream.tasks.reward_model import RM_REWARD, rm_input_ids, rm_messages
from grpo_stream.tasks.reward_registry import Outcome


class RewardModelScorer:
    """An async `(prompt, completions) -> outcomes` scorer over the reward servers."""

    def __init__(
        self, cfg: RewardModelConfig, urls: list[str], task: TaskConfig, tokenizer: Any = None
    ) -> None:
        if not urls:
            raise ValueError("reward_model.urls: no reward-model server")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        self.cfg, self.urls, self.task, self.tokenizer = cfg, list(urls), task, tokenizer
        self._next = itertools.cycle(range(len(self.urls)))
        self._sem: asyncio.Semaphore | None = None
        self.client: VLLMClient | None = None
        self.requests = 0  # requests sent (a retry counts), for stats and tests

    def bind(self, client: VLLMClient) -> None:
        self.client = client

    def input_ids(self, prompt: Prompt, completion: str) -> list[int]:
        return rm_input_ids(
            self.tokenizer, rm_messages(chat_messages(prompt, self.task), completion)
        )

    async def __call__(self, prompt: Prompt, completions: list[str]) -> list[Outcome]:
        if self.client is None:
            raise RuntimeError("reward model scorer used before bind(client)")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
        batch = [self.input_ids(prompt, c) for c in completions]
        out: list[Outcome] = [""] * len(batch)
        send = []
        for i, ids in enumerate(batch):
            if len(ids) > self.cfg.max_len:
                out[i] = f"input of {len(ids)} tokens exceeds reward_model.max_len"
            else:
                send.append(i)
        if send:
            async with self._sem:
                scores = await self._classify([batch[i] for i in send])
            for i, s in zip(send, scores, strict=True):
                out[i] = s
        return out

    async def _classify(self, batch: list[list[int]]) -> list[Outcome]:
        """One request for the group, retried on the next server within the deadline."""
        assert self.client is not None
        deadline = asyncio.get_running_loop().time() + self.cfg.timeout_s
        backoff, reason = Backoff(0.25, cap=2.0), ""
        for attempt in range(self.cfg.retries + 1):
            url = self.urls[next(self._next)]
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                self.requests += 1
                return list(
                    await self.client.classify(
                        url, self.cfg.served_name, batch, timeout_s=left, retries=0
                    )
                )
            except VLLMError as e:
                reason = str(e)
                if not is_transient(e):
                    return [reason] * len(batch)
            if attempt < self.cfg.retries:
                pause = min(backoff.next(), max(0.0, deadline - asyncio.get_running_loop().time()))
                await asyncio.sleep(pause)
        why = reason or "no time left"
        tries = self.cfg.retries + 1
        return [f"failed within {self.cfg.timeout_s:g}s ({tries} tries): {why}"] * len(batch)


def reward_model_scorers(cfg: Config, tokenizer: Any = None) -> dict[str, RewardModelScorer]:
    """{"reward_model": scorer} when `reward.functions` names it, else {}."""
    if not any(f.name == RM_REWARD for f in cfg.reward.functions):
        return {}
    urls = cfg.reward_model.resolved_urls(cfg.server.host)
    return {RM_REWARD: RewardModelScorer(cfg.reward_model, urls, cfg.task, tokenizer)}
