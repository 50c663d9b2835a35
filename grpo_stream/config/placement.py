"""Which GPUs the learner and each local vLLM server get, when `grpo-stream run` starts
them all on one machine.

    plan = plan_gpus(cfg)                  # ConfigError when the split cannot work
    env = visible_devices(plan.servers[i]) # {"CUDA_VISIBLE_DEVICES": "1"} or {}

The split is set in the config: `server.gpus` (one list of GPU ids per server, each
server's CUDA_VISIBLE_DEVICES), `learner.gpus` (the learner's CUDA_VISIBLE_DEVICES, one
GPU per rank) or `learner.device = "cuda:N"`. Unset, a server sees every GPU and uses
GPU 0, and the learner uses GPU 0 (GPUs 0..n-1 for n ranks).

Refused, with the fields to change:
* two servers on one GPU (each would claim 90% of its memory; NCCL also refuses two ranks
  of its group on one device);
* with `sync.transport = "nccl"`, the learner on a server's GPU (same reason);
* with disk sync, the learner sharing a server's GPU while
  `server.gpu_memory_utilization` is unset (vLLM would take 90% of the memory).

Nothing is checked on a CPU setup: GPUs are in play only when a `gpus` field is set,
`learner.device` names CUDA, or the sync is NCCL. Imports nothing heavy (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_stream.config import Config, ConfigError
from grpo_stream.config.transports import transport_traits


@dataclass(frozen=True)
class GpuPlan:
    """CUDA_VISIBLE_DEVICES per process; None: inherit this process's environment."""

    learner: list[int] | None
    servers: list[list[int] | None]


def visible_devices(gpus: list[int] | None) -> dict[str, str]:
    """The environment entry that confines a process to `gpus` ({} for None)."""
    return {} if gpus is None else {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}


def _check_ids(field: str, ids: list[int]) -> None:
    if not ids:
        raise ConfigError(f"{field}: an empty GPU list (give at least one GPU id)")
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise ConfigError(f"{field} = {ids}: GPU ids must be distinct and >= 0")


def learner_gpus(cfg: Config) -> list[int]:
    """The physical GPUs the learner's ranks use ([] on CPU)."""
    lc = cfg.learner
    if lc.device == "cpu":
        return []
    index = lc.device.partition(":")[2]
    if lc.gpus is not None:
        if index:
            raise ConfigError(
                f"learner.device = {lc.device!r} and learner.gpus are both set: give the "
                'GPUs in learner.gpus and set learner.device = "cuda"'
            )
        _check_ids("learner.gpus", lc.gpus)
        if len(lc.gpus) != lc.num_processes:
            raise ConfigError(
                f"learner.gpus = {lc.gpus}: one GPU per learner rank, and "
                f"learner.num_processes = {lc.num_processes}"
            )
        return list(lc.gpus)
    if index:
        if not index.isdigit():
            raise ConfigError(f"learner.device = {lc.device!r}: expected cuda:N (N a GPU id)")
        if lc.num_processes > 1:
            raise ConfigError(
                f"learner.device = {lc.device!r} names one GPU for "
                f"{lc.num_processes} learner ranks: use learner.gpus instead"
            )
        return [int(index)]
    return list(range(lc.num_processes))


def server_gpus(cfg: Config) -> list[list[int]]:
    """The physical GPUs of each local server (unset: GPU 0 each, vLLM's default)."""
    sc = cfg.server
    if sc.gpus is None:
        return [[0] for _ in range(sc.num_servers)]
    if len(sc.gpus) != sc.num_servers:
        raise ConfigError(
            f"server.gpus has {len(sc.gpus)} GPU lists for server.num_servers = "
            f"{sc.num_servers}: give one list per server"
        )
    for i, ids in enumerate(sc.gpus):
        _check_ids(f"server.gpus[{i}]", ids)
    return [list(g) for g in sc.gpus]


def _gpus_in_play(cfg: Config) -> bool:
    return (
        cfg.server.gpus is not None
        or cfg.learner.gpus is not None
        or cfg.learner.device.startswith("cuda")
        or transport_traits(cfg.sync.transport).nccl_group
    )


def _check_servers_apart(servers: list[list[int]]) -> None:
    owner: dict[int, int] = {}
    for i, ids in enumerate(servers):
        for g in ids:
            if g in owner:
                raise ConfigError(
                    f"server.gpus: servers {owner[g]} and {i} both use GPU {g}; give each "
                    "server its own GPUs, e.g. server.gpus = [[1], [2]]"
                )
            owner[g] = i


def _check_learner_apart(cfg: Config, learner: list[int], servers: list[list[int]]) -> None:
    for i, ids in enumerate(servers):
        shared = sorted(set(learner) & set(ids))
        if not shared:
            continue
        where = f"the learner (GPUs {learner}) and server {i} (GPUs {ids}) share GPU {shared[0]}"
        if transport_traits(cfg.sync.transport).nccl_group:
            raise ConfigError(
                f"sync.transport = {cfg.sync.transport!r}: {where}, and NCCL refuses two "
                "ranks of one group "
                "on one GPU; give them distinct GPUs (learner.gpus or learner.device, and "
                'server.gpus), or use sync.transport = "disk"'
            )
        if cfg.server.gpu_memory_utilization is None:
            raise ConfigError(
                f"{where}: set server.gpu_memory_utilization (e.g. 0.4) so vLLM leaves the "
                "learner memory (unset, it takes 90%)"
            )


def plan_gpus(cfg: Config) -> GpuPlan:
    """Check the learner/server GPU split of a one-machine `run`; return each process's
    CUDA_VISIBLE_DEVICES. Servers named by `server.urls` run elsewhere: not planned."""
    local = not cfg.server.urls
    if not _gpus_in_play(cfg):
        return GpuPlan(None, [None] * (cfg.server.num_servers if local else 0))
    learner = learner_gpus(cfg)
    if not local:
        return GpuPlan(cfg.learner.gpus, [])
    servers = server_gpus(cfg)
    _check_servers_apart(servers)
    _check_learner_apart(cfg, learner, servers)
    per_server = cfg.server.gpus or [None] * cfg.server.num_servers
    return GpuPlan(cfg.learner.gpus, list(per_server))
