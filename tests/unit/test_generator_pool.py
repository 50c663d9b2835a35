"""ServerPool: least-loaded dispatch, death, recovery on /health, and the wait bound.

Servers here are real aiohttp.web servers on 127.0.0.1 that this test starts and
stops (only `/health` and a canned `/v1/completions`), so the pool's probe talks HTTP
to something that really goes away and really comes back on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from aiohttp import web
from conftest import free_port

from grpo_stream.generator.pool import NoServerAvailable, ServerPool
from grpo_stream.generator.sampler import SampleRequest, request_group
from grpo_stream.serving.client import VLLMClient
from grpo_stream.tasks import Prompt


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


class HealthServer:
    """/health answers `health_status`; /v1/completions a fixed 2-sample answer (or 503)."""

    def __init__(self, port: int, health_status: int = 200, complete_status: int = 200):
        self.port, self.health_status, self.complete_status = port, health_status, complete_status
        self.completions = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    async def _weight_info(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": "default"})

    async def _complete(self, request: web.Request) -> web.Response:
        self.completions += 1
        if self.complete_status != 200:
            return web.Response(status=self.complete_status, text="engine dead")
        lp = {"token_logprobs": [-1.0, -2.0]}
        choices = [{"index": i, "text": "x", "token_ids": [5, 6], "logprobs": lp} for i in (0, 1)]
        return web.Response(text=json.dumps({"choices": choices}), content_type="application/json")

    async def start(self) -> HealthServer:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/weight_info", self._weight_info)
        app.router.add_post("/v1/completions", self._complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def run(coro):
    return asyncio.run(coro)


def test_least_loaded_dispatch() -> None:
    urls = [dead_url(), dead_url(), dead_url()]  # lease() itself sends nothing

    async def main():
        async with VLLMClient() as client, contextlib.AsyncExitStack() as stack:
            pool = ServerPool(urls, client)
            held = [await stack.enter_async_context(pool.lease()) for _ in range(3)]
            first_round = list(held)
            # a fourth and fifth lease: every server has 1 in flight -> spread again
            held += [await stack.enter_async_context(pool.lease()) for _ in range(2)]
            loads = dict(pool.in_flight)
            async with contextlib.AsyncExitStack() as inner:
                # release nothing yet; the least loaded is the one with 1 in flight
                lighter = await inner.enter_async_context(pool.lease())
                loads_with_sixth = dict(pool.in_flight)
            return first_round, held, loads, lighter, loads_with_sixth, pool

    first_round, held, loads, lighter, loads6, pool = run(main())
    assert sorted(first_round) == sorted(urls)  # each server gets one before any gets two
    assert sorted(loads.values()) == [1, 2, 2]
    light = min(loads, key=loads.get)
    assert lighter == light and loads6[light] == 2
    assert pool.in_flight == {u: 0 for u in urls}  # every lease given back
    assert pool.total_in_flight() == 0


def test_lease_skips_dead_servers() -> None:
    urls = [dead_url(), dead_url()]

    async def main():
        async with VLLMClient() as client:
            pool = ServerPool(urls, client)
            await pool.mark_dead(urls[0], "test")
            got = []
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(4):
                    got.append(await stack.enter_async_context(pool.lease()))
            await pool.close()
            return got, dict(pool.alive)

    got, alive = run(main())
    assert got == [urls[1]] * 4
    assert alive == {urls[0]: False, urls[1]: True}  # no /health answer: stays out


def test_dead_server_recovers_when_health_answers_again() -> None:
    port = free_port()

    async def main():
        server = await HealthServer(port).start()
        async with VLLMClient() as client:
            pool = ServerPool([server.url], client, wait_timeout_s=60)
            await server.stop()
            await pool.mark_dead(server.url, "connection refused")
            waiter = asyncio.create_task(_lease_once(pool))
            await asyncio.sleep(1.5)
            blocked = not waiter.done()  # every server is out: lease() must wait
            alive_while_down = pool.alive[server.url]
            await server.start()  # same port: the probe's /health now answers
            try:
                url = await asyncio.wait_for(waiter, 60)  # a hang guard, not a timing check
            finally:
                await server.stop()
                await pool.close()
            return blocked, alive_while_down, url, pool.alive[server.url]

    blocked, alive_while_down, url, alive_after = run(main())
    assert blocked and alive_while_down is False
    assert url == f"http://127.0.0.1:{port}" and alive_after is True


async def _lease_once(pool: ServerPool) -> str:
    async with pool.lease() as url:
        return url


def test_no_server_available_after_the_bound() -> None:
    url = dead_url()

    async def main():
        async with VLLMClient() as client:
            pool = ServerPool([url], client, wait_timeout_s=0.5)
            await pool.mark_dead(url, "connection refused")
            try:
                with pytest.raises(NoServerAvailable) as info:
                    await _lease_once(pool)
            finally:
                await pool.close()
            return str(info.value), pool.total_in_flight()

    message, in_flight = run(main())
    assert url in message and "0s" in message
    assert in_flight == 0


def test_empty_url_list_is_a_config_error() -> None:
    async def main():
        async with VLLMClient() as client:
            ServerPool([], client)

    with pytest.raises(ValueError, match="server.urls"):
        run(main())


def test_request_fails_over_from_a_dead_engine() -> None:
    """A server whose engine died (503 on /health and on requests) is taken out and the
    prompt is served by the other one."""

    async def main():
        sick = await HealthServer(free_port(), health_status=503, complete_status=503).start()
        well = await HealthServer(free_port()).start()
        try:
            async with VLLMClient(timeout_s=10) as client:
                pool = ServerPool([sick.url, well.url], client)  # ties go to the first
                req = SampleRequest(Prompt("p0", "q", "a"), "q", [1, 2])
                outs, v0, v1, _, url = await request_group(pool, "policy", req, 2, {}, 3)
                # while it is out, new leases avoid it
                second = await request_group(pool, "policy", req, 2, {}, 3)
                await pool.close()
                return outs, url, second[4], dict(pool.alive), sick.completions, sick, well
        finally:
            await sick.stop()
            await well.stop()

    outs, url, second_url, alive, sick_hits, sick, well = run(main())
    assert sick_hits == 1
    assert url == well.url and second_url == well.url
    assert alive == {sick.url: False, well.url: True}
    assert [o.token_ids for o in outs] == [[5, 6], [5, 6]]
