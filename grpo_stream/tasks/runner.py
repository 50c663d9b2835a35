"""Score a group of completions with the configured reward functions.

    runner = RewardRunner(cfg.reward)          # validates names and kwargs (ValueError)
    await runner.start()                       # starts user-function workers, if any
    results = await runner.score_group(prompt, completions)   # one RewardResult each
    await runner.aclose()

A reward scored by the process itself through a server (`reward_model`) is handed in
as `RewardRunner(cfg, external={"reward_model": scorer})` (`tasks/reward_model.py`);
it keeps its own deadline and retries, and its failure fails only its component.

Each function is applied to the whole group in one call limited to `cfg.timeout_s`, all
functions concurrently and off the event loop: built-ins (pure, cannot hang) in a thread,
import-path user functions in worker processes that are killed and restarted on timeout
(`reward_worker.py`). The total is the weighted sum of the components.

Failures are loud, never a silent 0: when a function raises, returns a non-number or
times out, that sample's component is NaN, `error` says which function and why
("numeric_answer: ValueError: ...", "slow_fn: timed out after 5s"), and its `total` is
NaN. Such a group must not be trained on (its group-relative advantages are unknown):
the learner drops any group with a NaN reward (what `group_failed(results)` tells of the
results); the generator still writes it to the buffer, so failures are visible there.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass, field
from typing import Any

import grpo_stream.tasks.reward_model  # noqa: F401  (registers `reward_model`)
import grpo_stream.tasks.rewards  # noqa: F401  (registers the built-ins)
from grpo_stream.config import RewardConfig
from grpo_stream.tasks.prompt import Prompt
from grpo_stream.tasks.reward_registry import (
    REWARDS,
    Outcome,
    call_reward,
    check_kwargs,
    describe,
    is_import_path,
    split_import_path,
)
from grpo_stream.tasks.reward_worker import WorkerPool


@dataclass
class RewardResult:
    total: float  # NaN when any component failed
    components: dict[str, float] = field(default_factory=dict)  # key -> unweighted score
    error: str = ""  # "key: reason; key: reason", empty when every function succeeded

    @property
    def failed(self) -> bool:
        return bool(self.error)


def group_failed(results: list[RewardResult]) -> bool:
    return any(r.failed for r in results)


@dataclass(frozen=True)
class RewardFn:
    key: str  # component name (label, or name deduplicated with "_2", "_3", ...)
    name: str
    weight: float
    kwargs: dict[str, Any]
    inline: Any  # the built-in function run in a thread, or None
    kind: str  # "sample" | "group" (inline only; the worker reads a user function's own)
    ref: str | None  # import path run in a worker process, or None


def _unknown(where: str, name: str) -> ValueError:
    choices = ", ".join(sorted(REWARDS))
    return ValueError(
        f"{where}.name: unknown reward {name!r} (choose from {choices}, "
        "or give 'package.module:function' or 'path/to/file.py:function')"
    )


def _resolve(where: str, name: str, kwargs: dict[str, Any]) -> tuple[Any, str, str | None]:
    if is_import_path(name):
        try:
            module, _ = split_import_path(name)
        except ValueError as e:
            raise ValueError(f"{where}.name: {e}") from None
        if module.endswith(".py") and not os.path.isfile(module):
            raise ValueError(f"{where}.name: reward file not found: {module}")
        return None, "sample", name  # loaded, checked and run by the workers
    if name not in REWARDS:
        raise _unknown(where, name)
    reg = REWARDS[name]
    problem = check_kwargs(reg.fn, kwargs)
    if problem is None and reg.validate is not None:
        try:
            reg.validate(kwargs)
        except (ValueError, TypeError) as e:
            problem = str(e)
    if problem:
        raise ValueError(f"{where}.kwargs: {problem} (reward {name!r})")
    if reg.inline:
        return reg.fn, reg.kind, None
    return None, reg.kind, f"{reg.fn.__module__}:{reg.fn.__qualname__}"


def build_reward_fns(cfg: RewardConfig) -> list[RewardFn]:
    """Check every configured function; ValueError names the field of the first bad one."""
    fns: list[RewardFn] = []
    seen: dict[str, int] = {}
    for i, f in enumerate(cfg.functions):
        where = f"reward.functions[{i}]"
        inline, kind, ref = _resolve(where, f.name, f.kwargs)
        base = f.label or (
            split_import_path(f.name)[1] if ref and is_import_path(f.name) else f.name
        )
        seen[base] = seen.get(base, 0) + 1
        key = base if seen[base] == 1 else f"{base}_{seen[base]}"
        if f.label and seen[base] > 1:
            raise ValueError(f"{where}.label: {f.label!r} is used twice")
        fns.append(RewardFn(key, f.name, f.weight, dict(f.kwargs), inline, kind, ref))
    return fns


def combine(fns: list[RewardFn], columns: list[list[Outcome]], n: int) -> list[RewardResult]:
    """Per completion: components, weighted total, and the failures (total NaN)."""
    results = []
    for i in range(n):
        components: dict[str, float] = {}
        errors = []
        for fn, column in zip(fns, columns, strict=True):
            outcome = column[i]
            if isinstance(outcome, str):
                errors.append(f"{fn.key}: {outcome}")
                components[fn.key] = math.nan
            else:
                components[fn.key] = outcome
        total = math.nan if errors else sum(f.weight * components[f.key] for f in fns)
        results.append(RewardResult(total, components, "; ".join(errors)))
    return results


async def score_external(scorer: Any, prompt: Prompt, completions: list[str]) -> list[Outcome]:
    """A process's own scorer (the reward-model client): its failure fails the group."""
    try:
        out = list(await scorer(prompt, completions))
    except Exception as e:  # CancelledError is no Exception: it propagates
        return [describe(e)] * len(completions)
    if len(out) != len(completions):
        return [f"returned {len(out)} values for {len(completions)} completions"] * len(completions)
    return out


