"""The one vLLM client: retries, deadlines, cancellation, API key, health waits, errors.

Against `fake_vllm.CannedServer` (a real HTTP server on 127.0.0.1 answering from a
script) and against ports where nothing listens. The blocking façade is driven from a
worker thread while the fake server runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from conftest import free_port
from fake_vllm import CannedServer

from grpo_stream.core.errors import UserError
from grpo_stream.serving.client import (
    API_KEY_ENV,
    Backoff,
    BlockingClient,
    ServerConnectionError,
    ServerHTTPError,
    ServerUnavailable,
    VLLMClient,
    get_json,
    is_transient,
    post_json,
    wait_for_server,
)


def run(coro):
    return asyncio.run(coro)


def test_admin_call_retries_transient_errors_then_succeeds() -> None:
    async def main():
        async with CannedServer() as srv, VLLMClient(10, retries=2, backoff_s=0.01) as c:
            srv.script["/pause"] = [(503, "busy"), (500, "hiccup"), (200, '{"status":"paused"}')]
            await c.pause(srv.url, "wait")
            return srv.hits["/pause"], srv.calls[-1].query

    hits, query = run(main())
    assert hits == 3 and query == {"mode": "wait"}


def test_retries_are_bounded_and_4xx_is_not_retried() -> None:
    async def main():
        async with CannedServer() as srv, VLLMClient(10, retries=2, backoff_s=0.01) as c:
            srv.script["/resume"] = [(503, "busy")]
            srv.script["/reset_prefix_cache"] = [(404, "not in dev mode")]
            with pytest.raises(ServerHTTPError) as busy:
                await c.resume(srv.url)
            with pytest.raises(ServerHTTPError) as missing:
                await c.reset_prefix_cache(srv.url)
            return srv.hits, busy.value, missing.value, srv.url

    hits, busy, missing, url = run(main())
    assert hits["/resume"] == 3 and hits["/reset_prefix_cache"] == 1
    assert busy.status == 503 and str(busy).startswith(f"{url}/resume: answered HTTP 503")
    assert missing.status == 404 and not is_transient(missing)
    assert isinstance(missing, UserError)  # the CLI prints it as one line naming the server


def test_every_call_has_a_deadline_that_names_the_server() -> None:
    async def main():
        release = asyncio.Event()

        async def hang(request: web.Request) -> web.Response:
            await release.wait()  # answers only once the test is over
            return web.Response(text="{}")

        async with CannedServer({"/weight_info": [hang]}) as srv, VLLMClient(0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(ServerConnectionError) as info:
                await c.weight_version(srv.url)
            release.set()
            return time.monotonic() - t0, str(info.value), info.value, srv.url

    took, message, err, url = run(main())
    assert took < 10  # not the handler's 30 s
    assert message == f"{url}/weight_info: no answer to GET within 0.3s"
    assert is_transient(err)


def test_cancellation_propagates_through_retries() -> None:
    """A cancelled call stops at once: CancelledError is never taken for a transient error."""

    async def main():
        async with CannedServer({"/pause": [(503, "busy")]}) as srv:
            async with VLLMClient(10, retries=50, backoff_s=5.0) as c:
                task = asyncio.create_task(c.pause(srv.url, "wait"))
                while srv.hits["/pause"] == 0:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # now in the 5-10 s backoff sleep
                task.cancel()
                t0 = time.monotonic()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return time.monotonic() - t0, srv.hits["/pause"]

    took, hits = run(main())
    assert hits == 1 and took < 1.0


def test_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def main():
        async with VLLMClient(5, retries=1, backoff_s=0.01) as c:
            with pytest.raises(ServerConnectionError) as info:
                await c.set_weight_version(url, 3)
            return info.value

    err = run(main())
    assert str(err).startswith(f"{url}/update_weight_version: POST failed")
    assert err.url == f"{url}/update_weight_version" and is_transient(err)


def test_api_key_header_explicit_never_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    async def auth(**kw) -> str | None:
        async with CannedServer() as srv, VLLMClient(5, **kw) as c:
            await c.health(srv.url)
            return srv.calls[-1].headers.get("Authorization")

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert run(auth()) is None
    assert run(auth(api_key="k1")) == "Bearer k1"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert run(auth()) is None  # the key is passed in from the config, never read from env
    assert run(auth(api_key="k2")) == "Bearer k2"


def test_wait_healthy_any_all_and_the_error() -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def main():
        async with CannedServer() as up, CannedServer({"/health": [(503, "")]}) as sick:
            async with VLLMClient(5) as c:
                anyone = await c.wait_healthy([dead, up.url], 5, need="any", poll_s=0.05)
                with pytest.raises(ServerUnavailable) as info:
                    await c.wait_healthy([up.url, sick.url], 0.3, need="all", poll_s=0.05)
                return anyone, str(info.value), up.url, sick.url

    anyone, message, up, sick = run(main())
    assert anyone == [up]
    assert "did not answer /health within 0.3s" in message
    assert f"{sick}: HTTP 503" in message and f"{up}:" not in message  # only the failing one


def test_wait_healthy_runs_the_check_every_poll() -> None:
    class Died(Exception):
        pass

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Died("process exited")

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Died):
        BlockingClient().wait_healthy([url], 60, poll_s=0.01, check=check)
    assert len(calls) == 3


def test_blocking_facade_get_post_json_and_wait() -> None:
    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = [(200, '{"weight_version": "4"}')]
            srv.script["/resume"] = [(500, "engine dead")]
            srv.script["/update_weight_version"] = [(200, '{"success": true}')]
            got = await asyncio.to_thread(get_json, f"{srv.url}/weight_info")
            failed = await asyncio.to_thread(post_json, f"{srv.url}/resume")
            posted = await asyncio.to_thread(
                post_json, f"{srv.url}/update_weight_version", {"new_version": "5"}
            )
            await asyncio.to_thread(wait_for_server, srv.url, 5)
            return got, failed, posted, srv.requests

    got, failed, posted, bodies = run(main())
    assert got == (200, {"weight_version": "4"})
    assert failed == (500, "engine dead")  # tools see the status, no exception
    assert posted == (200, {"success": True}) and bodies == [{"new_version": "5"}]


def test_backoff_doubles_to_the_cap() -> None:
    b = Backoff(0.5, cap=3.0, jitter=False)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    j = Backoff(1.0, cap=10.0)
    first, second = j.next(), j.next()
    assert 1.0 <= first < 2.0 and 2.0 <= second < 4.0
