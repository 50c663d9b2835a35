"""The evaluator process of a training run: held-out accuracy over policy versions.

`grpo-stream run` starts it beside the generator and the learner when `eval.every > 0`
(`grpo-stream eval --follow --config RUN/config.toml` starts it by hand). It watches the
servers' /weight_info and the learner's progress file, and evaluates (`evaluate.py`):
- version 0 and every version that is a multiple of `eval.every` (the learner waits
  before syncing past such a version until its row is written: `core/eval_progress.py`);
  version 0 only once the buffer holds the learner's first batch, so that the base
  model's evaluation never competes with the sampling of that batch (the learner trains
  its first step meanwhile, and waits for this row only before its first sync);
- the final version, once the learner says it reached `learner.max_steps` or finished
  (the generator's work ran out first); then it exits.
Each evaluation appends one row to RUN/eval.jsonl (and TensorBoard) and publishes the
version to BUFFER/consumers/eval.json. Rows already in RUN/eval.jsonl (a resumed run)
are not redone. It writes nothing to the buffer, so no eval sample is ever trained on.

    asyncio.run(Follower(cfg, run_dir, model_dir).run())
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from grpo_stream.buffer.store import open_reader
from grpo_stream.config import Config
from grpo_stream.config.transports import transport_traits
from grpo_stream.core.eval_progress import eval_due, write_eval_progress
from grpo_stream.core.progress import read_progress
from grpo_stream.eval.evaluate import Evaluator
from grpo_stream.eval.record import EvalLog, EvalRow, read_eval_rows
from grpo_stream.generator.pool import ServerPool
from grpo_stream.serving.client import TRANSIENT_ERRORS, VLLMClient, is_transient
from grpo_stream.tasks.heldout import check_disjoint, heldout_prompts

POLL_S = 0.25


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def eval_line(row: EvalRow) -> str:
    """'pass@1 (greedy) 0.625 | mean@2 0.375 | pass@2 0.562 | reward 0.275 | 42.2s',
    leaving out what the settings did not measure (eval.greedy = false, eval.k = 0)."""
    parts = (
        [f"pass@1 (greedy) {_f(row.greedy_pass_at_1)}"] if row.greedy_pass_at_1 is not None else []
    )
    if row.k > 0:
        parts += [f"mean@{row.k} {_f(row.mean_at_k)}", f"pass@{row.k} {_f(row.pass_at_k)}"]
    if row.turns_mean is not None:  # episodes ([env])
        parts += [f"turns {_f(row.turns_mean)}", f"tool calls {_f(row.tool_calls_mean)}"]
    return " | ".join([*parts, f"reward {_f(row.reward_mean)}", f"{row.eval_s:.1f}s"])


def say(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


class Follower:
    def __init__(self, cfg: Config, run_dir: str, model_dir: str):
        from transformers import AutoTokenizer

        self.cfg, self.run_dir = cfg, run_dir
        self.buffer_path = cfg.buffer_path(run_dir)
        prompts = heldout_prompts(cfg)
        check_disjoint(cfg, prompts)  # the generator skips them: verify on its real stream
        self.evaluator = Evaluator(cfg, AutoTokenizer.from_pretrained(model_dir), prompts)
        self.done = {r["policy_version"] for r in read_eval_rows(run_dir)}
        self._stop = asyncio.Event()
        self._reader = None  # the buffer, opened once it exists (version 0 waits on it)

    def request_stop(self) -> None:
        self._stop.set()

    async def _server_version(self, client: VLLMClient, urls: list[str]) -> int | None:
        """The version every server serves, or None while they disagree (mid-sync) or one
        does not answer (`run` may be restarting it: keep watching)."""
        try:
            versions = set(await asyncio.gather(*(client.weight_version(u) for u in urls)))
        except TRANSIENT_ERRORS as err:
            if not is_transient(err):
                raise
            return None
        return versions.pop() if len(versions) == 1 else None

    def _first_batch_in(self) -> bool:
        """Does the buffer hold the learner's first batch (learner.batch_groups groups)?"""
        if self._reader is None:
            try:
                self._reader = open_reader(self.buffer_path)
            except FileNotFoundError:  # the generator has not written its first group yet
                return False
        self._reader.refresh()
        return self._reader.num_groups() >= self.cfg.learner.batch_groups

    def _holds(self, version: int, final: bool) -> bool:
        """Hold back version 0's evaluation until the first batch is sampled."""
        return version == 0 and not final and not self._first_batch_in()

    def _final(self, version: int) -> bool:
        p = read_progress(self.buffer_path)
        if p.step < self.cfg.learner.max_steps and not p.finished:  # finished: its data ran out
            return False
        # without weight sync the servers' version is never the learner's
        synced = transport_traits(self.cfg.sync.transport).versions_servers
        return version == p.version or not synced

    async def _evaluate(self, pool: ServerPool, log: EvalLog, version: int) -> EvalRow:
        step = read_progress(self.buffer_path).step
        row = await self.evaluator.evaluate(pool, step=step)
        log.write(row)
        self.done.add(version)
        await asyncio.to_thread(write_eval_progress, self.buffer_path, version)
        mixed = f" (versions {row.versions_seen}: marked)" if row.version_mismatch else ""
        say(f"v{row.policy_version}: {eval_line(row)}{mixed}")
        return row

    async def run(self) -> int:
        urls = self.cfg.server.resolved_urls()
        log = EvalLog(self.run_dir)
        key = self.cfg.server.resolved_api_key()  # passed in: never read from os.environ
        async with VLLMClient(self.cfg.generator.request_timeout_s, api_key=key) as client:
            await client.wait_healthy(urls, self.cfg.server.startup_timeout_s, need="all")
            pool = ServerPool(urls, client, wait_timeout_s=self.cfg.server.startup_timeout_s)
            try:
                while not self._stop.is_set():
                    version = await self._server_version(client, urls)
                    if version is not None:
                        final = await asyncio.to_thread(self._final, version)
                        due = eval_due(self.cfg.eval.every, version) or final
                        if (
                            due
                            and version not in self.done
                            and not (await asyncio.to_thread(self._holds, version, final))
                        ):
                            await self._evaluate(pool, log, version)
                        if final:
                            break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), POLL_S)
            finally:
                await pool.close()
                await self.evaluator.aclose()
                log.close()
                if self._reader is not None:
                    self._reader.close()
        return len(self.done)
