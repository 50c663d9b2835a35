"""NCCL weight sync (GPU): vLLM's own weight-transfer engine, no disk in between.

    sync = NCCLSync(cfg.sync, urls, api_key=cfg.server.resolved_api_key())  # EVERY rank
    metrics = sync.push(model, version)                      # on every rank; {} off rank 0

The servers must be started with `--weight-transfer-config '{"backend":"nccl"}'` (and in
dev mode, for /pause, /resume, /reset_prefix_cache, /get_world_size). The trainer side is
vLLM's `NCCLTrainerWeightTransferEngine`, built by `WeightTransferTrainerFactory.trainer_init`
from an `NCCLTrainerInitInfo`; it drives the RL routes through a `VLLMWeightSyncClient`
(here `_ServersClient`, which fans those routes out over every server through the
project's `serving.client.BlockingClient`: one deadline per call, errors naming the server) and
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

A failure after `/start_weight_update` is never followed by `/resume`: the servers' layers
may sit half-updated, and vLLM documents the transfer group as unusable after a failed
transfer (`NCCLTrainerWeightTransferEngine.send_weights`: "the transfer group is unusable
either way and the caller has to tear it down"). `push` raises `WeightSyncError` naming
the servers, leaves them paused for the supervisor to restart, and refuses further
pushes; `close()` then only drops the trainer side. (A failed `/pause` leaves the weights
whole: the servers that did pause are resumed. A failed `/resume` comes after whole
weights and version, but that server may still be paused: it is named the same way.)
The whole sync, pause to resume, runs within `sync.timeout_s`: past it the push fails
the same way, naming the limit. The send runs in a daemon thread (`in_daemon_thread`),
so a broadcast stuck in NCCL cannot hold the push, nor the process's exit, past it.

Weights travel under Hugging Face names (`named_parameters()` of the HF model the
learner passes, a `ShardedPolicy` already unwrapped) through
`sync.weight_source.hf_source` (one class for vLLM 0.32 and 0.33), cast to `wire_dtype`
(`make_weight_sync` passes `wire_dtype_for(server.dtype)`: bf16 to bf16 servers, half
the bytes of fp32). Every NCCL call, including the send in
its worker thread, runs with the weights' CUDA device current (`on_device`): vLLM's
trainer side opens its communicator on the current device, and a new thread's is 0.
With FSDP2 the parameters are DTensors: iterating them all-gathers (`full_tensor()`, a
collective), which is why `push` runs on every rank; only rank 0 talks to the servers.
vLLM is imported lazily (only on the first push).

Every server must be able to reach `master_address` (default: loopback when all servers
are local, otherwise this host's address on the route to the first server) and NCCL needs
distinct GPUs for the trainer and each worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import torch

from grpo_stream.config import SyncConfig
from grpo_stream.config.transports import transport_traits
from grpo_stream.core import metric_names as M
from grpo_stream.serving.client import BlockingClient, VLLMClient, VLLMError
from grpo_stream.sync.base import WeightSyncError, current_rank
from grpo_stream.sync.weight_source import hf_source

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

    def __init__(
        self,
        urls: list[str],
        worker_counts: list[int],
        timeout_s: float,
        api_key: str | None = None,
    ):
        self.urls = urls
        # no retries: these routes are not idempotent (a second init or update would
        # wait in NCCL for peers that never come)
        self.http = BlockingClient(timeout_s, retries=0, api_key=api_key)
        # server k's workers follow the trainer (rank 0) and the workers of servers < k
        self.offsets = [sum(worker_counts[:k]) for k in range(len(urls))]
        self.version: str | None = None  # attached to the next finish_weight_update

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        base = int(init_info["rank_offset"])
        _fan_out(
            self.urls,
            lambda i, u: self.http.post(
                u,
                "/init_weight_transfer_engine",
                {"init_info": {**init_info, "rank_offset": base + self.offsets[i]}},
            ),
        )

    def start_weight_update(self) -> None:
        _fan_out(self.urls, lambda i, u: self.http.post(u, "/start_weight_update"))

    def update_weights(self, update_info) -> None:
        # NCCL's update info is JSON already (names, dtype names, shapes)
        body = {"update_info": update_info}
        _fan_out(self.urls, lambda i, u: self.http.post(u, "/update_weights", body))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        v = weight_version if weight_version is not None else self.version
        body = None if v is None else {"weight_version": v}
        _fan_out(self.urls, lambda i, u: self.http.post(u, "/finish_weight_update", body))

    def shutdown_weight_transfer_engine(self) -> None:
        _fan_out(self.urls, lambda i, u: self.http.post(u, "/shutdown_weight_transfer_engine"))


async def in_daemon_thread(fn, *args):
    """`fn(*args)` in a daemon thread, awaited. Not `asyncio.to_thread`: a send blocked in
    NCCL cannot be cancelled, and past the deadline `asyncio.run` (and the interpreter's
    exit) would wait for the executor's thread; a daemon thread is left behind instead."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result, error) -> None:
        if done.done():  # the deadline passed: nobody waits for it
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except Exception as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is closed (the push returned)
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="nccl-send", daemon=True).start()
    return await done


