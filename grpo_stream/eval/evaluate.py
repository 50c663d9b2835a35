"""One evaluation of the held-out prompts on the vLLM servers, at a known policy version.

    evaluator = Evaluator(cfg, tokenizer, heldout_prompts(cfg))  # renders, checks rewards
    async with VLLMClient(cfg.generator.request_timeout_s, api_key=key) as client:
        row = await evaluator.evaluate(ServerPool(urls, client))  # -> EvalRow
    await evaluator.aclose()

Per prompt it sends one greedy request (n=1, temperature 0; `eval.greedy`) and one
sampled request (n=`eval.k`, `eval.temperature`, top_p 1, top_k off), at most
`eval.max_concurrency` in flight, through the generator's `request_group` (least-loaded
server, retries, and the server's /weight_info read before and after every request).
With `[env]` set, each request is an episode instead (`eval.episodes`: the greedy one
and `eval.k` sampled ones through the training environment, scored as training scores
an episode), and the row says the mean model turns and tool calls per episode.
Completions are scored with the eval reward functions (`eval.reward`, default
[reward]); a completion is correct when the `eval.correct_reward` component reaches
`eval.correct_threshold` (a failed reward is not correct, and is counted). Nothing is
written to the buffer and nothing is reported to the learner: evaluation is invisible
to training and to its staleness accounting.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from grpo_stream.config import Config
from grpo_stream.eval.episodes import EpisodeEval
from grpo_stream.eval.passk import mean_at_k, mean_pass_at_k
from grpo_stream.eval.record import EvalRow, Scored
from grpo_stream.generator.pool import ServerPool
from grpo_stream.generator.sampler import PromptFailed, SampleRequest, request_group
from grpo_stream.serving.adapters import request_model
from grpo_stream.tasks import Prompt, RewardRunner, render_prompt
from grpo_stream.tasks.heldout import eval_task


@dataclass
class PromptResult:
    greedy: list[Scored] = field(default_factory=list)
    samples: list[Scored] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)
    failed: bool = False


def correct_key(keys: list[str], wanted: str | None) -> str:
    """The reward component that decides correctness (`eval.correct_reward`)."""
    if wanted is None:
        return keys[0]
    if wanted not in keys:
        raise ValueError(f"eval.correct_reward: {wanted!r} is not a reward component {keys}")
    return wanted


class Evaluator:
    def __init__(self, cfg: Config, tokenizer: Any, prompts: list[Prompt]):
        e, g = cfg.eval, cfg.generator
        self.cfg, self.k, self.greedy = cfg, e.k, e.greedy
        if not self.greedy and self.k == 0:
            raise ValueError("eval: eval.greedy = false and eval.k = 0 leave nothing to evaluate")
        task = eval_task(cfg)
        self.requests = [SampleRequest(p, *render_prompt(p, tokenizer, task)) for p in prompts]
        self.rewards = RewardRunner(e.reward or cfg.reward)  # checks names and kwargs now
        self.correct_key = correct_key([f.key for f in self.rewards.fns], e.correct_reward)
        self.threshold = e.correct_threshold
        temperature = e.temperature if e.temperature is not None else g.temperature
        base = {"max_tokens": e.max_tokens or g.max_tokens, "top_p": 1.0, "top_k": -1}
        if g.stop:
            base["stop"] = list(g.stop)
        self.greedy_params = {**base, "temperature": 0.0}
        self.sample_params = {**base, "temperature": temperature}
        self.max_concurrency = e.max_concurrency
        self.episodes = None
        if cfg.env.name is not None:  # held-out episodes through the training environment
            self.episodes = EpisodeEval(
                cfg, tokenizer, self.rewards, self.correct_key, self.threshold
            )

    def _score(self, outs: list, results: list) -> list[Scored]:
        scored = []
        for out, r in zip(outs, results, strict=True):
            value = r.components.get(self.correct_key, math.nan)
            ok = not r.failed and math.isfinite(value) and value >= self.threshold
            truncated = out.finish_reason == "length"
            scored.append(Scored(ok, r.total, dict(r.components), len(out.token_ids), truncated))
        return scored

    async def _request(
        self, pool: ServerPool, req: SampleRequest, greedy: bool, res: PromptResult
    ) -> None:
        g = self.cfg.generator
        n, params = (1, self.greedy_params) if greedy else (self.k, self.sample_params)
        if self.episodes is not None:
            try:
                scored, versions = await self.episodes.run(pool, req.prompt, n, params)
            except PromptFailed:
                res.failed = True
                return
            res.versions.update(versions)
            (res.greedy if greedy else res.samples).extend(scored)
            return
        try:
            outs, v0, v1, _, _ = await request_group(
                pool, request_model(self.cfg), req, n, params, g.max_retries, g.retry_budget_s
            )
        except PromptFailed:
            res.failed = True
            return
        results = await self.rewards.score_group(req.prompt, [o.text for o in outs])
        res.versions.update((v0, v1))
        (res.greedy if greedy else res.samples).extend(self._score(outs, results))

    async def run_requests(self, pool: ServerPool) -> list[PromptResult]:
        sem = asyncio.Semaphore(self.max_concurrency)
        results = [PromptResult() for _ in self.requests]

        async def bounded(req: SampleRequest, greedy: bool, res: PromptResult) -> None:
            async with sem:
                await self._request(pool, req, greedy, res)

        modes = [m for m, on in ((True, self.greedy), (False, self.k > 0)) if on]
        async with asyncio.TaskGroup() as tg:
            for req, res in zip(self.requests, results, strict=True):
                for greedy in modes:
                    tg.create_task(bounded(req, greedy, res))
        return results

    async def evaluate(self, pool: ServerPool, step: int | None = None, model: str = "") -> EvalRow:
        t0 = time.perf_counter()
        results = await self.run_requests(pool)
        return summarize(results, self.k, self.greedy, time.perf_counter() - t0, step, model)

    async def aclose(self) -> None:
        await self.rewards.aclose()


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def summarize(
    results: list[PromptResult], k: int, greedy: bool, eval_s: float, step: int | None, model: str
) -> EvalRow:
    """The row for one evaluation (pure: tested on hand-made results)."""
    ok = [r for r in results if not r.failed]
    versions = sorted(set().union(*(r.versions for r in ok))) if ok else []
    counts = [(len(r.samples), sum(s.correct for s in r.samples)) for r in ok if r.samples]
    counts = counts if k > 0 else []
    main = [s for r in ok for s in (r.samples if k > 0 else r.greedy)]
    greedy_done = [s for r in ok for s in r.greedy]
    keys = sorted({key for s in main for key in s.components})
    return EvalRow(
        policy_version=versions[0] if versions else -1,
        version_mismatch=len(versions) > 1,
        versions_seen=versions,
        prompts=len(ok),
        k=k,
        greedy_pass_at_1=_mean([float(s.correct) for s in greedy_done]) if greedy else None,
        mean_at_k=mean_at_k(counts) if counts else None,
        pass_at_k=mean_pass_at_k(counts, k) if counts else None,
        reward_mean=_mean([s.reward for s in main]),
        reward_components={key: _mean([s.components[key] for s in main]) for key in keys},
        greedy_reward_mean=_mean([s.reward for s in greedy_done]) if greedy else None,
        length_mean=_mean([float(s.tokens) for s in main]),
        truncated_frac=_mean([float(s.truncated) for s in main]),
        turns_mean=_mean([float(s.turns) for s in main if s.turns is not None]),
        tool_calls_mean=_mean([float(s.tool_calls) for s in main if s.tool_calls is not None]),
        reward_failed=sum(not math.isfinite(s.reward) for r in ok for s in r.greedy + r.samples),
        failed_prompts=len(results) - len(ok),
        eval_s=eval_s,
        time=time.time(),
        step=step,
        model=model,
    )
