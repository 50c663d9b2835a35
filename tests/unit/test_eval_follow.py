"""The evaluator keeps watching while a server is down or the servers are mid-sync."""

from __future__ import annotations

import asyncio

import pytest

from grpo_stream.eval.follow import Follower
from grpo_stream.serving.client import ServerConnectionError, ServerResponseError


class Servers:
    """A fault-injection stand-in for the client: fixed versions, or a server down."""

    def __init__(self, versions: dict[str, int | Exception]):
        self.versions = versions

    async def weight_version(self, url: str) -> int:
        v = self.versions[url]
        if isinstance(v, Exception):
            raise v
        return v


def version(versions: dict) -> int | None:
    return asyncio.run(Follower._server_version(None, Servers(versions), list(versions)))


def test_version_only_when_every_server_agrees():
    assert version({"a": 4, "b": 4}) == 4
    assert version({"a": 4, "b": 5}) is None  # mid-sync


def test_a_server_being_restarted_is_waited_for_not_fatal():
    assert version({"a": 4, "b": ServerConnectionError("refused", "b")}) is None


def test_a_broken_answer_is_an_error():
    with pytest.raises(ServerResponseError):
        version({"a": ServerResponseError("weight_version 'x' is not an int", "a")})
