"""SIMULATION: the in-process stand-in for vLLM servers that bench/simulate.py drives the
real generator against, with vLLM 0.32's three `/pause` modes (`sync.pause_mode`).

    servers = SimServers(urls, SimParams(), seed=0, pause_mode="keep")
    # the generator's `VLLMClient(...)` is replaced by `servers`; from the learner thread:
    waited_s = servers.sync(version)  # simulated seconds the learner waited

Each server runs `slots` requests at once (continuous batching). A request of G samples
decodes for `prefill_s + tpot_s * max(lengths)` simulated seconds, lengths drawn from a
lognormal (a long tail). A sync pauses every server at once (`sync.mode = "all"`: the
servers are synced concurrently, the learner waits for the slowest) and, as vLLM's
engine core does (`pause_scheduler`):

* every mode queues new requests (and those waiting for a slot) until the resume;
* ``wait`` (PAUSED_NEW, keep stepping): the reload starts only once the requests already
  running have finished, so the longest running request holds the sync;
* ``keep`` (PAUSED_ALL): running requests freeze where they are and continue on the new
  weights after the resume: their later tokens are sampled by the new version;
* ``abort``: running requests end at once with what they decoded so far
  (`finish_reason "abort"`, a cut answer: its text holds no final answer), which the
  real generator then handles (`generator/sampler.py`: the group is sampled again).

Each completion token's id is `TOKEN_BASE + v`, v the version that sampled it, so the
share of trained tokens sampled under an older version than their group's last one (a
partial rollout's mixed policy) is read from the buffer exactly. Simulated seconds run
`scale` times faster in real time (real sleeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import numpy as np

from grpo_stream.serving.client import Completion

TOKEN_BASE = 1000  # a simulated token's id: TOKEN_BASE + the version that sampled it
PAUSE_MODES = ("wait", "keep", "abort")


@dataclass
class SimParams:
    """The simulated parts (simulated seconds)."""

    len_mu: float = 5.7  # lognormal completion lengths: median e^5.7 ~ 300 tokens
    len_sigma: float = 1.0  # the long tail: p99 ~ 3000 (capped at max_tokens)
    max_tokens: int = 2048
    prompt_tokens: int = 100
    tpot_s: float = 0.02  # decode seconds per token of the longest sample of a request
    prefill_s: float = 0.2
    slots: int = 4  # requests a server runs at once
    train_s_per_token: float = 1e-4
    sync_s: float = 1.0  # every server paused this long per weight sync
    scale: float = 0.04  # real seconds per simulated second


class _Server:
    """One server's scheduler state (lives on the generator's event loop)."""

    def __init__(self, slots: int):
        self.version = 0
        self.slots = asyncio.Semaphore(slots)
        self.open = asyncio.Event()  # cleared while paused: new requests are queued
        self.unfrozen = asyncio.Event()  # cleared while paused in keep mode
        self.idle = asyncio.Event()  # no request running (wait mode drains to it)
        self.changed = asyncio.Event()  # set (and replaced) on every pause/resume
        self.abort_epoch = 0  # a running request admitted before an abort is cut
        self.running = 0
        for e in (self.open, self.unfrozen, self.idle):
            e.set()

    def signal(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def admit(self) -> None:
        """A slot while not paused (a paused server schedules no new request)."""
        while True:
            await self.open.wait()
            await self.slots.acquire()
            if self.open.is_set():
                break
            self.slots.release()
        self.running += 1
        self.idle.clear()

    def release(self) -> None:
        self.slots.release()
        self.running -= 1
        if self.running == 0:
            self.idle.set()


def decode_tokens(segments: list[tuple[int, float, float]], decoded_s: float, length: int,
                  p: SimParams) -> list[int]:  # fmt: skip
    """The token ids of one sample: token j is sampled at decode time
    `prefill_s + (j+1) * tpot_s` by the version of the segment [start, end) holding it;
    `decoded_s` (< the request's need when it was aborted) cuts the sample short."""
    n = min(length, max(int((decoded_s - p.prefill_s) / p.tpot_s + 1e-9), 0))
    ids, k = [], 0
    for j in range(n):
        t = p.prefill_s + (j + 1) * p.tpot_s
        while k < len(segments) - 1 and t > segments[k][2] + 1e-9:
            k += 1
        ids.append(TOKEN_BASE + segments[k][0])
    return ids


class SimServers:
    """The in-process stand-in for vLLM (the `VLLMClient` the generator uses)."""

    def __init__(self, urls: list[str], p: SimParams, seed: int, pause_mode: str = "wait"):
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"sync.pause_mode: {pause_mode!r} is not one of {PAUSE_MODES}")
        self.urls, self.p, self.pause_mode = urls, p, pause_mode
        self.rng = np.random.default_rng(seed)
        self.s: dict[str, _Server] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, *args, **kwargs) -> SimServers:  # stands where VLLMClient(...) is
        return self

    async def __aenter__(self) -> SimServers:
        self.loop = asyncio.get_running_loop()
        self.s = {u: _Server(self.p.slots) for u in self.urls}
        return self

    async def __aexit__(self, *exc) -> None:
        pass

    async def wait_healthy(self, urls, *args, **kwargs) -> list[str]:
        return list(urls)

    async def health(self, url: str, timeout_s: float = 5.0) -> bool:
        return True

    async def health_reason(self, url: str, timeout_s: float = 5.0) -> str | None:
        return None  # always healthy

    async def metrics(self, url: str) -> dict[str, float]:
        return {}

    async def weight_version(self, url: str) -> int:
        return self.s[url].version

    async def complete(self, url, model, prompt_ids, n, sampling) -> list[Completion]:
        p, srv = self.p, self.s[url]
        lengths = np.minimum(self.rng.lognormal(p.len_mu, p.len_sigma, n), p.max_tokens)
        lengths = np.maximum(lengths.astype(int), 1)
        await srv.admit()
        try:
            segments, done = await self._run(srv, p.prefill_s + p.tpot_s * int(lengths.max()))
        finally:
            srv.release()
        outs = []
        for k in lengths:
            ids = decode_tokens(segments, done, int(k), p)
            cut = len(ids) < k  # aborted: no final answer in the text
            outs.append(Completion(ids, [-1.0] * len(ids), "" if cut else "42",
                                   "abort" if cut else "length"))  # fmt: skip
        return outs

    async def _run(self, srv: _Server, need: float) -> tuple[list, float]:
        """Decode for `need` simulated seconds, frozen while paused in keep mode, cut
        by an abort; returns ([(version, start, end)] in decode time, seconds decoded)."""
        epoch, done, segments = srv.abort_epoch, 0.0, []
        while done < need - 1e-12 and srv.abort_epoch == epoch:
            await srv.unfrozen.wait()
            if srv.abort_epoch != epoch:
                break
            changed, v, t0 = srv.changed, srv.version, time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), (need - done) * self.p.scale)
            end = min(need, done + (time.monotonic() - t0) / self.p.scale)
            segments.append((v, done, end))
            done = end
        return segments or [(srv.version, 0.0, 0.0)], done

    async def _sync_one(self, srv: _Server, version: int) -> None:
        srv.open.clear()  # every mode: new requests are queued until the resume
        if self.pause_mode == "keep":
            srv.unfrozen.clear()
        elif self.pause_mode == "abort":
            srv.abort_epoch += 1
        srv.signal()
        if self.pause_mode == "wait":
            await srv.idle.wait()  # the drain: the longest running request holds the sync
        await asyncio.sleep(self.p.sync_s * self.p.scale)  # the reload
        srv.version = version
        srv.unfrozen.set()
        srv.open.set()
        srv.signal()

    async def _sync_all(self, version: int) -> None:
        await asyncio.gather(*(self._sync_one(self.s[u], version) for u in self.urls))

    def sync(self, version: int) -> float:
        """Pause, reload and resume every server (from the learner thread); returns the
        simulated seconds the learner waited for it."""
        t0 = time.monotonic()
        asyncio.run_coroutine_threadsafe(self._sync_all(version), self.loop).result()
        return (time.monotonic() - t0) / self.p.scale
