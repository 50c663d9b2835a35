"""Weight sync: push the learner's weights into the vLLM servers, behind one protocol.

    from grpo_stream.sync import make_weight_sync
    sync = make_weight_sync(cfg, run_dir)     # on every learner rank
    metrics = sync.push(hf_model, version, state_dict=sd)
    sync.close()

`sync.transport` picks the implementation from `TRANSPORTS`: "disk" (`disk.DiskSync`:
safetensors folder + in-place reload, CPU or GPU), "nccl" (`nccl.NCCLSync`: vLLM's NCCL
weight-transfer engine, GPU), "lora" (`lora.LoraSync`: the LoRA adapter alone, loaded
under a versioned name), "none" (`base.NoSync`). No code outside this package
branches on the name: the learner asks the sync object's traits (`needs_state_dict`,
`versions_servers`), and code without one asks `transport_traits(name)` (the data-only
table in `grpo_stream.config.transports`, below this package so that config's GPU
placement can read it; tests/unit/test_transport_traits.py keeps both true). The
protocol and `WeightSyncError` live in `base`. This package talks
to vLLM only through `grpo_stream.serving.client` and imports nothing from `learner/` or
`generator/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grpo_stream.config import Config
from grpo_stream.sync.base import NoSync, WeightSync, WeightSyncError


def _disk(cfg: Config, run_dir: str) -> WeightSync:
    from grpo_stream.sync.disk import DiskSync

    urls, key = cfg.server.resolved_urls(), cfg.server.resolved_api_key()
    return DiskSync(cfg.sync, urls, Path(run_dir) / "weights", api_key=key)


def _nccl(cfg: Config, run_dir: str) -> WeightSync:
    from grpo_stream.sync.nccl import NCCLSync
    from grpo_stream.sync.weight_source import wire_dtype_for

    wire = wire_dtype_for(cfg.server.dtype)  # the servers' dtype: bf16 servers get bf16
    key = cfg.server.resolved_api_key()
    return NCCLSync(cfg.sync, cfg.server.resolved_urls(), wire_dtype=wire, api_key=key)


def _lora(cfg: Config, run_dir: str) -> WeightSync:
    from grpo_stream.sync.lora import LoraSync

    urls, key = cfg.server.resolved_urls(), cfg.server.resolved_api_key()
    root, window = Path(run_dir) / "adapters", cfg.learner.max_staleness
    return LoraSync(cfg.sync, urls, root, cfg.model.served_name, window, api_key=key)


def _none(cfg: Config, run_dir: str) -> WeightSync:
    return NoSync()


TRANSPORTS: dict[str, Callable[[Config, str], WeightSync]] = {
    "disk": _disk,
    "nccl": _nccl,
    "lora": _lora,
    "none": _none,
}


def make_weight_sync(cfg: Config, run_dir: str) -> WeightSync:
    """The `WeightSync` for `cfg.sync.transport`, writing under `run_dir` where it must."""
    return TRANSPORTS[cfg.sync.transport](cfg, run_dir)


__all__ = ["TRANSPORTS", "NoSync", "WeightSync", "WeightSyncError", "make_weight_sync"]
