"""One prompt → G completions with the weight versions that made them → buffer records.

    outs, v0, v1, latency, url = await request_group(pool, model, req, n, sampling,
                                                     max_retries, retry_budget_s)
    group = build_group(run_id, req, outs, rewards, (v0, v1), latency, url)

`request_group` leases the least-loaded server, reads its weight version before and
after the request (vLLM stamps no version on a completion, so the pair brackets it:
if a sync landed in between, the sample carries the span), and retries transient
errors on any live server with backoff until both `max_retries` and `retry_budget_s`
are spent; then, or on any other error, it raises `PromptFailed`. A group cut by a
sync's abort is sampled again (an unfinished answer would be scored as a wrong one). It
does not score: the caller does (the generator's `_one`, the evaluator), and
`build_group` turns the completions and their rewards into `Sample` records ready for
the buffer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from grpo_stream.buffer.schema import Group, Sample
from grpo_stream.generator.pool import ServerPool
from grpo_stream.serving.adapters import versioned
from grpo_stream.serving.client import Backoff, Completion, VLLMClient, is_transient


class PromptFailed(RuntimeError):
    """A prompt could not be sampled (a non-transient error, or retries exhausted)."""


@dataclass
class SampleRequest:
    prompt: Any  # grpo_stream.tasks.Prompt
    prompt_text: str
    prompt_ids: list[int]


async def _request_once(
    client: VLLMClient, url: str, model: str, req: SampleRequest, n: int, sampling: dict
) -> tuple[list[Completion], int, int, float]:
    v0 = await client.weight_version(url)
    t0 = time.perf_counter()
    # `model` may name a version slot ('policy-v{version}', LoRA): v0's own adapter
    outs = await client.complete(url, versioned(model, v0), req.prompt_ids, n, sampling)
    latency = time.perf_counter() - t0
    v1 = await client.weight_version(url)
    return outs, v0, v1, latency


async def request_group(
    pool: ServerPool,
    model: str,
    req: SampleRequest,
    n: int,
    sampling: dict,
    max_retries: int,
    retry_budget_s: float = 0.0,
    backoff_s: float = 0.5,
) -> tuple[list[Completion], int, int, float, str]:
    """Retries transient errors until both `max_retries` retries and `retry_budget_s`
    seconds since the first failure are spent: a server paused for a long weight sync
    answers 503 for as long as the sync takes, however few attempts that is. A group a
    sync cut (`sync.pause_mode = "abort"`: a completion's finish_reason "abort", its
    answer unfinished) is sampled again, up to `max_retries` times, then kept as cut."""
    backoff = Backoff(backoff_s, cap=10.0)  # doubles per attempt, jittered
    last: BaseException | None = None
    attempts, first_failure, resampled = 0, None, 0
    while True:
        attempts += 1
        async with pool.lease() as url:
            try:
                outs, v0, v1, lat = await _request_once(pool.client, url, model, req, n, sampling)
                if resampled >= max_retries or not any(o.finish_reason == "abort" for o in outs):
                    return outs, v0, v1, lat, url
                resampled += 1  # cut by a sync's abort: sampled again (the new weights)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not is_transient(err):
                    raise PromptFailed(f"prompt {req.prompt.prompt_id} on {url}: {err}") from err
                last = err
                first_failure = first_failure or time.monotonic()
                if not await pool.client.health(url):
                    await pool.mark_dead(url, f"{type(err).__name__}: {err}")
        waited = time.monotonic() - first_failure
        if attempts > max_retries and waited >= retry_budget_s:
            break
        pause = backoff.next()
        if attempts > max_retries:  # only the time budget is left: do not sleep past it
            pause = min(pause, max(retry_budget_s - waited, 0.0))
        await asyncio.sleep(pause)
    raise PromptFailed(
        f"prompt {req.prompt.prompt_id}: {attempts} attempts failed in {waited:.1f} s "
        f"(generator.max_retries={max_retries}, generator.retry_budget_s={retry_budget_s:g}), "
        f"last: {last!r}"
    )


def build_group(
    run_id: str,
    req: SampleRequest,
    outs: list[Completion],
    rewards: list[Any],
    versions: tuple[int, int],
    latency: float,
    url: str,
) -> Group:
    now = time.time()
    return [
        Sample(
            run_id=run_id,
            prompt_id=req.prompt.prompt_id,
            sample_index=i,
            policy_version=versions[0],
            policy_version_end=versions[1],
            prompt_ids=req.prompt_ids,
            completion_ids=c.token_ids,
            behaviour_logprobs=c.logprobs,
            reward=float(r.total),
            prompt_text=req.prompt_text,
            completion_text=c.text,
            answer=str(req.prompt.answer),
            reward_components=dict(r.components),
            reward_error=r.error,
            finish_reason=c.finish_reason,
            gen_latency_s=latency,
            server_url=url,
            created_at=now,
        )
        for i, (c, r) in enumerate(zip(outs, rewards, strict=True))
    ]