class RewardRunner:
    """The configured reward functions, ready to score groups (see the module docstring)."""

    def __init__(self, cfg: RewardConfig, external: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.fns = build_reward_fns(cfg)
        # reward name -> an async scorer of this process (grpo_stream.tasks.reward_model)
        self.external = dict(external or {})
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop it was started on
        self._pool: WorkerPool | None = None
        self._lock: asyncio.Lock | None = None

    async def start(self) -> None:
        """Start the worker processes for user functions; ValueError if one cannot load."""
        if self.loop is not None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.loop is None:
                await self._start_pool()
                self.loop = asyncio.get_running_loop()

    async def _start_pool(self) -> None:
        specs = [(f.key, f.ref, f.kwargs) for f in self.fns if f.ref is not None]
        if not specs:
            return
        pool = WorkerPool(specs, self.cfg.num_workers, self.cfg.startup_timeout_s)
        errors = await pool.start()
        if errors:
            await pool.aclose()
            where = {f.key: i for i, f in enumerate(self.fns)}
            key, why = next(iter(errors.items()))
            raise ValueError(f"reward.functions[{where[key]}].name: {why}")
        self._pool = pool

    async def _score_fn(
        self, fn: RewardFn, prompt: Prompt, completions: list[str]
    ) -> list[Outcome]:
        timeout = self.cfg.timeout_s
        if fn.name in self.external:  # it keeps its own deadline (reward_model.timeout_s)
            return await score_external(self.external[fn.name], prompt, completions)
        if fn.ref is not None:
            assert self._pool is not None
            return await self._pool.call(fn.ref, completions, prompt, fn.kwargs, timeout)
        call = asyncio.to_thread(call_reward, fn.inline, fn.kind, completions, prompt, fn.kwargs)
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:  # the thread finishes on its own: built-ins cannot hang
            return [f"timed out after {timeout:g}s"] * len(completions)

    async def score_group(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        """One RewardResult per completion, in order; never raises for a function's failure."""
        await self.start()
        if not completions:
            return []
        columns = await asyncio.gather(*(self._score_fn(f, prompt, completions) for f in self.fns))
        return combine(self.fns, list(columns), len(completions))

    def close(self) -> None:
        """Kill the worker processes (blocking; prefer `aclose` inside a running loop)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.loop = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> RewardRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
