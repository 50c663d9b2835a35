"""NCCL weight sync (GPU): vLLM's own weight-transfer engine, no disk in between.

    sync = NCCLSync(cfg.sync, cfg.server.resolved_urls())   # on EVERY trainer rank
    metrics = sync.push(model, version)                      # on every rank; {} off rank 0

The servers must be started with `--weight-transfer-config '{"backend":"nccl"}'` (and in
dev mode, for /pause, /resume, /reset_prefix_cache, /get_world_size). The trainer side is
vLLM's `NCCLTrainerWeightTransferEngine`, built by `WeightTransferTrainerFactory.trainer_init`
from an `NCCLTrainerInitInfo`; it drives the RL routes through a `VLLMWeightSyncClient`
(here `_ServersClient`, which fans `HTTPVLLMWeightSyncClient` out over every server) and
broadcasts every parameter from trainer rank 0 to all inference workers in one NCCL group.

First push (rendezvous): rank 0 asks each server for its worker count (GET
/get_world_size), builds a group of 1 + Σ workers, and calls /init_weight_transfer_engine on
all servers at once (server k's workers get NCCL ranks after those of servers < k), while
it opens its own endpoint as rank 0 on `master_address:master_port`.

Every push on rank 0: `/pause?mode=M` on all servers → `/start_weight_update` →
`/update_weights` (the workers receive) concurrently with the trainer-side broadcast →
`/finish_weight_update {weight_version: N}` → `/reset_prefix_cache` → `/resume`. The pause
is needed: between start and finish vLLM's layerwise reload holds the model in a partial
state. `sync_pause_s` is the longest pause → resume across servers.

Weights travel under Hugging Face names (`named_parameters()` of the HF model; a
`ShardedPolicy` is unwrapped), optionally cast to `wire_dtype` (e.g. the servers' bf16,
halving the bytes). With FSDP2 the parameters are DTensors: iterating them all-gathers
(`full_tensor()`, a collective), which is why `push` runs on every rank; only rank 0 talks
to the servers. vLLM is imported lazily (only on the first push).

Every server must be able to reach `master_address` (default: loopback when all servers
are local, otherwise this host's address on the route to the first server) and NCCL needs
distinct GPUs for the trainer and each worker.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import torch

from grpo_stream.config import SyncConfig
from grpo_stream.generator.client import VLLMClient
from grpo_stream.sync.disk import WeightSyncError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _fan_out(urls: list[str], fn) -> list:
    """fn(i, url) on every server at once (NCCL calls block until all peers arrive)."""
    with ThreadPoolExecutor(max_workers=max(len(urls), 1)) as pool:
        futures = [pool.submit(fn, i, u) for i, u in enumerate(urls)]
        out = []
        for u, f in zip(urls, futures, strict=True):
            try:
                out.append(f.result())
            except Exception as e:
                raise WeightSyncError(f"{u}: weight transfer call failed: {e}") from e
        return out


class _ServersClient:
    """A `VLLMWeightSyncClient` (vLLM's structural protocol) over several servers."""

    def __init__(self, urls: list[str], worker_counts: list[int], timeout_s: float):
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient

        self.urls = urls
        self.clients = [HTTPVLLMWeightSyncClient(u, timeout=timeout_s) for u in urls]
        # server k's workers follow the trainer (rank 0) and the workers of servers < k
        self.offsets = [sum(worker_counts[:k]) for k in range(len(urls))]
        self.version: str | None = None  # attached to the next finish_weight_update

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        base = int(init_info["rank_offset"])
        _fan_out(
            self.urls,
            lambda i, _: self.clients[i].init_weight_transfer_engine(
                {**init_info, "rank_offset": base + self.offsets[i]}
            ),
        )

    def start_weight_update(self) -> None:
        _fan_out(self.urls, lambda i, _: self.clients[i].start_weight_update())

    def update_weights(self, update_info) -> None:
        _fan_out(self.urls, lambda i, _: self.clients[i].update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        v = weight_version if weight_version is not None else self.version
        _fan_out(self.urls, lambda i, _: self.clients[i].finish_weight_update(v))

    def shutdown_weight_transfer_engine(self) -> None:
        _fan_out(self.urls, lambda i, _: self.clients[i].shutdown_weight_transfer_engine())


def _hf_source(module: torch.nn.Module, wire_dtype: torch.dtype | None):
    """vLLM `ModuleSource` over the HF model, optionally casting to `wire_dtype`."""
    from vllm.distributed.weight_transfer import ModuleSource, ParamMeta
    from vllm.distributed.weight_transfer.base import materialize_full_tensor

    class CastSource(ModuleSource):
        def metadata(self) -> list:
            return [ParamMeta(m.name, wire_dtype or m.dtype, m.shape) for m in super().metadata()]

        def __iter__(self):
            for name, p in self._module.named_parameters():
                t = materialize_full_tensor(p.detach())  # all-gathers a DTensor shard
                yield name, t if wire_dtype is None else t.to(wire_dtype)

    return CastSource(module)


def worker_count(url: str, timeout_s: float) -> int:
    """Inference workers behind one server (TP × PP × DP), from GET /get_world_size."""
    try:
        with urllib.request.urlopen(f"{url}/get_world_size", timeout=timeout_s) as r:
            n = json.loads(r.read())["world_size"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightSyncError(f"{url}/get_world_size: {e} (dev mode server needed)") from e
    if not isinstance(n, int) or n < 1:
        raise WeightSyncError(f"{url}/get_world_size: world_size {n!r} is not a positive int")
    return n


def local_address_for(urls: list[str]) -> str:
    """The address the servers can reach this trainer on (loopback if all are local)."""
    hosts = [urlparse(u).hostname or "127.0.0.1" for u in urls]
    if all(h in LOOPBACK for h in hosts):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((hosts[0], 9))  # UDP: no packet is sent, only the route is chosen
        return s.getsockname()[0]


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class NCCLSync:
    def __init__(
        self,
        cfg: SyncConfig,
        urls: list[str],
        rank: int | None = None,
        master_address: str | None = None,
        master_port: int | None = None,
        wire_dtype: torch.dtype | None = None,
        packed: bool = True,
    ):
        if not urls:
            raise WeightSyncError("sync.transport = 'nccl' needs at least one server url")
        self.cfg, self.urls = cfg, [u.rstrip("/") for u in urls]
        self.rank = _current_rank() if rank is None else rank
        self.master_address, self.master_port = master_address, master_port
        self.wire_dtype, self.packed = wire_dtype, packed
        self.engine = self.client = self._module = None

    @property
    def is_sender(self) -> bool:
        return self.rank == 0

    def _connect(self, module: torch.nn.Module) -> None:
        """Rendezvous with every server's workers (all trainer ranks call this)."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        if not torch.cuda.is_available():
            raise WeightSyncError("sync.transport = 'nccl' needs a CUDA device (use 'disk' on CPU)")
        if self.is_sender:
            counts = [worker_count(u, self.cfg.timeout_s) for u in self.urls]
            address = self.master_address or local_address_for(self.urls)
            port = self.master_port or free_port(address)
            self.client = _ServersClient(self.urls, counts, self.cfg.timeout_s)
        else:  # non-senders only join the trainer-side all-gathers: no endpoint
            counts, address, port = [], "unused", 0
        info = NCCLTrainerInitInfo(
            master_address=address,
            master_port=port,
            world_size=1 + sum(counts),
            packed=self.packed,
            rank=self.rank,
        )
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=self.client, source=_hf_source(module, self.wire_dtype)
        )
        self._module = module

    def push(self, model, version: int, state_dict=None) -> dict[str, float]:
        """`state_dict` is unused: NCCL streams the (gathered) parameters themselves."""
        from grpo_stream.learner.distributed import unwrap

        module = unwrap(model)
        t0 = time.perf_counter()
        if self.engine is None:
            self._connect(module)
        elif module is not self._module:
            self.engine.source, self._module = _hf_source(module, self.wire_dtype), module
        t1 = time.perf_counter()
        if not self.is_sender:
            self.engine.send_weights()  # joins the all-gathers only
            return {}
        self.client.version = str(version)
        pause_s, transfer_s = asyncio.run(self._paused_transfer())
        return {
            "sync_connect_s": t1 - t0,
            "sync_transfer_s": transfer_s,
            "sync_pause_s": pause_s,
            "sync_s": time.perf_counter() - t0,
        }

    async def _paused_transfer(self) -> tuple[float, float]:
        async with VLLMClient(self.cfg.timeout_s) as http:
            t0 = time.perf_counter()
            try:
                await asyncio.gather(*(http.pause(u, self.cfg.pause_mode) for u in self.urls))
                t1 = time.perf_counter()
                # blocking NCCL + HTTP round trip, off the event loop
                await asyncio.to_thread(self.engine.send_weights)
                transfer_s = time.perf_counter() - t1
                await asyncio.gather(*(http.reset_prefix_cache(u) for u in self.urls))
            finally:
                await asyncio.gather(*(http.resume(u) for u in self.urls))
            return time.perf_counter() - t0, transfer_s

    def close(self) -> None:
        """Release the NCCL group on both sides (the servers keep serving)."""
        if self.engine is None:
            return
        try:
            if self.is_sender:
                self.client.shutdown_weight_transfer_engine()
        finally:
            self.engine.shutdown()
            self.engine = self.client = self._module = None
