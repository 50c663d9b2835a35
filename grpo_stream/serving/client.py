"""The one HTTP client for stock vLLM servers: OpenAI routes and the dev-mode RL routes.

Everything in grpo-stream that talks to vLLM goes through this module: the generator
(completions, /weight_info, /metrics, health), the weight syncs (/pause, /collective_rpc,
the NCCL transfer routes, /resume, LoRA adapter loading), the launcher (`serving.server`: waiting for a started
server) and the tests' and tools' `get_json`/`post_json`. It sits below generator/, sync/
and the rest of serving/.

    async with VLLMClient(timeout_s=300) as client:       # one aiohttp session per process
        await client.wait_healthy(urls, timeout_s=300, need="any")
        outs = await client.complete(url, model, prompt_ids, n=8, sampling={...})
    BlockingClient(timeout_s=60).wait_healthy([url], 300)   # the same, for synchronous code
    status, body = get_json(url + "/weight_info")           # tools and tests: never raises on 4xx

Every error names the server URL: `ServerHTTPError` (status and body), `ServerResponseError`
(the answer breaks the protocol), `ServerConnectionError` (refused, cut, or no answer by
the call's deadline), `ServerUnavailable` (no /health in time). `is_transient` picks the
ones worth another try (connection errors, 5xx, 429). Every call has a deadline
(`timeout_s`); idempotent calls retry transient errors `retries` times with jittered
exponential backoff (`Backoff`), and `CancelledError` always propagates. The API key is
passed in (`api_key`, from `cfg.server.resolved_api_key()`) and sent as
`Authorization: Bearer KEY`; the client never reads it from the environment. The errors
live in `serving/errors.py` and the answers' parsers in `serving/responses.py` (pure, no
HTTP); both are re-exported here.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from grpo_stream.serving.errors import (
    TRANSIENT_ERRORS,
    ServerConnectionError,
    ServerHTTPError,
    ServerResponseError,
    ServerUnavailable,
    VLLMError,
    is_transient,
)
from grpo_stream.serving.responses import (
    Completion,
    field,
    parse_classify,
    parse_completions,
    parse_prometheus,
)

__all__ = [
    "Completion",
    "ServerConnectionError",
    "ServerHTTPError",
    "ServerResponseError",
    "ServerUnavailable",
    "VLLMError",
    "is_transient",
    "parse_classify",
    "parse_completions",
    "parse_prometheus",
]

API_KEY_ENV = "VLLM_API_KEY"  # what vLLM's server reads for --api-key (serving.server sets it)


def endpoint(url: str, path: str) -> str:
    """`url` (a server base URL, trailing slash or not) joined with `path` ("/health")."""
    return url.rstrip("/") + path


@dataclass
class Backoff:
    """Exponential delays start, 2·start, ... capped at `cap`; jittered to ×[1, 2)."""

    start: float = 0.5
    cap: float = 10.0
    jitter: bool = True

    def __post_init__(self) -> None:
        self._delay = self.start

    def next(self) -> float:
        d, self._delay = self._delay, min(self._delay * 2, self.cap)
        return d * (1 + random.random()) if self.jitter else d


def _decode(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return text


class VLLMClient:
    """Async client; one per process (one `aiohttp.ClientSession`), used as `async with`."""

    def __init__(
        self,
        timeout_s: float = 300.0,
        max_connections: int = 64,
        *,
        retries: int = 2,
        backoff_s: float = 0.5,
        api_key: str | None = None,
    ):
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._max_connections = max_connections
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> VLLMClient:
        conn = aiohttp.TCPConnector(limit=self._max_connections)
        self._session = aiohttp.ClientSession(connector=conn, headers=self._headers)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("VLLMClient used outside `async with`")
        return self._session

    async def raw(
        self, method: str, url: str, timeout_s: float | None = None, **kw: Any
    ) -> tuple[int, str]:
        """One request to the full `url`: (status, body text). Raises only when no
        complete answer arrives by the deadline (`ServerConnectionError`)."""
        deadline = timeout_s or self.timeout_s
        timeout = aiohttp.ClientTimeout(total=deadline)
        try:
            async with self.session.request(method, url, timeout=timeout, **kw) as resp:
                return resp.status, await resp.text()
        except TimeoutError as e:
            raise ServerConnectionError(f"no answer to {method} within {deadline:g}s", url) from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise ServerConnectionError(f"{method} failed: {type(e).__name__}: {e}", url) from e

    async def request(
        self, method: str, url: str, path: str, *, retries: int = 0, **kw: Any
    ) -> Any:
        """`method` `url+path`; the parsed JSON answer (None when empty). Transient errors
        are retried `retries` times with backoff; an HTTP error status raises."""
        full, backoff = endpoint(url, path), Backoff(self.backoff_s)
        for attempt in range(retries + 1):
            try:
                status, text = await self.raw(method, full, **kw)
                if status >= 400:
                    raise ServerHTTPError(full, status, text)
                break
            except TRANSIENT_ERRORS as err:  # CancelledError is no Exception: it propagates
                if attempt == retries or not is_transient(err):
                    raise
            await asyncio.sleep(backoff.next())
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError as e:
            raise ServerResponseError(f"response is not JSON ({e}): {text[:200]}", full) from None

    async def complete(
        self, url: str, model: str, prompt_ids: list[int], n: int, sampling: dict[str, Any]
    ) -> list[Completion]:
        """n samples for one token-id prompt; not retried here (the caller picks a server)."""
        payload = {"model": model, "prompt": prompt_ids, "n": n, "logprobs": 0,
                   "return_token_ids": True, "return_tokens_as_token_ids": True, **sampling}  # fmt: skip
        body = await self.request("POST", url, "/v1/completions", json=payload)
        try:
            return parse_completions(body, n)
        except ServerResponseError as e:
            raise ServerResponseError(str(e), endpoint(url, "/v1/completions")) from None

    async def health_reason(self, url: str, timeout_s: float = 5.0) -> str | None:
        """None when GET /health answers 200, else a short reason."""
        try:
            await self.request("GET", url, "/health", timeout_s=timeout_s)
        except (ServerHTTPError, ServerConnectionError, ServerResponseError) as e:
            return f"HTTP {e.status}" if isinstance(e, ServerHTTPError) else e.reason
        return None

    async def health(self, url: str, timeout_s: float = 5.0) -> bool:
        return await self.health_reason(url, timeout_s) is None

    async def wait_healthy(
        self,
        urls: Sequence[str],
        timeout_s: float,
        *,
        need: Literal["all", "any"] = "all",
        poll_s: float = 0.5,
        check: Callable[[], None] | None = None,
        hint: str = "start one with `grpo-stream serve` or fix server.urls",
    ) -> list[str]:
        """Poll /health until all (or any) of `urls` answer 200; returns the healthy ones.
        `check()` runs before every poll and may raise (e.g. the server process exited).
        Raises `ServerUnavailable` naming every server and its last answer at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            if check is not None:
                check()
            left = max(0.1, min(5.0, deadline - time.monotonic()))
            reasons = await asyncio.gather(*(self.health_reason(u, left) for u in urls))
            healthy = [u for u, r in zip(urls, reasons, strict=True) if r is None]
            if healthy and (need == "any" or len(healthy) == len(urls)):
                return healthy
            if time.monotonic() + poll_s > deadline:
                last = "; ".join(
                    r if len(urls) == 1 else f"{u}: {r}"
                    for u, r in zip(urls, reasons, strict=True)
                    if r
                )
                who = f"vLLM server at {urls[0]}" if len(urls) == 1 else f"vLLM servers ({need})"
                raise ServerUnavailable(
                    f"{who} did not answer /health within {timeout_s:g}s (last: {last}); {hint}"
                )
            await asyncio.sleep(poll_s)

    async def weight_version(self, url: str) -> int:
        where = endpoint(url, "/weight_info")
        body = await self.request("GET", url, "/weight_info", timeout_s=min(30.0, self.timeout_s))
        v = field(body, "weight_version", where, (str, int, type(None)))
        if v is None or v == "default":  # a server that never had an update serves version 0
            return 0
        try:
            return int(v)
        except ValueError:
            raise ServerResponseError(f"weight_version {v!r} is not an int", where) from None

    async def world_size(self, url: str) -> int:
        """Inference workers behind one server (TP × PP × DP), from GET /get_world_size."""
        body = await self.request("GET", url, "/get_world_size", retries=self.retries)
        n = field(body, "world_size", endpoint(url, "/get_world_size"), int)
        if n < 1:
            raise ServerResponseError(f"world_size {n} is not positive", url)
        return n

    async def post(self, url: str, path: str, body: Any = None, **kw: Any) -> Any:
        """An admin POST (dev-mode RL routes); `retries=` only for idempotent routes."""
        return await self.request("POST", url, path, json=body, **kw)

    async def pause(self, url: str, mode: str) -> None:
        await self.request("POST", url, "/pause", params={"mode": mode}, retries=self.retries)

    async def resume(self, url: str) -> None:
        await self.request("POST", url, "/resume", retries=self.retries)

    async def collective_rpc(self, url: str, method: str, kwargs: dict, timeout_s: float) -> Any:
        payload = {"method": method, "kwargs": kwargs}
        return await self.post(url, "/collective_rpc", payload, timeout_s=timeout_s)

    async def set_weight_version(self, url: str, version: int) -> None:
        body = {"new_version": str(version)}
        await self.post(url, "/update_weight_version", body, retries=self.retries)

    async def reset_prefix_cache(self, url: str) -> None:
        await self.post(url, "/reset_prefix_cache", retries=self.retries)

    async def load_lora_adapter(self, url: str, name: str, path: str, timeout_s: float) -> None:
        """POST /v1/load_lora_adapter: the adapter folder `path` served as model `name`
        (vLLM answers plain text, not JSON; an existing name is refused with 400)."""
        await self._lora_call(url, "/v1/load_lora_adapter",
                              {"lora_name": name, "lora_path": path}, timeout_s)  # fmt: skip

    async def unload_lora_adapter(self, url: str, name: str) -> bool:
        """POST /v1/unload_lora_adapter; False when the server holds no adapter `name`."""
        try:
            await self._lora_call(url, "/v1/unload_lora_adapter", {"lora_name": name}, None)
        except ServerHTTPError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def _lora_call(self, url: str, path: str, body: dict, timeout_s: float | None) -> None:
        full = endpoint(url, path)
        status, text = await self.raw("POST", full, timeout_s=timeout_s, json=body)
        if status >= 400:
            raise ServerHTTPError(full, status, text)

    async def served_models(self, url: str) -> list[str]:
        """The model names a server answers to (GET /v1/models): the base, and adapters."""
        body = await self.request("GET", url, "/v1/models", retries=self.retries)
        data = field(body, "data", endpoint(url, "/v1/models"), list)
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    async def metrics(self, url: str) -> dict[str, float]:
        """Prometheus text from /metrics, reduced to {name: summed value}."""
        status, text = await self.raw(
            "GET", endpoint(url, "/metrics"), timeout_s=min(30.0, self.timeout_s)
        )
        if status >= 400:
            raise ServerHTTPError(endpoint(url, "/metrics"), status, text)
        return parse_prometheus(text)

    async def classify(
        self,
        url: str,
        model: str,
        token_ids_batch: list[list[int]],
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> list[float]:
        """The raw logit of a one-label classifier for each token-id input (vLLM's
        pooling runner, POST /classify). `use_activation: false` turns off the sigmoid vLLM
        applies by default; `add_special_tokens: false` because the inputs are already
        rendered. The route is idempotent, so transient errors are retried."""
        payload = {"model": model, "input": token_ids_batch, "use_activation": False,
                   "add_special_tokens": False}  # fmt: skip
        retries = self.retries if retries is None else retries
        body = await self.request(
            "POST", url, "/classify", json=payload, timeout_s=timeout_s, retries=retries
        )
        return parse_classify(body, len(token_ids_batch), endpoint(url, "/classify"))


class BlockingClient:
    """The synchronous façade (the launcher, the CLI, vLLM's weight-transfer threads): each
    call runs the async client on a fresh event loop, so it shares its errors, retries,
    deadlines and API key. Not for use inside a running event loop."""

    def __init__(self, timeout_s: float = 60.0, *, retries: int = 2, api_key: str | None = None):
        self.timeout_s, self.retries, self.api_key = timeout_s, retries, api_key

    def call(self, fn: Callable[[VLLMClient], Any]) -> Any:
        """`fn(client)` (a coroutine) on a fresh loop with a fresh `VLLMClient`."""

        async def main() -> Any:
            async with VLLMClient(
                self.timeout_s, 4, retries=self.retries, api_key=self.api_key
            ) as c:
                return await fn(c)

        return asyncio.run(main())

    def wait_healthy(self, urls: Sequence[str], timeout_s: float, **kw: Any) -> list[str]:
        return self.call(lambda c: c.wait_healthy(list(urls), timeout_s, **kw))

    def post(self, url: str, path: str, body: Any = None, **kw: Any) -> Any:
        return self.call(lambda c: c.post(url, path, body, **kw))

    def world_size(self, url: str) -> int:
        return self.call(lambda c: c.world_size(url))

    def raw_json(self, method: str, url: str, body: Any, timeout_s: float) -> tuple[int, Any]:
        kw = {} if body is None else {"json": body}
        status, text = self.call(lambda c: c.raw(method, url, timeout_s=timeout_s, **kw))
        return status, _decode(text)


def wait_for_server(url: str, timeout_s: float, poll_s: float = 0.5, check=None) -> None:
    """Block until GET {url}/health answers 200, or raise ServerUnavailable after timeout_s."""
    BlockingClient().wait_healthy([url], timeout_s, poll_s=poll_s, check=check)


def post_json(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, object]:
    """POST JSON (or nothing) to a full URL: (status, parsed body or text). Tools and tests."""
    return BlockingClient().raw_json("POST", url, body, timeout)


def get_json(url: str, timeout: float = 30.0) -> tuple[int, object]:
    """GET a full URL: (status, parsed body or text). Tools and tests."""
    return BlockingClient().raw_json("GET", url, None, timeout)
