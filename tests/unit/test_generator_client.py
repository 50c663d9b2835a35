"""The vLLM client and the sampler against bad responses, from a real local HTTP server.

`fake_vllm.CannedServer` (aiohttp.web on 127.0.0.1) answers each route from a script of
canned replies (status, body). It does not stand in for vLLM's behaviour (the
integration tests use a real vLLM server); it checks how `VLLMClient`,
`parse_completions` and `request_group` handle answers a server or a proxy might send:
malformed or truncated JSON, missing fields, length mismatches, non-finite log-probs,
wrong choice counts, HTTP errors that must not be retried and ones that must.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from aiohttp import web
from fake_vllm import CannedServer

from grpo_stream.generator.pool import ServerPool
from grpo_stream.generator.sampler import PromptFailed, SampleRequest, request_group
from grpo_stream.serving.client import (
    ServerHTTPError,
    ServerResponseError,
    VLLMClient,
    is_transient,
)
from grpo_stream.tasks import Prompt


def choice(i: int, ids: list[int], lps: list[float]) -> dict[str, Any]:
    return {
        "index": i,
        "text": f"text{i}",
        "token_ids": ids,
        "prompt_token_ids": [1, 2, 3],
        "logprobs": {"token_logprobs": lps, "tokens": [f"token_id:{t}" for t in ids]},
        "finish_reason": "length",
    }


def good_body(n: int = 2) -> dict[str, Any]:
    return {"choices": [choice(i, [10 + i, 20 + i, 30 + i], [-0.5, -1.25, -2.0]) for i in range(n)]}


def dumps(body: Any) -> str:
    return json.dumps(body)  # allow_nan: Python writes NaN/Infinity, as a buggy server might


def run(coro):
    return asyncio.run(coro)


async def complete(server: CannedServer, n: int = 2):
    async with VLLMClient(timeout_s=10) as client:
        return await client.complete(server.url, "policy", [1, 2, 3], n, {"max_tokens": 3})


def test_good_response_parsed_in_index_order() -> None:
    async def main():
        async with CannedServer() as srv:
            body = good_body(3)
            body["choices"].reverse()  # the protocol orders by "index", not position
            srv.script["/v1/completions"] = [(200, dumps(body))]
            outs = await complete(srv, n=3)
            return outs, srv.requests[0]

    outs, sent = run(main())
    assert [o.token_ids for o in outs] == [[10, 20, 30], [11, 21, 31], [12, 22, 32]]
    assert [o.text for o in outs] == ["text0", "text1", "text2"]
    assert outs[0].logprobs == [-0.5, -1.25, -2.0]
    assert outs[0].finish_reason == "length"
    # what the client asks for: token ids in and out, behaviour log-probs, n samples
    assert sent["prompt"] == [1, 2, 3] and sent["n"] == 3 and sent["logprobs"] == 0
    assert sent["return_token_ids"] is True and sent["max_tokens"] == 3


def _bad(mutate) -> str:
    body = good_body(2)
    mutate(body)
    return dumps(body)


BAD_BODIES = {
    "malformed_json": ("{choices: [oops]}", "not JSON"),
    "truncated_json": (dumps(good_body(2))[:57], "not JSON"),
    "not_an_object": ("[1, 2, 3]", "missing field 'choices'"),
    "no_choices": (dumps({"id": "cmpl-1"}), "missing field 'choices'"),
    "missing_token_ids": (
        _bad(lambda b: b["choices"][1].pop("token_ids")),
        "response.choices[1]: missing field 'token_ids'",
    ),
    "logprobs_null": (
        _bad(lambda b: b["choices"][0].update(logprobs=None)),
        "response.choices[0].logprobs: expected",
    ),
    "logprobs_length_mismatch": (
        _bad(lambda b: b["choices"][0]["logprobs"]["token_logprobs"].pop()),
        "3 token_ids but 2 logprobs.token_logprobs",
    ),
    "nan_logprob": (
        _bad(lambda b: b["choices"][1]["logprobs"]["token_logprobs"].__setitem__(2, math.nan)),
        "response.choices[1].logprobs.token_logprobs[2]: bad value nan",
    ),
    "minus_inf_logprob": (
        _bad(lambda b: b["choices"][0]["logprobs"]["token_logprobs"].__setitem__(0, -math.inf)),
        "token_logprobs[0]: bad value -inf",
    ),
    "positive_logprob": (
        _bad(lambda b: b["choices"][0]["logprobs"]["token_logprobs"].__setitem__(1, 0.7)),
        "token_logprobs[1]: bad value 0.7",
    ),
    "string_token_id": (
        _bad(lambda b: b["choices"][0]["token_ids"].__setitem__(0, "10")),
        "response.choices[0].token_ids[0]: not an int",
    ),
    "too_few_choices": (_bad(lambda b: b["choices"].pop()), "expected 2 choices, got 1"),
    "too_many_choices": (
        _bad(lambda b: b["choices"].append(choice(2, [1], [-1.0]))),
        "expected 2 choices, got 3",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_response_raises_naming_the_field(case: str) -> None:
    body, expected = BAD_BODIES[case]

    async def main():
        async with CannedServer() as srv:
            srv.script["/v1/completions"] = [(200, body)]
            with pytest.raises(ServerResponseError) as info:
                await complete(srv)
            return str(info.value)

    message = run(main())
    assert expected in message
    assert not is_transient(ServerResponseError(message))


def _request(prompt_id: str = "p0") -> SampleRequest:
    return SampleRequest(Prompt(prompt_id, "What is 1+1?", "2"), "What is 1+1?", [1, 2, 3])


async def _group(urls: list[str], max_retries: int, wait_timeout_s: float = 30.0):
    async with VLLMClient(timeout_s=10) as client:
        pool = ServerPool(urls, client, wait_timeout_s=wait_timeout_s)
        try:
            result = await request_group(pool, "policy", _request(), 2, {}, max_retries)
            return result, dict(pool.alive)
        finally:
            await pool.close()


VERSION = [(200, dumps({"weight_version": "default"}))]


def test_http_400_is_not_retried_and_names_the_server_message() -> None:
    msg = "n must be 1 when using greedy sampling, got 2."
    err = {"error": {"message": msg, "type": "BadRequestError", "param": None, "code": 400}}

    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            srv.script["/v1/completions"] = [(400, dumps(err)), (200, dumps(good_body()))]
            with pytest.raises(PromptFailed) as info:
                await _group([srv.url], max_retries=3)
            return str(info.value), srv.hits["/v1/completions"]

    message, hits = run(main())
    assert hits == 1  # a 4xx is the request's fault: another try would fail the same way
    assert "HTTP 400" in message and msg in message and "prompt p0" in message


def test_bad_body_fails_the_prompt_without_retry() -> None:
    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            srv.script["/v1/completions"] = [(200, "{trunc"), (200, dumps(good_body()))]
            with pytest.raises(PromptFailed, match="not JSON"):
                await _group([srv.url], max_retries=3)
            return srv.hits["/v1/completions"]

    assert run(main()) == 1


def test_http_503_is_retried_then_succeeds() -> None:
    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            busy = (503, dumps({"error": {"message": "paused"}}))
            srv.script["/v1/completions"] = [busy, busy, (200, dumps(good_body()))]
            result, alive = await _group([srv.url], max_retries=3)
            return result, alive, srv.url, srv.hits["/v1/completions"]

    (outs, v0, v1, latency, url), alive, srv_url, hits = run(main())
    assert hits == 3
    assert [o.token_ids for o in outs] == [[10, 20, 30], [11, 21, 31]]
    assert (v0, v1) == (0, 0) and latency >= 0 and url == srv_url
    assert alive == {srv_url: True}  # /health answered: a busy server is not taken out


def _cut_body(n: int = 2) -> dict[str, Any]:
    """What vLLM answers for requests a `/pause?mode=abort` cut: the partial outputs."""
    body = {"choices": [choice(i, [10 + i], [-0.5]) for i in range(n)]}
    body["choices"][1]["finish_reason"] = "abort"
    return body


def test_a_group_cut_by_a_syncs_abort_is_sampled_again() -> None:
    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            srv.script["/v1/completions"] = [(200, dumps(_cut_body())), (200, dumps(good_body()))]
            result, _ = await _group([srv.url], max_retries=3)
            return result[0], srv.hits["/v1/completions"]

    outs, hits = run(main())
    assert hits == 2  # the cut answer is not scored: the group is sampled again
    assert [o.token_ids for o in outs] == [[10, 20, 30], [11, 21, 31]]
    assert [o.finish_reason for o in outs] == ["length", "length"]


def test_a_group_cut_more_than_max_retries_times_is_kept_as_cut() -> None:
    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            srv.script["/v1/completions"] = [(200, dumps(_cut_body()))]  # always cut
            result, _ = await _group([srv.url], max_retries=2)
            return result[0], srv.hits["/v1/completions"]

    outs, hits = run(main())
    assert hits == 3  # the first answer and 2 resamples, then the bound
    assert [o.finish_reason for o in outs] == ["length", "abort"]


def test_connection_cut_mid_body_is_retried() -> None:
    full = dumps(good_body()).encode()

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = len(full)
        await resp.prepare(request)
        await resp.write(full[: len(full) // 2])
        request.transport.close()  # the peer vanishes half-way through the body
        return resp

    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            srv.script["/v1/completions"] = [cut, (200, dumps(good_body()))]
            result, _ = await _group([srv.url], max_retries=2)
            return result[0], srv.hits["/v1/completions"]

    outs, hits = run(main())
    assert hits == 2
    assert [o.logprobs for o in outs] == [[-0.5, -1.25, -2.0]] * 2


def test_retries_exhausted_raise_prompt_failed() -> None:
    async def main():
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            srv.script["/v1/completions"] = [(503, "busy")]
            with pytest.raises(PromptFailed) as info:
                await _group([srv.url], max_retries=2)
            return str(info.value), srv.hits["/v1/completions"]

    message, hits = run(main())
    assert hits == 3
    assert "3 attempts failed" in message and "503" in message


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("default", 0), (None, 0), ("0", 0), ("7", 7), (12, 12)],
)
def test_weight_version(answer: Any, expected: int) -> None:
    async def main():
        async with CannedServer() as srv, VLLMClient(timeout_s=10) as client:
            srv.script["/weight_info"] = [(200, dumps({"weight_version": answer}))]
            return await client.weight_version(srv.url)

    assert run(main()) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (dumps({"weight_version": "v2"}), "weight_version 'v2' is not an int"),
        (dumps({"version": 3}), "missing field 'weight_version'"),
        (dumps({"weight_version": [1]}), "weight_info.weight_version: expected"),
    ],
)
def test_weight_version_bad_answer(body: str, expected: str) -> None:
    async def main():
        async with CannedServer() as srv, VLLMClient(timeout_s=10) as client:
            srv.script["/weight_info"] = [(200, body)]
            with pytest.raises(ServerResponseError) as info:
                await client.weight_version(srv.url)
            return str(info.value)

    assert expected in run(main())


def test_health_and_http_errors() -> None:
    async def main():
        async with CannedServer() as srv, VLLMClient(timeout_s=10) as client:
            ok = await client.health(srv.url)
            srv.script["/health"] = [(503, "engine dead")]
            dead = await client.health(srv.url)
            srv.script["/pause"] = [(500, "boom")]
            with pytest.raises(ServerHTTPError) as info:
                await client.pause(srv.url, "wait")
            return ok, dead, info.value

    ok, dead, err = run(main())
    assert ok is True and dead is False
    assert err.status == 500 and err.body == "boom" and is_transient(err)
    assert not is_transient(ServerHTTPError("u", 404, "")) and is_transient(
        ServerHTTPError("u", 429, "")
    )


def test_retry_budget_outlasts_a_long_pause() -> None:
    """Seven 503s (a long weight sync) exhaust max_retries=1 but not a 30 s time budget
    (they take ~2 s); with no time budget the same server fails the prompt after 2
    attempts."""

    async def main(budget: float):
        async with CannedServer() as srv:
            srv.script["/weight_info"] = VERSION
            busy = (503, dumps({"error": {"message": "paused"}}))
            srv.script["/v1/completions"] = [busy] * 7 + [(200, dumps(good_body()))]
            async with VLLMClient(timeout_s=10) as client:
                pool = ServerPool([srv.url], client, wait_timeout_s=30)
                try:
                    args = (pool, "policy", _request(), 2, {}, 1, budget)
                    return await request_group(*args, backoff_s=0.01)
                finally:
                    await pool.close()

    outs, *_ = run(main(30.0))
    assert [o.token_ids for o in outs] == [[10, 20, 30], [11, 21, 31]]
    with pytest.raises(PromptFailed, match=r"2 attempts failed in .*retry_budget_s=0"):
        run(main(0.0))
