"""Generator observability: counters, a periodic progress line, JSONL metrics.

`GenStats` counts samples, tokens, failed prompts, failed rewards and the reward mean of
what was produced; `report_every(seconds, pool)` prints one line every `seconds`
(samples, groups written, tokens/s, requests in flight here and running on the servers,
the newest weight version seen, the recent reward mean, and whether the staleness gate
holds the generator) and appends a fuller snapshot to `RUN_DIR/generator_metrics.jsonl`:
those numbers, failure counts, live servers, vLLM's own /metrics counters and the
timing clocks (`grpo_stream.core.timing.GeneratorClocks`).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time

from grpo_stream.buffer.schema import Group
from grpo_stream.core import jsonl
from grpo_stream.serving.client import VLLMError


class GenStats:
    def __init__(self, path: str, clocks=None):
        self.path = path
        self.clocks = clocks  # grpo_stream.core.timing.GeneratorClocks: where the time goes
        self.t0 = time.perf_counter()
        self.samples = 0
        self.tokens = 0
        self.failed = 0
        self.written = 0
        self.reward_failures = 0
        self.gated = False
        self.last_version = 0
        self._rewards: list[float] = []
        self.server: dict[str, float] = {}

    @property
    def gated(self) -> bool:
        """The staleness gate holds the generator right now (timed in `clocks`)."""
        return self._gated

    @gated.setter
    def gated(self, value: bool) -> None:
        self._gated = value
        if self.clocks is not None:
            self.clocks.gated.set(value)

    def add_group(self, group: Group) -> None:
        self.samples += len(group)
        self.tokens += sum(len(s.completion_ids) for s in group)
        self.last_version = max(self.last_version, max(s.policy_version_end for s in group))
        for s in group:
            if math.isfinite(s.reward):
                self._rewards.append(s.reward)
            else:
                self.reward_failures += 1

    def snapshot(self, pool) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        recent = self._rewards[-512:]
        return {
            "time": time.time(),
            "samples": self.samples,
            "groups_written": self.written,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / dt,
            "in_flight": pool.total_in_flight() if pool else 0,
            "failed_prompts": self.failed,
            "reward_failures": self.reward_failures,
            "reward_mean_recent": sum(recent) / len(recent) if recent else float("nan"),
            "policy_version": self.last_version,
            "gated": self.gated,
            "servers_alive": sum(pool.alive.values()) if pool else 0,
            **self.server,
            **(self.clocks.snapshot() if self.clocks is not None else {}),
        }

    def report(self, pool) -> dict:
        snap = self.snapshot(pool)
        jsonl.append(self.path, snap)
        print(
            f"[generate] samples={snap['samples']} groups={snap['groups_written']} "
            f"tok/s={snap['tokens_per_s']:.0f} in_flight={snap['in_flight']} "
            f"server_running={snap.get('vllm_requests_running', 0):.0f} "
            f"version={snap['policy_version']} reward~{snap['reward_mean_recent']:.3f} "
            f"{'(waiting for learner)' if snap['gated'] else ''}",
            file=sys.stderr,
            flush=True,
        )
        return snap

    async def server_metrics(self, pool) -> dict[str, float]:
        """vLLM's own counters from /metrics, summed over the live servers."""
        out = {"vllm_requests_running": 0.0, "vllm_generation_tokens_total": 0.0}
        for url in [u for u in pool.urls if pool.alive[u]]:
            try:
                m = await pool.client.metrics(url)
            except VLLMError:  # observability only: a busy or dead server is skipped
                continue
            out["vllm_requests_running"] += m.get("vllm:num_requests_running", 0.0)
            out["vllm_generation_tokens_total"] += m.get("vllm:generation_tokens_total", 0.0)
        return out

    async def report_every(self, seconds: float, pool) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.server = await self.server_metrics(pool)
            self.report(pool)
