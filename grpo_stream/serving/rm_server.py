"""Start reward-model servers: stock vLLM with its pooling runner on a one-label classifier.

    check_classifier(cfg.reward_model.path)          # ConfigError unless a 1-label classifier
    servers = launch_rm_servers(cfg, log_dir)        # reward_model.num_servers, from .port
    grpo-stream serve --reward-model --config configs/cpu-rm.toml   # serve them alone

A `*ForSequenceClassification` model runs under `--runner pooling --convert classify`
(vLLM 0.32 would infer both from the architecture's suffix; they are given so a wrong
model fails loudly instead of being served as something else). The servers share the
policy servers' host, API key and CPU settings (`server.*`); `reward_model.port`,
`dtype` and `max_len` are their own. They answer `POST /classify` (see
`grpo_stream.generator.reward_model` for the request the generator sends).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from grpo_stream.config import Config, ConfigError, ServerConfig
from grpo_stream.serving.server import (
    VLLMServer,
    check_host,
    check_port_free,
    stop_servers,
)


def check_classifier(path: str | None) -> dict:
    """The folder's config.json, if it is a one-label sequence classifier; else ConfigError."""
    if not path:
        raise ConfigError("reward_model.path: not set (a one-label classifier folder)")
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"reward_model.path: {cfg_file} not found (a Hugging Face folder)")
    hf = json.loads(cfg_file.read_text())
    archs = hf.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(
            f"reward_model.path: {path} is a {', '.join(archs) or 'model without architectures'}"
            ", not a *ForSequenceClassification reward model (train one with "
            "`grpo-stream rm train`)"
        )
    labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
    if labels != 1:
        raise ConfigError(
            f"reward_model.path: {path} has {labels} labels; a reward model has one "
            "(num_labels = 1: its logit is the score)"
        )
    return hf


def rm_server_config(cfg: Config) -> ServerConfig:
    """The policy servers' rules (host, key, CPU settings) with the reward model's own
    ports, dtype and length; no weight transfer, no log file of the policy's."""
    rm = cfg.reward_model
    return cfg.server.model_copy(
        update={
            "urls": [],
            "num_servers": rm.num_servers,
            "port": rm.port,
            "dtype": rm.dtype,
            "max_model_len": rm.max_len,
            "weight_transfer_backend": None,
            "log_file": None,
            "gpus": None,
            "extra_args": [],
        }  # fmt: skip
    )


def build_rm_command(model_dir: Path, served_name: str, port: int, cfg: ServerConfig) -> list[str]:
    """The argv of one pooling server (the launcher's, without the sampling flags)."""
    check_host(cfg)
    entry = "vllm.entrypoints.openai.api_server"
    if cfg.resolved_api_key():  # then grpo_stream.serving.vllm_entry guards the dev routes too
        entry = "grpo_stream.serving.vllm_entry"
    cmd = [sys.executable, "-m", entry, "--model", str(model_dir),
           "--served-model-name", served_name, "--host", cfg.host, "--port", str(port),
           "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len),
           "--runner", "pooling", "--convert", "classify"]  # fmt: skip
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    return cmd


class RewardModelServer(VLLMServer):
    """One reward-model server child (start, wait_healthy, stop: as `VLLMServer`)."""

    def __init__(self, model_dir: Path, served_name: str, port: int, cfg: ServerConfig,
                 log_file: Path | None = None) -> None:  # fmt: skip
        super().__init__(model_dir, served_name, port, cfg, log_file)
        self.command = build_rm_command(self.model_dir, served_name, port, cfg)


def make_rm_servers(cfg: Config, log_dir: Path) -> list[RewardModelServer]:
    """The `reward_model.num_servers` servers (not started), checked: a classifier."""
    check_classifier(cfg.reward_model.path)
    scfg = rm_server_config(cfg)
    return [
        RewardModelServer(
            Path(cfg.reward_model.path),
            cfg.reward_model.served_name,
            scfg.port + i,
            scfg,
            Path(log_dir) / f"vllm-rm-{i}.log",
        )  # fmt: skip
        for i in range(scfg.num_servers)
    ]


def launch_rm_servers(cfg: Config, log_dir: Path) -> list[RewardModelServer]:
    """Start the reward servers and wait for all; on failure stop those started."""
    servers = make_rm_servers(cfg, log_dir)
    for s in servers:
        check_port_free(s.cfg.host, s.port)
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy()
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def serve_reward_model(cfg: Config, stop: threading.Event) -> int:
    """`grpo-stream serve --reward-model`: the reward servers alone, until `stop`."""
    log_dir = Path(cfg.run.run_dir or cfg.run.output_dir) / "logs"
    servers = launch_rm_servers(cfg, log_dir)
    try:
        for s in servers:
            print(f"URL {s.url}", flush=True)
        print(f"[serve] {len(servers)} reward-model server(s) ready", flush=True)
        while not stop.wait(1.0):
            if any(not s.is_alive() for s in servers):
                print("[serve] a reward-model server exited; see its log", flush=True)
                return 1
    finally:
        stop_servers(servers)
    return 0
