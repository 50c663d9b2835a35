"""The generator process: prompts → vLLM (n=G) → rewards → replay buffer.

`Generator.run()` is one asyncio program. A producer walks the prompt source and
starts one task per prompt, bounded by `generator.max_in_flight` (a semaphore) and
by the staleness gate (`gate.py`: at most the learner's next batch and
`max_ahead_batches` more beyond what it has consumed). Finished groups go through a queue
to a single writer task that publishes them to the buffer off the event loop.
On stop (SIGTERM/SIGINT, `generator.stop_after_groups` groups in the buffer, the prompt
source exhausted, or the learner finished), groups already scored are written before
exit: nothing finished is lost. The reason is left in `BUFFER/consumers/generator.json`
(`grpo_stream.core.generator_end`): `run` restarts no generator that finished its work,
and a learner waiting for groups that will not come ends cleanly.

    asyncio.run(Generator(cfg, run_dir, model_dir).run())
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid

from grpo_stream.buffer.schema import Group
from grpo_stream.buffer.store import open_writer
from grpo_stream.config import Config
from grpo_stream.core import generator_end as end
from grpo_stream.core import run_records
from grpo_stream.core.errors import UserError
from grpo_stream.core.timing import GeneratorClocks
from grpo_stream.generator import resume
from grpo_stream.generator.episodes import episode_runner
from grpo_stream.generator.gate import StalenessGate
from grpo_stream.generator.pool import ServerPool
from grpo_stream.generator.sampler import (
    PromptFailed,
    SampleRequest,
    build_group,
    request_group,
)
from grpo_stream.generator.stats import GenStats
from grpo_stream.serving.adapters import request_model
from grpo_stream.serving.client import VLLMClient

log = logging.getLogger(__name__)


class GeneratorError(UserError, RuntimeError):
    """The generator cannot make progress (e.g. every prompt keeps failing)."""


class Generator:
    def __init__(self, cfg: Config, run_dir: str, model_dir: str):
        from transformers import AutoTokenizer

        from grpo_stream.tasks import make_prompt_source
        from grpo_stream.tasks.heldout import training_exclusion
        from grpo_stream.tasks.runner import RewardRunner

        self.cfg, self.run_dir = cfg, run_dir
        self.buffer_path = cfg.buffer_path(run_dir)
        # producing again: first thing, so a learner starting beside this generator does
        # not take an earlier generator's end for this one's
        end.clear_generator_end(self.buffer_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.heldout = training_exclusion(cfg)  # eval.every > 0: held-out questions skipped
        # validates the task (files read) now
        self.prompts = make_prompt_source(cfg.task, exclude=self.heldout)
        self._make_source = make_prompt_source
        from grpo_stream.generator.reward_model import reward_model_scorers

        self.scorers = reward_model_scorers(cfg)  # `reward_model`: scored through the client
        self.rewards = RewardRunner(cfg.reward, external=self.scorers)  # validates names now
        self.episodes = episode_runner(cfg, self.tokenizer)  # None: single-turn samples
        self.run_id = os.path.basename(os.path.normpath(run_dir)) or uuid.uuid4().hex[:8]
        self.clocks = GeneratorClocks(cfg.server.resolved_urls())  # grpo_stream.core.timing
        self.stats = GenStats(os.path.join(run_dir, "generator_metrics.jsonl"), self.clocks)
        self._stop = asyncio.Event()
        ahead = cfg.learner.batch_groups * (1 + cfg.generator.max_ahead_batches)
        # polled as often as the learner polls the buffer: in sync mode (run --sync) each
        # step's generation starts one poll after the learner's sync
        poll_s = cfg.buffer.poll_s
        self.gate = StalenessGate(self.buffer_path, ahead, poll_s=poll_s, status=self.stats)
        self._queue: asyncio.Queue[Group | None] = asyncio.Queue()
        self.failed_prompts = 0
        self.write_error: OSError | None = None  # the buffer append that stopped us
        self._outstanding = 0  # prompts started but not yet written (or failed)
        self._failed_at_last_success = 0
        self._max_consecutive_failures = 3 * cfg.generator.max_in_flight + 5
        self.end_reason: str | None = None  # set by _produce; see stop_reason()
        self._signalled = False

    def _continue_prompts(self):
        """The prompts not started yet (grpo_stream.run.ledger): a restarted generator first
        regenerates, once, those in flight when it died, and repeats none."""
        started, oldest = resume.started_prompts(self.buffer_path, self.run_dir)
        if started:
            print(f"[generate] {len(started)} prompts already started; continuing after "
                  "them", file=sys.stderr, flush=True)  # fmt: skip
        source = self._make_source(self.cfg.task, exclude=self.heldout)
        return resume.continue_prompts(source, started, oldest)

    def request_stop(self) -> None:
        self._signalled = True
        self._stop.set()

    def stop_reason(self) -> str:
        """Why this generator stopped (`grpo_stream.core.generator_end.REASONS`)."""
        if self.gate.finished_step is not None:
            return end.LEARNER_FINISHED
        if self._signalled or self.end_reason is None:
            return end.STOPPED
        return self.end_reason

    def sampling_params(self) -> dict:
        g = self.cfg.generator
        params = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p}
        params["top_k"] = g.top_k
        if g.stop:
            params["stop"] = g.stop
        return params

    async def _room(self, reserved: int) -> None:
        """Wait until `reserved+1` groups may exist (gate.py); a learner that has
        finished stops the generator (it would wait forever otherwise)."""
        if not await self.gate.wait_for_room(reserved, self._stop):
            self._stop.set()

    async def _one(self, pool: ServerPool, prompt, sem: asyncio.Semaphore) -> None:
        from grpo_stream.tasks import render_prompt

        try:
            run_id = run_records.stamp(self.run_id, self.gate.lineage)  # NAME@LINEAGE, at start
            if self.episodes is not None:  # multi-turn: grpo_stream.generator.episodes
                group = await self.episodes.group(pool, prompt, run_id, self.rewards)
                return await self._publish(group)
            text, ids = render_prompt(prompt, self.tokenizer, self.cfg.task)
            req = SampleRequest(prompt, text, ids)
            g = self.cfg.generator
            outs, v0, v1, lat, url = await request_group(
                pool,
                request_model(self.cfg),  # the version's adapter name under the LoRA sync
                req,
                g.group_size,
                self.sampling_params(),
                g.max_retries,
                g.retry_budget_s,
            )
            with self.clocks.rewarding():
                rewards = await self.rewards.score_group(prompt, [o.text for o in outs])
            group = build_group(run_id, req, outs, rewards, (v0, v1), lat, url)
            await self._publish(group)
        except PromptFailed as err:
            # the ledger's record: this prompt ended here (a restart does not retry it)
            await asyncio.to_thread(
                run_records.record_failure, self.run_dir, prompt.prompt_id, str(err)
            )
            self.failed_prompts += 1
            self.stats.failed += 1
            self._outstanding -= 1
            log.error("%s", err)
            if self.failed_prompts - self._failed_at_last_success >= self._max_consecutive_failures:
                raise GeneratorError(
                    f"{self.failed_prompts} prompts failed in a row; last: {err}"
                ) from err
        finally:
            sem.release()

    async def _publish(self, group: Group) -> None:
        """A sampled group to the writer; the prompt succeeded."""
        self.stats.add_group(group)
        await self._queue.put(group)
        self._failed_at_last_success = self.failed_prompts

    async def _writer(self, writer) -> None:
        pending: list[Group] = []
        done = False
        while not done:
            item = await self._queue.get()
            if item is None:
                done = True
            else:
                pending.append(item)
            if pending and (
                done or len(pending) >= self.cfg.generator.groups_per_write or self._queue.empty()
            ):
                try:
                    await asyncio.to_thread(writer.append_groups, pending)
                except OSError as err:  # a full disk, a lost mount: stop, naming it
                    self.write_error = err
                    self._stop.set()
                    return  # nothing of this append was published (atomic)
                self.stats.written += len(pending)
                self._outstanding -= len(pending)
                pending = []

    async def _produce(self, pool: ServerPool, tg: asyncio.TaskGroup) -> None:
        sem = asyncio.Semaphore(self.cfg.generator.max_in_flight)
        stop_after = self.cfg.generator.stop_after_groups
        for prompt in self.prompts:
            if self._stop.is_set():
                break
            # groups in the buffer (a restarted generator's predecessors' too) + in flight;
            # a failed prompt leaves the count, so another prompt takes its place
            if stop_after is not None and self.stats.written + self._outstanding >= stop_after:
                self.end_reason = end.STOP_AFTER_GROUPS
                break
            await self._room(self.stats.written + self._outstanding)
            await sem.acquire()
            if self._stop.is_set():
                sem.release()
                break
            self._outstanding += 1
            tg.create_task(self._one(pool, prompt, sem))
        else:
            self.end_reason = end.EXHAUSTED

    async def run(self) -> int:
        urls = self.cfg.server.resolved_urls()
        key = self.cfg.server.resolved_api_key()  # sent as Authorization: Bearer
        async with VLLMClient(self.cfg.generator.request_timeout_s, api_key=key) as client:
            await self.gate.start()  # before any wait: a learner's finish from now on counts
            for scorer in self.scorers.values():
                scorer.bind(client)
            hint = "server.startup_timeout_s; start one with `grpo-stream serve` or fix server.urls"
            wait_s = self.cfg.server.startup_timeout_s
            await client.wait_healthy(urls, wait_s, need="any", hint=hint)
            writer = open_writer(
                self.buffer_path,
                self.cfg.buffer.backend,
                run_id=self.run_id,
                **self.cfg.buffer.writer_opts(),
            )
            self.stats.written = writer.num_groups()
            self.prompts = await asyncio.to_thread(self._continue_prompts)
            if self.cfg.generator.wait_for_learner:  # a reused server holds others' weights
                if not await self.gate.wait_for_lineage(self._stop):
                    self._stop.set()  # stopped, or the learner finished, while waiting
            wait_s = self.cfg.server.startup_timeout_s
            pool = ServerPool(urls, client, wait_timeout_s=wait_s, busy=self.clocks.requests)
            self.gate.watch = pool.check  # a held generator still notices a dead server
            stale = self.cfg.learner.max_staleness  # a server back from a restart: used
            pool.min_version = lambda: max(0, self.gate.learner_version - stale)  # once synced
            writer_task = asyncio.create_task(self._writer(writer), name="buffer-writer")
            reporter = asyncio.create_task(self.stats.report_every(10.0, pool), name="reporter")
            try:
                async with asyncio.TaskGroup() as tg:
                    await self._produce(pool, tg)  # in-flight groups finish before exit
            finally:
                await self._queue.put(None)  # flush what is scored, even when cancelled
                await asyncio.shield(writer_task)
                reporter.cancel()
                self.stats.server = await self.stats.server_metrics(pool)
                await pool.close()
                await asyncio.to_thread(writer.close)
                await self.rewards.aclose()
                self.stats.report(pool)
        if self.write_error is not None:
            raise GeneratorError(
                f"buffer {self.buffer_path}: an append failed ({self.write_error}); the "
                f"{self.stats.written} groups published before it are whole: free the space "
                "and start the generator again (it continues where it stopped)"
            ) from self.write_error
        await asyncio.to_thread(end.write_generator_end, self.buffer_path, self.stop_reason(),
                                self.stats.written)  # fmt: skip
        return self.stats.written
