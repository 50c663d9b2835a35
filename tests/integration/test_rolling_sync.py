"""Rolling weight sync (`sync.mode = "rolling"`) on two real vLLM CPU servers on the tiny
model: the servers are paused and reloaded one after the other, so at every moment at
least one of them serves; shown with the pause/resume timestamps the sync returns
(`sync_pauses`). `sync.mode = "all"` pauses both at once (their intervals overlap),
which is what the rolling check would catch."""

from __future__ import annotations

import pytest

from grpo_stream.config import ServerConfig, SyncConfig
from grpo_stream.core import metric_names as M
from grpo_stream.serving.client import BlockingClient
from grpo_stream.sync.disk import DiskSync
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_server(tiny_model_dir, tmp_path_factory):
    from grpo_stream.serving.server import VLLMServer

    cfg = ServerConfig(max_model_len=256, startup_timeout_s=600)
    log = tmp_path_factory.mktemp("logs") / "vllm-tiny-2.log"
    with VLLMServer(tiny_model_dir, "policy", free_port(), cfg, log) as srv:
        srv.wait_healthy()
        yield srv


def _push(mode: str, urls: list[str], tiny_model_dir, tmp_path, version: int) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sync = DiskSync(SyncConfig(mode=mode), urls, tmp_path / "weights", rank=0)
    metrics = sync.push(model, version)
    pauses = sorted(metrics[M.SYNC_PAUSES], key=lambda p: p[1])
    assert sorted(p[0] for p in pauses) == sorted(u.rstrip("/") for u in urls)
    assert all(t1 > t0 for _, t0, t1 in pauses)
    for u in urls:
        assert BlockingClient().call(lambda c, u=u: c.weight_version(u)) == version
    return pauses


def test_rolling_sync_keeps_one_server_serving(tiny_server, second_server, tiny_model_dir,
                                               tmp_path):  # fmt: skip
    urls = [tiny_server.url, second_server.url]
    (_, a0, a1), (_, b0, b1) = _push("rolling", urls, tiny_model_dir, tmp_path, 11)
    assert a1 <= b0  # the second pause began after the first server resumed


def test_all_at_once_pauses_both(tiny_server, second_server, tiny_model_dir, tmp_path):
    urls = [tiny_server.url, second_server.url]
    (_, a0, a1), (_, b0, b1) = _push("all", urls, tiny_model_dir, tmp_path, 12)
    assert max(a0, b0) < min(a1, b1)  # a moment when neither served
