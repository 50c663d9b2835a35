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


def test_version_0_waits_for_the_first_batch_in_the_buffer(tmp_path):
    """The base model's evaluation waits until learner.batch_groups groups are sampled,
    so it never competes with the first batch; later and final versions never wait."""
    from types import SimpleNamespace

    from bench.synth import make_group
    from grpo_stream.buffer.store import open_writer
    from grpo_stream.config import load_config

    cfg = load_config(None, ["learner.batch_groups=2"])
    me = SimpleNamespace(cfg=cfg, buffer_path=str(tmp_path / "buf"), _reader=None)
    me._first_batch_in = lambda: Follower._first_batch_in(me)
    holds = lambda v, final=False: Follower._holds(me, v, final)  # noqa: E731
    assert holds(0)  # no buffer yet
    assert not holds(0, final=True) and not holds(4)
    w = open_writer(me.buffer_path, run_id="r")
    w.append_groups([make_group(0)])
    assert holds(0)  # one group of the batch's two
    w.append_groups([make_group(1)])
    assert not holds(0)
    me._reader.close()
