"""The API key against a REAL vLLM CPU server (the tiny model), launched the way `run`
and `serve` launch it with `server.api_key` set: a completion request without the key
is refused (401), with it answered; the dev routes (/collective_rpc runs any worker
method) are refused without it too; /health stays open; the project's client sends the
key; `grpo-stream doctor` tells a wrong key from a right one."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from grpo_stream.serving.client import ServerHTTPError, VLLMClient, get_json, post_json
from tests.conftest import free_port

pytestmark = pytest.mark.slow

KEY = "test-key-4f1c"
PROMPT = [1, 9690, 198, 2683, 314]


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    from grpo_stream.config import ServerConfig
    from grpo_stream.serving.server import VLLMServer

    cfg = ServerConfig(max_model_len=256, startup_timeout_s=600, api_key=KEY)
    log = tmp_path_factory.mktemp("logs") / "vllm-keyed.log"
    with VLLMServer(tiny_model_dir, "policy", free_port(), cfg, log) as srv:
        assert srv.command[2] == "grpo_stream.serving.vllm_entry"
        srv.wait_healthy()  # /health answers without the key
        yield srv


def _completion_body() -> dict:
    return {"model": "policy", "prompt": PROMPT, "max_tokens": 2, "temperature": 1.0}


def _raw(url: str, method: str, key: str | None, body: dict | None = None) -> int:
    """Status of one request, with or without the key (never from the environment)."""

    async def main() -> int:
        async with VLLMClient(30, retries=0, api_key=key or "") as c:
            kw = {} if body is None else {"json": body}
            return (await c.raw(method, url, **kw))[0]

    return asyncio.run(main())


def test_completion_needs_the_key(keyed_server) -> None:
    url = f"{keyed_server.url}/v1/completions"
    assert _raw(url, "POST", None, _completion_body()) == 401
    assert _raw(url, "POST", "wrong", _completion_body()) == 401
    assert _raw(url, "POST", KEY, _completion_body()) == 200


def test_dev_routes_need_the_key_too(keyed_server) -> None:
    base = keyed_server.url
    rpc = {"method": "reload_weights", "kwargs": {"weights_path": "/nonexistent"}}
    assert _raw(f"{base}/collective_rpc", "POST", None, rpc) == 401  # never reaches the engine
    assert _raw(f"{base}/pause", "POST", None) == 401
    assert _raw(f"{base}/weight_info", "GET", None) == 401
    assert _raw(f"{base}/weight_info", "GET", KEY) == 200
    assert _raw(f"{base}/health", "GET", None) == 200


def test_the_project_client_sends_the_key(keyed_server, monkeypatch) -> None:
    async def sample(client_key: str | None) -> list:
        async with VLLMClient(60, api_key=client_key) as c:
            return await c.complete(keyed_server.url, "policy", PROMPT, 2,
                                    {"max_tokens": 2, "temperature": 1.0})  # fmt: skip

    outs = asyncio.run(sample(KEY))
    assert len(outs) == 2 and all(len(o.token_ids) == 2 for o in outs)
    monkeypatch.setenv("VLLM_API_KEY", KEY)  # the client never reads the key from os.environ
    with pytest.raises(ServerHTTPError) as refused:
        asyncio.run(sample(None))
    assert refused.value.status == 401
    monkeypatch.delenv("VLLM_API_KEY")
    status, _ = post_json(f"{keyed_server.url}/v1/completions", _completion_body())
    assert status == 401
    assert get_json(f"{keyed_server.url}/health")[0] == 200


def test_doctor_tells_a_wrong_key_from_the_right_one(keyed_server, tiny_model_dir) -> None:
    def doctor(key: str) -> subprocess.CompletedProcess:
        args = [f'server.urls=["{keyed_server.url}"]', f"server.api_key='{key}'",
                f"model.path={tiny_model_dir}", "task.use_chat_template=false"]  # fmt: skip
        return subprocess.run([sys.executable, "-m", "grpo_stream.cli", "doctor", *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    wrong = doctor("wrong")
    line = next(x for x in wrong.stdout.splitlines() if "server.urls[0]" in x)
    assert wrong.returncode == 1 and line.startswith("FAIL")
    assert "answers 401: server.api_key is missing or not the server's key" in line
    right = doctor(KEY)
    line = next(x for x in right.stdout.splitlines() if "server.urls[0]" in x)
    assert line.split()[0] == "ok", right.stdout
    assert line.endswith(f"{keyed_server.url}: healthy, dev mode, serves 'policy'")
