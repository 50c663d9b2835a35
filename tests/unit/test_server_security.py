"""The API key (issue 12, security): a non-loopback server needs one; it reaches vLLM as
VLLM_API_KEY (not in argv), the config hands it to every client (never os.environ), and
`grpo_stream.serving.vllm_entry`
makes vLLM's own key check cover the dev routes too (stock vLLM guards only /v1...).
The real server's answers are in tests/integration/test_api_key.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grpo_stream.config import ConfigError, ServerConfig
from grpo_stream.serving.server import build_command, build_env, check_host


def test_remote_host_needs_a_key_unless_the_network_is_trusted(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"server.host = '0.0.0.0' needs server.api_key"):
        check_host(ServerConfig(host="0.0.0.0"))
    check_host(ServerConfig(host="0.0.0.0", api_key="k"))
    check_host(ServerConfig(host="0.0.0.0", allow_remote_dev_mode=True))  # kept working
    monkeypatch.setenv("H8_KEY", "from-env")
    check_host(ServerConfig(host="10.1.2.3", api_key_env="H8_KEY"))
    monkeypatch.delenv("H8_KEY")
    with pytest.raises(ConfigError, match=r"server.api_key_env = 'H8_KEY'"):
        check_host(ServerConfig(host="10.1.2.3", api_key_env="H8_KEY"))


def test_key_reaches_vllm_through_its_environment_not_argv() -> None:
    cfg = ServerConfig(host="0.0.0.0", api_key="s3cret")
    cmd = build_command(Path("m"), "policy", 8000, cfg)
    assert cmd[1:3] == ["-m", "grpo_stream.serving.vllm_entry"]
    assert not any("s3cret" in a for a in cmd)  # argv shows in `ps` and in the server log
    assert build_env(cfg, base={})["VLLM_API_KEY"] == "s3cret"
    plain = ServerConfig()
    assert (
        build_command(Path("m"), "policy", 8000, plain)[2] == "vllm.entrypoints.openai.api_server"
    )
    assert "VLLM_API_KEY" not in build_env(plain, base={})


def test_cli_hands_the_key_to_every_client(monkeypatch) -> None:
    from grpo_stream import cli
    from grpo_stream.serving.client import VLLMClient

    monkeypatch.setenv("VLLM_API_KEY", "before")
    monkeypatch.setenv("H8_KEY", "k-from-env")
    args = cli.build_parser().parse_args(["serve", "server.api_key_env='H8_KEY'"])
    cfg = cli._load(args)
    assert cfg.server.resolved_api_key() == "k-from-env"
    assert os.environ["VLLM_API_KEY"] == "before"  # the CLI leaves os.environ alone
    key = cfg.server.resolved_api_key()  # what every client is handed
    assert VLLMClient(api_key=key)._headers == {"Authorization": "Bearer k-from-env"}
    assert VLLMClient()._headers == {}  # never from the environment
    assert cfg.server.key_env() == {"H8_KEY": "k-from-env"}  # what `run`'s children get


def test_config_fields_are_described() -> None:
    fields = ServerConfig.model_fields
    assert "Authorization: Bearer" in fields["api_key"].description
    assert "environment variable" in fields["api_key_env"].description


@pytest.fixture
def guarded_app():
    """vLLM's middleware module with the all-routes guard, around a tiny ASGI app."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient
    from vllm.entrypoints.serve.middleware import authenticate

    from grpo_stream.serving.vllm_entry import guard_every_route

    original = authenticate.AuthenticationMiddleware
    try:
        guard = guard_every_route()
        assert authenticate.AuthenticationMiddleware is guard  # what vLLM's app will add

        def ok(request):
            return PlainTextResponse("ok")

        paths = ["/health", "/metrics", "/v1/completions", "/collective_rpc", "/pause",
                 "/weight_info", "/update_weight_version"]  # fmt: skip
        app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in paths])
        app.add_middleware(guard, tokens=["right"])
        yield TestClient(app)
    finally:
        authenticate.AuthenticationMiddleware = original


def test_guard_covers_the_dev_routes(guarded_app) -> None:
    for path in ("/v1/completions", "/collective_rpc", "/pause", "/weight_info",
                 "/update_weight_version"):  # fmt: skip
        assert guarded_app.post(path).status_code == 401, path
        assert guarded_app.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert guarded_app.post(path, headers={"Authorization": "Bearer right"}).status_code == 200
    assert guarded_app.get("/health").status_code == 200  # probes stay open
    assert guarded_app.get("/metrics").status_code == 200


def test_stock_vllm_guards_only_the_openai_prefixes() -> None:
    """What the README says about stock vLLM: its key leaves the dev routes open."""
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

    assert GUARDED_PREFIX == ("/v1", "/v2", "/inference", "/cohere")
    assert not any(p.startswith(GUARDED_PREFIX) for p in ("/collective_rpc", "/pause"))