def sender_device(module: torch.nn.Module) -> torch.device:
    """The CUDA device the trainer's weights live on (where NCCL must run), with its
    index made explicit: a new thread's current device is 0, whatever this one's is."""
    p = next(module.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    if dev.type != "cuda":
        raise WeightSyncError(
            f"sync.transport = 'nccl': the learner's weights are on {dev}, not a CUDA "
            "device (set learner.device to cuda, or use sync.transport = 'disk')"
        )
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def on_device(device: torch.device, fn, *args):
    """`fn(*args)` with `device` current in THIS thread (vLLM's trainer-side NCCL uses
    the current device; `asyncio.to_thread` workers start on device 0)."""
    with torch.cuda.device(device):
        return fn(*args)


def worker_count(url: str, timeout_s: float, api_key: str | None = None) -> int:
    """Inference workers behind one server (TP × PP × DP), from GET /get_world_size."""
    try:
        return BlockingClient(timeout_s, api_key=api_key).world_size(url)
    except VLLMError as e:
        raise WeightSyncError(f"{e} (a dev mode server is needed)") from e


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


class NCCLSync:
    """`WeightSync` over vLLM's NCCL weight-transfer engine; construct and push on every
    trainer rank (only rank 0 talks to the servers)."""

    needs_state_dict = False  # the parameters themselves are streamed
    versions_servers = transport_traits("nccl").versions_servers

    def __init__(
        self,
        cfg: SyncConfig,
        urls: list[str],
        rank: int | None = None,
        master_address: str | None = None,
        master_port: int | None = None,
        wire_dtype: torch.dtype | None = None,
        packed: bool = True,
        api_key: str | None = None,  # server.resolved_api_key(), sent on every call
    ):
        if not urls:
            raise WeightSyncError("sync.transport = 'nccl' needs at least one server url")
        self.cfg, self.urls = cfg, [u.rstrip("/") for u in urls]
        self.rank = current_rank() if rank is None else rank
        self.master_address, self.master_port = master_address, master_port
        self.wire_dtype, self.packed, self.api_key = wire_dtype, packed, api_key
        self.engine = self.client = self._module = None
        self.device: torch.device | None = None
        self.failed: str | None = None  # why the transfer group is unusable

    @property
    def is_sender(self) -> bool:
        return self.rank == 0

    def _connect(self, module: torch.nn.Module) -> None:
        """Rendezvous with every server's workers (all trainer ranks call this)."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        if not torch.cuda.is_available():
            raise WeightSyncError("sync.transport = 'nccl' needs a CUDA device (use 'disk' on CPU)")
        self.device = sender_device(module)
        if self.is_sender:
            counts = [worker_count(u, self.cfg.timeout_s, self.api_key) for u in self.urls]
            address = self.master_address or local_address_for(self.urls)
            port = self.master_port or free_port(address)
            self.client = _ServersClient(self.urls, counts, self.cfg.timeout_s, self.api_key)
        else:  # non-senders only join the trainer-side all-gathers: no endpoint
            counts, address, port = [], "unused", 0
        info = NCCLTrainerInitInfo(
            master_address=address,
            master_port=port,
            world_size=1 + sum(counts),
            packed=self.packed,
            rank=self.rank,
        )
        self.engine = on_device(
            self.device,
            lambda: WeightTransferTrainerFactory.trainer_init(
                info, client=self.client, source=hf_source(module, self.wire_dtype)
            ),
        )
        self._module = module

    def push(self, model, version: int, state_dict=None) -> dict[str, float]:
        """`model`: the Hugging Face model (its parameters may be FSDP2 DTensors);
        `state_dict` is unused: NCCL streams the (gathered) parameters themselves."""
        if self.failed:
            raise WeightSyncError(f"an earlier weight transfer failed ({self.failed})")
        module = model
        t0 = time.perf_counter()
        if self.engine is None:
            self._connect(module)
        elif module is not self._module:
            self.engine.source, self._module = hf_source(module, self.wire_dtype), module
        t1 = time.perf_counter()
        if not self.is_sender:
            on_device(self.device, self.engine.send_weights)  # joins the all-gathers only
            return {}
        self.client.version = str(version)
        pause_s, transfer_s = asyncio.run(self._within_deadline(version))
        return {
            M.SYNC_CONNECT_S: t1 - t0,
            M.SYNC_TRANSFER_S: transfer_s,
            M.SYNC_PAUSE_S: pause_s,
            M.SYNC_S: time.perf_counter() - t0,
        }

    async def _within_deadline(self, version: int) -> tuple[float, float]:
        """The paused transfer, all of it (pause, transfer, version, resume) within
        `sync.timeout_s`. Past it the servers may be paused on half-sent weights and the
        group is unusable: the push fails naming them, and refuses further pushes."""
        try:
            return await asyncio.wait_for(self._paused_transfer(), self.cfg.timeout_s)
        except TimeoutError:
            limit = f"sync.timeout_s={self.cfg.timeout_s:g}s"
            self.failed = f"no end within {limit}"
            raise WeightSyncError(
                f"the sync of version {version} to {', '.join(self.urls)} did not finish "
                f"within {limit} (pause, transfer, version, resume); the servers are left "
                "paused, not resumed (their weights may be half-updated: restart them)"
            ) from None

    async def _paused_transfer(self) -> tuple[float, float]:
        """Pause → transfer → reset prefix caches → resume; (paused s, transfer s).
        `/resume` only after everything succeeded (see the module docstring)."""
        async with VLLMClient(self.cfg.timeout_s, api_key=self.api_key) as http:
            t0 = time.perf_counter()
            await self._pause_all(http)
            t1 = time.perf_counter()
            try:
                # blocking NCCL + HTTP round trip, off the event loop
                await in_daemon_thread(on_device, self.device, self.engine.send_weights)
                transfer_s = time.perf_counter() - t1
                await asyncio.gather(*(http.reset_prefix_cache(u) for u in self.urls))
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                raise WeightSyncError(
                    f"weight transfer to {', '.join(self.urls)} failed after "
                    "/start_weight_update; the servers are left paused, not resumed (their "
                    f"weights may be half-updated and the NCCL group is unusable: restart "
                    f"them): {self.failed}"
                ) from e
            await self._resume_all(http)
            return time.perf_counter() - t0, transfer_s

    async def _resume_all(self, http: VLLMClient) -> None:
        """Resume every server (the new weights and version are whole); raise naming
        each server whose /resume failed (it may still be paused: restart it)."""
        results = await asyncio.gather(*(http.resume(u) for u in self.urls), return_exceptions=True)
        errors = [(u, r) for u, r in zip(self.urls, results, strict=True) if r is not None]
        if errors:
            v = self.client.version
            self.failed = "; ".join(f"{u}: /resume failed after version {v} was sent: {r}"
                                    for u, r in errors)  # fmt: skip
            # no more pushes, and close() leaves the servers' side alone
            raise WeightSyncError(f"{self.failed} (restart it)") from errors[0][1]

    async def _pause_all(self, http: VLLMClient) -> None:
        """Pause every server; if any pause fails, resume the paused ones (their weights
        are untouched) and raise naming the servers that failed."""
        jobs = (http.pause(u, self.cfg.pause_mode) for u in self.urls)
        results = await asyncio.gather(*jobs, return_exceptions=True)
        failed = [f"{u}: {r}" for u, r in zip(self.urls, results, strict=True) if r is not None]
        if failed:
            paused = [u for u, r in zip(self.urls, results, strict=True) if r is None]
            await asyncio.gather(*(http.resume(u) for u in paused), return_exceptions=True)
            raise WeightSyncError(f"/pause failed, no weights sent: {'; '.join(failed)}")

    def published(self, version: int) -> None:
        """No folder is written: the weights go over NCCL."""
        return None

    def close(self) -> None:
        """Release the NCCL group on both sides (the servers keep serving); idempotent.
        After a failed transfer only the trainer side is dropped: the servers' group is
        unusable and they await a restart."""
        engine, client, self.engine, self.client, self._module = (
            self.engine, self.client, None, None, None
        )  # fmt: skip
        if engine is None:
            return
        try:
            if self.is_sender and client is not None and not self.failed:
                client.shutdown_weight_transfer_engine()
        finally:
            try:
                engine.shutdown()
            except Exception:
                if not self.failed:  # after a failure the group may not tear down cleanly
                    raise
