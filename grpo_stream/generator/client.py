"""aiohttp client for stock vLLM OpenAI servers (dev mode).

One `VLLMClient` per process wraps one `aiohttp.ClientSession`. It sends
`/v1/completions` with the prompt as token ids and `n=G`, and parses the response
into `Completion` records (sampled token ids + the behaviour log-probs that vLLM
computed while sampling). Every field is validated: a malformed or truncated answer
raises `ServerResponseError` naming the field, never an IndexError deep inside.
The RL control routes (`/pause`, `/resume`, `/collective_rpc`, `/weight_info`,
`/update_weight_version`) live here too, so the learner's weight sync shares them.

    async with VLLMClient(timeout_s=300) as client:
        outs = await client.complete(url, model, prompt_ids, n=8, sampling=dict(...))
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import aiohttp


class ServerResponseError(RuntimeError):
    """The server answered, but not with what the protocol promises."""


class ServerHTTPError(RuntimeError):
    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{url} answered HTTP {status}: {body[:500]}")
        self.url, self.status, self.body = url, status, body


# Errors worth a retry on the same or another server: connection trouble, time-outs,
# and 5xx (vLLM answers 503 while paused in abort/wait mode).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    asyncio.TimeoutError,
)


def is_transient(err: BaseException) -> bool:
    if isinstance(err, ServerHTTPError):
        return err.status >= 500 or err.status == 429
    return isinstance(err, TRANSIENT_ERRORS)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


def _field(obj: Any, key: str, where: str, typ: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ServerResponseError(f"{where}: missing field '{key}'")
    val = obj[key]
    if not isinstance(val, typ):
        raise ServerResponseError(f"{where}.{key}: expected {typ}, got {type(val).__name__}")
    return val


def parse_choice(choice: Any, where: str) -> Completion:
    token_ids = _field(choice, "token_ids", where, list)
    lp = _field(choice, "logprobs", where, dict)
    logprobs = _field(lp, "token_logprobs", f"{where}.logprobs", list)
    if len(logprobs) != len(token_ids):
        raise ServerResponseError(
            f"{where}: {len(token_ids)} token_ids but {len(logprobs)} logprobs.token_logprobs"
        )
    for i, (t, x) in enumerate(zip(token_ids, logprobs, strict=True)):
        if not isinstance(t, int) or isinstance(t, bool):
            raise ServerResponseError(f"{where}.token_ids[{i}]: not an int ({t!r})")
        if not isinstance(x, int | float) or not math.isfinite(x) or x > 1e-4:
            raise ServerResponseError(f"{where}.logprobs.token_logprobs[{i}]: bad value {x!r}")
    text = choice.get("text", "")
    finish = choice.get("finish_reason") or ""
    return Completion(list(token_ids), [float(x) for x in logprobs], str(text), str(finish))


def parse_completions(body: Any, n: int) -> list[Completion]:
    choices = _field(body, "choices", "response", list)
    if len(choices) != n:
        raise ServerResponseError(f"response.choices: expected {n} choices, got {len(choices)}")
    ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    return [parse_choice(c, f"response.choices[{i}]") for i, c in enumerate(ordered)]


class VLLMClient:
    def __init__(self, timeout_s: float = 300.0, max_connections: int = 64):
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> VLLMClient:
        conn = aiohttp.TCPConnector(limit=self._max_connections)
        self._session = aiohttp.ClientSession(timeout=self._timeout, connector=conn)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("VLLMClient used outside `async with`")
        return self._session

    async def _request(self, method: str, url: str, timeout_s: float | None = None, **kw) -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        async with self.session.request(method, url, timeout=timeout, **kw) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ServerHTTPError(url, resp.status, text)
            if not text:
                return None
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ServerResponseError(
                    f"{url}: response is not JSON ({e}): {text[:200]}"
                ) from None

    async def complete(
        self, url: str, model: str, prompt_ids: list[int], n: int, sampling: dict[str, Any]
    ) -> list[Completion]:
        payload = {
            "model": model,
            "prompt": prompt_ids,
            "n": n,
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            **sampling,
        }
        body = await self._request("POST", f"{url}/v1/completions", json=payload)
        return parse_completions(body, n)

    async def health(self, url: str, timeout_s: float = 5.0) -> bool:
        try:
            await self._request("GET", f"{url}/health", timeout_s=timeout_s)
            return True
        except (ServerHTTPError, ServerResponseError, *TRANSIENT_ERRORS):
            return False

    async def weight_version(self, url: str) -> int:
        body = await self._request("GET", f"{url}/weight_info", timeout_s=30)
        v = _field(body, "weight_version", f"{url}/weight_info", (str, int, type(None)))
        if v is None or v == "default":  # a server that never had an update serves version 0
            return 0
        try:
            return int(v)
        except ValueError:
            raise ServerResponseError(
                f"{url}/weight_info: weight_version {v!r} is not an int"
            ) from None

    async def pause(self, url: str, mode: str) -> None:
        await self._request("POST", f"{url}/pause", params={"mode": mode})

    async def resume(self, url: str) -> None:
        await self._request("POST", f"{url}/resume")

    async def collective_rpc(self, url: str, method: str, kwargs: dict, timeout_s: float) -> Any:
        payload = {"method": method, "kwargs": kwargs}
        return await self._request(
            "POST", f"{url}/collective_rpc", json=payload, timeout_s=timeout_s
        )

    async def set_weight_version(self, url: str, version: int) -> None:
        await self._request(
            "POST", f"{url}/update_weight_version", json={"new_version": str(version)}
        )

    async def reset_prefix_cache(self, url: str) -> None:
        await self._request("POST", f"{url}/reset_prefix_cache")

    async def metrics(self, url: str) -> dict[str, float]:
        """Prometheus text from /metrics, reduced to {name: summed value}."""
        async with self.session.get(f"{url}/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out
