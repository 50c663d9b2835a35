"""A scripted HTTP server on 127.0.0.1 for fault injection against the vLLM client.

It does not stand in for vLLM's behaviour (the integration tests use a real vLLM
server); it answers each route from a script, so a test can make a server send what a
real one sends only when something breaks (a 500 from a failed reload, a cut body, a
hang), and it records every call in order (path, query, JSON body, headers).

    async with CannedServer() as srv:
        srv.script["/collective_rpc"] = [(500, "reload failed")]
        ...
        assert srv.paths() == ["/pause", "/collective_rpc"]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

OK_JSON = (200, "{}")


@dataclass
class Call:
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]


class CannedServer:
    """A real HTTP server on 127.0.0.1 that answers each path from a script of replies.

    `script[path]` is a list of replies used in order; the last one repeats. A reply is
    (status, body text) or an async handler `fn(request) -> web.StreamResponse`. Paths
    without a script answer 404. `/health` answers 200 unless scripted otherwise.
    """

    def __init__(self, script: dict[str, list[Any]] | None = None) -> None:
        self.script: dict[str, list[Any]] = {"/health": [(200, "")], **(script or {})}
        self.hits: Counter[str] = Counter()
        self.requests: list[Any] = []  # the JSON bodies, in order
        self.calls: list[Call] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, skip: tuple[str, ...] = ("/health",)) -> list[str]:
        return [c.path for c in self.calls if c.path not in skip]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        body = await request.json() if request.can_read_body else None
        if body is not None:
            self.requests.append(body)
        self.calls.append(Call(request.path, dict(request.query), body, dict(request.headers)))
        replies = self.script.get(request.path)
        if not replies:
            return web.Response(status=404, text="no such route")
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if callable(reply):
            return await reply(request)
        status, text = reply
        return web.Response(status=status, text=text, content_type="application/json")

    async def __aenter__(self) -> CannedServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
