"""Least-loaded dispatch over several vLLM servers, with death and recovery.

`ServerPool.lease()` hands out the live server with the fewest requests in flight.
A server that fails with a transient error is taken out (`mark_dead`) and a kept
background task probes its `/health` with exponential backoff until it answers
again and, with `min_version`, serves weights recent enough (a restarted server is used
once it has been re-synced, not while it serves the initial model). When every server
is down, `lease()` waits on a condition (no sleep-polling) until one recovers, up to
`wait_timeout_s`.

    async with pool.lease() as url:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from grpo_stream.core.errors import UserError
from grpo_stream.serving.client import Backoff, VLLMClient, VLLMError

log = logging.getLogger(__name__)


class NoServerAvailable(UserError, RuntimeError):
    pass


class ServerPool:
    def __init__(
        self, urls: list[str], client: VLLMClient, wait_timeout_s: float = 300.0, busy=None
    ):
        if not urls:
            raise ValueError("server.urls: no vLLM server URL configured")
        self.urls = list(urls)
        self.client = client
        self.wait_timeout_s = wait_timeout_s
        self.in_flight = {u: 0 for u in urls}
        self.alive = {u: True for u in urls}
        self._cond = asyncio.Condition()
        self._probes: dict[str, asyncio.Task] = {}
        self.busy = busy  # a grpo_stream.core.timing.BusyClock: seconds each server had work
        # the oldest weight version worth sampling from (older samples would be dropped as
        # stale): a restarted server is back only once re-synced that far
        self.min_version: Callable[[], int] | None = None

    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())

    async def _pick(self) -> str:
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: any(self.alive.values())), self.wait_timeout_s
                )
            except TimeoutError:
                raise NoServerAvailable(
                    f"no vLLM server answered /health for {self.wait_timeout_s:.0f}s: {self.urls}"
                ) from None
            url = min((u for u in self.urls if self.alive[u]), key=lambda u: self.in_flight[u])
            self.in_flight[url] += 1
            return url

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[str]:
        url = await self._pick()
        if self.busy is not None:
            self.busy.start(url)
        try:
            yield url
        finally:
            self.in_flight[url] -= 1
            if self.busy is not None:
                self.busy.stop(url)

    async def mark_dead(self, url: str, reason: str) -> None:
        async with self._cond:
            if not self.alive[url]:
                return
            self.alive[url] = False
        log.warning("server %s taken out: %s", url, reason)
        self._probes[url] = asyncio.create_task(self._probe(url), name=f"probe:{url}")

    async def check(self) -> list[str]:
        """Health-check every server thought alive now; take out those that do not answer
        (their probe brings them back). Returns the URLs taken out by this call."""
        urls = [u for u in self.urls if self.alive[u]]
        reasons = await asyncio.gather(*(self.client.health_reason(u, 5.0) for u in urls))
        gone = [(u, r) for u, r in zip(urls, reasons, strict=True) if r is not None]
        for u, r in gone:
            await self.mark_dead(u, f"no /health ({r})")
        return [u for u, _ in gone]

    async def _probe(self, url: str) -> None:
        backoff = Backoff(0.5, cap=10.0, jitter=False)
        while not await self._ready(url):
            await asyncio.sleep(backoff.next())
        async with self._cond:
            self.alive[url] = True
            self._cond.notify_all()
        log.warning("server %s is back", url)

    async def _ready(self, url: str) -> bool:
        """Healthy, and (with `min_version`) serving weights no older than it."""
        if not await self.client.health(url, timeout_s=5.0):
            return False
        if self.min_version is None:
            return True
        try:
            return await self.client.weight_version(url) >= self.min_version()
        except VLLMError:
            return False

    async def close(self) -> None:
        for t in self._probes.values():
            t.cancel()
        for t in self._probes.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
